"""The attention kernels (lmstack/model/attention.py) against the materialising reference.

Values and gradients of flash attention, unrolled and in lax loops, with packed documents, GQA, a
sliding window and prefix keys, in float32 at HIGHEST matmul precision: the two compute the same sums in
another order, so they agree to float32 rounding (~1e-6 here); 1e-5 leaves room for any x86 CPU's
summation order. In bfloat16 both round each matmul input to 8 bits, so they differ by about 2^-8 of the
output's scale. Then memory: flash's step keeps O(T) bytes, the reference's O(T^2).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmstack.model import attention as attention_lib


def _mm(eq, a, b, dt=jnp.float32):
  return jnp.einsum(eq, a.astype(dt), b.astype(dt), preferred_element_type=jnp.float32,
                    precision=jax.lax.Precision.HIGHEST)


def _case(t=24, k=2, g=3, h=8, p=5, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(2, t, k, g, h)) / np.sqrt(h), jnp.float32)
  keys, vals = (jnp.asarray(rng.normal(size=(2, t, k, h)), jnp.float32) for _ in range(2))
  # Row 0 packs two documents (10 + t-10 tokens, positions restarting); row 1 is one document.
  seg = jnp.asarray([[1] * 10 + [2] * (t - 10), [1] * t], jnp.int32)
  pos = jnp.asarray([list(range(10)) + list(range(t - 10)), list(range(t))], jnp.int32)
  prefix = tuple(jnp.asarray(rng.normal(size=(p, k, h)), jnp.float32) for _ in range(2))
  weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32)  # a loss that weighs every output
  return q, keys, vals, pos, seg, prefix, weights


def _values_and_grads(fn, q, keys, vals, prefix, weights):
  loss = lambda q, k, v, pre: jnp.sum(fn(q, k, v, pre) * weights)
  return fn(q, keys, vals, prefix), jax.grad(loss, argnums=(0, 1, 2, 3))(q, keys, vals, prefix)


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("block", [4, 8, 0])
@pytest.mark.parametrize("with_prefix", [False, True])
@pytest.mark.parametrize("unrolled", [True, False])
def test_flash_matches_the_reference_in_values_and_gradients(monkeypatch, window, block, with_prefix, unrolled):
  monkeypatch.setattr(attention_lib, "MAX_UNROLLED_BLOCKS", 8 if unrolled else 0)
  q, keys, vals, pos, seg, prefix, weights = _case()
  mask = attention_lib.Mask(pos, pos, seg, seg, window)
  flash = lambda q, k, v, pre: attention_lib.flash(q, k, v, mask, jnp.float32, block, pre)
  ref = lambda q, k, v, pre: attention_lib.materialize(q, k, v, mask.dense(), _mm, pre)
  pre = prefix if with_prefix else None
  got = _values_and_grads(flash, q, keys, vals, pre, weights)
  want = _values_and_grads(ref, q, keys, vals, pre, weights)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  if with_prefix:  # the prefix keys get gradients (prefix tuning trains them)
    assert float(jnp.abs(got[1][3][0]).max()) > 1e-3


def test_flash_in_bfloat16_is_within_bf16_rounding_of_the_reference():
  q, keys, vals, pos, seg, _, weights = _case(t=32)
  mask = attention_lib.Mask(pos, pos, seg, seg)
  bf = jnp.bfloat16
  flash = lambda q, k, v, pre: attention_lib.flash(q, k, v, mask, bf, 8)
  ref = lambda q, k, v, pre: attention_lib.materialize(q, k, v, mask.dense(), lambda e, a, b: _mm(e, a, b, bf))
  exact = lambda q, k, v, pre: attention_lib.materialize(q, k, v, mask.dense(), _mm)
  got, want, f32 = (_values_and_grads(f, q, keys, vals, None, weights) for f in (flash, ref, exact))
  for a, b, c in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(f32)):
    scale = float(jnp.abs(c).max())
    # Each bf16 product carries up to 2^-9 relative error per input; a few chained matmuls stay within
    # 2^-6 of the output's scale; flash (probabilities rounded per block) and the reference (rounded once)
    # are each that close to float32.
    assert float(jnp.abs(a - c).max()) < 2**-6 * scale
    assert float(jnp.abs(b - c).max()) < 2**-6 * scale


def test_flash_refuses_keys_that_are_not_the_queries_own():
  q, keys, vals, pos, seg, _, _ = _case()
  mask = attention_lib.Mask(pos, pos, seg, seg)
  with pytest.raises(ValueError, match="own 24 tokens"):
    attention_lib.flash(q, keys[:, :12], vals[:, :12], mask, jnp.float32, 4)


def test_xla_fused_attention_matches_the_reference():
  q, keys, vals, pos, seg, _, weights = _case(k=2, g=2)
  for window in (0, 5):
    mask = attention_lib.Mask(pos, pos, seg, seg, window)
    fused = lambda q, k, v, pre: attention_lib.fused("xla", q, k, v, mask, jnp.float32)
    ref = lambda q, k, v, pre: attention_lib.materialize(q, k, v, mask.dense(), _mm)
    with jax.default_matmul_precision("highest"):
      got = _values_and_grads(fused, q, keys, vals, None, weights)
    want = _values_and_grads(ref, q, keys, vals, None, weights)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_auto_picks_a_kernel_per_platform():
  r = attention_lib.resolve
  assert r("auto", "cpu") == attention_lib.CPU_DEFAULT == "flash"
  assert r("auto", "gpu") == "flash"
  assert r("auto", "tpu") == "materialize"  # what the README's AOT table compiled
  assert r("materialize", "cpu") == "materialize"
  assert r("cudnn", "gpu") == "cudnn"


def _step_temp_bytes(kernel, t, block=128):
  """Temporaries of a compiled value-and-gradient step of one attention layer at T tokens."""
  k, g, h = 2, 2, 16
  q = jax.ShapeDtypeStruct((1, t, k, g, h), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, t, k, h), jnp.float32)
  pos = jnp.arange(t)[None]
  seg = jnp.ones((1, t), jnp.int32)
  mask = attention_lib.Mask(pos, pos, seg, seg)
  if kernel == "flash":
    fn = lambda q, k, v: attention_lib.flash(q, k, v, mask, jnp.bfloat16, block)
  else:
    mm = lambda e, a, b: _mm(e, a, b, jnp.bfloat16)
    fn = lambda q, k, v: attention_lib.materialize_blocked(q, k, v, mask.dense(), mm, block)
  step = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2)))
  return step.lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes


def test_flash_memory_grows_linearly_with_the_sequence_the_reference_quadratically():
  flash = [_step_temp_bytes("flash", t) for t in (2048, 4096)]
  ref = [_step_temp_bytes("materialize", t) for t in (2048, 4096)]
  # Doubling T: flash's temporaries (inputs, outputs, per-block scores) at most double, plus slack for
  # XLA's buffer packing; the reference keeps T^2 / 2 float32 scores (and probabilities), about 4x.
  assert flash[1] < 2.5 * flash[0], flash
  assert ref[1] > 3.5 * ref[0], ref
  # At 4,096 tokens the T x T scores alone (2 x 2 heads x 4096^2 / 2 x 4 B = 64 MiB) dwarf flash's total.
  assert flash[1] * 8 < ref[1], (flash, ref)


@pytest.mark.parametrize("window", [0, 100])
def test_splash_kernel_in_interpret_mode_matches_the_reference(window):
  # The Pallas TPU kernel, interpreted on CPU: GQA (2 key heads of 2 queries each), two packed documents in
  # row 0, a causal window. Its float32 matmuls run at the default precision of the interpreter's dots;
  # against HIGHEST-precision reference sums of 256 terms the differences stay near 1e-5 of values ~1.
  from lmstack.model import splash  # pylint: disable=import-outside-toplevel
  q, keys, vals, pos, seg, _, weights = _case(t=256, k=2, g=2, h=16)
  mask = attention_lib.Mask(pos, pos, seg, seg, window)
  kernel = lambda q, k, v, pre: splash.splash(q, k, v, mask, jnp.float32)
  ref = lambda q, k, v, pre: attention_lib.materialize(q, k, v, mask.dense(), _mm)
  got = _values_and_grads(kernel, q, keys, vals, None, weights)
  want = _values_and_grads(ref, q, keys, vals, None, weights)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-4)


def test_splash_refuses_a_length_its_blocks_do_not_divide():
  from lmstack.model import splash  # pylint: disable=import-outside-toplevel
  q, keys, vals, pos, seg, _, _ = _case(t=24)
  with pytest.raises(ValueError, match="multiple of 128"):
    splash.splash(q, keys, vals, attention_lib.Mask(pos, pos, seg, seg), jnp.float32)


@pytest.mark.parametrize("impl", ["splash", "xla", "cudnn"])
def test_kernels_without_shared_keys_refuse_prefix_tuning_at_config_time(impl):
  from lmstack.model.transformer import ModelConfig  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=f"attention_impl='{impl}'.*prefix"):
    ModelConfig(attention_impl=impl, peft=dict(method="prefix"))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN fused attention runs on NVIDIA GPUs only")
def test_cudnn_matches_the_reference_on_a_gpu():
  # cuDNN takes half precision only: bf16 inputs, so the bound of the bf16 test above.
  q, keys, vals, pos, seg, _, weights = _case(t=128, k=2, g=2, h=64)
  mask = attention_lib.Mask(pos, pos, seg, seg)
  bf = jnp.bfloat16
  fused = lambda q, k, v, pre: attention_lib.fused("cudnn", q, k, v, mask, bf)
  exact = lambda q, k, v, pre: attention_lib.materialize(q, k, v, mask.dense(), _mm)
  got, f32 = (_values_and_grads(f, q, keys, vals, None, weights) for f in (fused, exact))
  for a, c in zip(jax.tree.leaves(got), jax.tree.leaves(f32)):
    assert float(jnp.abs(a - c).max()) < 2**-6 * float(jnp.abs(c).max())


def test_the_long_context_tool_measures_the_real_step():
  # tools/long_context.py compiles the trainer's own step (lmstack/train/build.py); at 2,048 tokens the tiny
  # model's materialised scores (4 heads x 2048^2 / 2 x 4 B = 32 MiB a layer, kept for the backward pass)
  # already outweigh flash's whole step.
  import os  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
  import long_context  # pylint: disable=import-outside-toplevel
  flash = long_context.cpu_step_bytes(2048, "flash", size="tiny")
  ref = long_context.cpu_step_bytes(2048, "materialize", size="tiny")
  assert flash[0] == ref[0]  # the same arguments: parameters, Adam moments, the batch
  assert ref[1] > 2 * 32 * 2**20 > flash[1], (flash, ref)
