"""Pieces shared by the stage configs: argument parsing and model presets."""

import dataclasses

import ml_collections

from lmstack.model.transformer import PRESETS


def parse_arg(arg, **defaults):
  """Parses "size=tiny,runlocal" into a ConfigDict over `defaults`.

  A bare name sets a boolean to True; values take the type of their default.
  """
  out = ml_collections.ConfigDict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; expected some of {sorted(defaults)}")
    default = defaults[key]
    if not value:
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = type(default)(value)
  return out


def model_section(size):
  """`config.model`: every field of the named preset, each overridable."""
  if size not in PRESETS:
    raise ValueError(f"unknown model size {size!r}; expected one of {sorted(PRESETS)}")
  return ml_collections.ConfigDict({"preset": size, **dataclasses.asdict(PRESETS[size])})
