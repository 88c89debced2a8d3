"""Domain, language and long-context extension: continue pre-training from a checkpoint.

  # A new domain (the Python docs) with a 25% replay of the pre-training corpus
  python -m lmstack.main --config=configs/extend.py:init_from=runs/pretrain --workdir=runs/extend
  # ... with a vocabulary grown for it first (new pieces appended, mean-initialised rows)
  python tools/extend_vocab.py --ckpt=runs/pretrain --corpus='<pkg>/assets/data/python_docs.jsonl.gz' \
      --vocab_size=4096 --out=ckpt/pyvocab
  python -m lmstack.main --config=configs/extend.py:init_from=ckpt/pyvocab --workdir=runs/pyvocab
  # Longer context: a model trained at 128 tokens continues at 512, RoPE
  # position interpolation (rope=pi) or a larger RoPE base (rope=theta)
  python -m lmstack.main --config=configs/extend.py:init_from=runs/short,domain=pretrain,seq_len=512,rope=pi \
      --workdir=runs/long

What it changes from configs/pretrain.py:
  init_from  the checkpoint (required): its shape and tokenizer (tools/extend_vocab.py's
             checkpoints carry theirs), a fresh optimizer
  data       a mixture (lmstack/data/mixture.py): the `domain` sources share
             1 - replay, the pre-training corpus gets `replay` (against forgetting)
  train      seq_len (default: the checkpoint's), tokens per step kept
  model      seq_len > the checkpoint's max_seq_len raises max_seq_len, and
             rope=pi divides positions by rope_factor (Chen et al. 2023), while
             rope=theta raises the RoPE base to theta * rope_factor^(H/(H-2))
             (the "NTK-aware" base change); rope_factor defaults to
             new seq_len / old max_seq_len
  optim      lr=3e-4, warmup 20 steps, cosine to 10%

Arguments: init_from=PATH, domain=python_docs (comma-separated sources of
configs/common.py MIXTURE_SOURCES), replay=0.25, seq_len=0, rope=none|pi|theta,
rope_factor=0, lr=3e-4, runlocal.
"""

from configs import common, pretrain


def get_config(arg=None):
  arg = common.parse_arg(arg, init_from="", domain="python_docs", replay=0.25, seq_len=0, rope="none",
                         rope_factor=0.0, lr=3e-4, runlocal=False)
  if not arg.init_from:
    raise ValueError("configs/extend.py needs init_from=<checkpoint>")
  if arg.rope not in ("none", "pi", "theta"):
    raise ValueError(f"rope={arg.rope!r}; expected none, pi or theta")
  if not 0 <= arg.replay < 1:
    raise ValueError(f"replay={arg.replay} must be in [0, 1)")
  config = pretrain.get_config("runlocal" if arg.runlocal else None)
  common.from_checkpoint(config, arg.init_from)
  step_dir, _ = common.checkpoint_step(arg.init_from)
  source_train = common.checkpoint_meta(step_dir).get("config", {}).get("train", {})
  if not arg.runlocal and source_train:
    config.train.update(batch_size=source_train["batch_size"], seq_len=source_train["seq_len"])

  domain = [d for d in arg.domain.split(",") if d]
  weights = {name: (1 - arg.replay) / len(domain) for name in domain}
  weights["pretrain"] = weights.get("pretrain", 0.0) + arg.replay
  config.data = common.mixture_data(weights, config.data.tokenizer)
  config.train.report_unigram = False
  config.optim.lr = arg.lr

  m, t = config.model, config.train
  if arg.seq_len:
    # Same tokens per step at the new length.
    t.batch_size = max(1, t.batch_size * t.seq_len // arg.seq_len)
    t.seq_len = arg.seq_len
  if t.seq_len > m.max_seq_len or arg.rope != "none":
    factor = arg.rope_factor or max(1.0, t.seq_len / m.max_seq_len)
    if arg.rope == "pi":
      if m.rope_scaling not in ("none", "linear"):
        raise ValueError(f"rope=pi on a checkpoint with rope_scaling={m.rope_scaling!r}")
      m.rope_scaling = "linear"
      m.rope_scaling_factor = (m.rope_scaling_factor if m.rope_scaling_factor else 1.0) * factor
    elif arg.rope == "theta":
      head_dim = m.head_dim or m.d_model // m.n_heads
      m.rope_theta = m.rope_theta * factor ** (head_dim / (head_dim - 2))
    m.max_seq_len = max(m.max_seq_len, t.seq_len)
  return config
