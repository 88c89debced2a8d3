"""Console output of the command-line entry points: quiet library logs, one line per failure.

Library logs (Orbax's and absl's, with the tracebacks Orbax's and tensorstore's
background threads log or print when a save fails) go to
`WORKDIR/logs/lmstack.log` during a run (`library_logs_to`), not to the
console, which keeps to progress lines and one `error:` line.
"""

import contextlib
import logging
import os
import sys
import threading

from absl import flags

from lmstack import errors


def quiet_logging():
  """Keeps the console to progress lines: library loggers at WARNING unless --verbosity was given."""
  if flags.FLAGS["verbosity"].present:
    return
  for name in ("absl", "jax", "orbax"):
    logging.getLogger(name).setLevel(logging.WARNING)
  logging.getLogger().setLevel(logging.WARNING)


def fail(message):
  """Exits after one line on stderr, written in one call so that no other thread's output lands inside it.

  An error exits 1 after `error: <message>`; a Preempted (lmstack.errors) exits EXIT_PREEMPTED after
  `preempted: <message>`.
  """
  status = getattr(message, "exit_status", errors.EXIT_ERROR)
  word = "preempted" if status == errors.EXIT_PREEMPTED else "error"
  sys.stderr.write(f"{word}: {message}\n")
  sys.stderr.flush()
  if _LOG_PATH:
    # After a failed save, tensorstore's threads print "Event loop is closed" tracebacks, and asyncio logs
    # "Task exception was never retrieved", while the interpreter shuts down; they belong with Orbax's own
    # report, in the run's log file.
    # File descriptor 2 itself: the interpreter resets sys.stderr while it shuts down, and C code writes to it.
    try:
      log = os.open(_LOG_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
      os.dup2(log, 2)
      os.close(log)
    except OSError:
      pass
  sys.exit(status)


_LOG_PATH = None  # the log file of the last run in this process (library_logs_to)


@contextlib.contextmanager
def library_logs_to(path):
  """Sends the `absl` logger (Orbax logs through it) and uncaught exceptions of background threads to
  the file `path` instead of the console, for the duration of the block.

  The file is local (on a gs:// workdir the logs stay on the console). A file that cannot be opened
  leaves logging as it was.
  """
  global _LOG_PATH
  try:
    handler = logging.FileHandler(path, encoding="utf-8")
  except OSError:
    yield
    return
  _LOG_PATH = path
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"))
  logger = logging.getLogger("absl")
  old_propagate, old_level, old_hook = logger.propagate, logger.level, threading.excepthook
  logger.addHandler(handler)
  logger.propagate = False
  aio = logging.getLogger("asyncio")  # Orbax's failed writes: "Task exception was never retrieved"
  old_aio_propagate = aio.propagate
  aio.addHandler(handler)
  aio.propagate = False
  if not flags.FLAGS.is_parsed() or not flags.FLAGS["verbosity"].present:
    logger.setLevel(logging.INFO)  # the file keeps what the console does not show

  def thread_hook(args):
    logger.error("uncaught exception in thread %s", getattr(args.thread, "name", "?"),
                 exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

  old_stderr = sys.stderr
  threading.excepthook = thread_hook
  # After a failed save, tensorstore's threads print "Event loop is closed" tracebacks to sys.stderr,
  # dozens of them: what background threads write there goes to the file too.
  sys.stderr = _MainThreadOnly(old_stderr, handler.stream)
  try:
    yield
  except BaseException:
    # The run failed: its background threads go on printing while the exception unwinds to fail() and
    # the interpreter shuts down, so their redirection stays (the main thread still writes to the
    # console); the absl logger is restored, for whoever logs next in this process.
    _restore_logger(logger, handler, old_propagate, old_level)
    raise
  else:
    _restore_logger(logger, handler, old_propagate, old_level)
    threading.excepthook = old_hook
    sys.stderr = old_stderr
    aio.removeHandler(handler)
    aio.propagate = old_aio_propagate
    handler.close()


def _restore_logger(logger, handler, propagate, level):
  logger.removeHandler(handler)
  logger.propagate = propagate
  logger.setLevel(level)


class _MainThreadOnly:
  """A text stream that passes the main thread's writes to `console` and other threads' to `other`."""

  def __init__(self, console, other):
    self._console, self._other = console, other

  def write(self, text):
    if threading.current_thread() is threading.main_thread():
      return self._console.write(text)
    try:
      return self._other.write(text)
    except (OSError, ValueError):  # the log file is full or closed: drop it rather than fail the writer
      return len(text)

  def flush(self):
    self._console.flush()

  def __getattr__(self, name):  # fileno, isatty, encoding, ...: the console's
    return getattr(self._console, name)
