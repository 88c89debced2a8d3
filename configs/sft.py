"""Supervised fine-tuning: prompt -> response, loss on the response only.

Changes from configs/pretrain.py: `init_from` a checkpoint (its model shape
and tokenizer), SFT data (`data.kind=sft`: the shipped WordNet definitions by
default, or HumanEval, or your JSONL), a lower learning rate, and a method
(`peft.method`): full fine-tuning by default; LoRA, QLoRA, prompt tuning,
prefix tuning, bottleneck adapters or LLaMA-Adapter train only their own
parameters (lmstack/model/peft.py; configs/lora.py is this file with LoRA).

  python -m lmstack.main --config=configs/sft.py:init_from=runs/pretrain --workdir=runs/sft
  python -m lmstack.main --config=configs/sft.py:init_from=runs/pretrain,method=prefix,data=humaneval \\
      --workdir=runs/prefix --config.peft.num_virtual_tokens=32

Arguments: init_from=<checkpoint>, method=<full|lora|qlora|prompt|prefix|adapter|llama_adapter>,
data=<wordnet|humaneval|jsonl> (jsonl: set --config.data.train_files/eval_files and the field
names), runlocal.
"""

from configs import common, pretrain
from lmstack.model import peft

# Learning rates that worked on the default model (tools/sft_sweep.py): the
# adapters want a larger step than full fine-tuning (LoRA ~10x).
LEARNING_RATES = {"full": 1e-4, "lora": 1e-3, "qlora": 1e-3, "prompt": 3e-2, "prefix": 1e-2,
                  "adapter": 1e-3, "llama_adapter": 1e-2}


def get_config(arg=None):
  arg = common.parse_arg(arg, init_from="", method="full", data="wordnet", runlocal=False)
  if arg.method not in LEARNING_RATES:
    raise ValueError(f"method={arg.method!r}; expected one of {sorted(LEARNING_RATES)}")
  config = pretrain.get_config("runlocal" if arg.runlocal else "")
  if arg.init_from:
    common.from_checkpoint(config, arg.init_from)
  config.data.kind = "sft"
  config.data.format = arg.data
  config.data.prompt_field = "prompt"
  config.data.response_field = "response"
  config.data.messages_field = ""  # a chat field instead: rendered with the chat template
  config.data.separator = "\n"  # between prompt and response

  method = "none" if arg.method == "full" else arg.method
  config.peft = common.peft_section(method)
  config.trainable = peft.trainable_pattern(method)

  config.train.update(steps=300, batch_size=16, seq_len=128, eval_every=100, checkpoint_every=100,
                      report_unigram=False)
  config.optim.update(lr=LEARNING_RATES[arg.method], schedule="cosine", warmup_steps=10, min_lr_ratio=0.0,
                      weight_decay=0.0 if method != "none" else 0.1)
  if arg.data == "humaneval":
    config.train.seq_len = 512
  if arg.runlocal:
    config.train.update(steps=4, batch_size=8, seq_len=64, log_every=1, eval_every=2, eval_batches=2,
                        checkpoint_every=2)
    config.optim.warmup_steps = 1
  return config
