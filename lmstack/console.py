"""Console output of the command-line entry points."""

import logging
import sys

from absl import flags


def quiet_logging():
  """Keeps the console to progress lines: library loggers at WARNING unless --verbosity was given."""
  if flags.FLAGS["verbosity"].present:
    return
  for name in ("absl", "jax", "orbax"):
    logging.getLogger(name).setLevel(logging.WARNING)
  logging.getLogger().setLevel(logging.WARNING)


def fail(message):
  """Exits with status 1 after one `error:` line on stderr, written in one call so that no other
  thread's output (Orbax logs its own tracebacks from background threads) lands inside it."""
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  sys.exit(1)
