"""User-facing errors.

Every mistake a user can make (a wrong config key, a missing file, a mismatched
checkpoint) raises `LmstackError` with a one-line message naming the field or
file and what was expected. `lmstack.main` prints it as a single line and exits
non-zero instead of showing a stack trace.

Exit statuses of `lmstack.main` and `lmstack.pipeline`, for schedulers:
  0   the run finished (or was already done)
  1   an error: one `error:` line on stderr says what, and nothing good was lost
  75  preempted (SIGTERM): the current step was saved (or, before the first
      step, nothing had changed); re-running the same command resumes. 75 is
      EX_TEMPFAIL of sysexits.h: "try again later".
"""

import os

EXIT_ERROR = 1
EXIT_PREEMPTED = 75


class LmstackError(Exception):
  """A problem with the user's input, reported as one line."""


class ConfigError(LmstackError):
  """A config field is missing, unknown or out of range."""


class DataError(LmstackError):
  """A corpus, data file or tokenizer is missing, empty or invalid."""


class CheckpointError(LmstackError):
  """A checkpoint is missing, corrupt or does not match the model."""


class Preempted(LmstackError):
  """The run stopped on SIGTERM after saving; re-running resumes it (exit status EXIT_PREEMPTED)."""

  exit_status = EXIT_PREEMPTED


class TrainingError(LmstackError):
  """Training cannot go on: e.g. too many steps in a row were skipped as non-finite or spiking."""


def show(value, limit=80):
  """`repr(value)` for a one-line message: a config section as a dict, cut at `limit` characters."""
  if hasattr(value, "to_dict"):  # a ConfigDict's repr is multi-line YAML
    value = value.to_dict()
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def os_error(e):
  """An OSError as one line: "[Errno 28] No space left on device: 'runs/x/metrics.jsonl'"."""
  if not isinstance(e, OSError) or e.errno is None:
    return f"{type(e).__name__}: {e}"
  text = f"[Errno {e.errno}] {e.strerror or os.strerror(e.errno)}"
  return text + (f": {os.fspath(e.filename)!r}" if e.filename is not None else "")
