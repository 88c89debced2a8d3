"""Pre-training: next-token prediction on packed documents.

The default trains the 17M-parameter `default` preset on the embedded corpus
(Botchan + Shakespeare, 0.52M tokens) for 200 steps of 16 x 256 tokens
(about 1.6 epochs) on CPU in under 10 minutes:

  python -m lmstack.main --config=configs/pretrain.py --workdir=/tmp/lmstack/pretrain

Arguments after the colon: `size=<preset>` (tiny, default, 34m, 100m, 1b, 7b, 70b; the last three
train 256 full-length sequences a step with full rematerialisation, a TPU slice's run),
`init_from=<checkpoint>` (continue from a checkpoint, e.g. an imported Hugging
Face model: its shape and tokenizer, a fresh optimizer) and `runlocal` (tiny
model, a few steps: what the tests run), e.g.
  --config=configs/pretrain.py:size=100m
  --config=configs/pretrain.py:init_from=ckpt/smollm
Any field can be overridden: --config.train.steps=200 --config.optim.lr=3e-4
"""

import os

import ml_collections

import lmstack
from configs import common

ASSETS = os.path.join(os.path.dirname(lmstack.__file__), "assets")


def get_config(arg=None):
  arg = common.parse_arg(arg, size="default", runlocal=False, init_from="")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = common.model_section("tiny" if arg.runlocal else arg.size)
  config.loss = "next_token"
  config.trainable = ".*"  # regex over parameter paths; the rest is frozen
  config.frozen_dtype = "auto"  # frozen matmul weights stored in model.dtype (bf16); "float32" keeps them
  config.peft = common.peft_section()  # a parameter-efficient method (configs/sft.py)
  config.init_from = ""  # a checkpoint (workdir or step dir) to start from, fresh optimizer

  config.data = ml_collections.ConfigDict(dict(
      kind="lm",  # lm | mixture | sft | preference (lmstack/data/datasets.py)
      format="text",  # text | jsonl | array_record | tfds
      train_files=os.path.join(ASSETS, "corpus", "train.txt"),  # comma-separated globs
      eval_files=os.path.join(ASSETS, "corpus", "valid.txt"),
      jsonl_field="text",
      tfds_name="",
      tfds_data_dir="",
      tfds_train_split="train",
      tfds_eval_split="validation",
      tokenizer=os.path.join(ASSETS, "tokenizer", "default.model"),
      allow_invalid_text=False,  # read files with NUL bytes or >0.1% invalid UTF-8 (lmstack/data/sources.py)
  ))

  config.train = ml_collections.ConfigDict(dict(
      steps=200,
      batch_size=16,  # global, in sequences
      seq_len=256,
      grad_accum_steps=1,
      log_every=10,
      eval_every=50,  # 0: no evaluation
      eval_batches=0,  # 0: the whole held-out split
      checkpoint_every=50,
      keep_checkpoints=3,
      async_checkpoint=True,
      tensorboard=True,
      peak_flops=-1.0,  # matmul FLOP/s for MFU; -1 measures it at start, 0 disables MFU
      report_unigram=True,  # print the corpus's unigram entropy beside the final loss
      # The step's guard (lmstack/train/step.py Guard): a skipped step keeps its params and optimizer state.
      skip_nonfinite=True,  # skip a step whose loss or grad norm is inf/NaN (False: stop the run)
      spike_zscore=0.0,  # skip a loss this many running std above its running mean; 0: off
      spike_warmup_steps=20,  # applied steps before the spike test starts
      max_consecutive_skips=10,  # stop after this many skipped steps in a row; 0: never
      # "A:B": a jax.profiler trace of steps A .. B-1 in workdir/tb/plugins/profile (TensorBoard's profile
      # plugin, or Perfetto: a .trace.json.gz beside it); "": off, at no cost.
      profile_steps="",
      # Weights & Biases, beside TensorBoard and JSONL: "" is off (wandb is then never imported); a project
      # name logs the scalars and the config there (pip install wandb). offline: to workdir/wandb only.
      wandb_project="",
      wandb_mode="online",  # online | offline | disabled
  ))

  config.optim = ml_collections.ConfigDict(dict(
      lr=1e-3,
      schedule="cosine",  # cosine | wsd | linear | constant
      warmup_steps=20,
      min_lr_ratio=0.1,
      decay_fraction=0.2,  # wsd: share of the steps spent decaying
      decay_shape="linear",  # wsd: linear | 1-sqrt | cosine
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      grad_clip=1.0,
  ))

  config.mesh = ml_collections.ConfigDict(dict(
      shape=(1, -1, 1),  # (data, fsdp, tensor) within a slice; -1 takes the remaining devices
      dcn_shape=(-1, 1, 1),  # across slices (multi-slice TPU), multiplying `shape`: data parallel over DCN
      rules="fsdp",  # fsdp | fsdp_tp | dp (see lmstack/sharding.py)
  ))

  if arg.size in ("1b", "7b", "70b") and not arg.runlocal:  # a TPU slice's run: 256 sequences a step, each as
    # long as the preset takes (0.5M tokens a step for 1b, 1M for 7b and 70b); 256 divides every slice
    # up to 256 chips. tools/aot_compile.py --config=configs/pretrain.py:size=7b --slice=... checks the fit.
    config.train.update(batch_size=256, seq_len=config.model.max_seq_len)
    config.model.remat = "full"
  if arg.init_from:
    common.from_checkpoint(config, arg.init_from)
  if arg.runlocal:
    config.train.update(steps=4, batch_size=8, seq_len=64, log_every=1, eval_every=2, eval_batches=2,
                        checkpoint_every=2, peak_flops=0.0, report_unigram=False)
    config.optim.warmup_steps = 1
  return config
