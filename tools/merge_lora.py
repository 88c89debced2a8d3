"""Folds a LoRA (or QLoRA) fine-tune into its base weights: a plain checkpoint.

  python tools/merge_lora.py --ckpt=runs/lora --out=ckpt/lora_merged
  python tools/merge_lora.py --ckpt=runs/lora --out=ckpt/lora_merged --hf_out=hf/lora_merged --dtype=bfloat16

`--ckpt` is the LoRA run's workdir (or a step directory); its frozen base is
the checkpoint the run started from (its config's init_from), which must
still exist. W' = W + (alpha / r) A B for every adapted linear layer (for
QLoRA, W is the NF4/int8 base dequantized, what the adapters were trained
against). The output is a params checkpoint with the run's tokenizer, usable
as `init_from` of the next stage, by tools/generate.py, and, with --hf_out,
exported as a Hugging Face directory.
"""

import base64
import logging

from absl import app, flags

_CKPT = flags.DEFINE_string("ckpt", None, "The LoRA run's workdir, checkpoints dir or step dir.", required=True)
_OUT = flags.DEFINE_string("out", None, "The merged params checkpoint to write.", required=True)
_STEP = flags.DEFINE_integer("step", None, "The step to merge (default: the newest).")
_HF_OUT = flags.DEFINE_string("hf_out", None, "Also export the merged model as a Hugging Face directory.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "--hf_out weights dtype: float32, bfloat16 or float16.")


def merge(ckpt, out, step=None):
  """Writes the merged params checkpoint; returns (params, model_cfg)."""
  from lmstack import checkpoint as ckpt_lib
  from lmstack.convert import hf
  from lmstack.data.tokenizer import tokenizer_from_bytes
  from lmstack.errors import CheckpointError
  from lmstack.model import peft

  params, cfg, meta = ckpt_lib.restore_params(ckpt, step=step)
  if not cfg.peft.lora:
    raise CheckpointError(f"{ckpt} is not a LoRA fine-tune (its method is {cfg.peft.method!r})")
  merged, base_cfg = peft.merge_lora(params, cfg)
  tokenizer = tokenizer_from_bytes(base64.b64decode(meta["tokenizer_model"])) if meta.get("tokenizer_model") else None
  hf.save_params_checkpoint(out, merged, base_cfg, source=f"merge_lora {ckpt}", tokenizer=tokenizer)
  return merged, base_cfg


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    for name in ("absl", "jax", "orbax"):
      logging.getLogger(name).setLevel(logging.ERROR)
  from lmstack import console
  from lmstack.errors import LmstackError
  try:
    _, cfg = merge(_CKPT.value, _OUT.value, _STEP.value)
    print(f"{_OUT.value}: merged LoRA into {cfg.num_params():,} base parameters")
    if _HF_OUT.value:
      from lmstack.convert import hf
      hf.export_checkpoint(_OUT.value, _HF_OUT.value, dtype=_DTYPE.value)
      print(f"{_HF_OUT.value}: Hugging Face directory ({_DTYPE.value})")
  except LmstackError as e:
    console.fail(e)


if __name__ == "__main__":
  app.run(main)
