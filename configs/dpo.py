"""Alignment with DPO: preference pairs, a frozen reference model, one hyperparameter beta.

Changes from configs/sft.py: preference data (`data.kind=preference`,
lmstack/data/preference.py: the shipped WordNet pairs by default, a word's
true gloss vs another word's; HumanEval pairs, the canonical solution vs a
corrupted one; or your JSONL of prompt/chosen/rejected or chats), the loss
(`loss=dpo`) and its section `config.dpo` (beta, variant, label smoothing,
how the reference is made: lmstack/train/reference.py), a lower learning
rate, and a held-out evaluation before the first step (`eval_at_start`: the
starting model's preference accuracy). Start from an SFT or LoRA checkpoint.

  python -m lmstack.main --config=configs/dpo.py:init_from=runs/sft --workdir=runs/dpo
  python -m lmstack.main --config=configs/dpo.py:init_from=runs/sft,method=lora --workdir=runs/dpo_lora
  python -m lmstack.main --config=configs/dpo.py:init_from=runs/sft,variant=ipo,reference=precomputed \\
      --workdir=runs/ipo --config.dpo.beta=0.5

Arguments: init_from=<checkpoint>, method=<full|lora|qlora|adapter|llama_adapter|prompt|prefix>,
data=<wordnet_pairs|humaneval_pairs|jsonl> (jsonl: set --config.data.train_files/eval_files and the field
names), variant=<sigmoid|robust|ipo|hinge>, reference=<copy|adapters_off|precomputed> (default: adapters_off
for lora, qlora, adapter and llama_adapter, else copy), runlocal.
"""

import ml_collections

from configs import common, sft

# Learning rates that raised held-out reward accuracy on the default model
# (README, "Alignment (DPO)"); adapters take ~10x, as in SFT.
LEARNING_RATES = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4, "prompt": 1e-2, "prefix": 3e-3, "adapter": 2e-4,
                  "llama_adapter": 3e-3}
ZERO_IS_IDENTITY = ("lora", "qlora", "adapter", "llama_adapter")


def get_config(arg=None):
  arg = common.parse_arg(arg, init_from="", method="full", data="wordnet_pairs", variant="sigmoid", reference="",
                         runlocal=False)
  if arg.method not in LEARNING_RATES:
    raise ValueError(f"method={arg.method!r}; expected one of {sorted(LEARNING_RATES)}")
  parts = [f"method={arg.method}"] + ["runlocal"] * arg.runlocal
  if arg.init_from:
    parts.append(f"init_from={arg.init_from}")
  config = sft.get_config(",".join(parts))

  config.data.kind = "preference"
  config.data.format = arg.data  # wordnet_pairs | humaneval_pairs | jsonl
  for field in ("response_field", "messages_field"):
    del config.data[field]
  config.data.chosen_field = "chosen"
  config.data.rejected_field = "rejected"
  config.data.pairs_per_prompt = 4 if arg.data == "humaneval_pairs" else 1  # rejected responses per prompt
  config.data.rejected_pos = "other"  # wordnet_pairs: rejected gloss of another part of speech, or "any"

  config.loss = "dpo"
  config.dpo = ml_collections.ConfigDict(dict(
      beta=0.1,  # the KL weight: rewards are beta * (policy - reference) log-probabilities
      variant=arg.variant,  # sigmoid (DPO) | robust | ipo | hinge (lmstack/train/losses.py)
      label_smoothing=0.0,  # sigmoid: conservative DPO; robust: the assumed label noise
      reference=arg.reference or ("adapters_off" if arg.method in ZERO_IS_IDENTITY else "copy"),
  ))

  config.train.update(steps=200, batch_size=16, seq_len=64, eval_every=50, eval_batches=32, checkpoint_every=50)
  config.train.eval_at_start = True
  if arg.data == "humaneval_pairs":
    config.train.update(seq_len=512, batch_size=8)
  config.optim.update(lr=LEARNING_RATES[arg.method], warmup_steps=10, weight_decay=0.0)
  if arg.runlocal:
    config.train.update(steps=4, batch_size=8, seq_len=64, log_every=1, eval_every=2, eval_batches=2,
                        checkpoint_every=2)
    config.optim.warmup_steps = 1
  return config
