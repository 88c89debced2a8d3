"""The blocked output projection + cross-entropy against a float64 NumPy reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmstack.model.transformer import PRESETS, Transformer
from lmstack.train import losses


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _inputs(b=2, t=48, d=16, v=40, tied=False, seed=0):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(b, t, d)).astype(np.float32)
  w = (rng.normal(size=(v, d) if tied else (d, v)) * 0.4).astype(np.float32)
  targets = rng.integers(0, v, (b, t)).astype(np.int32)
  weights = (rng.random((b, t)) > 0.3).astype(np.float32)
  return h, w, targets, weights


def _reference(h, w, targets, weights, tied, row_cotangent):
  """Sum over rows of row_cotangent * (weighted NLL of the row), and its gradients, in float64."""
  h64, w64 = h.astype(np.float64), w.astype(np.float64)
  w_dv = w64.T if tied else w64
  logp = _log_softmax(h64 @ w_dv)
  nll_bt = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  loss = np.sum(row_cotangent[:, None] * nll_bt * weights)
  onehot = np.eye(w_dv.shape[1])[targets]
  g = row_cotangent[:, None, None] * weights[..., None] * (np.exp(logp) - onehot)
  dh = g @ w_dv.T
  dw_dv = np.einsum("btd,btv->dv", h64, g)
  return loss, dh, dw_dv.T if tied else dw_dv


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("block", [0, 16, 48])
def test_cross_entropy_and_gradients_match_float64(tied, block):
  h, w, targets, weights = _inputs(tied=tied)
  eq = "btd,vd->btv" if tied else "btd,dv->btv"
  f = lambda h, w: losses.unembed_cross_entropy(h, w, targets, weights, eq, jnp.float32, block)
  (loss, hits), (dh, dw) = f(h, w), jax.grad(lambda h, w: f(h, w)[0], (0, 1))(h, w)
  ref_loss, ref_dh, ref_dw = _reference(h, w, targets, weights, tied, np.ones(2))
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(dh, ref_dh, atol=1e-5)
  np.testing.assert_allclose(dw, ref_dw, atol=1e-5)
  w_dv = w.T if tied else w
  ref_hits = np.sum((np.argmax(h.astype(np.float64) @ w_dv, -1) == targets) * weights)
  assert float(hits) == ref_hits


@pytest.mark.parametrize("block", [0, 16])
def test_row_logps_with_unequal_row_cotangents(block):
  h, w, targets, weights = _inputs(seed=1)
  cot = np.array([1.5, -0.5])
  f = lambda h, w: jnp.sum(cot * losses.unembed_logps(h, w, targets, weights, "btd,dv->btv", jnp.float32, block))
  ref_loss, ref_dh, ref_dw = _reference(h, w, targets, weights, False, cot)
  np.testing.assert_allclose(float(f(h, w)), -ref_loss, rtol=1e-5)
  dh, dw = jax.grad(f, (0, 1))(h, w)
  np.testing.assert_allclose(dh, -ref_dh, atol=1e-5)
  np.testing.assert_allclose(dw, -ref_dw, atol=1e-5)


def test_blocked_loss_equals_one_block_in_the_model():
  """bfloat16 matmuls: blocks change only the order of float32 sums."""
  cfg = dataclasses.replace(PRESETS["tiny"], loss_block=32)
  rng = np.random.default_rng(0)
  tok = rng.integers(0, cfg.vocab_size, (2, 129)).astype(np.int32)
  batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "segment_ids": np.ones((2, 128), np.int32),
           "positions": np.tile(np.arange(128, dtype=np.int32), (2, 1))}
  graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))

  def loss(p, block):
    model = nnx.merge(graphdef, p)
    model.cfg = dataclasses.replace(cfg, loss_block=block)
    s, w, m = losses.next_token_loss(model, batch)
    return s / w, m["accuracy"]

  (l32, acc32), g32 = jax.value_and_grad(lambda p: loss(p, 32), has_aux=True)(params)
  (l0, acc0), g0 = jax.value_and_grad(lambda p: loss(p, 0), has_aux=True)(params)
  assert abs(float(l32) - float(l0)) < 1e-5 and float(acc32) == float(acc0)
  for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-3)
