"""Checkpoint souping: the (weighted) average of the parameters of N checkpoints.

  python tools/soup.py --ckpt=runs/anneal_s0,runs/anneal_s1,runs/anneal_s2 --out=ckpt/soup
  python tools/soup.py --ckpt=runs/a --ckpt=runs/b --weights=0.7,0.3 --out=ckpt/soup

Every `--ckpt` (a training workdir, its checkpoints/ directory, a step
directory or a params checkpoint) must hold the same model shape and the same
tokenizer; OLMo 2 anneals one checkpoint several times with different data
orders (configs/anneal.py:seed=...) and averages the results. Weights default
to uniform and are normalised. The soup is a params checkpoint
(lmstack.convert.hf.save_params_checkpoint) with the ingredients' tokenizer in
its meta and beside it (`out/tokenizer.model`), so every tool and
`--config=configs/<stage>.py:init_from=ckpt/soup` takes it as it is.
"""

import argparse
import base64
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
# pylint: disable=g-import-not-at-top
from configs import common
from lmstack.errors import CheckpointError, ConfigError, LmstackError

SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim",
              "tie_embeddings", "qkv_bias")


def soup(paths, weights=None):
  """(params, model_cfg, tokenizer bytes): the weighted mean of `paths`' params.

  The parameters are summed one checkpoint at a time in float32, so memory
  holds two copies of the model, not N.
  """
  import jax
  from lmstack import checkpoint as ckpt_lib

  if len(paths) < 2:
    raise ConfigError(f"a soup needs at least 2 checkpoints, got {len(paths)}")
  weights = [1.0] * len(paths) if not weights else [float(w) for w in weights]
  if len(weights) != len(paths) or min(weights) < 0 or not sum(weights):
    raise ConfigError(f"--weights: expected {len(paths)} non-negative numbers, not all 0, got {weights}")
  weights = [w / sum(weights) for w in weights]
  total = first_cfg = first_tok = None
  for path, w in zip(paths, weights):
    params, cfg, meta = ckpt_lib.restore_params(path)
    tok = base64.b64decode(meta["tokenizer_model"]) if meta.get("tokenizer_model") else None
    if first_cfg is None:
      first_cfg, first_tok, first_path = cfg, tok, path
      total = jax.tree.map(lambda x, w=w: x.astype("float32") * w, params)
      continue
    diffs = [f"{k}: {getattr(first_cfg, k)} vs {getattr(cfg, k)}" for k in SHAPE_KEYS
             if getattr(first_cfg, k) != getattr(cfg, k)]
    if diffs:
      raise CheckpointError(f"{path} has another model shape than {first_path} ({'; '.join(diffs)})")
    if tok != first_tok:
      raise CheckpointError(f"{path} has another tokenizer than {first_path}; a soup needs one vocabulary")
    total = jax.tree.map(lambda t, x, w=w: t + x.astype("float32") * w, total, params)
    del params
  return total, first_cfg, first_tok


def write_soup(paths, out, weights=None):
  """Soups `paths` into the params checkpoint `out`; returns the ModelConfig."""
  from lmstack.convert.hf import save_params_checkpoint
  from lmstack.data.tokenizer import tokenizer_from_bytes

  out = os.path.abspath(out)
  if os.path.isdir(out) and os.listdir(out):  # before the slow part
    raise CheckpointError(f"{out} already exists and is not empty; choose a new output directory")
  params, cfg, tok = soup(paths, weights)
  tokenizer = tokenizer_from_bytes(tok) if tok else None
  source = "soup of " + ", ".join(os.path.abspath(p) for p in paths)
  save_params_checkpoint(out, params, cfg, source=source, tokenizer=tokenizer)
  if tok:
    common.write_tokenizer_beside(out, tok)
  return cfg


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
  parser.add_argument("--ckpt", action="append", required=True,
                      help="checkpoints to average (comma-separated and/or repeated)")
  parser.add_argument("--weights", default="", help="comma-separated weights (default: uniform)")
  parser.add_argument("--out", required=True, help="the new params checkpoint directory")
  args = parser.parse_args(argv)
  paths = [p for arg in args.ckpt for p in arg.split(",") if p]
  try:
    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
  except ValueError:
    sys.exit(f"error: --weights={args.weights!r} is not a comma-separated list of numbers")
  try:
    cfg = write_soup(paths, args.out, weights)
  except LmstackError as e:
    sys.exit(f"error: {e}")
  print(f"wrote {args.out}: the {'weighted ' if weights else ''}average of {len(paths)} checkpoints "
        f"({cfg.num_params():,} parameters)")


if __name__ == "__main__":
  main()
