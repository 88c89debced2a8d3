"""Sharded training on 8 fake CPU devices equals the single-device run."""

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lmstack import sharding
from lmstack.errors import ConfigError
from lmstack.train import losses, optim
from lmstack.train import state as state_lib


def _optim_cfg():
  # eps 1e-6 (not 1e-8): Adam maps a gradient at float32 noise level to a
  # full-size step, so an embedding row touched by one token could flip sign
  # between two reduction orders; a larger eps keeps the comparison about
  # sharding, not about Adam's conditioning.
  return ml_collections.ConfigDict(dict(lr=3e-3, schedule="cosine", warmup_steps=1, min_lr_ratio=0.1,
                                        decay_fraction=0.2, decay_shape="linear", b1=0.9, b2=0.95,
                                        eps=1e-6, weight_decay=0.1, grad_clip=1.0))


def _batches(cfg, n=3, b=8, t=32):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    tok = rng.integers(0, cfg.vocab_size, (b, t + 1)).astype(np.int32)
    seg = np.where(np.arange(t) < 20, 1, 2).astype(np.int32) * np.ones((b, 1), np.int32)
    pos = np.where(seg == 1, np.arange(t), np.arange(t) - 20).astype(np.int32)
    out.append(dict(inputs=tok[:, :-1], targets=tok[:, 1:], segment_ids=seg, positions=pos))
  return out


def _train(cfg, mesh_shape, rules, devices, accum=1):
  mesh = sharding.make_mesh(mesh_shape, devices)
  rules = sharding.resolve_rules(rules)
  tx, schedule = optim.make_optimizer(_optim_cfg(), 3)
  m = state_lib.init_sharded(cfg, ".*", tx, mesh, rules, seed=0)
  data_sh = sharding.batch_sharding(mesh, rules)
  step = state_lib.jit_train_step(m, losses.next_token_loss, tx, schedule, accum, data_sh)
  state, frozen = m.init()
  out = []
  with sharding.use(mesh, rules):
    for batch in _batches(cfg):
      state, metrics = step(state, frozen, {k: jax.device_put(v, data_sh) for k, v in batch.items()})
      out.append(float(metrics["loss"]))
  return out, state


def _init_params(cfg):
  from flax import nnx
  from lmstack.model.transformer import Transformer
  return nnx.state(Transformer(cfg, nnx.Rngs(0)), nnx.Param)


@pytest.mark.parametrize("mesh_shape,rules", [((8, 1, 1), "fsdp"), ((1, 8, 1), "fsdp"), ((2, 2, 2), "fsdp_tp"),
                                              ((1, 2, 4, 1), "fsdp"), ((1, 1, 4, 2), "fsdp_tp")])
def test_sharded_steps_equal_single_device(tiny_cfg, mesh_shape, rules):
  assert jax.device_count() == 8
  cfg = dataclasses.replace(tiny_cfg, dtype="float32")
  ref_losses, ref_state = _train(cfg, (1, 1, 1), rules, jax.devices()[:1])
  losses_, state = _train(cfg, mesh_shape, rules, jax.devices())
  np.testing.assert_allclose(losses_, ref_losses, rtol=1e-5)
  assert ref_losses[2] < ref_losses[0]
  # Adam divides by sqrt(v): float32 reduction-order differences in tiny
  # gradients show up as ~1e-5 absolute in the weights, against updates of
  # ~3e-3 per step (checked below so the comparison is not vacuous).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5),
               state["params"], ref_state["params"])
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(_init_params(cfg))))
  assert moved > 5e-3
  # The parameters really are split across devices (not silently replicated).
  specs = {s.spec for s in jax.tree.leaves(jax.tree.map(lambda x: x.sharding, state["params"]))}
  if mesh_shape[1] > 1 or mesh_shape[-1] > 1:
    assert any(spec != P() and any(spec) for spec in specs), specs


def _grads(cfg, mesh_shape, rules, devices, t=32):
  """d(mean next-token loss)/d params of the first batch, on `mesh_shape`."""
  from flax import nnx
  mesh = sharding.make_mesh(mesh_shape, devices)
  rules = sharding.resolve_rules(rules)
  tx, _ = optim.make_optimizer(_optim_cfg(), 3)
  m = state_lib.init_sharded(cfg, ".*", tx, mesh, rules, seed=0)
  state, frozen = m.init()
  data_sh = sharding.batch_sharding(mesh, rules)
  batch = {k: jax.device_put(v, data_sh) for k, v in _batches(cfg, n=1, t=t)[0].items()}

  def loss(params):
    loss_sum, weight, _ = losses.next_token_loss(nnx.merge(m.graphdef, params, frozen), batch, None)
    return loss_sum / weight

  with sharding.use(mesh, rules):
    grad = jax.jit(jax.grad(loss))
    return grad(state["params"]), grad.lower(state["params"]).compile().memory_analysis()


@pytest.mark.parametrize("mesh_shape,rules", [((1, 1, 8, 1), "fsdp"), ((1, 2, 4, 1), "fsdp_tp")])
def test_context_parallel_gradients_equal_single_device(tiny_cfg, mesh_shape, rules):
  # The sequence axis splits every activation along T; attention gathers all keys and values, so each
  # query still sees its whole causal, same-document past (the batches pack two documents a row).
  cfg = dataclasses.replace(tiny_cfg, dtype="float32")
  ref, _ = _grads(cfg, (1, 1, 1), rules, jax.devices()[:1])
  got, _ = _grads(cfg, mesh_shape, rules, jax.devices())
  # float32 sums over the batch's 256 tokens in another order: errors of a few ulp of the largest term.
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
  assert max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(ref)) > 0


def test_context_parallelism_splits_the_attention_scores(tiny_cfg):
  # At 512 tokens the float32 scores (8 rows x 4 heads x 512 x 512 per layer) dominate the step's
  # temporaries; split 8 ways along the queries, a device's temporaries shrink well below half.
  cfg = dataclasses.replace(tiny_cfg, dtype="float32", max_seq_len=512, attention_block=0)
  _, one = _grads(cfg, (1, 1, 1, 1), "fsdp", jax.devices()[:1], t=512)
  _, split = _grads(cfg, (1, 1, 8, 1), "fsdp", jax.devices(), t=512)
  assert split.temp_size_in_bytes < 0.5 * one.temp_size_in_bytes, (split, one)


def test_gradient_accumulation_equals_full_batch(tiny_cfg):
  cfg = dataclasses.replace(tiny_cfg, dtype="float32")
  full, s1 = _train(cfg, (1, 1, 1), "fsdp", jax.devices()[:1], accum=1)
  accum, s2 = _train(cfg, (1, 1, 1), "fsdp", jax.devices()[:1], accum=4)
  np.testing.assert_allclose(accum, full, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-5), s1["params"], s2["params"])


def test_mesh_shape_errors_are_one_line():
  with pytest.raises(ConfigError, match="needs 12 devices"):
    sharding.make_mesh((3, 4, 1))
  with pytest.raises(ConfigError, match="at most one -1"):
    sharding.make_mesh((-1, -1, 1))
  with pytest.raises(ConfigError, match="does not divide"):
    sharding.make_mesh((3, -1, 1))
  with pytest.raises(ConfigError, match="expected one of"):
    sharding.resolve_rules("zero9")


def test_indivisible_dims_stay_replicated():
  mesh = sharding.make_mesh((1, 8, 1))
  rules = sharding.resolve_rules("fsdp")
  assert sharding.logical_to_spec(("vocab", "embed"), (100, 64), mesh, rules) == P(None, "fsdp")
  assert sharding.logical_to_spec(("vocab", "embed"), (100, 60), mesh, rules) == P(None, None)


@pytest.mark.parametrize("mesh_shape,rules", [((1, 8, 1), "fsdp"), ((2, 2, 2), "fsdp_tp")])
def test_splash_attention_sharded_gradients_equal_the_reference_on_one_device(tiny_cfg, mesh_shape, rules):
  # The TPU kernel (Pallas interpret mode on CPU) in shard_map, each device on its rows and key/value heads,
  # against the materialising kernel on one device: same model, same packed batch of 128 tokens a row.
  ref_cfg = dataclasses.replace(tiny_cfg, dtype="float32", attention_impl="materialize")
  ref, _ = _grads(ref_cfg, (1, 1, 1), rules, jax.devices()[:1], t=128)
  got, _ = _grads(dataclasses.replace(ref_cfg, attention_impl="splash"), mesh_shape, rules, jax.devices(), t=128)
  # float32 sums in another order and the interpreter's default-precision dots: ~1e-5 of the largest term.
  scale = max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(ref))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * scale), got, ref)
