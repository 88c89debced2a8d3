"""The one jit-compiled training step that every stage uses.

A stage differs only in its loss function and in which parameters train. The
model is split into `params` (trainable: differentiated, optimized, donated)
and `frozen` (everything else: read-only). The step is

  grads = d(sum of loss over micro-batches) / d params, divided by the weight
  params, opt_state = AdamW update

with gradient accumulation as a `lax.scan` over micro-batches, so the memory
of one step is that of one micro-batch.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def _loss_and_grads(graphdef, loss_fn, params, frozen, batch, accum_steps, rng):
  def loss_of(p, mb, key):
    loss_sum, weight, metrics = loss_fn(nnx.merge(graphdef, p, frozen), mb, key)
    return loss_sum, (weight, metrics)

  grad_fn = jax.value_and_grad(loss_of, has_aux=True)
  if accum_steps == 1:
    (loss_sum, (weight, metrics)), grads = grad_fn(params, batch, rng)
    return loss_sum, weight, metrics, grads

  micro = jax.tree.map(lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)

  def body(carry, xs):
    mb, i = xs
    (loss_sum, (weight, metrics)), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
    return jax.tree.map(jnp.add, carry, (loss_sum, weight, metrics, grads)), None

  first = jax.tree.map(lambda x: x[0], micro)
  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, first, rng)))
  (loss_sum, (weight, metrics)), grads = zeros
  carry, _ = jax.lax.scan(body, (loss_sum, weight, metrics, grads), (micro, jnp.arange(accum_steps)))
  return carry


def make_train_step(graphdef, loss_fn, tx, schedule, accum_steps=1, seed=0):
  """Returns `train_step(state, frozen, batch) -> (state, metrics)`.

  state: {"step": int32 [], "params": nnx.State, "opt_state": optax state}.
  `loss_fn(model, batch, rng)` gets a key derived from `seed` and the step
  (for dropout), so a resumed run draws the same masks.
  """

  def train_step(state, frozen, batch):
    params = state["params"]
    rng = jax.random.fold_in(jax.random.key(seed), state["step"])
    loss_sum, weight, metrics, grads = _loss_and_grads(graphdef, loss_fn, params, frozen, batch, accum_steps, rng)
    weight = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    out = {k: v / weight for k, v in metrics.items()}
    out.update(loss=loss_sum / weight, weight=weight, lr=schedule(state["step"]),
               grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params))
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, out

  return train_step


def make_eval_step(graphdef, loss_fn):
  """Returns `eval_step(params, frozen, batch) -> (loss_sum, weight, metric sums)`."""

  def eval_step(params, frozen, batch):
    return loss_fn(nnx.merge(graphdef, params, frozen), batch, None)

  return eval_step
