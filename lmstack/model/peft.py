"""Parameter-efficient fine-tuning: adapter parameters, quantized bases, merging.

A method is one `PeftConfig` inside the `ModelConfig` (`config.peft` in a
stage config); the transformer builds the method's parameters next to the
base ones and `trainable_pattern(method)` names them, so the stage trains
only those (`config.trainable`) and the base is frozen: no gradients, no
optimizer state, never written. Methods:

  lora           W x + (alpha / r) B A x on the linear layers whose name
                 ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up",
                 "mlp/down", and "unembed", the output projection when it is
                 not tied) matches `targets` (default: all of them). A is
                 Gaussian with std 1/sqrt(fan_in), B is zero, so training
                 starts at the base model. rsLoRA scales by alpha / sqrt(r).
                 With `embed`, the input embedding too: E[t] + scale A[t] B,
                 A [V, r] zero and B Gaussian (an embedding has no fan-in).
  qlora          lora over a base stored quantized (int8 or NF4, absmax
                 scales per block of `quant_block` input rows); each weight is
                 dequantized to the matmul dtype when used.
  prompt         `num_virtual_tokens` trained input embeddings before every
                 row (prompt tuning). Being first, they attend only to each
                 other, so their keys and values at every layer are computed
                 once per step by running the frozen model on them alone, and
                 the real tokens (positions shifted by P) attend to them.
  prefix         trained keys and values, P per layer (prefix tuning),
                 directly or through an MLP from P embeddings
                 (`prefix_hidden` > 0, the paper's reparametrisation).
  adapter        Houlsby bottleneck adapters after the attention and the MLP
                 of every block: h + up(gelu(down(h))), `up` zero.
  llama_adapter  P trained prompt vectors in each of the top `adapter_layers`
                 layers; the layer's queries attend to their (frozen k/v
                 projected) keys with a separate softmax whose output is
                 scaled by a zero-initialised gate per head (LLaMA-Adapter).

lora, adapter and llama_adapter leave the model's function unchanged at
initialisation. LoRA folds back into the base weights (`merge_lora`); the
other methods keep their parameters beside the base.

Parameter names (paths under the model), which `trainable_pattern` matches:
  blocks/attn/q_lora_a [L, in, r], blocks/attn/q_lora_b [L, r, out], ...
  blocks/attn/q_codes, blocks/attn/q_scale (qlora: the quantized base)
  prompt [P, D]; prefix_kv [L, 2, P, K, H] or prefix_embed, prefix_mlp_*
  blocks/attn_adapter/{down,down_bias,up,up_bias}, blocks/mlp_adapter/...
  adaption_prompt [L', P, D], adaption_gate [L', N]
"""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

METHODS = ("none", "lora", "qlora", "prompt", "prefix", "adapter", "llama_adapter")
QUANT = ("int8", "nf4")

_TRAINABLE = {
    "none": ".*",
    "lora": r".*_lora_[ab]",
    "qlora": r".*_lora_[ab]",
    "prompt": "prompt",
    "prefix": r"prefix_.*",
    "adapter": r"blocks/(attn|mlp)_adapter/.*",
    "llama_adapter": r"adaption_.*",
}

# The 16 NF4 levels of the QLoRA paper (Dettmers et al. 2023, appendix E):
# quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  """Which parameter-efficient method, and its knobs (see the module doc)."""
  method: str = "none"
  rank: int = 16
  alpha: float = 32.0
  rslora: bool = False
  dropout: float = 0.0  # LoRA dropout on the adapter's input, training only
  targets: str = ".*"  # regex over linear names; "attn/.*" is attention-only
  embed: bool = False  # lora/qlora: also adapt the input embedding (rows A[token] B)
  quant: str = "nf4"  # qlora: int8 | nf4
  quant_block: int = 64
  num_virtual_tokens: int = 16  # P of prompt, prefix and llama_adapter
  prompt_init: str = "vocab"  # prompt: random | vocab | text
  prompt_init_text: str = ""
  prefix_hidden: int = 0  # prefix: MLP reparametrisation width (0: direct)
  adapter_dim: int = 64  # adapter: bottleneck width
  adapter_layers: int = 0  # llama_adapter: top layers with prompts (0: all)

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"peft.method={self.method!r}; expected one of {', '.join(METHODS)}")
    if self.method == "qlora" and self.quant not in QUANT:
      raise ValueError(f"peft.quant={self.quant!r}; expected int8 or nf4")
    if self.method in ("lora", "qlora") and self.rank < 1:
      raise ValueError(f"peft.rank={self.rank} must be >= 1")
    if not 0 <= self.dropout < 1:
      raise ValueError(f"peft.dropout={self.dropout} must be in [0, 1)")
    if self.method in ("prompt", "prefix", "llama_adapter") and self.num_virtual_tokens < 1:
      raise ValueError(f"peft.num_virtual_tokens={self.num_virtual_tokens} must be >= 1")
    if self.prompt_init not in ("random", "vocab", "text"):
      raise ValueError(f"peft.prompt_init={self.prompt_init!r}; expected random, vocab or text")
    try:
      re.compile(self.targets)
    except re.error as e:
      raise ValueError(f"peft.targets={self.targets!r} is not a regular expression: {e}") from None

  @property
  def lora(self):
    return self.method in ("lora", "qlora")

  @property
  def scale(self):
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def trainable_pattern(method):
  """The `config.trainable` regex that selects `method`'s parameters."""
  return _TRAINABLE[method]


def linear_specs(cfg):
  """{name: (weight shape, logical axes, number of input dims)} of a block's linears."""
  d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
  return {
      "attn/q": ((d, n, h), ("embed", "heads", "head_dim"), 1),
      "attn/k": ((d, k, h), ("embed", "kv_heads", "head_dim"), 1),
      "attn/v": ((d, k, h), ("embed", "kv_heads", "head_dim"), 1),
      "attn/o": ((n, h, d), ("heads", "head_dim", "embed"), 2),
      "mlp/gate": ((d, f), ("embed", "mlp"), 1),
      "mlp/up": ((d, f), ("embed", "mlp"), 1),
      "mlp/down": ((f, d), ("mlp", "embed"), 1),
  }


def lora_targets(cfg):
  """The linear names that get LoRA under `cfg.peft` (empty if not LoRA)."""
  if not cfg.peft.lora:
    return []
  regex = re.compile(cfg.peft.targets)
  return [name for name in linear_specs(cfg) if regex.fullmatch(name)]


def lora_embed(cfg):
  """Whether the input embedding gets LoRA (`peft.embed`)."""
  return cfg.peft.lora and cfg.peft.embed


def lora_unembed(cfg):
  """Whether the output projection gets LoRA (untied embeddings only)."""
  return cfg.peft.lora and not cfg.tie_embeddings and re.fullmatch(cfg.peft.targets, "unembed") is not None


def _block_size(cfg, fan_in):
  return math.gcd(cfg.peft.quant_block, fan_in)


# ---------------------------------------------------------------------------
# Quantization of a frozen base weight (QLoRA).


def quantize(w_io, kind, block):
  """(codes, absmax) of a weight flattened to [in, out].

  Blocks of `block` consecutive input rows share one absmax per output
  column. int8: round(127 w / absmax), codes [in/block, block, out] int8.
  nf4: the index of the nearest NF4 level of w / absmax, two 4-bit codes per
  byte, codes [in/block, block/2, out] uint8. absmax: [in/block, out] float32.
  """
  fan_in, fan_out = w_io.shape
  blocks = jnp.asarray(w_io, jnp.float32).reshape(fan_in // block, block, fan_out)
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  normed = blocks / jnp.where(absmax == 0, 1.0, absmax)[:, None, :]
  if kind == "int8":
    return jnp.round(normed * 127).astype(jnp.int8), absmax
  midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
  codes = jnp.searchsorted(midpoints, normed).astype(jnp.uint8)
  return codes[:, 0::2] | (codes[:, 1::2] << 4), absmax


def _split(shape, in_ndim):
  return math.prod(shape[:in_ndim]), math.prod(shape[in_ndim:])


def dequantize(codes, absmax, kind, shape, dtype=jnp.float32):
  """The weight of shape `shape` that `codes`, `absmax` store."""
  if kind == "int8":
    normed = codes.astype(jnp.float32) / 127
  else:
    levels = jnp.asarray(NF4_LEVELS)
    lo, hi = levels[codes & 15], levels[codes >> 4]
    normed = jnp.stack([lo, hi], axis=2).reshape(codes.shape[0], codes.shape[1] * 2, codes.shape[2])
  return (normed * absmax[:, None, :]).reshape(shape).astype(dtype)


def quantize_weight(w, cfg, name):
  """Quantizes one (possibly layer-stacked) base weight of linear `name`."""
  shape, _, in_ndim = linear_specs(cfg)[name]
  fan_in, fan_out = _split(shape, in_ndim)
  block = _block_size(cfg, fan_in)
  fn = lambda x: quantize(x.reshape(fan_in, fan_out), cfg.peft.quant, block)
  for _ in range(w.ndim - len(shape)):  # leading layers axis
    fn = jax.vmap(fn)
  return fn(w)


def dequantize_weight(codes, absmax, cfg, name, dtype=jnp.float32):
  shape, _, _ = linear_specs(cfg)[name]
  fn = lambda c, s: dequantize(c, s, cfg.peft.quant, shape, dtype)
  for _ in range(codes.ndim - 3):
    fn = jax.vmap(fn)
  return fn(codes, absmax)


# ---------------------------------------------------------------------------
# Building the parameters (called from the transformer's constructors).


def _param(value, axes):
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def make_linear(module, cfg, name, std, rngs):
  """Sets `module.<w>` (or its quantized codes and scale) and its LoRA factors."""
  shape, axes, in_ndim = linear_specs(cfg)[name]
  attr = name.split("/")[1]
  w = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  if cfg.peft.method == "qlora":
    fan_in, fan_out = _split(shape, in_ndim)
    codes, absmax = quantize(w.reshape(fan_in, fan_out), cfg.peft.quant, _block_size(cfg, fan_in))
    setattr(module, attr + "_codes", _param(codes, (axes[0], None, axes[-1])))
    setattr(module, attr + "_scale", _param(absmax, (axes[0], axes[-1])))
  else:
    setattr(module, attr, _param(w, axes))
  if name in lora_targets(cfg):
    fan_in, fan_out = _split(shape, in_ndim)
    a = jax.random.normal(rngs.params(), (fan_in, cfg.peft.rank), jnp.float32) / math.sqrt(fan_in)
    setattr(module, attr + "_lora_a", _param(a, (axes[0], None)))
    setattr(module, attr + "_lora_b", _param(jnp.zeros((cfg.peft.rank, fan_out)), (None, axes[-1])))


def base_weight(module, cfg, name, dtype):
  """The base weight of linear `name` as `dtype` (dequantized under qlora)."""
  attr = name.split("/")[1]
  if cfg.peft.method == "qlora":
    shape, _, _ = linear_specs(cfg)[name]
    return dequantize(getattr(module, attr + "_codes")[...], getattr(module, attr + "_scale")[...],
                      cfg.peft.quant, shape, dtype)
  return getattr(module, attr)[...]


def lora_delta(module, cfg, name, x, rng, matmul):
  """(alpha / r) B A x for linear `name`, or None when it has no LoRA.

  x: [B, T, in...]; returns [B, T, out...] float32. `matmul(eq, x, w)` is the
  model's mixed-precision einsum.
  """
  if name not in lora_targets(cfg):
    return None
  shape, _, in_ndim = linear_specs(cfg)[name]
  attr = name.split("/")[1]
  b, t = x.shape[:2]
  x_bti = x.reshape(b, t, -1)
  p = cfg.peft
  if p.dropout and rng is not None:
    keep = jax.random.bernoulli(rng, 1 - p.dropout, x_bti.shape)
    x_bti = jnp.where(keep, x_bti / (1 - p.dropout), 0).astype(x_bti.dtype)
  h_btr = matmul("bti,ir->btr", x_bti, getattr(module, attr + "_lora_a")[...])
  y_bto = matmul("btr,ro->bto", h_btr, getattr(module, attr + "_lora_b")[...])
  return (p.scale * y_bto).reshape(b, t, *shape[in_ndim:])


class Bottleneck(nnx.Module):
  """Houlsby adapter: h + up(gelu(down(h))), `up` zero at initialisation."""

  def __init__(self, cfg, rngs):
    d, a = cfg.d_model, cfg.peft.adapter_dim
    self.down = _param(cfg.init_std * jax.random.normal(rngs.params(), (d, a)), ("embed", None))
    self.down_bias = _param(jnp.zeros((a,)), (None,))
    self.up = _param(jnp.zeros((a, d)), (None, "embed"))
    self.up_bias = _param(jnp.zeros((d,)), ("embed",))

  def __call__(self, h_btd, matmul):
    z_bta = jax.nn.gelu(matmul("btd,da->bta", h_btd, self.down[...]) + self.down_bias[...])
    return h_btd + matmul("bta,ad->btd", z_bta, self.up[...]) + self.up_bias[...]


def make_model_params(model, cfg, rngs):
  """The model-level parameters of prompt, prefix and llama_adapter."""
  p = cfg.peft
  n_virtual, d, std = p.num_virtual_tokens, cfg.d_model, cfg.init_std
  if lora_unembed(cfg):
    a = jax.random.normal(rngs.params(), (d, p.rank), jnp.float32) / math.sqrt(d)
    model.unembed_lora_a = _param(a, ("embed", None))
    model.unembed_lora_b = _param(jnp.zeros((p.rank, cfg.vocab_size)), (None, "vocab"))
  if lora_embed(cfg):
    model.embed_lora_a = _param(jnp.zeros((cfg.vocab_size, p.rank)), ("vocab", None))
    b = jax.random.normal(rngs.params(), (p.rank, d), jnp.float32) / math.sqrt(p.rank)
    model.embed_lora_b = _param(b, (None, "embed"))
  if p.method == "prompt":
    model.prompt = _param(std * jax.random.normal(rngs.params(), (n_virtual, d)), (None, "embed"))
  elif p.method == "prefix":
    kv_shape = (cfg.n_layers, 2, n_virtual, cfg.n_kv_heads, cfg.head_dim)
    if p.prefix_hidden:
      out = math.prod(kv_shape) // n_virtual
      model.prefix_embed = _param(std * jax.random.normal(rngs.params(), (n_virtual, d)), (None, "embed"))
      model.prefix_mlp_in = _param(std * jax.random.normal(rngs.params(), (d, p.prefix_hidden)), ("embed", "mlp"))
      model.prefix_mlp_in_bias = _param(jnp.zeros((p.prefix_hidden,)), ("mlp",))
      model.prefix_mlp_out = _param(std * jax.random.normal(rngs.params(), (p.prefix_hidden, out)), ("mlp", None))
      model.prefix_mlp_out_bias = _param(jnp.zeros((out,)), (None,))
    else:
      model.prefix_kv = _param(std * jax.random.normal(rngs.params(), kv_shape),
                               ("layers", None, None, "kv_heads", "head_dim"))
  elif p.method == "llama_adapter":
    layers = adapter_layers(cfg)
    model.adaption_prompt = _param(std * jax.random.normal(rngs.params(), (layers, n_virtual, d)),
                                   (None, None, "embed"))
    model.adaption_gate = _param(jnp.zeros((layers, cfg.n_heads)), (None, "heads"))


def adapter_layers(cfg):
  n = cfg.peft.adapter_layers
  return cfg.n_layers if n <= 0 else min(n, cfg.n_layers)


def prefix_kv(model, cfg, matmul):
  """Prefix tuning's keys and values per layer: [L, 2, P, K, H] float32."""
  if not cfg.peft.prefix_hidden:
    return model.prefix_kv[...]
  h_ph = jnp.tanh(matmul("bpd,dh->bph", model.prefix_embed[...][None], model.prefix_mlp_in[...])[0]
                  + model.prefix_mlp_in_bias[...])
  out_po = matmul("bph,ho->bpo", h_ph[None], model.prefix_mlp_out[...])[0] + model.prefix_mlp_out_bias[...]
  p = cfg.peft.num_virtual_tokens
  out = out_po.reshape(p, cfg.n_layers, 2, cfg.n_kv_heads, cfg.head_dim)
  return out.transpose(1, 2, 0, 3, 4)


def adaption_per_layer(model, cfg):
  """(prompts [L, P, D], gates [L, N]): zeros below the top adapter layers."""
  n = adapter_layers(cfg)
  prompt, gate = model.adaption_prompt[...], model.adaption_gate[...]
  pad = cfg.n_layers - n
  if pad:
    prompt = jnp.concatenate([jnp.zeros((pad,) + prompt.shape[1:], prompt.dtype), prompt])
    gate = jnp.concatenate([jnp.zeros((pad,) + gate.shape[1:], gate.dtype), gate])
  return prompt, gate


def num_trainable(cfg):
  """The closed-form count of the method's trainable parameters."""
  p, L, d = cfg.peft, cfg.n_layers, cfg.d_model
  if p.method == "none":
    return cfg.num_params()
  if p.lora:
    total = 0
    for name in lora_targets(cfg):
      shape, _, in_ndim = linear_specs(cfg)[name]
      fan_in, fan_out = _split(shape, in_ndim)
      total += p.rank * (fan_in + fan_out)
    total = L * total + (p.rank * (d + cfg.vocab_size) if lora_unembed(cfg) else 0)
    return total + (p.rank * (cfg.vocab_size + d) if lora_embed(cfg) else 0)
  kv = 2 * cfg.n_kv_heads * cfg.head_dim
  if p.method == "prompt":
    return p.num_virtual_tokens * d
  if p.method == "prefix":
    if not p.prefix_hidden:
      return L * p.num_virtual_tokens * kv
    h = p.prefix_hidden
    return p.num_virtual_tokens * d + d * h + h + h * L * kv + L * kv
  if p.method == "adapter":
    return L * 2 * (2 * d * p.adapter_dim + p.adapter_dim + d)
  return adapter_layers(cfg) * (p.num_virtual_tokens * d + cfg.n_heads)  # llama_adapter


# ---------------------------------------------------------------------------
# Pure-dict transforms: checkpoints between methods.


def _blocks_module(name):
  return name.split("/")[0]  # "attn" or "mlp"


def merge_lora(params, cfg):
  """(params, cfg) of the plain model with LoRA folded into the base weights.

  W' = W + (alpha / r) reshape(A B); under qlora W is the dequantized base,
  so the merged model computes what the trained one did (up to the matmul
  dtype). `params` is a pure dict with the base weights in full precision
  (what `lmstack.checkpoint.restore_params` returns for a LoRA checkpoint).
  """
  if not cfg.peft.lora:
    raise ValueError(f"merge_lora: the checkpoint's method is {cfg.peft.method!r}, not lora or qlora")
  out = jax.tree.map(lambda x: x, params)
  blocks = out["blocks"]
  for name in lora_targets(cfg):
    module, attr = name.split("/")
    shape, _, _ = linear_specs(cfg)[name]
    a = blocks[module].pop(attr + "_lora_a")
    b = blocks[module].pop(attr + "_lora_b")
    w = blocks[module][attr]
    delta = jnp.einsum("lir,lro->lio", a, b, preferred_element_type=jnp.float32) * cfg.peft.scale
    blocks[module][attr] = (w + delta.reshape(w.shape)).astype(w.dtype)
  if "unembed_lora_a" in out:
    a, b = out.pop("unembed_lora_a"), out.pop("unembed_lora_b")
    delta = jnp.einsum("dr,rv->dv", a, b, preferred_element_type=jnp.float32) * cfg.peft.scale
    out["unembed"] = (out["unembed"] + delta).astype(out["unembed"].dtype)
  if "embed_lora_a" in out:
    a, b = out.pop("embed_lora_a"), out.pop("embed_lora_b")
    delta = jnp.einsum("vr,rd->vd", a, b, preferred_element_type=jnp.float32) * cfg.peft.scale
    out["embed"] = (out["embed"] + delta).astype(out["embed"].dtype)
  return out, dataclasses.replace(cfg, peft=PeftConfig())


def dequantized_base(base, cfg):
  """`base` (full-precision weights) as the qlora model sees them: quantized
  and dequantized with `cfg.peft`'s scheme; other configs return it as is."""
  if cfg.peft.method != "qlora":
    return base
  out = jax.tree.map(lambda x: x, base)
  for name in linear_specs(cfg):
    module, attr = name.split("/")
    w = out["blocks"][module][attr]
    codes, absmax = quantize_weight(w, cfg, name)
    out["blocks"][module][attr] = dequantize_weight(codes, absmax, cfg, name).astype(w.dtype)
  return out


def quantize_base(base, cfg):
  """The qlora model's frozen base: each linear weight -> _codes, _scale."""
  out = jax.tree.map(lambda x: x, base)
  for name in linear_specs(cfg):
    module, attr = name.split("/")
    w = out["blocks"][module].pop(attr)
    codes, absmax = quantize_weight(w, cfg, name)
    out["blocks"][module][attr + "_codes"] = codes
    out["blocks"][module][attr + "_scale"] = absmax
  return out


def initial_prompt(embed_vd, cfg, tokenizer=None, seed=0):
  """Prompt tuning's start [P, D]: rows of the (trained) embedding table.

  vocab: rows of P token ids drawn uniformly from the tokenizer's ordinary
  pieces; text: the rows of `prompt_init_text`'s tokens, repeated to P.
  """
  p = cfg.peft
  embed_vd = np.asarray(embed_vd)
  if p.prompt_init == "text":
    if tokenizer is None or not p.prompt_init_text:
      raise ValueError("peft.prompt_init=text needs peft.prompt_init_text and a tokenizer")
    ids = list(tokenizer.encode(p.prompt_init_text))
    if not ids:
      raise ValueError(f"peft.prompt_init_text={p.prompt_init_text!r} encodes to no tokens")
    ids = (ids * (p.num_virtual_tokens // len(ids) + 1))[:p.num_virtual_tokens]
  else:
    low = 4 if embed_vd.shape[0] > 4 else 0  # skip pad/unk/bos/eos
    high = tokenizer.vocab_size if tokenizer is not None else embed_vd.shape[0]
    ids = np.random.default_rng(seed).integers(low, high, p.num_virtual_tokens)
  return jnp.asarray(embed_vd[np.asarray(ids)])
