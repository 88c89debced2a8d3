"""The Pallas TPU splash-attention kernel (shipped with JAX) behind lmstack's attention interface.

One MQA kernel per key/value head serves its G query heads (GQA without repeating K/V), vmapped over the
batch and the key/value heads. Masking: causal by index (or a causal sliding window) and-ed with segment
ids. That is lmstack's position mask for training rows, whose positions restart per packed document and
grow along the row. Under a mesh the kernel runs in `shard_map`, each device on its batch rows and key/value
heads; the sequence axis must be whole (context parallelism takes the materialising path). Off TPU it runs
in Pallas interpret mode, which is how the tests check it on CPU.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

from lmstack import sharding

BLOCKS = (512, 256, 128)  # the kernel's query and key blocks: the largest of these that divides T


def block_for(t):
  """The kernel block for T tokens, or None when no block divides T."""
  return next((b for b in BLOCKS if t % b == 0), None)


@functools.lru_cache(maxsize=32)
def _kernel(t, g, window, block, interpret):
  if window:
    head = mask_lib.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
  else:
    head = mask_lib.CausalMask((t, t))
  sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                                block_kv_dq=block)
  with jax.ensure_compile_time_eval():  # its block tables are constants, not tracers of the first caller
    return kernel_lib.make_splash_mqa(mask_lib.MultiHeadMask([head] * g), block_sizes=sizes, head_shards=1,
                                      q_seq_shards=1, interpret=interpret)


def splash(q_btkgh, k_bskh, v_bskh, mask, dt):
  """Attention of pre-scaled queries B T K G H over keys B S K H (S == T); float32 out."""
  b, t, kh, g, h = q_btkgh.shape
  block = block_for(t)
  if block is None or k_bskh.shape[1] != t:
    raise ValueError(f"attention_impl=splash needs the queries' own keys and T a multiple of 128, got "
                     f"T={t}, S={k_bskh.shape[1]}")
  interpret = sharding.platform() != "tpu"

  def local(q, k, v, seg):  # q B K G T H, k and v B K S H, seg B T: this device's rows and heads
    kern = _kernel(t, g, mask.window, block, interpret)
    one = lambda q, k, v, seg: kern(q, k, v, segment_ids=kernel_lib.SegmentIds(q=seg, kv=seg))
    per_head = jax.vmap(one, in_axes=(0, 0, 0, None))
    return jax.vmap(per_head)(q, k, v, seg)

  q = jnp.transpose(q_btkgh, (0, 2, 3, 1, 4)).astype(dt)
  k = jnp.transpose(k_bskh, (0, 2, 1, 3)).astype(dt)
  v = jnp.transpose(v_bskh, (0, 2, 1, 3)).astype(dt)
  seg = mask.q_seg.astype(jnp.int32)
  active = sharding.active()
  if active is not None:
    mesh, rules = active
    spec = lambda axes, x: sharding.logical_to_spec(axes, x.shape, mesh, rules)
    q_spec = spec(("batch", "kv_heads", None, None, None), q)
    kv_spec = spec(("batch", "kv_heads", None, None), k)
    seg_spec = jax.sharding.PartitionSpec(q_spec[0], None)
    local = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                          check_vma=False)
  out = local(q, k, v, seg)
  return jnp.transpose(out, (0, 3, 1, 2, 4)).astype(jnp.float32)  # B T K G H
