"""LoRA fine-tuning: configs/sft.py with `peft.method=lora`.

Rank 16, alpha 32, on all linear layers (attention and MLP, as "LoRA Without
Regret" recommends); only the adapters train, with a 10x larger learning rate
than full fine-tuning. `tools/merge_lora.py` folds the adapters into the base.

  python -m lmstack.main --config=configs/lora.py:init_from=runs/pretrain --workdir=runs/lora
  python -m lmstack.main --config=configs/lora.py:init_from=runs/pretrain,qlora --workdir=runs/qlora
  python -m lmstack.main --config=configs/lora.py:init_from=runs/pretrain --workdir=runs/lora_attn \\
      --config.peft.targets='attn/.*' --config.peft.rank=8

Arguments: init_from=<checkpoint>, data=<wordnet|humaneval|jsonl>, qlora (NF4 base), runlocal.
"""

from configs import common, sft


def get_config(arg=None):
  arg = common.parse_arg(arg, init_from="", data="wordnet", qlora=False, runlocal=False)
  method = "qlora" if arg.qlora else "lora"
  parts = [f"method={method}", f"data={arg.data}"] + ["runlocal"] * arg.runlocal
  if arg.init_from:
    parts.append(f"init_from={arg.init_from}")
  return sft.get_config(",".join(parts))
