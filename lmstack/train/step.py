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


def _loss_and_grads(graphdef, loss_fn, params, frozen, batch, accum_steps):
  def loss_of(p, mb):
    loss_sum, weight, metrics = loss_fn(nnx.merge(graphdef, p, frozen), mb)
    return loss_sum, (weight, metrics)

  grad_fn = jax.value_and_grad(loss_of, has_aux=True)
  if accum_steps == 1:
    (loss_sum, (weight, metrics)), grads = grad_fn(params, batch)
    return loss_sum, weight, metrics, grads

  micro = jax.tree.map(lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)

  def body(carry, mb):
    (loss_sum, (weight, metrics)), grads = grad_fn(params, mb)
    return jax.tree.map(jnp.add, carry, (loss_sum, weight, metrics, grads)), None

  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro))))
  (loss_sum, (weight, metrics)), grads = zeros
  carry, _ = jax.lax.scan(body, (loss_sum, weight, metrics, grads), micro)
  return carry


def make_train_step(graphdef, loss_fn, tx, schedule, accum_steps=1):
  """Returns `train_step(state, frozen, batch) -> (state, metrics)`.

  state: {"step": int32 [], "params": nnx.State, "opt_state": optax state}.
  """

  def train_step(state, frozen, batch):
    params = state["params"]
    loss_sum, weight, metrics, grads = _loss_and_grads(graphdef, loss_fn, params, frozen, batch, accum_steps)
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
  """Returns `eval_step(params, frozen, batch) -> (loss_sum, weight)`."""

  def eval_step(params, frozen, batch):
    loss_sum, weight, _ = loss_fn(nnx.merge(graphdef, params, frozen), batch)
    return loss_sum, weight

  return eval_step
