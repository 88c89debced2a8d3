"""A Llama-family decoder in Flax NNX.

RMSNorm, rotary embeddings, SwiGLU MLP, grouped-query attention, optional tied
embeddings. Parameters are float32; matmuls take `cfg.dtype` inputs (bfloat16
by default) and accumulate in float32. Every parameter carries logical axis
names in its `out_sharding` metadata (`lmstack.sharding` maps them onto the
mesh). The blocks are stored stacked on a leading `layers` axis and run with
`jax.lax.scan` (or a Python loop when `scan_layers=False`), each wrapped in
`jax.checkpoint` according to `cfg.remat`.

Shape suffixes: B batch, T query length, S key length, D model width,
N query heads, K key/value heads, G query heads per kv head, H head dim,
F MLP width, V vocabulary, L layers.
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lmstack import sharding
from lmstack.model import attention as attention_lib
from lmstack.model import peft as peft_lib
# The config lives in lmstack/model/config.py; these names stay importable from here.
from lmstack.model.config import ATTENTION_IMPLS, DTYPES, PRESETS, REMAT_NAMES, ModelConfig, check_types  # noqa: F401


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
assert tuple(REMAT_POLICIES) == REMAT_NAMES


def _param(rngs, shape, axes, std):
  """A float32 parameter with logical axis names (std 0 means ones)."""
  if std == 0:
    value = jnp.ones(shape, jnp.float32)
  else:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def _matmul(eq, x, w, dtype, out=jnp.float32):
  """Einsum with `dtype` inputs, float32 accumulation and an `out` result.

  The backward pass is written out so that its two matmuls also take `dtype`
  inputs and accumulate in float32. JAX's own transpose of a mixed-precision
  dot multiplies the float32 cotangent by upcast weights, which on CPU runs
  the backward pass (two thirds of the FLOPs) at float32 speed, about half
  the bf16-in/f32-out rate. For "A,B->C" with no index private to one
  operand, dA = "C,B->A" and dB = "A,C->B".
  """
  y = jnp.einsum(eq, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
  return y.astype(out)


def _matmul_fwd(eq, x, w, dtype, out=jnp.float32):
  return _matmul(eq, x, w, dtype, out), (x, w)


def _matmul_bwd(eq, dtype, out, res, dy):
  del out
  x, w = res
  a, rest = eq.split(",")
  b, c = rest.split("->")
  dy = dy.astype(dtype)
  dx = jnp.einsum(f"{c},{b}->{a}", dy, w.astype(dtype), preferred_element_type=jnp.float32)
  dw = jnp.einsum(f"{a},{c}->{b}", x.astype(dtype), dy, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


class RMSNorm(nnx.Module):

  def __init__(self, cfg, rngs):
    self.scale = _param(rngs, (cfg.d_model,), ("embed",), 0)
    self.eps = cfg.norm_eps

  def __call__(self, x_btd, out=jnp.float32):
    x = x_btd.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...]).astype(out)


def rope_frequencies(cfg):
  """Inverse frequencies [H/2] of the rotary embedding, after any scaling."""
  h = cfg.head_dim
  inv_freq = 1.0 / cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)
  if cfg.rope_scaling == "linear":
    return inv_freq / cfg.rope_scaling_factor
  if cfg.rope_scaling == "llama3":
    # Long wavelengths are interpolated by `factor`, short ones kept, and the
    # band between them blended linearly in 1/wavelength (Llama 3.1).
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = cfg.rope_original_max_len / cfg.rope_low_freq_factor
    high_wavelen = cfg.rope_original_max_len / cfg.rope_high_freq_factor
    smooth = ((cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor)
              / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor))
    blended = (1 - smooth) * inv_freq / cfg.rope_scaling_factor + smooth * inv_freq
    return jnp.where(wavelen < high_wavelen, inv_freq,
                     jnp.where(wavelen > low_wavelen, inv_freq / cfg.rope_scaling_factor, blended))
  return inv_freq


def rope(x_btnh, positions_bt, inv_freq):
  """Rotary embedding in the rotate-half layout (as Hugging Face Llama)."""
  angles = positions_bt[..., None].astype(jnp.float32) * inv_freq  # B T H/2
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _linear(module, cfg, eq, x, name, rng):
  """A linear layer: the base weight (dequantized under qlora) plus LoRA."""
  dt, act = cfg.compute_dtype, cfg.act_dtype
  y = _matmul(eq, x, peft_lib.base_weight(module, cfg, name, dt), dt, act)
  delta = peft_lib.lora_delta(module, cfg, name, x, rng, lambda e, a, w: _matmul(e, a, w, dt))
  return y if delta is None else (y + delta).astype(act)


class Attention(nnx.Module):

  def __init__(self, cfg, rngs):
    d, n, k, h, std = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.init_std
    self.cfg = cfg
    for name in ("q", "k", "v"):
      peft_lib.make_linear(self, cfg, "attn/" + name, std, rngs)
    if cfg.qkv_bias:
      self.q_bias = nnx.Param(jnp.zeros((n, h)), out_sharding=("heads", "head_dim"), eager_sharding=False)
      self.k_bias = nnx.Param(jnp.zeros((k, h)), out_sharding=("kv_heads", "head_dim"), eager_sharding=False)
      self.v_bias = nnx.Param(jnp.zeros((k, h)), out_sharding=("kv_heads", "head_dim"), eager_sharding=False)
    # Scaled down with depth as in GPT-2, so the residual stream stays O(1).
    peft_lib.make_linear(self, cfg, "attn/o", std / math.sqrt(2 * cfg.n_layers), rngs)
    del d, n, k, h

  def _linear(self, eq, x, name, rng):
    return _linear(self, self.cfg, eq, x, "attn/" + name, rng)

  def _project(self, x_btd, name, rng=None):
    y = self._linear("btd,dnh->btnh", x_btd, name, rng)
    if self.cfg.qkv_bias:
      y = y + getattr(self, name + "_bias")[...]
    return y

  def __call__(self, x_btd, positions_bt, mask, kv_cache=None, cache_index=None, extra=None, rng=None):
    """Self-attention; with `kv_cache` ((k, v), each B S K H), the new keys and
    values are written at slot `cache_index` and the queries attend over the
    whole cache. Returns the output, and the updated cache when given one.

    `extra` (adapters, see lmstack/model/peft.py): "k", "v" [P, K, H] are
    keys and values every query sees (prefix and prompt tuning); "adaption"
    (prompt [P, D], gate [N]) adds LLaMA-Adapter's gated attention.
    `rng` drives LoRA dropout (training only).
    """
    cfg, dt = self.cfg, self.cfg.compute_dtype
    extra = extra or {}
    b, t, _ = x_btd.shape
    g = cfg.n_heads // cfg.n_kv_heads
    inv_freq = rope_frequencies(cfg)
    rngs = [None] * 4 if rng is None else list(jax.random.split(rng, 4))
    act = cfg.act_dtype
    q_btnh = rope(self._project(x_btd, "q", rngs[0]), positions_bt, inv_freq).astype(act)
    k_bskh = rope(self._project(x_btd, "k", rngs[1]), positions_bt, inv_freq).astype(act)
    v_bskh = self._project(x_btd, "v", rngs[2])
    if kv_cache is not None:
      k_cache, v_cache = kv_cache
      k_bskh = jax.lax.dynamic_update_slice(k_cache, k_bskh.astype(k_cache.dtype), (0, cache_index, 0, 0))
      v_bskh = jax.lax.dynamic_update_slice(v_cache, v_bskh.astype(v_cache.dtype), (0, cache_index, 0, 0))
      kv_cache = (k_bskh, v_bskh)
    q_btkgh = q_btnh.reshape(b, t, cfg.n_kv_heads, g, cfg.head_dim) / math.sqrt(cfg.head_dim)
    prefix = (extra["k"], extra["v"]) if "k" in extra else None
    mm = lambda eq, a, w: _matmul(eq, a, w, dt)
    if kv_cache is not None:  # decoding: a few queries over the cache's slots
      out_btkgh = attention_lib.materialize(q_btkgh, k_bskh, v_bskh, mask, mm, prefix)
    elif sharding.logical_size("seq") > 1:
      # Context parallelism: each device keeps its queries' slice of the sequence and gathers the keys
      # and values of the whole sequence (an all-gather over the `sequence` mesh axis), so the scores
      # it holds are [its T / n queries, all S keys].
      q_btkgh = sharding.constrain(q_btkgh, ("batch", "seq", "kv_heads", None, "head_dim"))
      k_bskh = sharding.constrain(k_bskh, ("batch", None, "kv_heads", "head_dim"))
      v_bskh = sharding.constrain(v_bskh, ("batch", None, "kv_heads", "head_dim"))
      dense = sharding.constrain(mask.dense(), ("batch", None, None, "seq", None))
      out_btkgh = sharding.constrain(attention_lib.materialize(q_btkgh, k_bskh, v_bskh, dense, mm, prefix),
                                     ("batch", "seq", "kv_heads", None, "head_dim"))
    else:
      impl = attention_lib.resolve(cfg.attention_impl, sharding.platform())
      if impl == "flash":
        out_btkgh = attention_lib.flash(q_btkgh, k_bskh, v_bskh, mask, dt, cfg.attention_block, prefix)
      elif impl == "materialize":
        out_btkgh = attention_lib.materialize_blocked(q_btkgh, k_bskh, v_bskh, mask.dense(), mm,
                                                      cfg.attention_block, prefix)
      elif impl == "splash":
        from lmstack.model import splash  # pylint: disable=import-outside-toplevel  (Pallas TPU: only when used)
        out_btkgh = splash.splash(q_btkgh, k_bskh, v_bskh, mask, dt)
      else:
        out_btkgh = attention_lib.fused(impl, q_btkgh, k_bskh, v_bskh, mask, dt)
    if "adaption" in extra:
      out_btkgh = out_btkgh + self._adaption(q_btkgh, *extra["adaption"])
    out_btnh = out_btkgh.reshape(b, t, cfg.n_heads, cfg.head_dim).astype(act)
    out_btd = self._linear("btnh,nhd->btd", out_btnh, "o", rngs[3])
    return out_btd if kv_cache is None else (out_btd, kv_cache)

  def _adaption(self, q_btkgh, prompt_pd, gate_n):
    """LLaMA-Adapter: gate * softmax(q . k_p) v_p over the layer's prompt,
    whose keys and values come from the frozen projections (no rotation)."""
    cfg, dt = self.cfg, self.cfg.compute_dtype
    k_1pkh = self._project(prompt_pd[None], "k")
    v_1pkh = self._project(prompt_pd[None], "v")
    logits_bkgtp = _matmul("btkgh,bpkh->bkgtp", q_btkgh, jnp.broadcast_to(k_1pkh, (q_btkgh.shape[0],) + k_1pkh.shape[1:]), dt)
    probs_bkgtp = jax.nn.softmax(logits_bkgtp, axis=-1)
    out_btkgh = _matmul("bkgtp,bpkh->btkgh", probs_bkgtp, jnp.broadcast_to(v_1pkh, (q_btkgh.shape[0],) + v_1pkh.shape[1:]), dt)
    return out_btkgh * gate_n.reshape(cfg.n_kv_heads, -1)[:, :, None]


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg, rngs):
    self.cfg = cfg
    peft_lib.make_linear(self, cfg, "mlp/gate", cfg.init_std, rngs)
    peft_lib.make_linear(self, cfg, "mlp/up", cfg.init_std, rngs)
    peft_lib.make_linear(self, cfg, "mlp/down", cfg.init_std / math.sqrt(2 * cfg.n_layers), rngs)

  def __call__(self, x_btd, rng=None):
    cfg = self.cfg
    rngs = [None] * 3 if rng is None else list(jax.random.split(rng, 3))
    h_btf = jax.nn.silu(_linear(self, cfg, "btd,df->btf", x_btd, "mlp/gate", rngs[0]))
    h_btf = h_btf * _linear(self, cfg, "btd,df->btf", x_btd, "mlp/up", rngs[1])
    return _linear(self, cfg, "btf,fd->btd", h_btf, "mlp/down", rngs[2])


class Block(nnx.Module):

  def __init__(self, cfg, rngs):
    self.attn_norm = RMSNorm(cfg, rngs)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg, rngs)
    self.mlp = MLP(cfg, rngs)
    if cfg.peft.method == "adapter":
      self.attn_adapter = peft_lib.Bottleneck(cfg, rngs)
      self.mlp_adapter = peft_lib.Bottleneck(cfg, rngs)

  def __call__(self, x_btd, positions_bt, mask, kv_cache=None, cache_index=None, extra=None, rng=None):
    rngs = (None, None) if rng is None else tuple(jax.random.split(rng))
    act = self.attn.cfg.act_dtype
    attn = self.attn(self.attn_norm(x_btd, act), positions_bt, mask, kv_cache, cache_index, extra, rngs[0])
    if kv_cache is not None:
      attn, kv_cache = attn
    mm = lambda eq, a, w: _matmul(eq, a, w, self.attn.cfg.compute_dtype)
    if hasattr(self, "attn_adapter"):
      attn = self.attn_adapter(attn, mm)
    x_btd = x_btd + attn.astype(act)
    mlp = self.mlp(self.mlp_norm(x_btd, act), rngs[1])
    if hasattr(self, "mlp_adapter"):
      mlp = self.mlp_adapter(mlp, mm)
    x_btd = x_btd + mlp.astype(act)
    x_btd = sharding.constrain(x_btd, ("batch", "seq", "embed"))
    return x_btd if kv_cache is None else (x_btd, kv_cache)


class Transformer(nnx.Module):
  """Decoder-only LM: tokens B T -> logits B T V (float32)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std)
    # Build one block per key under vmap so each parameter gets a leading
    # `layers` axis; the stacked layout is what lax.scan iterates over.
    keys = jax.random.split(rngs.params(), cfg.n_layers)
    stacked = jax.vmap(lambda key: nnx.split(Block(cfg, nnx.Rngs(key)))[1])(keys)
    stacked = jax.tree.map(
        lambda v: v.replace(out_sharding=("layers",) + v.out_sharding), stacked,
        is_leaf=lambda v: isinstance(v, nnx.Variable))
    self.blocks = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, nnx.Rngs(0)))), stacked)
    self.final_norm = RMSNorm(cfg, rngs)
    if not cfg.tie_embeddings:
      self.unembed = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std)
    peft_lib.make_model_params(self, cfg, rngs)

  def init_cache(self, batch_size, max_len, dtype=None):
    """An empty KV cache for `max_len` slots.

    k, v: L B S K H, one slot per token (not per position: rows of different
    lengths share slot indices and keep their own positions); pos: B S, the
    position of the token in each slot, -1 while empty; index: the next slot.
    """
    cfg = self.cfg
    shape = (cfg.n_layers, batch_size, max_len, cfg.n_kv_heads, cfg.head_dim)
    dtype = dtype or cfg.compute_dtype
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "pos": jnp.full((batch_size, max_len), -1, jnp.int32), "index": jnp.zeros((), jnp.int32)}

  def hidden(self, tokens_bt, positions_bt=None, segment_ids_bt=None, cache=None, rng=None):
    """Final-norm hidden states B T D (float32), and the updated cache if given.

    With a cache, tokens whose segment id is 0 (padding of shorter prompts)
    are stored as empty slots, so no later token attends to them. `rng`
    (training only) drives LoRA dropout.
    """
    cfg = self.cfg
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
    if segment_ids_bt is None:
      segment_ids_bt = jnp.ones_like(tokens_bt)
    extras = self._adapter_extras()
    if cfg.peft.method == "prompt":  # the virtual tokens hold positions 0 .. P-1
      positions_bt = positions_bt + cfg.peft.num_virtual_tokens
    if cache is None:
      mask = attention_lib.Mask(sharding.constrain(positions_bt, ("batch", "seq")), positions_bt,
                                sharding.constrain(segment_ids_bt, ("batch", "seq")), segment_ids_bt,
                                cfg.sliding_window)
      kv = index = None
    else:
      index = cache["index"]
      new_pos = jnp.where(segment_ids_bt > 0, positions_bt, -1).astype(jnp.int32)
      cache_pos = jax.lax.dynamic_update_slice(cache["pos"], new_pos, (0, index))
      mask = attention_lib.Mask(positions_bt, cache_pos, None, None, cfg.sliding_window).dense()
      kv = (cache["k"], cache["v"])
    x_btd = jnp.take(self.embed[...], tokens_bt, axis=0)
    if peft_lib.lora_embed(cfg):
      a_btr = jnp.take(self.embed_lora_a[...], tokens_bt, axis=0)
      x_btd = x_btd + cfg.peft.scale * _matmul("btr,rd->btd", a_btr, self.embed_lora_b[...], cfg.compute_dtype)
    x_btd = sharding.constrain(x_btd.astype(cfg.act_dtype), ("batch", "seq", "embed"))
    x_btd, kv = self._run_blocks(x_btd, positions_bt, mask, kv, index, extras, rng)
    h_btd = self.final_norm(x_btd)
    if cache is None:
      return h_btd
    return h_btd, {"k": kv[0], "v": kv[1], "pos": cache_pos, "index": index + tokens_bt.shape[1]}

  def _run_blocks(self, x_btd, positions_bt, mask, kv=None, index=None, extras=None, rng=None):
    """The decoder blocks, scanned or unrolled; returns (x, stacked (k, v) or None)."""
    cfg = self.cfg
    graphdef, state = nnx.split(self.blocks)

    def layer(x_btd, xs):
      block = nnx.merge(graphdef, xs["block"])
      layer_rng = None if rng is None else jax.random.fold_in(rng, xs["index"])
      out = block(x_btd, positions_bt, mask, xs.get("kv"), index, xs.get("extra"), layer_rng)
      return out if kv is not None else (out, None)

    if cfg.remat != "none":
      layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    xs = {"block": state, "index": jnp.arange(cfg.n_layers)}
    if kv is not None:
      xs["kv"] = kv
    if extras:
      xs["extra"] = extras
    if cfg.scan_layers:
      return jax.lax.scan(layer, x_btd, xs)
    outs = []
    for i in range(cfg.n_layers):
      x_btd, out = layer(x_btd, jax.tree.map(lambda a: a[i], xs))
      outs.append(out)
    return x_btd, None if kv is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)

  def _adapter_extras(self):
    """Per-layer inputs of the prefix-style adapters, each with a leading L axis."""
    cfg = self.cfg
    method = cfg.peft.method
    mm = lambda eq, a, w: _matmul(eq, a, w, cfg.compute_dtype)
    if method == "prefix":
      kv_l2pkh = peft_lib.prefix_kv(self, cfg, mm)
      return {"k": kv_l2pkh[:, 0], "v": kv_l2pkh[:, 1]}
    if method == "prompt":
      # Being first, the virtual tokens see only each other: their keys and
      # values at every layer are the frozen model's on them alone.
      p = cfg.peft.num_virtual_tokens
      pos_1p = jnp.arange(p)[None]
      zeros = jnp.zeros((cfg.n_layers, 1, p, cfg.n_kv_heads, cfg.head_dim), jnp.float32)
      mask = attention_lib.Mask(pos_1p, pos_1p, None, None).dense()
      _, (k_l1pkh, v_l1pkh) = self._run_blocks(self.prompt[...][None], pos_1p, mask, (zeros, zeros), 0)
      return {"k": k_l1pkh[:, 0], "v": v_l1pkh[:, 0]}
    if method == "llama_adapter":
      return {"adaption": peft_lib.adaption_per_layer(self, cfg)}
    return None

  def unembedding(self):
    """The output projection as (weight, einsum from h B T D to logits B T V).

    LoRA on it is folded into the weight (W + scale A B, in float32), so the
    loss can apply it block by block; gradients reach A and B through the sum.
    """
    cfg = self.cfg
    if cfg.tie_embeddings:
      return self.embed[...], "btd,vd->btv"
    w_dv = self.unembed[...]
    if peft_lib.lora_unembed(cfg):
      delta_dv = jnp.dot(self.unembed_lora_a[...], self.unembed_lora_b[...], precision=jax.lax.Precision.HIGHEST)
      w_dv = w_dv + cfg.peft.scale * delta_dv
    return w_dv, "btd,dv->btv"

  def logits(self, h_btd):
    w, eq = self.unembedding()
    return _matmul(eq, h_btd, w, self.cfg.compute_dtype)

  def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None, cache=None, rng=None):
    """Logits B T V (float32); with a cache, (logits, updated cache)."""
    if cache is None:
      return self.logits(self.hidden(tokens_bt, positions_bt, segment_ids_bt, rng=rng))
    h_btd, cache = self.hidden(tokens_bt, positions_bt, segment_ids_bt, cache)
    return self.logits(h_btd), cache
