"""Batched autoregressive decoding with a KV cache.

  tokens = generate(model, [[2, 45, 9], [2, 7]], max_new_tokens=32)               # greedy
  tokens = generate(model, prompts, max_new_tokens=64, temperature=0.8, top_p=0.95, stop_ids=[3])

Prompts of different lengths share one batch: they are right-padded, the
padding is stored as empty cache slots, and each row keeps its own positions,
so every row decodes exactly as it would alone. The prefill and the whole
decode loop (a `lax.while_loop` that stops when every row has produced a stop
token) are one jit-compiled program; prompt lengths are bucketed to a multiple
of 16 so that nearby lengths reuse it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmstack.errors import ConfigError

_BUCKET = 16


def sample_logits(logits_bv, key, temperature=0.0, top_k=0, top_p=1.0):
  """Next token ids B from float32 logits B V.

  temperature 0 is greedy (argmax). Otherwise logits are divided by the
  temperature, cut to the `top_k` largest (0: no cut) and to the smallest set
  whose probability reaches `top_p` (1.0: no cut), then sampled.
  """
  if temperature == 0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  logits_bv = logits_bv / temperature
  neg = jnp.finfo(logits_bv.dtype).min
  if top_k > 0:
    kth = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
    logits_bv = jnp.where(logits_bv < kth, neg, logits_bv)
  if top_p < 1.0:
    sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_bv, axis=-1)
    # Keep a token while the probability mass before it is below top_p: the
    # most likely token is always kept.
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p
    threshold = jnp.min(jnp.where(keep, sorted_bv, jnp.inf), axis=-1, keepdims=True)
    logits_bv = jnp.where(logits_bv < threshold, neg, logits_bv)
  return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate(graphdef, state, tokens_bp, lengths_b, stop_ids, key, *, max_new_tokens, temperature, top_k, top_p):
  model = nnx.merge(graphdef, state)
  b, p = tokens_bp.shape
  cache = model.init_cache(b, p + max_new_tokens)
  positions_bp = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  segments_bp = (positions_bp < lengths_b[:, None]).astype(jnp.int32)
  logits_bpv, cache = model(tokens_bp, positions_bp, segments_bp, cache)
  last_bv = logits_bpv[jnp.arange(b), lengths_b - 1]
  key, sub = jax.random.split(key)
  tok_b = sample_logits(last_bv, sub, temperature, top_k, top_p)
  out_bn = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(tok_b)
  done_b = jnp.isin(tok_b, stop_ids)

  def cond(carry):
    i, _, done_b, _, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_b)

  def body(carry):
    i, tok_b, done_b, cache, out_bn, key = carry
    # The token sampled at step i-1 sits at position length + i - 1.
    pos_b1 = (lengths_b + i - 1)[:, None]
    logits_b1v, cache = model(tok_b[:, None], pos_b1, jnp.ones_like(pos_b1), cache)
    key, sub = jax.random.split(key)
    nxt_b = sample_logits(logits_b1v[:, 0], sub, temperature, top_k, top_p)
    nxt_b = jnp.where(done_b, 0, nxt_b)
    out_bn = out_bn.at[:, i].set(nxt_b)
    return i + 1, nxt_b, done_b | jnp.isin(nxt_b, stop_ids), cache, out_bn, key

  carry = (jnp.ones((), jnp.int32), tok_b, done_b, cache, out_bn, key)
  return jax.lax.while_loop(cond, body, carry)[4]


def _pad_prompts(model, prompts, max_new_tokens):
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ConfigError("generate: every prompt needs at least one token")
  longest = max(len(p) for p in prompts)
  context = model.cfg.max_seq_len
  if longest + max_new_tokens > context:
    raise ConfigError(f"generate: a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} "
                      f"exceeds the model's context of {context} tokens")
  width = min(-(-longest // _BUCKET) * _BUCKET, context - max_new_tokens)
  tokens = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  return tokens, np.asarray([len(p) for p in prompts], np.int32)


def _trim(row, stop_ids):
  """Tokens up to and including the first stop token."""
  out = []
  for t in row:
    out.append(int(t))
    if t in stop_ids:
      break
  return out


def generate(model, prompts, *, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, stop_ids=(), seed=0):
  """Continues each prompt (a list of token ids) by up to `max_new_tokens`.

  Returns one list per prompt: the new tokens, ending with the stop token
  when one was produced.
  """
  tokens, lengths = _pad_prompts(model, prompts, max_new_tokens)
  graphdef, state = nnx.split(model)
  out = _generate(graphdef, state, tokens, lengths, jnp.asarray(list(stop_ids) or [-1], jnp.int32),
                  jax.random.key(seed), max_new_tokens=max_new_tokens, temperature=float(temperature),
                  top_k=int(top_k), top_p=float(top_p))
  stops = set(int(s) for s in stop_ids)
  return [_trim(row, stops) for row in np.asarray(out)]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _full_forward_next(graphdef, state, tokens_bs, lengths_b):
  model = nnx.merge(graphdef, state)
  logits = model(tokens_bs)
  return jnp.argmax(logits[jnp.arange(tokens_bs.shape[0]), lengths_b - 1], axis=-1).astype(jnp.int32)


def generate_without_cache(model, prompts, *, max_new_tokens):
  """Greedy decoding that recomputes the whole prefix for every token.

  The baseline the KV cache is measured and tested against: each step runs
  the full forward pass over a fixed-width buffer (positions past a row's
  length cannot affect it, attention being causal).
  """
  tokens, lengths = _pad_prompts(model, prompts, max_new_tokens)
  buf = np.zeros((len(prompts), tokens.shape[1] + max_new_tokens), np.int32)
  buf[:, :tokens.shape[1]] = tokens
  graphdef, state = nnx.split(model)
  out = []
  for _ in range(max_new_tokens):
    nxt = np.asarray(_full_forward_next(graphdef, state, buf, lengths))
    buf[np.arange(len(prompts)), lengths] = nxt
    lengths = lengths + 1
    out.append(nxt)
  return [list(map(int, row)) for row in np.stack(out, axis=1)]
