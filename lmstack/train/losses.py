"""Loss functions, chosen by name in `config.loss`.

Every loss has the form `loss_fn(model, batch, rng) -> (loss_sum, weight, metrics)`
(`rng` drives dropout in training and is None in evaluation):
the summed loss over the batch, the total weight it is averaged by (tokens for
language modelling, pairs for preference losses) and a dict of summed metrics.
Returning sums rather than means makes gradient accumulation exact: the step
adds sums over micro-batches and divides once.

  next_token  cross-entropy of packed rows (pre-training, SFT with a loss mask)
  dpo         a preference loss over (chosen, rejected) rows against a
              reference model's log-probabilities in the batch (`ref_logps`,
              lmstack/train/reference.py); options in `config.dpo`, bound by
              `make_loss`
"""

import functools

import jax
import jax.numpy as jnp

from lmstack.errors import ConfigError


def token_weights(batch):
  """1.0 on real target tokens, 0.0 on padding (segment id 0) and masked tokens."""
  w = (batch["segment_ids"] > 0).astype(jnp.float32)
  if "loss_mask" in batch:
    w = w * batch["loss_mask"].astype(jnp.float32)
  return w


def next_token_loss(model, batch, rng=None):
  """Cross-entropy of `targets` given `inputs` (float32).

  batch: inputs, targets, segment_ids, positions, all int32 [B, T]; an
  optional loss_mask [B, T] zeroes tokens (for example prompts in SFT).
  """
  h_btd = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"], rng=rng)
  w, eq = model.unembedding()
  w_bt = token_weights(batch)
  cfg = model.cfg
  loss_sum, correct = unembed_cross_entropy(h_btd, w, batch["targets"], w_bt, eq, cfg.compute_dtype, cfg.loss_block)
  return loss_sum, jnp.sum(w_bt), {"accuracy": correct}


# ---------------------------------------------------------------------------
# The output projection and cross-entropy, a block of positions at a time.
#
# For a vocabulary V the logits are B x T x V float32 (134 MB at 8 x 512 x
# 8192), several times the size of everything else in a step, and softmax,
# its gradient and the argmax each pass over them. Here a `lax.scan` over
# blocks of `block` positions computes each block's logits, its loss and,
# under differentiation, at once its gradient: d loss / d logits =
# weight * (softmax - onehot) is known in the forward pass because the loss is
# a plain sum, so the block's dh and dW are computed there and only scaled by
# the incoming cotangent in the backward pass. No logits are kept and none are
# recomputed.


def _blocks(x, block):
  """[B, T, ...] -> [T / block, B, block, ...]."""
  b, t = x.shape[:2]
  return jnp.moveaxis(x.reshape(b, t // block, block, *x.shape[2:]), 1, 0)


def _unblock(x):
  n, b, c = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(b, n * c, *x.shape[3:])


def _block_size(t, block):
  return block if block and t > block and t % block == 0 else t


def _block_logits(h_bcd, w, eq, dtype):
  return jnp.einsum(eq, h_bcd.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _block_stats(logits_bcv, targets_bc, w_bc):
  lse_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
  target_bc = jnp.take_along_axis(logits_bcv, targets_bc[..., None], -1)[..., 0]
  correct_bc = jnp.argmax(logits_bcv, -1) == targets_bc
  return lse_bc, jnp.sum((lse_bc - target_bc) * w_bc), jnp.sum(correct_bc * w_bc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def unembed_cross_entropy(h_btd, w, targets_bt, w_bt, eq, dtype, block):
  """(sum of weighted next-token NLL, weighted count of argmax hits), float32.

  logits = einsum(eq, h, w) with `dtype` inputs and float32 accumulation,
  `block` positions at a time; the gradient flows to `h_btd` and `w`.
  """
  c = _block_size(h_btd.shape[1], block)

  def body(carry, xs):
    h_bcd, t_bc, w_bc = xs
    _, nll, hits = _block_stats(_block_logits(h_bcd, w, eq, dtype), t_bc, w_bc)
    return (carry[0] + nll, carry[1] + hits), None

  zero = jnp.zeros((), jnp.float32)
  (nll, hits), _ = jax.lax.scan(body, (zero, zero), (_blocks(h_btd, c), _blocks(targets_bt, c), _blocks(w_bt, c)))
  return nll, hits


def _ce_fwd(h_btd, w, targets_bt, w_bt, eq, dtype, block):
  c = _block_size(h_btd.shape[1], block)
  w_axes = eq.split("->")[0].split(",")[1]
  dh_eq, dw_eq = f"btv,{w_axes}->btd", f"btd,btv->{w_axes}"  # the two gradient contractions of eq

  def body(carry, xs):
    nll_sum, hits_sum, dw = carry
    h_bcd, t_bc, w_bc = xs
    logits_bcv = _block_logits(h_bcd, w, eq, dtype)
    lse_bc, nll, hits = _block_stats(logits_bcv, t_bc, w_bc)
    p_bcv = jnp.exp(logits_bcv - lse_bc[..., None])
    onehot = jax.lax.broadcasted_iota(jnp.int32, p_bcv.shape, 2) == t_bc[..., None]
    g_bcv = ((p_bcv - onehot) * w_bc[..., None]).astype(dtype)
    dh_bcd = jnp.einsum(dh_eq, g_bcv, w.astype(dtype), preferred_element_type=jnp.float32)
    dw = dw + jnp.einsum(dw_eq, h_bcd.astype(dtype), g_bcv, preferred_element_type=jnp.float32)
    return (nll_sum + nll, hits_sum + hits, dw), dh_bcd

  zero = jnp.zeros((), jnp.float32)
  init = (zero, zero, jnp.zeros(w.shape, jnp.float32))
  (nll, hits, dw), dh = jax.lax.scan(body, init, (_blocks(h_btd, c), _blocks(targets_bt, c), _blocks(w_bt, c)))
  return (nll, hits), (_unblock(dh).astype(h_btd.dtype), dw.astype(w.dtype))


def _ce_bwd(eq, dtype, block, res, cotangents):
  del eq, dtype, block
  dh, dw = res
  g = cotangents[0]  # the argmax count has no gradient
  return (dh * g).astype(dh.dtype), (dw * g).astype(dw.dtype), None, None


unembed_cross_entropy.defvjp(_ce_fwd, _ce_bwd)


def unembed_logps(h_btd, w, targets_bt, w_bt, eq, dtype, block):
  """Per-row sums of weighted target log-probabilities [B], block by block.

  The rows' cotangents differ (a preference loss weighs chosen and rejected
  apart), so the gradient is not known in the forward pass; each block is
  rematerialised instead, which costs one more logits matmul.
  """
  c = _block_size(h_btd.shape[1], block)

  @jax.checkpoint
  def body(carry, xs):
    h_bcd, t_bc, w_bc = xs
    logits_bcv = _block_logits(h_bcd, w, eq, dtype)
    lse_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
    target_bc = jnp.take_along_axis(logits_bcv, t_bc[..., None], -1)[..., 0]
    return carry + jnp.sum((target_bc - lse_bc) * w_bc, -1), None

  out, _ = jax.lax.scan(body, jnp.zeros(h_btd.shape[:1], jnp.float32),
                        (_blocks(h_btd, c), _blocks(targets_bt, c), _blocks(w_bt, c)))
  return out


# ---------------------------------------------------------------------------
# Preference losses (DPO and its variants)

VARIANTS = ("sigmoid", "robust", "ipo", "hinge")


def sequence_logps(model, batch, rng=None):
  """Log-probabilities of each row's scored tokens, summed: ([B, 2], token counts [B, 2]) float32.

  batch: inputs, targets, segment_ids, positions, loss_mask int32 [B, 2, T]
  (a pair per leading index: chosen, rejected); a token counts where
  `token_weights` is 1 (the response and eos).
  """
  b, r, t = batch["inputs"].shape
  flat = {k: batch[k].reshape(b * r, t) for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
  h_btd = model.hidden(flat["inputs"], flat["positions"], flat["segment_ids"], rng=rng)
  w, eq = model.unembedding()
  w_bt = token_weights(flat)
  logp_b = unembed_logps(h_btd, w, flat["targets"], w_bt, eq, model.cfg.compute_dtype, model.cfg.loss_block)
  return logp_b.reshape(b, r), jnp.sum(w_bt, -1).reshape(b, r)


def preference_loss(h_b, variant="sigmoid", beta=0.1, label_smoothing=0.0):
  """Per-pair loss of h = (policy - reference) log-ratio of chosen minus that of rejected.

  sigmoid  -(1 - e) log s(beta h) - e log s(-beta h): DPO (Rafailov et al.
           2023); e > 0 is conservative DPO (labels flipped with probability e)
  robust   (-(1 - e) log s(beta h) + e log s(-beta h)) / (1 - 2 e): robust DPO
           (Chowdhury et al. 2024), unbiased under label noise e
  ipo      (h - 1 / (2 beta))^2 on length-normalised log-probabilities (IPO,
           Azar et al. 2023; beta is their tau)
  hinge    max(0, 1 - beta h) (SLiC, Zhao et al. 2023)
  """
  e = label_smoothing
  if variant == "sigmoid":
    return -(1 - e) * jax.nn.log_sigmoid(beta * h_b) - e * jax.nn.log_sigmoid(-beta * h_b)
  if variant == "robust":
    return (-(1 - e) * jax.nn.log_sigmoid(beta * h_b) + e * jax.nn.log_sigmoid(-beta * h_b)) / (1 - 2 * e)
  if variant == "ipo":
    return (h_b - 1 / (2 * beta)) ** 2
  if variant == "hinge":
    return jax.nn.relu(1 - beta * h_b)
  raise ValueError(f"dpo.variant={variant!r}; expected one of {', '.join(VARIANTS)}")


def _above(x_b, y_b):
  """1 where x > y, 1/2 on ties (policy == reference scores 0.5), else 0."""
  return (x_b > y_b) + 0.5 * (x_b == y_b)


def dpo_loss(model, batch, rng=None, *, variant="sigmoid", beta=0.1, label_smoothing=0.0):
  """A preference loss of the policy `model` against reference log-probabilities.

  batch: the rows of lmstack.data.preference ([B, 2, T]) and ref_logps
  float32 [B, 2], the reference model's summed log-probabilities of the same
  rows (lmstack/train/reference.py). Returns the summed loss over the real
  pairs, their number, and summed metrics: rewards/{chosen,rejected} =
  beta (policy - reference) log-probabilities (length-normalised under ipo),
  rewards/margins (chosen - rejected), rewards/accuracies (chosen > rejected),
  logps/{chosen,rejected} (the policy's, summed) and logps/accuracies (the
  policy alone prefers chosen). Ties count 1/2 in both accuracies.
  """
  policy_b2, n_b2 = sequence_logps(model, batch, rng)
  ref_b2 = batch["ref_logps"].astype(jnp.float32)
  valid_b = jnp.all(n_b2 > 0, axis=-1).astype(jnp.float32)  # padding pairs have no scored token
  if variant == "ipo":
    ratio_b2 = (policy_b2 - ref_b2) / jnp.maximum(n_b2, 1.0)
  else:
    ratio_b2 = policy_b2 - ref_b2
  loss_b = preference_loss(ratio_b2[:, 0] - ratio_b2[:, 1], variant, beta, label_smoothing)
  rewards_b2 = beta * ratio_b2
  total = lambda x_b: jnp.sum(x_b * valid_b)
  metrics = {
      "rewards/chosen": total(rewards_b2[:, 0]),
      "rewards/rejected": total(rewards_b2[:, 1]),
      "rewards/margins": total(rewards_b2[:, 0] - rewards_b2[:, 1]),
      "rewards/accuracies": total(_above(rewards_b2[:, 0], rewards_b2[:, 1])),
      "logps/chosen": total(policy_b2[:, 0]),
      "logps/rejected": total(policy_b2[:, 1]),
      "logps/accuracies": total(_above(policy_b2[:, 0], policy_b2[:, 1])),
  }
  return total(loss_b), jnp.sum(valid_b), metrics


LOSSES = {"next_token": next_token_loss, "dpo": dpo_loss}
PREFERENCE = ("dpo",)  # losses that need the reference log-probabilities in the batch


def is_preference(name):
  return name in PREFERENCE


def make_loss(config):
  """`config.loss`'s function, with its options (`config.dpo`) bound."""
  if config.loss not in LOSSES:
    raise ConfigError(f"config.loss={config.loss!r}; expected one of {sorted(LOSSES)}")
  if not is_preference(config.loss):
    return LOSSES[config.loss]
  if "dpo" not in config:
    raise ConfigError(f"config.loss={config.loss!r} needs a config.dpo section (configs/dpo.py)")
  d = config.dpo
  if d.variant not in VARIANTS:
    raise ConfigError(f"config.dpo.variant={d.variant!r}; expected one of {', '.join(VARIANTS)}")
  if not d.beta > 0:
    raise ConfigError(f"config.dpo.beta={d.beta} must be positive")
  if not 0 <= d.label_smoothing < 0.5:
    raise ConfigError(f"config.dpo.label_smoothing={d.label_smoothing} must be in [0, 0.5)")
  return functools.partial(dpo_loss, variant=d.variant, beta=float(d.beta), label_smoothing=float(d.label_smoothing))
