"""Pieces shared by the stage configs: argument parsing and model presets."""

import dataclasses
import json
import os

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


def checkpoint_meta(path):
  """The `meta` JSON of the newest step under a workdir or checkpoint dir.

  Read as a plain file (what Orbax's JSON handler writes), so a config can
  take its model shape from a checkpoint without starting JAX.
  """
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  if os.path.basename(path).isdigit():
    step_dir = path
  else:
    steps = [int(d) for d in os.listdir(path) if d.isdigit()] if os.path.isdir(path) else []
    if not steps:
      raise ValueError(f"init_from={path!r} holds no checkpoint step directory")
    step_dir = os.path.join(path, str(max(steps)))
  with open(os.path.join(step_dir, "meta", "metadata"), encoding="utf-8") as f:
    return json.load(f)


def from_checkpoint(config, path):
  """Starts `config` from a checkpoint: its model shape and its tokenizer."""
  meta = checkpoint_meta(path)
  config.init_from = path
  config.model = ml_collections.ConfigDict({"preset": "checkpoint", **meta["model"]})
  tokenizer = meta.get("config", {}).get("data", {}).get("tokenizer") or meta.get("source")
  if tokenizer:
    config.data.tokenizer = tokenizer
  return config
