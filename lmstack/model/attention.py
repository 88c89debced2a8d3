"""Attention kernels with one calling convention, picked by `model.attention_impl` (`resolve`).

  materialize  the scores of every query block over its keys, float32, kept
               for the backward pass (the reference; O(T^2) memory).
  flash        online softmax over key blocks in pure JAX, with a custom VJP
               that recomputes the probabilities block by block in the
               backward pass: O(T) activation memory, any backend.
  cudnn, xla   `jax.nn.dot_product_attention` (cudnn: fused attention on
               NVIDIA GPUs).
  splash       the Pallas TPU kernel, in lmstack/model/splash.py.

Queries arrive scaled by 1/sqrt(head_dim) in the grouped layout q B T K G H
(K key/value heads, G query heads per key head: GQA without repeating K/V),
keys and values B S K H; the output is B T K G H, float32. Which keys a
query sees is a `Mask`: positions and segment ids (packed documents), so no
T x S boolean array is built unless a materialising kernel asks for it.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

NEG = -1e30  # a masked score: exp(NEG - m) underflows to 0 for any real row max m


@functools.partial(jax.tree_util.register_dataclass, data_fields=["q_pos", "k_pos", "q_seg", "k_seg"],
                   meta_fields=["window"])
@dataclasses.dataclass(frozen=True)
class Mask:
  """Query i sees key j when k_pos[j] <= q_pos[i], k_pos[j] >= 0 (a negative
  position is an empty cache slot), the segments are equal (none given, as for
  the KV cache: one segment), and with a sliding window,
  q_pos[i] - k_pos[j] < window. Positions restart per packed
  document and grow along the row, so within a segment the order of indices is
  the order of positions: query i never sees a key after index i."""
  q_pos: jax.Array  # B T int
  k_pos: jax.Array  # B S int
  q_seg: jax.Array | None  # B T int; None (with k_seg): one segment
  k_seg: jax.Array | None  # B S int
  window: int = 0

  def between(self, q_pos, k_pos, q_seg, k_seg):
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    ok = (k <= q) & (k >= 0)
    if q_seg is not None:
      ok &= q_seg[:, :, None] == k_seg[:, None, :]
    if self.window:
      ok &= q - k < self.window
    return ok  # B T S

  def dense(self):
    """B 1 1 T S booleans, for the materialising kernels."""
    return self.between(self.q_pos, self.k_pos, self.q_seg, self.k_seg)[:, None, None]


def materialize(q_btkgh, k_bskh, v_bskh, mask_b11ts, matmul, prefix=None):
  """Softmax attention over all keys with float32 scores kept for the backward pass.

  `prefix` (k, v), each [P, K, H]: keys every query sees, before the others.
  `matmul(eq, a, b)` is the model's bf16-in/f32-out einsum.
  """
  if prefix is not None:
    b, p = q_btkgh.shape[0], prefix[0].shape[0]
    k_bskh = jnp.concatenate([jnp.broadcast_to(prefix[0], (b,) + prefix[0].shape).astype(k_bskh.dtype), k_bskh], 1)
    v_bskh = jnp.concatenate([jnp.broadcast_to(prefix[1], (b,) + prefix[1].shape).astype(v_bskh.dtype), v_bskh], 1)
    mask_b11ts = jnp.concatenate([jnp.ones(mask_b11ts.shape[:-1] + (p,), bool),
                                  jnp.broadcast_to(mask_b11ts, mask_b11ts.shape)], -1)
  logits_bkgts = matmul("btkgh,bskh->bkgts", q_btkgh, k_bskh)
  logits_bkgts = jnp.where(mask_b11ts, logits_bkgts, jnp.finfo(jnp.float32).min)
  probs_bkgts = jax.nn.softmax(logits_bkgts, axis=-1)
  return matmul("bkgts,bskh->btkgh", probs_bkgts, v_bskh)


def materialize_blocked(q_btkgh, k_bskh, v_bskh, mask_b11ts, matmul, block, prefix=None):
  """`materialize` in query blocks, each over the keys up to its end (training, no cache)."""
  t = q_btkgh.shape[1]
  if not block or t <= block or t % block:
    return materialize(q_btkgh, k_bskh, v_bskh, mask_b11ts, matmul, prefix)
  return jnp.concatenate([
      materialize(q_btkgh[:, i:i + block], k_bskh[:, :i + block], v_bskh[:, :i + block],
                  mask_b11ts[..., i:i + block, :i + block], matmul, prefix) for i in range(0, t, block)], axis=1)


# ---------------------------------------------------------------------------
# Flash attention in pure JAX.
#
# Layout inside: q B K G T H, k and v B K S H, so each score block is one
# batched matmul "bkgqh,bksh->bkgqs" with the batch dimensions leading and the
# contraction over the minor dimension of both operands (the form XLA's dot
# emitters take directly). Block i of the queries visits key blocks
# lo(i) .. hi(i): those that hold a key at or before its last query and, with a
# window, after its first query minus the window.
# ---------------------------------------------------------------------------


def _key_blocks(i, bq, bk, window):
  """Key blocks [lo, hi) that query block i can see (i may be traced)."""
  hi = ((i + 1) * bq + bk - 1) // bk
  if not window:
    return 0, hi
  lo = (i * bq - window + 1) // bk
  return (max(0, lo) if isinstance(i, int) else jnp.maximum(0, lo)), hi


def _loop(lo, hi, body, carry):
  """for j in [lo, hi): carry = body(j, carry), unrolled when the bounds are Python ints."""
  if isinstance(lo, int) and isinstance(hi, int):
    for j in range(lo, hi):
      carry = body(j, carry)
    return carry
  return jax.lax.fori_loop(lo, hi, body, carry)


def _slice(x, start, size, axis):
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _add_at(x, start, y, axis):
  return jax.lax.dynamic_update_slice_in_dim(x, _slice(x, start, y.shape[axis], axis) + y, start, axis)


class _Blocks:
  """One call's shapes and the per-block pieces both passes use."""

  def __init__(self, q, k, masks, window, dt, bq, bk):
    self.b, self.k_heads, self.g, self.t, self.h = q.shape
    self.s = k.shape[2]
    self.bq, self.bk, self.window, self.dt = bq, bk, window, dt
    self.nq = self.t // bq
    self.mask = Mask(*masks, window=window)

  def block_mask(self, i, j):
    m = self.mask
    qs = lambda a: _slice(a, i * self.bq, self.bq, 1)
    ks = lambda a: _slice(a, j * self.bk, self.bk, 1)
    return m.between(qs(m.q_pos), ks(m.k_pos), qs(m.q_seg), ks(m.k_seg))[:, None, None]  # B 1 1 bq bk

  def scores(self, q_i, k_j, i, j):
    """Scores of query block i against key block j (both in the matmul dtype), and their mask."""
    s = jnp.einsum("bkgqh,bksh->bkgqs", q_i, k_j, preferred_element_type=jnp.float32)
    return s, self.block_mask(i, j)


def _flash_forward(q, k, v, masks, window, dt, bq, bk, unroll):
  blocks = _Blocks(q, k, masks, window, dt, bq, bk)

  def query_block(i):
    q_i = _slice(q, i * bq, bq, 3).astype(dt)
    shape = q_i.shape[:-1]

    def key_block(j, carry):
      m, l, acc = carry
      s, ok = blocks.scores(q_i, _slice(k, j * bk, bk, 2).astype(dt), i, j)
      m_new = jnp.maximum(m, jnp.max(jnp.where(ok, s, NEG), axis=-1))
      p = jnp.where(ok, jnp.exp(s - m_new[..., None]), 0.0)
      corr = jnp.exp(m - m_new)
      v_j = _slice(v, j * bk, bk, 2).astype(dt)
      pv = jnp.einsum("bkgqs,bksh->bkgqh", p.astype(dt), v_j, preferred_element_type=jnp.float32)
      return m_new, l * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv

    init = (jnp.full(shape, NEG, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (blocks.h,), jnp.float32))
    m, l, acc = _loop(*_key_blocks(i, bq, bk, window), key_block, init)
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
    return out, lse

  if unroll:
    outs, lses = zip(*[query_block(i) for i in range(blocks.nq)])
    return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)
  out_n, lse_n = jax.lax.map(query_block, jnp.arange(blocks.nq))  # nq B K G bq (H)
  b, kh, g, _, h = q.shape
  out = jnp.moveaxis(out_n, 0, 3).reshape(b, kh, g, blocks.t, h)
  lse = jnp.moveaxis(lse_n, 0, 3).reshape(b, kh, g, blocks.t)
  return out, lse


def _flash_backward(q, k, v, masks, out, lse, d_out, d_lse, window, dt, bq, bk, unroll):
  """dq, dk, dv: with P = exp(S - lse), dV = P^T dO, dP = dO V^T and
  dS = P (dP - rowsum(dO * O) + d_lse), dQ = dS K, dK = dS^T Q."""
  blocks = _Blocks(q, k, masks, window, dt, bq, bk)
  delta = jnp.sum(d_out * out, axis=-1) - d_lse  # B K G T

  def query_block(i, carry):
    dq, dk, dv = carry
    q_i = _slice(q, i * bq, bq, 3).astype(dt)
    do_i = _slice(d_out, i * bq, bq, 3).astype(dt)
    lse_i = _slice(lse, i * bq, bq, 3)[..., None]
    delta_i = _slice(delta, i * bq, bq, 3)[..., None]

    def key_block(j, carry):
      dq_i, dk, dv = carry
      k_j = _slice(k, j * bk, bk, 2).astype(dt)
      s, ok = blocks.scores(q_i, k_j, i, j)
      p = jnp.where(ok, jnp.exp(s - lse_i), 0.0)
      v_j = _slice(v, j * bk, bk, 2).astype(dt)
      dv = _add_at(dv, j * bk, jnp.einsum("bkgqs,bkgqh->bksh", p.astype(dt), do_i,
                                          preferred_element_type=jnp.float32), 2)
      dp = jnp.einsum("bkgqh,bksh->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta_i)).astype(dt)
      dq_i = dq_i + jnp.einsum("bkgqs,bksh->bkgqh", ds, k_j, preferred_element_type=jnp.float32)
      dk = _add_at(dk, j * bk, jnp.einsum("bkgqs,bkgqh->bksh", ds, q_i, preferred_element_type=jnp.float32), 2)
      return dq_i, dk, dv

    dq_i = jnp.zeros(q_i.shape, jnp.float32)
    dq_i, dk, dv = _loop(*_key_blocks(i, bq, bk, window), key_block, (dq_i, dk, dv))
    return jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * bq, 3), dk, dv

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  if unroll:  # per-block accumulators, joined once: no whole-array update per block pair
    return _flash_backward_unrolled(blocks, q, k, v, d_out, lse, delta)
  lo, hi = jnp.asarray(0), jnp.asarray(blocks.nq)
  dq, dk, dv = _loop(lo, hi, query_block, (zeros(q), zeros(k), zeros(v)))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _flash_backward_unrolled(blocks, q, k, v, d_out, lse, delta):
  """`_flash_backward` with Python loops, each gradient block its own array."""
  bq, bk, dt = blocks.bq, blocks.bk, blocks.dt
  nk = blocks.s // bk
  k_b = [_slice(k, j * bk, bk, 2).astype(dt) for j in range(nk)]
  v_b = [_slice(v, j * bk, bk, 2).astype(dt) for j in range(nk)]
  dk_b, dv_b, dq_b = [None] * nk, [None] * nk, []
  add = lambda acc, x: x if acc is None else acc + x
  for i in range(blocks.nq):
    q_i = _slice(q, i * bq, bq, 3).astype(dt)
    do_i = _slice(d_out, i * bq, bq, 3).astype(dt)
    lse_i = _slice(lse, i * bq, bq, 3)[..., None]
    delta_i = _slice(delta, i * bq, bq, 3)[..., None]
    dq_i = None
    for j in range(*_key_blocks(i, bq, bk, blocks.window)):
      s, ok = blocks.scores(q_i, k_b[j], i, j)
      p = jnp.where(ok, jnp.exp(s - lse_i), 0.0)
      dv_b[j] = add(dv_b[j], jnp.einsum("bkgqs,bkgqh->bksh", p.astype(dt), do_i, preferred_element_type=jnp.float32))
      dp = jnp.einsum("bkgqh,bksh->bkgqs", do_i, v_b[j], preferred_element_type=jnp.float32)
      ds = (p * (dp - delta_i)).astype(dt)
      dq_i = add(dq_i, jnp.einsum("bkgqs,bksh->bkgqh", ds, k_b[j], preferred_element_type=jnp.float32))
      dk_b[j] = add(dk_b[j], jnp.einsum("bkgqs,bkgqh->bksh", ds, q_i, preferred_element_type=jnp.float32))
    dq_b.append(jnp.zeros(q_i.shape, jnp.float32) if dq_i is None else dq_i)
  fill = lambda blocks_, like: [jnp.zeros(like.shape[:2] + (bk,) + like.shape[3:], jnp.float32) if x is None else x
                                for x in blocks_]
  dq = jnp.concatenate(dq_b, axis=3)
  dk = jnp.concatenate(fill(dk_b, k), axis=2)
  dv = jnp.concatenate(fill(dv_b, v), axis=2)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _flash(q, k, v, masks, window, dt, bq, bk, unroll):
  return _flash_forward(q, k, v, masks, window, dt, bq, bk, unroll)


def _flash_fwd(q, k, v, masks, window, dt, bq, bk, unroll):
  out, lse = _flash_forward(q, k, v, masks, window, dt, bq, bk, unroll)
  return (out, lse), (q, k, v, masks, out, lse)


def _flash_bwd(window, dt, bq, bk, unroll, res, cotangents):
  q, k, v, masks, out, lse = res
  d_out, d_lse = cotangents
  dq, dk, dv = _flash_backward(q, k, v, masks, out, lse, d_out, d_lse, window, dt, bq, bk, unroll)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)

# Unroll the block loops up to this many query blocks (the step's compile time
# grows with the number of blocks; beyond it, lax loops).
MAX_UNROLLED_BLOCKS = 8


def flash(q_btkgh, k_bskh, v_bskh, mask, dt, block, prefix=None):
  """Flash attention for training (keys are the queries' own sequence).

  `block` is both the query and the key block (0, or one that does not divide
  T: one block). `prefix` keys are attended by every query and merged by
  log-sum-exp, with gradients to them.
  """
  b, t, kh, g, h = q_btkgh.shape
  if k_bskh.shape[1] != t:
    raise ValueError(f"flash attention attends over the queries' own {t} tokens, got {k_bskh.shape[1]} keys")
  blk = block if block and t % block == 0 else t
  q = jnp.transpose(q_btkgh, (0, 2, 3, 1, 4))  # B K G T H
  k = jnp.transpose(k_bskh, (0, 2, 1, 3))  # B K S H
  v = jnp.transpose(v_bskh, (0, 2, 1, 3))
  masks = (mask.q_pos, mask.k_pos, mask.q_seg, mask.k_seg)
  out, lse = _flash(q, k, v, masks, mask.window, jnp.dtype(dt), blk, blk, t // blk <= MAX_UNROLLED_BLOCKS)
  if prefix is not None:
    out = _merge_prefix(q, out, lse, prefix, dt)
  return jnp.transpose(out, (0, 3, 1, 2, 4))  # B T K G H


def _merge_prefix(q, out, lse, prefix, dt):
  """Adds keys every query sees ([P, K, H] each) to attention whose output and log-sum-exp are given."""
  k_pkh, v_pkh = prefix
  s = jnp.einsum("bkgth,pkh->bkgtp", q.astype(dt), k_pkh.astype(dt), preferred_element_type=jnp.float32)
  lse_p = jax.nn.logsumexp(s, axis=-1)
  out_p = jnp.einsum("bkgtp,pkh->bkgth", jax.nn.softmax(s, axis=-1).astype(dt), v_pkh.astype(dt),
                     preferred_element_type=jnp.float32)
  total = jnp.logaddexp(lse, lse_p)
  return out * jnp.exp(lse - total)[..., None] + out_p * jnp.exp(lse_p - total)[..., None]


def fused(impl, q_btkgh, k_bskh, v_bskh, mask, dt):
  """`jax.nn.dot_product_attention` ("xla" or "cudnn"); queries arrive scaled, so its scale is 1."""
  b, t, kh, g, h = q_btkgh.shape
  window = (mask.window - 1, 0) if mask.window else None
  out_btnh = jax.nn.dot_product_attention(
      q_btkgh.reshape(b, t, kh * g, h).astype(dt), k_bskh.astype(dt), v_bskh.astype(dt),
      mask=mask.dense()[:, :, 0], scale=1.0, is_causal=True, local_window_size=window, implementation=impl)
  return out_btnh.astype(jnp.float32).reshape(b, t, kh, g, h)


# What "auto" picks on CPU: flash or materialize, by tools/bench.py on the 34m shapes (see the README).
CPU_DEFAULT = "flash"


def resolve(impl, platform):
  """The kernel `impl` ("auto" or a name) means on `platform` ("tpu", "gpu", "cpu").

  Until the README's AOT table is re-compiled with the splash kernel, "auto" on TPU stays the materialising
  kernel it was compiled with; GPUs take flash (cuDNN is opt-in: `attention_impl=cudnn`, no prefix keys).
  """
  if impl != "auto":
    return impl
  if platform == "tpu":
    return "materialize"
  return CPU_DEFAULT
