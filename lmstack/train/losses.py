"""Loss functions, chosen by name in `config.loss`.

Every loss has the form `loss_fn(model, batch) -> (loss_sum, weight, metrics)`:
the summed loss over the batch, the total weight it is averaged by (tokens for
language modelling, pairs for preference losses) and a dict of summed metrics.
Returning sums rather than means makes gradient accumulation exact: the step
adds sums over micro-batches and divides once.
"""

import jax.numpy as jnp
import optax


def token_weights(batch):
  """1.0 on real target tokens, 0.0 on padding (segment id 0) and masked tokens."""
  w = (batch["segment_ids"] > 0).astype(jnp.float32)
  if "loss_mask" in batch:
    w = w * batch["loss_mask"].astype(jnp.float32)
  return w


def next_token_loss(model, batch):
  """Cross-entropy of `targets` given `inputs` (float32).

  batch: inputs, targets, segment_ids, positions, all int32 [B, T]; an
  optional loss_mask [B, T] zeroes tokens (for example prompts in SFT).
  """
  logits_btv = model(batch["inputs"], batch["positions"], batch["segment_ids"])
  w_bt = token_weights(batch)
  nll_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv.astype(jnp.float32), batch["targets"])
  loss_sum = jnp.sum(nll_bt * w_bt)
  correct = jnp.sum((jnp.argmax(logits_btv, -1) == batch["targets"]) * w_bt)
  return loss_sum, jnp.sum(w_bt), {"accuracy": correct}


LOSSES = {"next_token": next_token_loss}
