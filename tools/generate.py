"""Generates text from an lmstack checkpoint with the KV-cache decoder.

  python tools/generate.py --ckpt=runs/pretrain --prompt="HAMLET. To be, or not" --max_new_tokens=64
  python tools/generate.py --ckpt=runs/pretrain --prompts_file=prompts.txt --temperature=0.8 --top_p=0.95

`--ckpt` is a training workdir, its checkpoints/ directory or one step
directory; the model shape and the tokenizer come from the checkpoint itself.
Prompts (one per line in --prompts_file) are decoded together in one batch.
"""

import dataclasses
import sys
import time

from absl import app, flags, logging

_CKPT = flags.DEFINE_string("ckpt", None, "Workdir, checkpoints dir or step dir.", required=True)
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 for greedy decoding.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1.0: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Matmul input dtype for decoding.")


def load_model(ckpt, dtype="float32"):
  """(model, tokenizer) from a training workdir or a params checkpoint."""
  import base64

  from lmstack import checkpoint as ckpt_lib
  from lmstack.data.tokenizer import tokenizer_from_bytes
  from lmstack.errors import CheckpointError

  params, cfg, meta = ckpt_lib.restore_params(ckpt)
  cfg = dataclasses.replace(cfg, dtype=dtype, remat="none")
  if not meta.get("tokenizer_model"):
    raise CheckpointError(f"checkpoint {ckpt} carries no tokenizer")
  tokenizer = tokenizer_from_bytes(base64.b64decode(meta["tokenizer_model"]))
  return ckpt_lib.model_from_params(params, cfg), tokenizer


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from lmstack.errors import LmstackError
  from lmstack.model.generate import generate
  prompts = list(_PROMPT.value)
  if _PROMPTS_FILE.value:
    with open(_PROMPTS_FILE.value, encoding="utf-8") as f:
      prompts += [line.rstrip("\n") for line in f if line.strip()]
  if not prompts:
    print("error: give --prompt or --prompts_file", file=sys.stderr)
    return 1
  try:
    model, tok = load_model(_CKPT.value, _DTYPE.value)
    bos = [tok.bos_id] if tok.bos_id >= 0 else []  # some tokenizers (Qwen2) have no bos
    ids = [bos + tok.encode(p) for p in prompts]
    t0 = time.perf_counter()
    out = generate(model, ids, max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                   top_p=_TOP_P.value, stop_ids=tok.eos_ids, seed=_SEED.value)
    seconds = time.perf_counter() - t0
  except LmstackError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for prompt, new in zip(prompts, out):
    text = tok.decode([t for t in new if t not in tok.eos_ids])
    print(f"=== {prompt!r}\n{prompt}{text}\n")
  n = sum(len(o) for o in out)
  print(f"{n} tokens in {seconds:.2f} s (including compilation)", file=sys.stderr)
  return 0


if __name__ == "__main__":
  app.run(main)
