"""Pieces shared by the stage configs: argument parsing and model presets."""

import dataclasses
import json
import os

import ml_collections

from lmstack import paths
from lmstack.model.peft import PeftConfig
from lmstack.model.transformer import PRESETS, ModelConfig


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
  fields = dataclasses.asdict(PRESETS[size])
  del fields["peft"]  # its own section: config.peft
  return ml_collections.ConfigDict({"preset": size, **fields})


def peft_section(method="none"):
  """`config.peft`: every field of PeftConfig (lmstack/model/peft.py)."""
  return ml_collections.ConfigDict(dataclasses.asdict(PeftConfig(method=method)))


def checkpoint_meta(path):
  """The `meta` JSON of the newest step under a workdir or checkpoint dir.

  Read as a plain file (what Orbax's JSON handler writes), so a config can
  take its model shape from a checkpoint without starting JAX. Local or
  gs:// paths (`lmstack.paths`).
  """
  step_dir, _ = checkpoint_step(path)
  return json.loads((paths.as_path(step_dir) / "meta" / "metadata").read_text())


def from_checkpoint(config, path):
  """Starts `config` from a checkpoint: its model shape and its tokenizer."""
  meta = checkpoint_meta(path)
  config.init_from = path
  model = {k: v for k, v in meta["model"].items() if k != "peft"}
  config.model = ml_collections.ConfigDict({"preset": "checkpoint", **model})
  # A training run names its tokenizer file; a params checkpoint written by a
  # tool has one beside it (checkpoint_tokenizer); an import names its source.
  tokenizer = (meta.get("config", {}).get("data", {}).get("tokenizer") or checkpoint_tokenizer(path)
               or meta.get("source"))
  if tokenizer:
    config.data.tokenizer = tokenizer
  return config


# ---------------------------------------------------------------------------
# Mid-training: data mixtures, checkpoint hand-off, token budgets

_DATA = "<pkg>/assets/data/"
_CORPUS = "<pkg>/assets/corpus/"

# The shipped sources of a mixture (lmstack/data/mixture.py): the annealing
# quality mix is the first three plus a share of the pre-training corpus.
MIXTURE_SOURCES = {
    "python_docs": dict(format="jsonl", train_files=_DATA + "python_docs.jsonl.gz", max_eval_docs=30),
    "sympy_docs": dict(format="jsonl", train_files=_DATA + "sympy_docs.jsonl.gz", max_eval_docs=0),
    "wordnet": dict(format="wordnet", train_files=_DATA + "wordnet_glosses.jsonl.gz", max_eval_docs=1000),
    "pretrain": dict(format="text", train_files=_CORPUS + "train.txt", eval_files=_CORPUS + "valid.txt",
                     max_eval_docs=0),
}
QUALITY_MIX = {"python_docs": 0.3, "sympy_docs": 0.15, "wordnet": 0.25, "pretrain": 0.3}


def mixture_data(weights, tokenizer):
  """`config.data` of a weighted mixture (`data.kind="mixture"`).

  `weights` maps names of MIXTURE_SOURCES to weights; every shipped source is
  listed (weight 0: off), so any of them can be switched on from the command
  line, e.g. --config.data.sources.sympy_docs.weight=0.3.
  """
  unknown = sorted(set(weights) - set(MIXTURE_SOURCES))
  if unknown:
    raise ValueError(f"unknown mixture sources {unknown}; expected some of {sorted(MIXTURE_SOURCES)}")
  srcs = {}
  for name, src in MIXTURE_SOURCES.items():
    srcs[name] = dict(weight=float(weights.get(name, 0.0)), format=src["format"], train_files=src["train_files"],
                      eval_files=src.get("eval_files", ""), jsonl_field="text",
                      max_eval_docs=src["max_eval_docs"])
  return ml_collections.ConfigDict(dict(
      kind="mixture",
      tokenizer=tokenizer,
      holdout_every=20,  # every 20th document of a source without eval_files is held out
      chunk_chars=4096,  # JSONL documents are cut at paragraphs into chunks of at most this
      sources=srcs,
      allow_invalid_text=False,  # read files with NUL bytes or >0.1% invalid UTF-8 (lmstack/data/sources.py)
  ))


def checkpoint_step(path):
  """(step directory, step) of the newest step under a workdir or checkpoint dir (local or gs://)."""
  path = paths.as_path(path)
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  if path.name.isdigit() and (path / "meta").is_dir():
    return os.fspath(path), int(path.name)
  steps = [int(d.name) for d in path.iterdir() if d.name.isdigit()] if path.is_dir() else []
  if not steps:
    raise ValueError(f"init_from={os.fspath(path)!r} holds no checkpoint step directory")
  return os.fspath(path / str(max(steps))), max(steps)


def checkpoint_tokenizer(path):
  """The tokenizer file a tool wrote beside a params checkpoint (tools/soup.py,
  tools/extend_vocab.py), or "" if there is none."""
  path = paths.as_path(path)
  for root in (path, path.parent):
    for name in ("tokenizer.model", "tokenizer.lmstack"):
      if (root / name).is_file():
        return os.fspath(root / name)
  return ""


def write_tokenizer_beside(out, tokenizer_bytes):
  """Writes a tokenizer (its `to_bytes()`) next to a params checkpoint, where
  checkpoint_tokenizer finds it; returns the file's path."""
  name = "tokenizer.lmstack" if tokenizer_bytes.startswith(b"lmstack-tokenizer/") else "tokenizer.model"
  path = os.path.join(out, name)
  with open(path, "wb") as f:
    f.write(tokenizer_bytes)
  return path


def pretrain_budget(meta, step):
  """(tokens, FLOPs) a training checkpoint's run had spent at `step`."""
  train = meta.get("config", {}).get("train")
  if not train:
    raise ValueError("the checkpoint has no training config (a params checkpoint: soup, import); "
                     "give the budget in tokens")
  tokens = step * train["batch_size"] * train["seq_len"]
  return tokens, tokens * model_config(meta["model"]).flops_per_token(train["seq_len"])


def model_config(model):
  """A ModelConfig from a `config.model` section or a checkpoint's meta["model"]."""
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  return ModelConfig(**{k: v for k, v in dict(model).items() if k in fields})


def budget_steps(tokens, batch_size, seq_len):
  """Steps of `batch_size` x `seq_len` that spend (at least) `tokens`."""
  return max(1, -(-int(tokens) // (batch_size * seq_len)))
