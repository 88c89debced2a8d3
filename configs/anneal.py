"""Annealing (mid-training): decay the learning rate to zero on a quality mixture.

  python -m lmstack.main --config=configs/anneal.py:init_from=runs/pretrain/checkpoints/400 \
      --workdir=runs/anneal

What it changes from configs/pretrain.py:
  init_from  the pre-training checkpoint (required; a WSD run's stable-phase
             checkpoint is the usual choice): its shape and tokenizer, a fresh
             optimizer
  data       a weighted mixture (lmstack/data/mixture.py): Python docs and
             SymPy docs (high quality), WordNet glosses (encyclopedic) and a
             share of the pre-training corpus; weights in common.QUALITY_MIX,
             e.g. --config.data.sources.wordnet.weight=0.1
  optim      no warmup; from the checkpoint's learning rate (its schedule at
             its step) down to zero, linearly or 1-sqrt
  train      the pre-training run's batch_size and seq_len; steps from a budget
  seed       the data order (OLMo 2 anneals with several seeds, then soups)

Arguments after the colon (comma-separated):
  init_from=PATH   required
  fraction=0.1     budget: this fraction of the checkpoint's pre-training tokens
  budget=tokens    ... or of its FLOPs (budget=flops: differs with seq_len)
  tokens=N         budget in tokens instead (needed for params checkpoints)
  lr=X             start here instead of the checkpoint's learning rate
  decay=linear     or 1-sqrt
  seed=0           data order
  runlocal         a few small steps: what the tests run
"""

from configs import common, pretrain
from lmstack.errors import ConfigError
from lmstack.train import optim


def get_config(arg=None):
  arg = common.parse_arg(arg, init_from="", fraction=0.1, budget="tokens", tokens=0, lr=0.0, decay="linear",
                         seed=0, runlocal=False)
  if not arg.init_from:
    raise ValueError("configs/anneal.py needs init_from=<pre-training checkpoint>")
  if arg.budget not in ("tokens", "flops"):
    raise ValueError(f"budget={arg.budget!r}; expected tokens or flops")
  config = pretrain.get_config("runlocal" if arg.runlocal else None)
  common.from_checkpoint(config, arg.init_from)
  step_dir, step = common.checkpoint_step(arg.init_from)
  meta = common.checkpoint_meta(step_dir)
  source_train = meta.get("config", {}).get("train", {})
  if not arg.runlocal and source_train:
    config.train.update(batch_size=source_train["batch_size"], seq_len=source_train["seq_len"])
  config.seed = arg.seed

  config.data = common.mixture_data(common.QUALITY_MIX, config.data.tokenizer)
  config.train.report_unigram = False  # the unigram baseline is a single-corpus figure

  lr = arg.lr
  if not lr:
    try:
      lr = optim.checkpoint_lr(meta.get("config", {}), step)
    except ConfigError as e:
      raise ValueError(f"init_from={arg.init_from}: {e} (lr=...)") from None
  config.optim.update(schedule="wsd", lr=lr, warmup_steps=0, decay_fraction=1.0, min_lr_ratio=0.0,
                      decay_shape=arg.decay)

  t = config.train
  if arg.tokens:
    tokens = arg.tokens
  else:
    spent_tokens, spent_flops = common.pretrain_budget(meta, step)
    if arg.budget == "tokens":
      tokens = arg.fraction * spent_tokens
    else:
      model = common.model_config(config.model)
      tokens = arg.fraction * spent_flops / model.flops_per_token(t.seq_len)
  if not arg.runlocal:
    t.steps = common.budget_steps(tokens, t.batch_size, t.seq_len)
  t.checkpoint_every = min(t.checkpoint_every, t.steps)
  return config
