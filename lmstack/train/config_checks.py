"""Type and range checks of the config fields every stage reads.

`trainer.validate` runs `check_fields(config)` before anything is built, so a
wrong value is one line naming the field and what it should be:

  config.optim.b2=1.5; expected a number in [0, 1)
  config.train.log_every=0; expected an integer >= 1

instead of a NaN loss many steps later or a TypeError deep inside JAX. A
config file can set any value (its locking only types command-line
overrides), so types are checked too. The model's own fields are checked
where they become a ModelConfig (lmstack/model/transformer.py); data files
and records where they are read (lmstack/data/).
"""

import math
import numbers

from lmstack import sharding
from lmstack.errors import ConfigError, show
from lmstack.train.state import FROZEN_DTYPES


def is_int(v):
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v):
  """A finite int or float (not a bool)."""
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _at_least(lo):
  return lambda v: is_int(v) and v >= lo


def _in(lo, hi, hi_open=False):
  return lambda v: is_number(v) and lo <= v and (v < hi if hi_open else v <= hi)


def profile_range(v):
  """(first, stop) of train.profile_steps "A:B" (steps A .. B-1, numbered from 1), or None for ""."""
  if v == "":
    return None
  first, sep, stop = v.partition(":") if isinstance(v, str) else ("", "", "")
  if not (sep and first.strip().isdigit() and stop.strip().isdigit() and 1 <= int(first) < int(stop)):
    raise ValueError(v)
  return int(first), int(stop)


def _profile_steps(v):
  try:
    profile_range(v)
    return True
  except ValueError:
    return False


def _mesh_shape(v):
  return (isinstance(v, (tuple, list)) and len(v) in (3, 4) and all(is_int(s) and (s >= 1 or s == -1) for s in v)
          and list(v).count(-1) <= 1)


def _mesh_rules(v):
  if isinstance(v, str):
    return True  # a preset: sharding.resolve_rules names the choices
  axes_ok = lambda a: a is None or isinstance(a, str) or (isinstance(a, (tuple, list))
                                                          and all(isinstance(x, str) for x in a))
  return isinstance(v, (tuple, list)) and all(
      isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str) and axes_ok(pair[1])
      for pair in v)


_MESH_SHAPE = ("3 integers (data, fsdp, tensor) or 4 (data, fsdp, sequence, tensor), each >= 1 or one -1 for "
               "the remaining devices")
_BOOL = (lambda v: isinstance(v, bool), "true or false")
_STR = (lambda v: isinstance(v, str), "a string")

# path -> (check, what it should be). Paths ending in "?" may be absent.
FIELDS = {
    "seed": (lambda v: is_int(v) and -2**63 <= v < 2**63, "a 64-bit integer"),
    "loss": _STR,
    "trainable": _STR,
    "init_from": _STR,
    "frozen_dtype?": (lambda v: v in FROZEN_DTYPES, "'auto' (frozen matmul weights in model.dtype) or 'float32'"),
    "train.steps": (_at_least(1), "an integer >= 1"),
    "train.batch_size": (_at_least(1), "an integer >= 1 (sequences per step, global)"),
    "train.seq_len": (_at_least(2), "an integer >= 2 (tokens per row)"),
    "train.grad_accum_steps": (_at_least(1), "an integer >= 1"),
    "train.log_every": (_at_least(1), "an integer >= 1"),
    "train.eval_every": (_at_least(0), "an integer >= 0 (0: no evaluation)"),
    "train.eval_batches": (_at_least(0), "an integer >= 0 (0: the whole held-out split)"),
    "train.checkpoint_every": (_at_least(1), "an integer >= 1"),
    "train.keep_checkpoints": (_at_least(1), "an integer >= 1"),
    "train.async_checkpoint": _BOOL,
    "train.tensorboard": _BOOL,
    "train.peak_flops": (is_number, "a finite number (-1: measure it, 0: no MFU)"),
    "train.report_unigram": _BOOL,
    "train.eval_at_start?": _BOOL,
    "train.skip_nonfinite?": _BOOL,
    "train.spike_zscore?": (_in(0, math.inf), "a finite number >= 0 (0: off)"),
    "train.spike_warmup_steps?": (_at_least(0), "an integer >= 0"),
    "train.max_consecutive_skips?": (_at_least(0), "an integer >= 0 (0: never stop)"),
    "train.wandb_project?": _STR,
    "train.wandb_mode?": (lambda v: v in ("online", "offline", "disabled"), "online, offline or disabled"),
    "train.profile_steps?": (_profile_steps, "'' (off) or 'A:B', 1 <= A < B: trace steps A to B-1"),
    "optim.lr": (_in(0, math.inf), "a finite number >= 0"),
    "optim.schedule": _STR,
    "optim.warmup_steps": (_at_least(0), "an integer >= 0"),
    "optim.min_lr_ratio": (_in(0, 1), "a number in [0, 1]"),
    "optim.decay_fraction": (_in(0, 1), "a number in [0, 1]"),
    "optim.decay_shape": (lambda v: v in ("linear", "1-sqrt", "cosine"), "linear, 1-sqrt or cosine"),
    "optim.b1": (_in(0, 1, hi_open=True), "a number in [0, 1)"),
    "optim.b2": (_in(0, 1, hi_open=True), "a number in [0, 1)"),
    "optim.eps": (lambda v: is_number(v) and v > 0, "a number > 0 (it keeps Adam's update finite)"),
    "optim.weight_decay": (_in(0, math.inf), "a finite number >= 0"),
    "optim.grad_clip": (_in(0, math.inf), "a finite number >= 0 (0: no clipping)"),
    "mesh.shape": (_mesh_shape, _MESH_SHAPE),
    "mesh.dcn_shape?": (_mesh_shape, _MESH_SHAPE),
    "mesh.rules": (_mesh_rules, f"{', '.join(sharding.RULES)} or a list of (logical axis, mesh axes) pairs"),
    "data.kind?": _STR,
    "data.tokenizer": (lambda v: isinstance(v, str) and v.strip(), "a tokenizer path"),
    "data.allow_invalid_text?": _BOOL,
    "dpo.beta?": (lambda v: is_number(v) and v > 0, "a number > 0"),
    "dpo.label_smoothing?": (_in(0, 0.5, hi_open=True), "a number in [0, 0.5)"),
    "dpo.variant?": _STR,
    "dpo.reference?": _STR,
}

# Data fields that name files, record fields or text, wherever a stage has them.
_DATA_STRINGS = ("format", "jsonl_field", "prompt_field", "response_field",
                 "messages_field", "chosen_field", "rejected_field", "separator", "rejected_pos")


def _get(config, path):
  """(present, value) of a dotted path."""
  node = config
  for key in path.split("."):
    if not hasattr(node, "keys") or key not in node:
      return False, None
    node = node[key]
  return True, node


def check_fields(config):
  """Raises ConfigError for the first field of FIELDS that is missing or out of range."""
  for path, (ok, expected) in FIELDS.items():
    optional = path.endswith("?")
    path = path.rstrip("?")
    present, value = _get(config, path)
    if not present:
      if optional:
        continue
      raise ConfigError(f"config.{path} is missing; expected {expected}")
    if not ok(value):
      raise ConfigError(f"config.{path}={show(value)}; expected {expected}")
  for name in _DATA_STRINGS:
    present, value = _get(config, f"data.{name}")
    if present and not isinstance(value, str):
      raise ConfigError(f"config.data.{name}={show(value)}; expected a string")
  for name in ("train_files", "eval_files"):
    present, value = _get(config, f"data.{name}")
    if present and not (isinstance(value, str) or (isinstance(value, (list, tuple))
                                                   and all(isinstance(p, str) for p in value))):
      raise ConfigError(f"config.data.{name}={show(value)}; expected comma-separated paths or globs")
