"""The one entry point from a stage's `config.data` to its batches.

`config.data.kind` picks the builder; every builder takes the same arguments
and returns a Grain IterDataset of dicts of int32 numpy arrays whose iterator
state is JSON (it goes into every checkpoint):

  lm          packed next-token batches (pre-training): lmstack.data.pipeline
  mixture     weighted mixture of lm sources (annealing): lmstack.data.mixture
  sft         prompt -> response with a loss mask (fine-tuning): lmstack.data.sft
  preference  prompt, chosen, rejected pairs (DPO): lmstack.data.preference
"""

import importlib

from lmstack.errors import ConfigError

KINDS = {
    "lm": ("lmstack.data.pipeline", "make_lm_dataset"),
    "mixture": ("lmstack.data.mixture", "make_mixture_dataset"),
    "sft": ("lmstack.data.sft", "make_sft_dataset"),
    "preference": ("lmstack.data.preference", "make_preference_dataset"),
}


def make_dataset(data_cfg, tokenizer, *, seq_len, batch_size, seed, split="train", shard_index=0,
                 shard_count=1):
  """Batches of one split of `data_cfg` (see the module docstring)."""
  kind = data_cfg.get("kind", "lm")
  if kind not in KINDS:
    raise ConfigError(f"config.data.kind={kind!r}; expected one of {sorted(KINDS)}")
  module, name = KINDS[kind]
  builder = getattr(importlib.import_module(module), name)
  return builder(data_cfg, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed, split=split,
                 shard_index=shard_index, shard_count=shard_count)


def rows_per_example(data_cfg):
  """Rows of seq_len tokens per batch element: 2 for preference pairs (chosen, rejected), else 1."""
  return 2 if data_cfg.get("kind", "lm") == "preference" else 1
