"""Console output of the command-line entry points."""

import logging

from absl import flags


def quiet_logging():
  """Keeps the console to progress lines: library loggers at WARNING unless --verbosity was given."""
  if flags.FLAGS["verbosity"].present:
    return
  for name in ("absl", "jax", "orbax"):
    logging.getLogger(name).setLevel(logging.WARNING)
  logging.getLogger().setLevel(logging.WARNING)
