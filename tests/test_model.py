"""The decoder against an independent float64 NumPy implementation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmstack.model.transformer import PRESETS, ModelConfig, Transformer


def _np_params(model):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def reference_logits(p, cfg, tokens, positions, segments):
  """Llama forward pass written out with loops and float64 NumPy."""
  def rms(x, scale):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * scale

  def rot(x, pos):  # x: T N H
    h = x.shape[-1]
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, h, 2) / h)
    if cfg.rope_scaling == "linear":
      inv = inv / cfg.rope_scaling_factor
    elif cfg.rope_scaling == "llama3":
      scaled = []
      for f in inv:
        wavelen, orig = 2 * np.pi / f, cfg.rope_original_max_len
        if wavelen < orig / cfg.rope_high_freq_factor:
          scaled.append(f)
        elif wavelen > orig / cfg.rope_low_freq_factor:
          scaled.append(f / cfg.rope_scaling_factor)
        else:
          a = (orig / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
          scaled.append((1 - a) * f / cfg.rope_scaling_factor + a * f)
      inv = np.array(scaled)
    ang = pos[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., :h // 2], x[..., h // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

  out = []
  g = cfg.n_heads // cfg.n_kv_heads
  for b in range(tokens.shape[0]):
    x = p["embed"][tokens[b]]
    t = len(x)
    for l in range(cfg.n_layers):
      blk = jax.tree.map(lambda a: a[l], p["blocks"])
      y = rms(x, blk["attn_norm"]["scale"])
      bias = {n: blk["attn"].get(n + "_bias", 0.0) for n in "qkv"}
      q = rot(np.einsum("td,dnh->tnh", y, blk["attn"]["q"]) + bias["q"], positions[b])
      k = rot(np.einsum("td,dkh->tkh", y, blk["attn"]["k"]) + bias["k"], positions[b])
      v = np.einsum("td,dkh->tkh", y, blk["attn"]["v"]) + bias["v"]
      o = np.zeros((t, cfg.n_heads, cfg.head_dim))
      for n in range(cfg.n_heads):
        for i in range(t):
          ok = [j for j in range(i + 1) if segments[b, j] == segments[b, i]
                and (not cfg.sliding_window or positions[b, i] - positions[b, j] < cfg.sliding_window)]
          s = np.array([q[i, n] @ k[j, n // g] for j in ok]) / np.sqrt(cfg.head_dim)
          w = np.exp(s - s.max())
          w /= w.sum()
          o[i, n] = sum(wj * v[j, n // g] for wj, j in zip(w, ok))
      x = x + np.einsum("tnh,nhd->td", o, blk["attn"]["o"])
      y = rms(x, blk["mlp_norm"]["scale"])
      gate = y @ blk["mlp"]["gate"]
      x = x + ((gate / (1 + np.exp(-gate))) * (y @ blk["mlp"]["up"])) @ blk["mlp"]["down"]
    x = rms(x, p["final_norm"]["scale"])
    out.append(x @ (p["embed"].T if cfg.tie_embeddings else p["unembed"]))
  return np.stack(out)


def _inputs(cfg, b=2, t=12, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
  # Row 0 packs two documents (7 + 5 tokens); row 1 is one document.
  segments = np.array([[1] * 7 + [2] * (t - 7), [1] * t], np.int32)
  positions = np.array([list(range(7)) + list(range(t - 7)), list(range(t))], np.int32)
  return tokens, positions, segments


@pytest.mark.parametrize("variant", [dict(), dict(tie_embeddings=True), dict(qkv_bias=True), dict(sliding_window=3),
                                     dict(attention_block=4), dict(attention_block=4, sliding_window=3),
                                     dict(attention_impl="xla"), dict(attention_impl="xla", n_kv_heads=4),
                                     dict(rope_scaling="linear", rope_scaling_factor=4.0),
                                     dict(rope_scaling="llama3", rope_scaling_factor=8.0, rope_original_max_len=64,
                                          rope_theta=500.0)])
def test_float32_forward_matches_numpy_reference(tiny_cfg, variant):
  cfg = dataclasses.replace(tiny_cfg, dtype="float32", vocab_size=96, init_std=0.2, **variant)
  model = Transformer(cfg, nnx.Rngs(1))
  if cfg.qkv_bias:  # biases start at zero; make them matter
    for name in ("q_bias", "k_bias", "v_bias"):
      var = getattr(model.blocks.attn, name)
      var[...] = jax.random.normal(jax.random.key(len(name)), var[...].shape)
  tokens, positions, segments = _inputs(cfg)
  got = np.asarray(model(tokens, positions, segments))
  want = reference_logits(_np_params(model), cfg, tokens, positions, segments)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_bfloat16_compute_close_to_float32(tiny_cfg):
  cfg32 = dataclasses.replace(tiny_cfg, dtype="float32")
  m32 = Transformer(cfg32, nnx.Rngs(0))
  m16 = Transformer(dataclasses.replace(tiny_cfg, dtype="bfloat16"), nnx.Rngs(0))
  tokens, positions, segments = _inputs(cfg32)
  a, b = np.asarray(m32(tokens, positions, segments)), np.asarray(m16(tokens, positions, segments))
  assert b.dtype == np.float32  # logits are float32 whatever the matmul inputs
  assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
  assert not np.array_equal(a, b)  # the bf16 path is really taken


def test_bfloat16_activations_close_to_float32_and_really_bf16(tiny_cfg):
  # activation_dtype=bfloat16 rounds the residual stream and every layer's matmul output to 8 bits (2^-9
  # relative each); over 2 layers the logits stay within the bound of the bf16-input test above.
  cfg32 = dataclasses.replace(tiny_cfg, dtype="bfloat16")
  cfg16 = dataclasses.replace(cfg32, activation_dtype="bfloat16")
  m32, m16 = Transformer(cfg32, nnx.Rngs(0)), Transformer(cfg16, nnx.Rngs(0))
  tokens, positions, segments = _inputs(cfg32)
  a, b = np.asarray(m32(tokens, positions, segments)), np.asarray(m16(tokens, positions, segments))
  assert b.dtype == np.float32 and not np.array_equal(a, b)
  assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
  # The scanned layers carry the residual stream in bfloat16.
  jaxpr = jax.make_jaxpr(lambda t: m16.hidden(t, positions, segments))(tokens)
  scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
  assert scans and any(v.aval.dtype == jnp.bfloat16 and v.aval.shape == (*tokens.shape, cfg16.d_model)
                       for v in scans[0].outvars)
  # Gradients flow through the bf16 stream: close to the float32 stream's (measured: logits within 0.6 %
  # of their largest, gradients within 4 % of each leaf's largest; bf16 rounding compounds through the
  # backward pass's products, hence the looser bound).
  grad = lambda m: nnx.grad(lambda m: jnp.mean(m(tokens, positions, segments) ** 2))(m)
  g32, g16 = jax.tree.leaves(nnx.state(grad(m32))), jax.tree.leaves(nnx.state(grad(m16)))
  for x, y in zip(g32, g16):
    assert np.abs(np.asarray(x) - np.asarray(y)).max() <= 0.1 * np.abs(np.asarray(x)).max() + 1e-6


def test_packed_documents_do_not_see_each_other(tiny_cfg):
  cfg = dataclasses.replace(tiny_cfg, dtype="float32")
  model = Transformer(cfg, nnx.Rngs(0))
  tokens, positions, segments = _inputs(cfg)
  packed = np.asarray(model(tokens[:1], positions[:1], segments[:1]))[0]
  alone1 = np.asarray(model(tokens[:1, :7]))[0]
  alone2 = np.asarray(model(tokens[:1, 7:]))[0]
  np.testing.assert_allclose(packed[:7], alone1, atol=1e-5)
  np.testing.assert_allclose(packed[7:], alone2, atol=1e-5)


@pytest.mark.parametrize("variant", [dict(scan_layers=False), dict(remat="full"), dict(remat="dots"),
                                     dict(remat="dots_no_batch", scan_layers=False)])
def test_scan_and_remat_do_not_change_values_or_grads(tiny_cfg, variant):
  base = dataclasses.replace(tiny_cfg, dtype="float32")
  tokens, positions, segments = _inputs(base)

  def loss_and_grads(cfg):
    model = Transformer(cfg, nnx.Rngs(3))
    graphdef, params = nnx.split(model, nnx.Param)
    def loss(p):
      return jnp.mean(nnx.merge(graphdef, p)(tokens, positions, segments) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  l0, g0 = loss_and_grads(base)
  l1, g1 = loss_and_grads(dataclasses.replace(base, **variant))
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g0, g1)


def test_every_parameter_has_logical_axes(tiny_cfg):
  model = Transformer(tiny_cfg, nnx.Rngs(0))
  names = {"embed", "vocab", "heads", "kv_heads", "head_dim", "mlp", "layers"}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.out_sharding
    assert axes is not None and len(axes) == var.get_value().ndim, path
    assert set(axes) <= names, (path, axes)
    assert (axes[0] == "layers") == (path[0] == "blocks"), path


@pytest.mark.parametrize("tie", [False, True])
def test_num_params_formula_counts_real_parameters(tiny_cfg, tie):
  cfg = dataclasses.replace(tiny_cfg, tie_embeddings=tie)
  state = nnx.state(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
  assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(state))


def test_presets_have_published_llama2_sizes():
  # Parameter counts of Llama-2-7b-hf and Llama-2-70b-hf as published.
  assert PRESETS["7b"].num_params() == 6_738_415_616
  assert PRESETS["70b"].num_params() == 68_976_648_192
  assert 33e6 < PRESETS["34m"].num_params() < 35e6
  assert 15e6 < PRESETS["default"].num_params() < 20e6
  assert 90e6 < PRESETS["100m"].num_params() < 110e6
  assert 1.0e9 < PRESETS["1b"].num_params() < 1.2e9


def test_bad_model_config_is_one_line_error():
  with pytest.raises(ValueError, match="not a multiple"):
    ModelConfig(n_heads=6, n_kv_heads=4)
  with pytest.raises(ValueError, match="remat"):
    ModelConfig(remat="sometimes")


@pytest.mark.parametrize("eq,xs,ws", [("btd,dnh->btnh", (2, 3, 8), (8, 4, 5)), ("btnh,nhd->btd", (2, 3, 4, 5), (4, 5, 8)),
                                      ("btkgh,bskh->bkgts", (2, 3, 2, 2, 5), (2, 4, 2, 5)),
                                      ("bkgts,bskh->btkgh", (2, 2, 2, 3, 4), (2, 4, 2, 5))])
def test_matmul_backward_equals_autodiff(eq, xs, ws):
  from lmstack.model.transformer import _matmul
  rng = np.random.default_rng(0)
  x, w = jnp.asarray(rng.normal(size=xs), jnp.float32), jnp.asarray(rng.normal(size=ws), jnp.float32)
  probe = jnp.asarray(rng.normal(size=jnp.einsum(eq, x, w).shape), jnp.float32)
  ours = jax.grad(lambda x, w: jnp.sum(_matmul(eq, x, w, jnp.float32) * probe), argnums=(0, 1))(x, w)
  ref = jax.grad(lambda x, w: jnp.sum(jnp.einsum(eq, x, w, precision="highest") * probe), argnums=(0, 1))(x, w)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # bf16 inputs: the same gradients to bf16 precision, returned in float32.
  ours16 = jax.grad(lambda x, w: jnp.sum(_matmul(eq, x, w, jnp.bfloat16) * probe), argnums=(0, 1))(x, w)
  for a, b in zip(ours16, ref):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=0.05, atol=0.1)
