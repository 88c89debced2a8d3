"""Hugging Face checkpoints of the Llama family <-> lmstack params.

Supported architectures: `LlamaForCausalLM` (with Llama 3.1 "llama3" or
"linear" RoPE scaling, and tied embeddings as in SmolLM), `MistralForCausalLM`
(sliding-window attention) and `Qwen2ForCausalLM` (q/k/v biases). Anything
else in a config.json that would change the function the weights compute (an
o_proj or MLP bias, another activation, another RoPE type, quantized weights)
is refused with a one-line `CheckpointError` naming the field.

Import (the command line is tools/convert_hf.py):

  cfg = hf.hf_to_model_config(hf.read_hf_config(hf_dir), dtype="bfloat16")
  params = hf.load_hf_params(hf_dir, cfg, mesh, rules)
  model = hf.model_from_params(params, cfg)        # an nnx Transformer
  hf.save_params_checkpoint(out, params, cfg, source=hf_dir, hf_config=...)

`params` is a *pure dict* (`nnx.to_pure_dict` layout: {"embed": ...,
"blocks": {"attn": {"q": ...}}}) of float32 `jax.Array`s, each already placed
with the sharding `lmstack.sharding.state_shardings` gives it on `mesh`. Put it
into a model's abstract state with `nnx.replace_by_pure_dict(state, params)`
(`state = nnx.state(abstract_model, nnx.Param)`), then `nnx.merge`; that is
all `model_from_params` does.

Export:

  params, cfg, meta = hf.load_params_checkpoint(ckpt)  # params ckpt or training workdir
  hf.save_hf(params, cfg, out_dir, tokenizer_path="tok.model", dtype="bfloat16")

writes config.json, generation_config.json, model.safetensors (or shards and
model.safetensors.index.json) and, given a tokenizer, the files transformers'
`AutoTokenizer` loads: for a SentencePiece model tokenizer.model and a
LlamaTokenizer tokenizer_config.json (transformers converts the .model itself,
which needs the `sentencepiece` and `protobuf` packages on the reader's side);
for a Hugging Face tokenizer its tokenizer.json, byte for byte, and a
PreTrainedTokenizerFast tokenizer_config.json. The special tokens and chat
template are the tokenizer's own (what lmstack trained with), and config.json's
bos/eos/pad ids come from them.

Tokenizers. `import_checkpoint` stores the HF directory's tokenizer (what
`load_tokenizer(hf_dir)` reads) in the params checkpoint's meta, as training
checkpoints do; so a run with `init_from=<ckpt>` and `data.tokenizer=<hf_dir>`
passes the trainer's same-tokenizer check, tools/generate.py finds it, and
export writes it back. A tokenizer with more tokens than the embedding table
has rows is refused (its ids would index past it); one with fewer is allowed
(Qwen2 pads its table to 151,936 rows for 151,665 tokens), with a warning.

Layouts. lmstack stores the L layers stacked on a leading axis and splits
heads out of the projection matrices; HF stores one torch `Linear` weight
[out, in] per layer. Both use the rotate-half RoPE layout, so q and k need no
permutation:
  q_proj.weight [N*H, D]  <->  blocks/attn/q [L, D, N, H]   (W.T.reshape)
  o_proj.weight [D, N*H]  <->  blocks/attn/o [L, N, H, D]
  {gate,up}_proj [F, D], down_proj [D, F], lm_head [V, D]  <->  transposed
  q/k/v_proj.bias [N*H]   <->  blocks/attn/{q,k,v}_bias [L, N, H]
  norms and embed_tokens as they are.

Memory. Import reads one tensor at a time (safetensors files are memory
mapped), converts it to float32, writes it into the host buffer of its stacked
parameter, and hands each finished parameter to `jax.device_put` with its
sharding before starting the next, so the host holds at most one parameter
beyond what the devices hold: never two float32 copies of the model. Export
fetches one layer of one parameter at a time and holds at most one shard file
(`max_shard_bytes`) in memory. Both run on one host (export fetches through
`jax.device_get`, which needs every shard addressable).
"""

import base64
import contextlib
import dataclasses
import glob
import json
import logging
import math
import os

from flax import nnx
import jax
import ml_dtypes  # importing it registers numpy's "bfloat16", which safetensors looks up by name
import numpy as np
import orbax.checkpoint as ocp
from safetensors import safe_open
import safetensors.numpy

# model_from_params and load_params_checkpoint are re-exported: import and export are used with them.
from lmstack.checkpoint import (abstract_params, first_line, flatten_tree, model_from_params,  # noqa: F401
                                restore_params as load_params_checkpoint, tree_get, tree_set, write_manifest)
from lmstack.data import tokenizer as tokenizer_lib
from lmstack.errors import CheckpointError, ConfigError
from lmstack.model import peft
from lmstack.model.transformer import ModelConfig

LLAMA, MISTRAL, QWEN2 = "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"
ARCHITECTURES = {LLAMA: "llama", MISTRAL: "mistral", QWEN2: "qwen2"}  # -> model_type
# transformers' defaults for fields a config.json may leave out.
_DEFAULT_MAX_POSITIONS = {LLAMA: 2048, MISTRAL: 131072, QWEN2: 32768}
_DEFAULT_NORM_EPS = 1e-6

# Weight dtypes that convert exactly to float32; anything else (int8, fp8,
# packed 4-bit) is a quantized checkpoint that needs its own dequantization.
_FLOAT_DTYPES = ("F32", "F16", "BF16")
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # "5GB", as transformers counts
# Tensors some checkpoints carry that hold nothing to import: old transformers
# versions saved RoPE's inverse frequencies as a buffer.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------------------
# config.json <-> ModelConfig


def read_hf_config(hf_dir):
  """The parsed config.json of a Hugging Face model directory."""
  path = os.path.join(hf_dir, "config.json")
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{path} not found: {hf_dir!r} is not a Hugging Face model directory") from None
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {first_line(e)})") from None


def hf_to_model_config(hf_config: dict, **overrides) -> ModelConfig:
  """The ModelConfig of a Llama/Mistral/Qwen2 config.json (a dict).

  `overrides` set ModelConfig fields the checkpoint does not determine
  (`dtype`, `remat`, `scan_layers`, `max_seq_len`, ...).
  """
  return _hf_to_model_config(hf_config, "config.json", overrides)


def _hf_to_model_config(hf, where, overrides):
  arch = _architecture(hf, where)

  def need(key):
    if hf.get(key) is None:
      raise CheckpointError(f"{where}: field {key!r} is missing")
    return hf[key]

  def refuse(key, value, why):
    raise CheckpointError(f"{where}: {key}={json.dumps(value)} is not supported ({why})")

  act = hf.get("hidden_act", "silu")
  if act not in ("silu", "swish"):  # transformers maps both names to SiLU
    refuse("hidden_act", act, "lmstack's MLP is SwiGLU: silu only")
  if hf.get("mlp_bias"):
    refuse("mlp_bias", hf["mlp_bias"], "lmstack's MLP has no biases")
  if arch == LLAMA and hf.get("attention_bias"):
    refuse("attention_bias", hf["attention_bias"], "q/k/v/o biases on a Llama; lmstack has q/k/v biases only, "
           "as Qwen2ForCausalLM")
  quantization = hf.get("quantization_config")
  if quantization:
    refuse("quantization_config", quantization.get("quant_method", "?") if isinstance(quantization, dict)
           else quantization, "quantized weights")
  # Other fields are ignored on purpose: dropout, initializer_range, use_cache,
  # and Llama-2's pretraining_tp (its sliced matmuls compute the same function).

  n_heads, d_model, n_layers = need("num_attention_heads"), need("hidden_size"), need("num_hidden_layers")
  values = dict(
      vocab_size=need("vocab_size"),
      d_model=d_model,
      n_layers=n_layers,
      n_heads=n_heads,
      n_kv_heads=hf.get("num_key_value_heads") or n_heads,
      head_dim=hf.get("head_dim") or d_model // n_heads,
      mlp_dim=need("intermediate_size"),
      max_seq_len=hf.get("max_position_embeddings") or _DEFAULT_MAX_POSITIONS[arch],
      norm_eps=float(hf.get("rms_norm_eps") or _DEFAULT_NORM_EPS),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=arch == QWEN2,
      sliding_window=_sliding_window(hf, arch, n_layers, where),
      **_rope(hf, where),
  )
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ConfigError(f"unknown ModelConfig fields {unknown}; expected some of {sorted(fields)}")
  values.update(overrides)
  try:
    return ModelConfig(**values)
  except ValueError as e:
    raise ConfigError(f"{where}: {e}") from None


def _architecture(hf, where):
  archs = hf.get("architectures")
  if archs is None:  # some configs name only the model type
    by_type = {t: a for a, t in ARCHITECTURES.items()}
    if hf.get("model_type") not in by_type:
      raise CheckpointError(f"{where}: model_type={json.dumps(hf.get('model_type'))} (and no architectures) is "
                            f"not supported; expected one of {', '.join(by_type)}")
    return by_type[hf["model_type"]]
  if not (isinstance(archs, list) and len(archs) == 1 and archs[0] in ARCHITECTURES):
    raise CheckpointError(f"{where}: architectures={json.dumps(archs)} is not supported; expected one of "
                          f"{', '.join(ARCHITECTURES)}")
  return archs[0]


def _rope(hf, where):
  """RoPE fields from the legacy (`rope_theta` + `rope_scaling`) or the
  transformers 5 (`rope_parameters`) spelling; transformers prefers the first."""
  params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
    raise CheckpointError(f"{where}: per-layer-type RoPE parameters are not supported")
  theta = float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
  if partial not in (None, 1, 1.0):
    raise CheckpointError(f"{where}: partial_rotary_factor={partial} is not supported (lmstack rotates whole heads)")
  kind = params.get("rope_type", params.get("type", "default"))

  def need(key, default=None):
    value = params.get(key, default)
    if value is None:
      raise CheckpointError(f"{where}: rope_type={kind!r} needs the field {key!r}")
    return value

  if kind == "default":
    return dict(rope_theta=theta, rope_scaling="none")
  if kind == "linear":
    return dict(rope_theta=theta, rope_scaling="linear", rope_scaling_factor=float(need("factor")))
  if kind == "llama3":
    return dict(rope_theta=theta, rope_scaling="llama3", rope_scaling_factor=float(need("factor")),
                rope_low_freq_factor=float(need("low_freq_factor")),
                rope_high_freq_factor=float(need("high_freq_factor")),
                rope_original_max_len=int(need("original_max_position_embeddings",
                                               hf.get("max_position_embeddings"))))
  raise CheckpointError(f"{where}: rope_type={kind!r} is not supported; expected default, linear or llama3")


def _sliding_window(hf, arch, n_layers, where):
  """lmstack's `sliding_window` (0: none): one window for every layer."""
  if arch == MISTRAL:
    return int(hf.get("sliding_window") or 0)
  if arch != QWEN2:
    return 0  # Llama has no sliding window
  # Qwen2 (as transformers 5 reads it): the window applies only with
  # use_sliding_window, to the layers marked "sliding_attention" in
  # layer_types, or by default to layers >= max_window_layers.
  window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
  if not window:
    return 0
  types = hf.get("layer_types") or [
      "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention" for i in range(n_layers)]
  n_sliding = sum(t == "sliding_attention" for t in types)
  if n_sliding == 0:
    return 0
  if n_sliding != n_layers:
    raise CheckpointError(f"{where}: use_sliding_window=true with {n_sliding} of {n_layers} layers sliding "
                          f"(max_window_layers={hf.get('max_window_layers')}) is not supported; lmstack uses "
                          "one attention pattern for every layer")
  return int(window)


def infer_architecture(cfg: ModelConfig) -> str:
  """The HF architecture that computes what `cfg` does."""
  if cfg.qkv_bias:
    return QWEN2
  return MISTRAL if cfg.sliding_window else LLAMA


def model_config_to_hf(cfg: ModelConfig, architecture: str = LLAMA) -> dict:
  """A config.json dict (without dtype and token ids; `save_hf` adds them).

  `architecture="auto"` picks one with `infer_architecture`. Both the legacy
  `rope_theta`/`rope_scaling` fields and transformers 5's `rope_parameters`
  are written, so transformers 4 and 5 read the same RoPE.
  """
  if architecture == "auto":
    architecture = infer_architecture(cfg)
  if architecture not in ARCHITECTURES:
    raise ConfigError(f"architecture={architecture!r}; expected auto or one of {', '.join(ARCHITECTURES)}")
  if cfg.qkv_bias != (architecture == QWEN2):
    raise ConfigError(f"model.qkv_bias={cfg.qkv_bias} cannot be exported as {architecture}: q/k/v biases are "
                      f"what {QWEN2} has and the others lack")
  if cfg.sliding_window and architecture == LLAMA:
    raise ConfigError(f"model.sliding_window={cfg.sliding_window} cannot be exported as {LLAMA}; use "
                      f"{MISTRAL} (or {QWEN2} with qkv_bias)")
  if cfg.rope_scaling != "none" and architecture != LLAMA:
    raise ConfigError(f"model.rope_scaling={cfg.rope_scaling!r} is exported for {LLAMA} only")
  rope = {"rope_type": "default"}
  if cfg.rope_scaling == "linear":
    rope = {"rope_type": "linear", "factor": cfg.rope_scaling_factor}
  elif cfg.rope_scaling == "llama3":
    rope = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor, "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_len}
  hf = {
      "architectures": [architecture],
      "model_type": ARCHITECTURES[architecture],
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": None if cfg.rope_scaling == "none" else rope,
      "rope_parameters": {**rope, "rope_theta": cfg.rope_theta},
      "tie_word_embeddings": cfg.tie_embeddings,
      "initializer_range": cfg.init_std,
      "attention_dropout": 0.0,
      "use_cache": True,
  }
  if architecture == LLAMA:
    hf.update(attention_bias=False, mlp_bias=False)
  elif architecture == MISTRAL:
    hf.update(sliding_window=cfg.sliding_window or None)
  else:
    window = cfg.sliding_window or None
    hf.update(use_sliding_window=window is not None, sliding_window=window,
              max_window_layers=0 if window else cfg.n_layers,
              layer_types=["sliding_attention" if window else "full_attention"] * cfg.n_layers)
  return hf


# ---------------------------------------------------------------------------
# The tensor layout


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One lmstack parameter and its HF tensor(s)."""
  path: tuple  # keys into the pure dict
  hf_name: str  # "{}" stands for the layer index when stacked
  hf_shape: tuple  # of one layer
  transpose: bool  # HF stores it as a torch Linear weight [out, in]
  stacked: bool

  def to_lmstack(self, w, shape):
    return (w.T if self.transpose else w).reshape(shape)

  def to_hf(self, x):
    return np.ascontiguousarray(x.reshape(self.hf_shape[::-1]).T if self.transpose else x.reshape(self.hf_shape))


def _layout(cfg):
  """Every parameter of `cfg`'s model, in the order HF checkpoints list them."""
  d, n, k, h, f, v = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  out = [_Tensor(("embed",), "model.embed_tokens.weight", (v, d), False, False)]
  layer = [
      (("attn", "q"), "self_attn.q_proj.weight", (n * h, d), True),
      (("attn", "k"), "self_attn.k_proj.weight", (k * h, d), True),
      (("attn", "v"), "self_attn.v_proj.weight", (k * h, d), True),
  ]
  if cfg.qkv_bias:
    layer += [
        (("attn", "q_bias"), "self_attn.q_proj.bias", (n * h,), False),
        (("attn", "k_bias"), "self_attn.k_proj.bias", (k * h,), False),
        (("attn", "v_bias"), "self_attn.v_proj.bias", (k * h,), False),
    ]
  layer += [
      (("attn", "o"), "self_attn.o_proj.weight", (d, n * h), True),
      (("mlp", "gate"), "mlp.gate_proj.weight", (f, d), True),
      (("mlp", "up"), "mlp.up_proj.weight", (f, d), True),
      (("mlp", "down"), "mlp.down_proj.weight", (d, f), True),
      (("attn_norm", "scale"), "input_layernorm.weight", (d,), False),
      (("mlp_norm", "scale"), "post_attention_layernorm.weight", (d,), False),
  ]
  out += [_Tensor(("blocks",) + p, "model.layers.{}." + name, s, t, True) for p, name, s, t in layer]
  out.append(_Tensor(("final_norm", "scale"), "model.norm.weight", (d,), False, False))
  if not cfg.tie_embeddings:
    out.append(_Tensor(("unembed",), "lm_head.weight", (v, d), True, False))
  return out


def _hf_names(t, cfg):
  return [t.hf_name.format(i) for i in range(cfg.n_layers)] if t.stacked else [t.hf_name]


# ---------------------------------------------------------------------------
# Abstract model and shardings


# ---------------------------------------------------------------------------
# Import


class _Safetensors:
  """Reads tensors by name from a directory's safetensors file(s)."""

  def __init__(self, hf_dir):
    self.hf_dir = hf_dir
    self._stack = contextlib.ExitStack()
    self._open = {}
    try:
      self.files = self._weight_map()  # tensor name -> file path
    except BaseException:
      self._stack.close()
      raise

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._stack.close()

  def _handle(self, path):
    if path not in self._open:
      try:
        self._open[path] = self._stack.enter_context(safe_open(path, framework="numpy"))
      except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path} is not a readable safetensors file ({first_line(e)})") from None
    return self._open[path]

  def _weight_map(self):
    index_path = os.path.join(self.hf_dir, _INDEX)
    if os.path.exists(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path} is unreadable ({type(e).__name__}: {first_line(e)})") from None
      files = {name: os.path.join(self.hf_dir, file) for name, file in weight_map.items()}
      for name, path in files.items():
        if not os.path.exists(path):
          raise CheckpointError(f"{index_path} lists shard {os.path.basename(path)} (for {name}), which is "
                                "missing; the download is incomplete")
      return files
    paths = sorted(glob.glob(os.path.join(self.hf_dir, "*.safetensors")))
    if not paths:
      raise CheckpointError(f"{self.hf_dir} holds no *.safetensors weights (PyTorch .bin checkpoints are not "
                            "supported: re-save with save_pretrained(safe_serialization=True))")
    files = {}
    for path in paths:
      for name in self._handle(path).keys():
        if name in files:
          raise CheckpointError(f"tensor {name} is in both {files[name]} and {path}")
        files[name] = path
    return files

  def read(self, name, shape):
    """Tensor `name` as float32, checked to have `shape` before it is read."""
    if name not in self.files:
      raise CheckpointError(f"{self.hf_dir} has no tensor {name}, which config.json implies")
    path = self.files[name]
    f = self._handle(path)
    try:
      tensor = f.get_slice(name)
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"{path} does not hold tensor {name} ({first_line(e)})") from None
    dtype, got = tensor.get_dtype(), tuple(tensor.get_shape())
    if dtype not in _FLOAT_DTYPES:
      raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}; only {', '.join(_FLOAT_DTYPES)} weights "
                            "can be imported (quantized checkpoints are not supported)")
    if got != tuple(shape):
      raise CheckpointError(f"{path}: tensor {name} has shape {list(got)}, but config.json implies "
                            f"{list(shape)}")
    return np.asarray(f.get_tensor(name), np.float32)


def load_hf_params(hf_dir, model_cfg=None, mesh=None, rules=None):
  """Imports a Hugging Face safetensors checkpoint as sharded lmstack params.

  Args:
    hf_dir: a directory with config.json and model.safetensors, or shards
      listed in model.safetensors.index.json (or several *.safetensors).
    model_cfg: the ModelConfig to load into; default
      `hf_to_model_config(config.json)`. Its shapes must match the weights.
    mesh, rules: where to place the arrays (default one device, "fsdp").

  Returns:
    A pure dict of float32 jax.Arrays (see the module docstring), each placed
    with its sharding. `nnx.replace_by_pure_dict(nnx.state(abstract_model,
    nnx.Param), params)` or `model_from_params(params, model_cfg)` makes it a
    model.
  """
  hf_dir = os.fspath(hf_dir)
  hf_config = read_hf_config(hf_dir)
  where = os.path.join(hf_dir, "config.json")
  if model_cfg is None:
    model_cfg = _hf_to_model_config(hf_config, where, {})
  else:
    _architecture(hf_config, where)  # still refuse what is not a Llama-family model
  layout = _layout(model_cfg)
  targets = abstract_params(model_cfg, mesh, rules)
  with _Safetensors(hf_dir) as reader:
    expected = {name for t in layout for name in _hf_names(t, model_cfg)}
    if model_cfg.tie_embeddings:
      expected.add("lm_head.weight")  # some tied checkpoints still store it; it equals embed_tokens
    unexpected = sorted(n for n in reader.files if n not in expected and not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
      raise CheckpointError(f"{hf_dir} holds {len(unexpected)} tensor(s) the model has no place for, e.g. "
                            f"{unexpected[0]}; config.json does not describe this checkpoint")
    params = {}
    for t in layout:
      target = tree_get(targets, t.path)
      if t.stacked:
        host = np.empty(target.shape, np.float32)
        for i, name in enumerate(_hf_names(t, model_cfg)):
          host[i] = t.to_lmstack(reader.read(name, t.hf_shape), target.shape[1:])
      else:
        host = t.to_lmstack(reader.read(t.hf_name, t.hf_shape), target.shape)
      # Wait for the transfer, so that at most one host buffer is alive.
      tree_set(params, t.path, jax.block_until_ready(jax.device_put(host, target.sharding)))
      del host
  return params


# ---------------------------------------------------------------------------
# lmstack params checkpoints


def save_params_checkpoint(path, params, model_cfg, source=None, hf_config=None, tokenizer=None):
  """Writes an Orbax params checkpoint: `path/0/{params,meta}`.

  `params` is a pure dict (or nnx.State) of arrays; `meta` is {"model":
  the ModelConfig as a dict, "source": where the weights came from,
  "hf_config": the imported config.json} and, given `tokenizer` (an lmstack
  tokenizer), "tokenizer_model": base64 of its `to_bytes()`, the key and
  encoding of a training checkpoint's meta (`lmstack.checkpoint.make_meta`).
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(path) and os.listdir(path):
    raise CheckpointError(f"{path} already exists and is not empty; choose a new output directory")
  if isinstance(params, nnx.State):
    params = nnx.to_pure_dict(params)
  meta = {"model": dataclasses.asdict(model_cfg), "source": source, "hf_config": hf_config, "manifest": True}
  if tokenizer is not None:
    meta["tokenizer_model"] = base64.b64encode(tokenizer.to_bytes()).decode("ascii")
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
  with ocp.CheckpointManager(path, options=options) as manager:
    manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
  write_manifest(os.path.join(path, "0"))  # restore_params verifies it (and, as meta says, expects it)
  return path


# ---------------------------------------------------------------------------
# Export


def _export_tokenizer(tokenizer, name=None):
  """The lmstack tokenizer of `save_hf`'s `tokenizer_path`: a path (`.model`,
  tokenizer.json, Hugging Face directory, or a file of `to_bytes()`), the
  bytes of `to_bytes()` (a checkpoint's meta), or a tokenizer object."""
  if isinstance(tokenizer, (bytes, bytearray)):
    return tokenizer_lib.tokenizer_from_bytes(bytes(tokenizer), name=name or "<bytes>")
  if isinstance(tokenizer, (str, os.PathLike)):
    return tokenizer_lib.load_tokenizer(os.fspath(tokenizer))
  return tokenizer


def _write_json(path, obj):
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def _token_ids(tok):
  """config.json / generation_config.json ids of a tokenizer (None: unset).

  Every stop id goes in eos_token_id (a list when there are several, as in
  Llama 3's generation_config.json), so generation stops where lmstack's does.
  """
  eos = tok.eos_ids
  return {"bos_token_id": tok.bos_id if tok.bos_id >= 0 else None,
          "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
          "pad_token_id": tok.pad_id if tok.pad_id >= 0 else None}


def _hf_chat_template(template):
  """tokenizer_config.json's chat_template: a string, or transformers' list
  of {"name", "template"} for lmstack's {name: template}."""
  if isinstance(template, dict):
    return [{"name": k, "template": v} for k, v in template.items()]
  return template


def _special_tokens(tok):
  """bos/eos/unk/pad_token (None when unset) and any other special tokens
  (additional_special_tokens, cls_token, ...) of the tokenizer, as strings."""
  tokens = tok.special_tokens
  return {**tokens, **{f"{k}_token": tokens.get(f"{k}_token") for k in ("bos", "eos", "unk", "pad")}}


def _write_tokenizer(tok, out_dir, model_max_length):
  """The tokenizer files transformers' AutoTokenizer loads, for either kind.

  The special tokens and chat template are the tokenizer's resolved ones
  (`tok.special_tokens`), which are what lmstack trained with.
  """
  # The payload is the tokenizer file itself (the .model proto or the
  # tokenizer.json text, as read); to_bytes() may wrap it in an envelope.
  payload = tok._payload()  # pylint: disable=protected-access
  special = _special_tokens(tok)
  if tok.kind == "hf":
    with open(os.path.join(out_dir, tokenizer_lib.HF_TOKENIZER_FILE), "wb") as f:
      f.write(payload)
    # Whether bos is prepended is the tokenizer.json post-processor's business,
    # as for any fast tokenizer; the config only names the special tokens.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
              "clean_up_tokenization_spaces": False, "model_max_length": model_max_length}
  else:
    with open(os.path.join(out_dir, tokenizer_lib.SP_TOKENIZER_FILE), "wb") as f:
      f.write(payload)
    # transformers' LlamaTokenizer finds the special tokens by their piece
    # strings (lmstack's: <pad>, <unk>, <s>, </s> at 0, 1, 2, 3); the
    # prefix-space setting mirrors the model's add_dummy_prefix (lmstack's
    # tokenizers have none), so HF encodes as SentencePiece does.
    ids = tok.encode("a")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": bool(ids) and tok.id_to_piece(ids[0]).startswith("\u2581"),
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    _write_json(os.path.join(out_dir, "special_tokens_map.json"),
                {k: v for k, v in special.items() if k.endswith("_token") and v})
  if tok.chat_template is not None:
    config["chat_template"] = _hf_chat_template(tok.chat_template)
  _write_json(os.path.join(out_dir, "tokenizer_config.json"), config)


def save_hf(params, model_cfg, out_dir, tokenizer_path=None, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES,
            dtype="float32", architecture="auto", token_ids=None, tokenizer_name=None):
  """Writes `params` as a Hugging Face checkpoint that transformers loads.

  Args:
    params: a pure dict (or nnx.State) of the model's parameters.
    model_cfg: their ModelConfig.
    out_dir: a new or empty directory.
    tokenizer_path: the tokenizer to include: a SentencePiece .model, a
      tokenizer.json or a Hugging Face directory (what `load_tokenizer`
      reads), the bytes of `to_bytes()` (what checkpoints store), or a
      tokenizer; its special ids become config.json's bos/eos/pad ids.
    max_shard_bytes: one model.safetensors up to this size, else shards
      model-0000i-of-0000n.safetensors and model.safetensors.index.json.
    dtype: "float32" or "bfloat16" tensors (and config.json torch_dtype).
    architecture: "auto" (`infer_architecture`) or an HF architecture name.
    token_ids: {"bos_token_id", "eos_token_id", "pad_token_id"} when there is
      no tokenizer (default lmstack's: 2, 3, 0).
    tokenizer_name: what to call a tokenizer given as bytes in errors.

  Returns:
    The config.json dict written.
  """
  if dtype not in EXPORT_DTYPES:
    raise ConfigError(f"dtype={dtype!r}; expected one of {sorted(EXPORT_DTYPES)}")
  np_dtype = EXPORT_DTYPES[dtype]
  if isinstance(params, nnx.State):
    params = nnx.to_pure_dict(params)
  hf_config = model_config_to_hf(model_cfg, architecture)
  ids = {"bos_token_id": tokenizer_lib.BOS_ID, "eos_token_id": tokenizer_lib.EOS_ID,
         "pad_token_id": tokenizer_lib.PAD_ID, **(token_ids or {})}
  tok = None
  if tokenizer_path is not None:
    tok = _export_tokenizer(tokenizer_path, tokenizer_name)
    if tok.vocab_size > model_cfg.vocab_size:
      raise ConfigError(f"tokenizer {tok.name} has {tok.vocab_size} tokens but the model's vocab_size is "
                        f"{model_cfg.vocab_size}")
    ids = _token_ids(tok)
  hf_config.update(ids, torch_dtype=dtype, dtype=dtype)  # transformers 4 reads torch_dtype, 5 dtype

  # Check every parameter before writing anything.
  layout = _layout(model_cfg)
  targets = flatten_tree(abstract_params(model_cfg))
  got = flatten_tree(params)
  for p, target in targets.items():
    if p not in got:
      raise ConfigError(f"params lack {'/'.join(p)}, which the model config implies")
    if tuple(got[p].shape) != target.shape:
      raise ConfigError(f"params {'/'.join(p)} has shape {list(got[p].shape)}, the model config implies "
                        f"{list(target.shape)}")
  extra = sorted("/".join(p) for p in got if p not in targets)
  if extra:
    raise ConfigError(f"params hold {extra[0]}, which the model config has no place for")

  out_dir = os.fspath(out_dir)
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise CheckpointError(f"{out_dir} already exists and is not empty; choose a new output directory")
  os.makedirs(out_dir, exist_ok=True)

  # Tensors in HF order (embed, layer by layer, norm, lm_head), cut greedily into shards.
  order = [(layout[0], None)]
  order += [(t, i) for i in range(model_cfg.n_layers) for t in layout if t.stacked]
  order += [(t, None) for t in layout[1:] if not t.stacked]
  itemsize = np.dtype(np_dtype).itemsize
  shards, size = [[]], 0
  for t, i in order:
    nbytes = math.prod(t.hf_shape) * itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append((t, i))
    size += nbytes

  weight_map, total = {}, 0
  for s, shard in enumerate(shards):
    file = "model.safetensors" if len(shards) == 1 else f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = {}
    for t, i in shard:
      x = tree_get(params, t.path)
      x = np.asarray(jax.device_get(x if i is None else x[i]), np.float32)  # one layer at a time
      name = t.hf_name if i is None else t.hf_name.format(i)
      tensors[name] = t.to_hf(x).astype(np_dtype)
      weight_map[name] = file
      total += tensors[name].nbytes
    safetensors.numpy.save_file(tensors, os.path.join(out_dir, file), metadata={"format": "pt"})
    del tensors
  if len(shards) > 1:
    _write_json(os.path.join(out_dir, _INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
  _write_json(os.path.join(out_dir, "config.json"), hf_config)
  _write_json(os.path.join(out_dir, "generation_config.json"),
              {k: v for k, v in ids.items() if v is not None})
  if tok is not None:
    _write_tokenizer(tok, out_dir, model_cfg.max_seq_len)
  return hf_config


# ---------------------------------------------------------------------------
# Whole conversions (what tools/convert_hf.py runs)


def read_hf_tokenizer(hf_dir, vocab_size):
  """The tokenizer of a Hugging Face model directory, None if it has none.

  It is what `load_tokenizer(hf_dir)` reads (tokenizer.json, else
  tokenizer.model, with tokenizer_config.json's special tokens and chat
  template), so its `to_bytes()` equals those of a training run whose
  `config.data.tokenizer` is `hf_dir`. A broken tokenizer file is an error,
  not "no tokenizer". Refuses one with more tokens than the `vocab_size`
  rows of the embedding table; warns about one with fewer.
  """
  names = (tokenizer_lib.HF_TOKENIZER_FILE, tokenizer_lib.SP_TOKENIZER_FILE)
  if not any(os.path.isfile(os.path.join(hf_dir, name)) for name in names):
    return None
  tok = tokenizer_lib.load_tokenizer(hf_dir)
  # HFTokenizer.vocab_size is the largest id + 1, added tokens included:
  # every id it can produce must have a row.
  if tok.vocab_size > vocab_size:
    raise CheckpointError(f"{hf_dir}: the tokenizer has {tok.vocab_size} tokens but config.json's vocab_size is "
                          f"{vocab_size}; its ids would index past the embedding table")
  if tok.vocab_size < vocab_size:
    logging.warning("%s: the tokenizer has %d tokens, fewer than the %d rows of the embedding table (config.json's "
                    "vocab_size); the other rows are padding no token id reaches", hf_dir, tok.vocab_size,
                    vocab_size)
  return tok


def import_checkpoint(hf_dir, out, mesh=None, rules=None, **overrides):
  """HF directory -> lmstack params checkpoint at `out`; returns the ModelConfig.

  `overrides` set ModelConfig fields the checkpoint does not determine
  (default dtype bfloat16, the trainer's matmul input type). The directory's
  tokenizer, if it has one (`read_hf_tokenizer`), is stored in the meta.
  """
  hf_dir = os.path.abspath(os.fspath(hf_dir))
  hf_config = read_hf_config(hf_dir)
  out = os.path.abspath(os.fspath(out))
  if os.path.isdir(out) and os.listdir(out):  # before the slow part
    raise CheckpointError(f"{out} already exists and is not empty; choose a new output directory")
  model_cfg = _hf_to_model_config(hf_config, os.path.join(hf_dir, "config.json"), overrides)
  tokenizer = read_hf_tokenizer(hf_dir, model_cfg.vocab_size)
  params = load_hf_params(hf_dir, model_cfg, mesh, rules)
  save_params_checkpoint(out, params, model_cfg, source=hf_dir, hf_config=hf_config, tokenizer=tokenizer)
  return model_cfg


def export_checkpoint(ckpt, out_dir, tokenizer_path=None, dtype="float32", architecture="auto",
                      max_shard_bytes=DEFAULT_MAX_SHARD_BYTES, step=None):
  """lmstack checkpoint (params checkpoint or training workdir) -> HF directory.

  Without `tokenizer_path` (see `save_hf`), the checkpoint's own tokenizer
  (its meta's, of either kind: a training run's, or the one an import kept)
  is exported; a checkpoint imported from HF keeps that model's architecture,
  and without a tokenizer its bos/eos/pad ids, unless told otherwise.
  Returns the config.json dict.
  """
  out_dir = os.fspath(out_dir)
  if os.path.isdir(out_dir) and os.listdir(out_dir):  # before the slow part
    raise CheckpointError(f"{out_dir} already exists and is not empty; choose a new output directory")
  if tokenizer_path is not None:
    tokenizer_path = _export_tokenizer(tokenizer_path)  # a bad path fails before the slow part
  params, model_cfg, meta = load_params_checkpoint(ckpt, step=step)
  if model_cfg.peft.lora:  # a LoRA fine-tune exports as its merged model
    params, model_cfg = peft.merge_lora(params, model_cfg)
  elif model_cfg.peft.method != "none":
    raise CheckpointError(f"{ckpt} is a {model_cfg.peft.method} model; Hugging Face's Llama has no place for "
                          "its parameters (only LoRA merges into the weights)")
  source = meta.get("hf_config") or {}
  if architecture == "auto" and source.get("architectures"):
    try:  # the source architecture, when it still computes what the params do
      model_config_to_hf(model_cfg, source["architectures"][0])
      architecture = source["architectures"][0]
    except ConfigError:
      pass
  token_ids = {k: source[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in source}
  tokenizer_name = None
  if tokenizer_path is None and meta.get("tokenizer_model"):
    tokenizer_path = base64.b64decode(meta["tokenizer_model"])
    tokenizer_name = f"{os.fspath(ckpt)} (its meta)"
  return save_hf(params, model_cfg, out_dir, tokenizer_path=tokenizer_path, max_shard_bytes=max_shard_bytes,
                 dtype=dtype, architecture=architecture, token_ids=token_ids, tokenizer_name=tokenizer_name)
