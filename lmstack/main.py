"""Command-line entry point for every stage.

  python -m lmstack.main --config=configs/pretrain.py --workdir=/tmp/run \
      [--config.train.steps=200 ...]

The config file is an ml_collections `get_config(arg)`, locked so that a
mistyped field (`--config.train.setps=1`) is an error, not a silent no-op.
User errors (a bad flag, a bad config value, LmstackError) and OS errors
(a full disk, an unwritable workdir) print one line and exit with status 1; a
run stopped by SIGTERM exits 75 once saved, and a finished one 0
(lmstack/errors.py). On a TPU pod, a multi-slice job or another cluster,
`--distributed=auto` (the default) starts JAX's distributed runtime first
(lmstack/distributed.py); every host runs this same command.
"""

import re

from absl import app, flags
from ml_collections import config_flags

from lmstack import console
from lmstack.errors import LmstackError, os_error

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics (local or gs://).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "jax.distributed.initialize(): auto = when the environment names a cluster "
                                 "(Cloud TPU VM, MEGASCALE_*, TPU_WORKER_HOSTNAMES, SLURM, Open MPI, "
                                 "JAX_COORDINATOR_ADDRESS).")
flags.mark_flags_as_required(["config", "workdir"])


def _one_line(e):
  """The useful line of a flag error (config_flags nests whole tracebacks)."""
  text = str(e).strip()
  if isinstance(e, AttributeError):  # its message is a repr: quoted, with escapes
    text = text.strip("'").replace("\\n", "\n").replace("\\'", "'")
  lines = [" ".join(l.split()) for l in text.splitlines() if l.strip()]
  if isinstance(e, AttributeError):  # a locked ConfigDict refusing an unknown field
    return f"unknown config field {lines[0].strip(chr(39))}; " + " ".join(lines[1:])
  last = lines[-1] if lines else type(e).__name__
  return re.sub(r"^\w+Error: ", "", last)


def parse_flags(argv):
  """absl flag parsing, with bad flags and config overrides as one line."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    console.fail(_one_line(e))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  console.quiet_logging()
  from lmstack import distributed  # heavy imports after flag parsing, so --help is fast
  from lmstack.train import trainer
  try:
    reason = distributed.initialize(_DISTRIBUTED.value)  # before anything touches a device
  except LmstackError as e:
    console.fail(e)
  if reason:
    import jax
    print(f"distributed: process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} of "
          f"{jax.device_count()} devices ({reason})", flush=True)
  try:
    config = _CONFIG.value
    config.keys()  # config_flags loads the file lazily: force it here
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    console.fail(_one_line(e))
  try:
    trainer.run(config, _WORKDIR.value)
  except LmstackError as e:
    console.fail(e)
  except OSError as e:  # the workdir, metrics or TensorBoard files: a full disk, a vanished mount
    console.fail(os_error(e))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
