"""Converts Hugging Face Llama-family checkpoints to and from lmstack.

  # HF directory (config.json + safetensors) -> lmstack params checkpoint
  python tools/convert_hf.py import --hf_dir=path/to/SmolLM2-135M --out=ckpt/smollm

  # lmstack params checkpoint, or a training workdir's newest checkpoint -> HF
  python tools/convert_hf.py export --ckpt=runs/pretrain --out=hf/pretrain --dtype=bfloat16

Supported: LlamaForCausalLM (incl. llama3/linear RoPE scaling, tied
embeddings), MistralForCausalLM, Qwen2ForCausalLM; see lmstack/convert/hf.py.
A params checkpoint is an Orbax directory with step 0 holding `params` and
`meta` (the ModelConfig, the source directory and its config.json, and the
directory's tokenizer when it has one: then a run with
--config.init_from=CKPT --config.data.tokenizer=HF_DIR, and
tools/generate.py --ckpt=CKPT, use it). A tokenizer with more tokens than the
embedding table has rows is refused; one with fewer is imported with a warning.

Export writes config.json, generation_config.json, model.safetensors (or
shards of at most --max_shard_size and model.safetensors.index.json) and the
tokenizer: by default the checkpoint's own (a training run's, or the one an
import kept), else --tokenizer=FILE.model, a tokenizer.json or a Hugging Face
directory. SentencePiece becomes tokenizer.model (LlamaTokenizer), a Hugging
Face tokenizer its tokenizer.json as it was (PreTrainedTokenizerFast), with
the special tokens and chat template. `transformers.AutoModelForCausalLM
.from_pretrained` and `AutoTokenizer.from_pretrained` load the result.
Mistakes print one line and exit with status 1.
"""

import logging
import os
import re
import sys

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
# pylint: disable=g-import-not-at-top
from lmstack import console
from lmstack.errors import ConfigError, LmstackError

_HF_DIR = flags.DEFINE_string("hf_dir", None, "import: the Hugging Face model directory.")
_CKPT = flags.DEFINE_string("ckpt", None, "export: a params checkpoint or a training workdir (its newest step).")
_OUT = flags.DEFINE_string("out", None, "The output directory (new or empty).")
_STEP = flags.DEFINE_integer("step", None, "export: the checkpoint step (default the newest).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "export: the tensors' dtype.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "export: the tokenizer to include: a SentencePiece .model, a "
                                 "tokenizer.json or a Hugging Face directory (default: the checkpoint's own, if any).")
_ARCH = flags.DEFINE_string("architecture", "auto", "export: LlamaForCausalLM, MistralForCausalLM, "
                            "Qwen2ForCausalLM, or auto (the source's, else what the model needs).")
_MAX_SHARD = flags.DEFINE_string("max_shard_size", "5GB", "export: the largest safetensors file (e.g. 2GB, 500MB).")
_MESH = flags.DEFINE_list("mesh_shape", None, "import: place the weights on a (data, fsdp, tensor) mesh of the "
                          "local devices, e.g. 1,-1,1 (default one device).")
_RULES = flags.DEFINE_string("rules", "fsdp", "import: the mesh rules preset.")
_MODEL_DTYPE = flags.DEFINE_string("model_dtype", "bfloat16", "import: ModelConfig.dtype (matmul inputs) "
                                   "recorded in the checkpoint.")

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text):
  """"5GB" -> 5 * 10**9 bytes (KB/MB/GB decimal, KiB/MiB/GiB binary)."""
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
  if not m or m.group(2).upper() not in _UNITS:
    raise ConfigError(f"--max_shard_size={text!r}; expected a size such as 5GB, 500MB or 2GiB")
  return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _require(**named):
  for name, value in named.items():
    if not value:
      raise ConfigError(f"--{name} is required")


def run(command):
  from lmstack import sharding  # heavy imports after flag parsing, so --help is fast
  from lmstack.convert import hf

  if command == "import":
    _require(hf_dir=_HF_DIR.value, out=_OUT.value)
    mesh = None
    if _MESH.value:
      try:
        mesh = sharding.make_mesh(tuple(int(s) for s in _MESH.value))
      except ValueError:
        raise ConfigError(f"--mesh_shape={','.join(_MESH.value)}; expected three integers") from None
    cfg = hf.import_checkpoint(_HF_DIR.value, _OUT.value, mesh=mesh, rules=_RULES.value, dtype=_MODEL_DTYPE.value)
    print(f"{_OUT.value}: {cfg.num_params():,} parameters ({cfg.n_layers} layers, d_model {cfg.d_model}, "
          f"vocab {cfg.vocab_size}) from {_HF_DIR.value}")
  elif command == "export":
    _require(ckpt=_CKPT.value, out=_OUT.value)
    hf_config = hf.export_checkpoint(_CKPT.value, _OUT.value, tokenizer_path=_TOKENIZER.value, dtype=_DTYPE.value,
                                     architecture=_ARCH.value, max_shard_bytes=parse_size(_MAX_SHARD.value),
                                     step=_STEP.value)
    files = sorted(os.listdir(_OUT.value))
    print(f"{_OUT.value}: {hf_config['architectures'][0]} ({_DTYPE.value}): {', '.join(files)}")
  else:
    raise ConfigError(f"unknown command {command!r}; expected import or export")


def main(argv):
  if len(argv) != 2:
    print("usage: convert_hf.py import --hf_dir=DIR --out=DIR | export --ckpt=DIR --out=DIR", file=sys.stderr)
    sys.exit(1)
  if not flags.FLAGS["verbosity"].present:  # keep the console to the result line
    for name in ("absl", "jax", "orbax"):
      logging.getLogger(name).setLevel(logging.ERROR)
  try:
    run(argv[1])
  except LmstackError as e:
    console.fail(e)


if __name__ == "__main__":
  app.run(main)
