"""User-facing errors.

Every mistake a user can make (a wrong config key, a missing file, a mismatched
checkpoint) raises `LmstackError` with a one-line message naming the field or
file and what was expected. `lmstack.main` prints it as a single line and exits
non-zero instead of showing a stack trace.
"""


class LmstackError(Exception):
  """A problem with the user's input, reported as one line."""


class ConfigError(LmstackError):
  """A config field is missing, unknown or out of range."""


class DataError(LmstackError):
  """A corpus, data file or tokenizer is missing, empty or invalid."""


class CheckpointError(LmstackError):
  """A checkpoint is missing, corrupt or does not match the model."""


class TrainingError(LmstackError):
  """Training cannot go on: e.g. too many steps in a row were skipped as non-finite or spiking."""


def show(value, limit=80):
  """`repr(value)` for a one-line message: a config section as a dict, cut at `limit` characters."""
  if hasattr(value, "to_dict"):  # a ConfigDict's repr is multi-line YAML
    value = value.to_dict()
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."
