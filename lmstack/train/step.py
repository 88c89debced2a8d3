"""The one jit-compiled training step that every stage uses.

A stage differs only in its loss function and in which parameters train. The
model is split into `params` (trainable: differentiated, optimized, donated)
and `frozen` (everything else: read-only). The step is

  grads = d(sum of loss over micro-batches) / d params, divided by the weight
  params, opt_state = AdamW update

with gradient accumulation as a `lax.scan` over micro-batches, so the memory
of one step is that of one micro-batch.

A guard (`Guard`, from config.train) runs inside the compiled step: a step
whose loss or gradient norm is not finite, or whose loss is a spike (more than
`spike_zscore` running standard deviations above the running mean), keeps the
old params and optimizer state, selected with `jnp.where`, so no value goes
back to the host. Its running statistics and skip counters live in the state
(`state["guard"]`) and so are checkpointed: a resumed run skips exactly the
steps an uninterrupted one would.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lmstack.errors import ConfigError


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


@dataclasses.dataclass(frozen=True)
class Guard:
  """Which steps skip their update (the `config.train` fields of the same names).

  skip_nonfinite: skip a step whose loss or gradient norm is inf or NaN
    (False: apply it, and the trainer stops at the next log step).
  spike_zscore: skip a step whose loss is more than this many running standard
    deviations above the running mean; 0 turns the test off.
  spike_warmup_steps: updates that feed the statistics before the spike test starts.
  max_consecutive_skips: this many skips in a row trip the guard (the trainer
    then stops); 0: never.
  ema_decay: the running statistics' decay per update (a horizon of ~100).
  """
  skip_nonfinite: bool = True
  spike_zscore: float = 0.0
  spike_warmup_steps: int = 20
  max_consecutive_skips: int = 10
  ema_decay: float = 0.99

  @classmethod
  def from_config(cls, train_cfg):
    """The guard of `config.train` (a field it lacks takes its default)."""
    defaults = cls()
    guard = cls(**{f.name: type(getattr(defaults, f.name))(train_cfg.get(f.name, getattr(defaults, f.name)))
                   for f in dataclasses.fields(cls) if f.name != "ema_decay"})
    for name in ("spike_zscore", "spike_warmup_steps", "max_consecutive_skips"):
      if getattr(guard, name) < 0:
        raise ConfigError(f"config.train.{name}={getattr(guard, name)} must not be negative (0 turns it off)")
    return guard


def init_guard():
  """The guard's part of the state: running loss statistics and skip counters.

  mean, var: exponential moving mean and variance of the loss of applied steps;
  count: applied steps that fed them; consecutive: skips in a row, up to now;
  total: skips in all; tripped: the step at which `consecutive` first reached
  max_consecutive_skips (0: not yet).
  """
  f32, i32 = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
  return {"mean": f32, "var": f32, "count": i32, "consecutive": i32, "total": i32, "tripped": i32}


def _guard(guard, g, loss, grad_norm, step):
  """(skip: bool [], the guard state after step `step` + 1)."""
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  skip = jnp.zeros((), bool)
  if guard.skip_nonfinite:
    skip = ~finite
  if guard.spike_zscore > 0:
    armed = g["count"] >= guard.spike_warmup_steps
    skip |= armed & (loss > g["mean"] + guard.spike_zscore * jnp.sqrt(g["var"]))
  # Welford-like start (weight 1/n), then an EMA: the statistics are usable
  # after a few steps and follow the loss's slow decline afterwards.
  keep = finite & ~skip
  a = jnp.maximum(1.0 / (g["count"] + 1).astype(jnp.float32), 1.0 - guard.ema_decay)
  diff = jnp.where(keep, loss - g["mean"], 0.0)
  consecutive = jnp.where(skip, g["consecutive"] + 1, 0)
  tripped = g["tripped"]
  if guard.max_consecutive_skips > 0:
    tripped = jnp.where((tripped == 0) & (consecutive >= guard.max_consecutive_skips), step + 1, tripped)
  return skip, {
      "mean": jnp.where(keep, g["mean"] + a * diff, g["mean"]),
      "var": jnp.where(keep, (1.0 - a) * (g["var"] + a * diff * diff), g["var"]),
      "count": g["count"] + keep.astype(jnp.int32),
      "consecutive": consecutive,
      "total": g["total"] + skip.astype(jnp.int32),
      "tripped": tripped,
  }


def make_train_step(graphdef, loss_fn, tx, schedule, accum_steps=1, seed=0, guard=Guard()):
  """Returns `train_step(state, frozen, batch) -> (state, metrics)`.

  state: {"step": int32 [], "params": nnx.State, "opt_state": optax state,
  "guard": init_guard()}. `loss_fn(model, batch, rng)` gets a key derived from
  `seed` and the step (for dropout), so a resumed run draws the same masks.
  A skipped step (see `Guard`) still advances "step" (its batch is dropped)
  but not the optimizer, whose schedule therefore runs `skipped_total` steps
  behind; the logged `lr` is the one the optimizer used.
  """

  def train_step(state, frozen, batch):
    params = state["params"]
    rng = jax.random.fold_in(jax.random.key(seed), state["step"])
    loss_sum, weight, metrics, grads = _loss_and_grads(graphdef, loss_fn, params, frozen, batch, accum_steps, rng)
    weight = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    loss, grad_norm = loss_sum / weight, optax.global_norm(grads)
    skip, g = _guard(guard, state["guard"], loss, grad_norm, state["step"])
    # A select, not a cond: the old values come back bit for bit, and donation still aliases the buffers.
    keep_old = lambda new, old: jnp.where(skip, old, new)  # noqa: E731
    params = jax.tree.map(keep_old, new_params, params)
    opt_state = jax.tree.map(keep_old, opt_state, state["opt_state"])
    out = {k: v / weight for k, v in metrics.items()}
    out.update(loss=loss, weight=weight, lr=schedule(state["step"] - state["guard"]["total"]),
               grad_norm=grad_norm, param_norm=optax.global_norm(params),
               skipped=skip.astype(jnp.float32), skipped_total=g["total"])
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "guard": g}, out

  return train_step


def make_eval_step(graphdef, loss_fn):
  """Returns `eval_step(params, frozen, batch) -> (loss_sum, weight, metric sums)`."""

  def eval_step(params, frozen, batch):
    return loss_fn(nnx.merge(graphdef, params, frozen), batch, None)

  return eval_step
