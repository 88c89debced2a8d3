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
import optax

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
  logits_btv = model(batch["inputs"], batch["positions"], batch["segment_ids"], rng=rng)
  w_bt = token_weights(batch)
  nll_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv.astype(jnp.float32), batch["targets"])
  loss_sum = jnp.sum(nll_bt * w_bt)
  correct = jnp.sum((jnp.argmax(logits_btv, -1) == batch["targets"]) * w_bt)
  return loss_sum, jnp.sum(w_bt), {"accuracy": correct}


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
  logits_btv = model(flat["inputs"], flat["positions"], flat["segment_ids"], rng=rng)
  w_bt = token_weights(flat)
  logp_bt = -optax.softmax_cross_entropy_with_integer_labels(logits_btv.astype(jnp.float32), flat["targets"])
  return jnp.sum(logp_bt * w_bt, -1).reshape(b, r), jnp.sum(w_bt, -1).reshape(b, r)


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
