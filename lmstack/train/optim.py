"""Learning-rate schedules and the AdamW optimizer.

Schedules (`optim.schedule`):
  cosine   linear warmup, then cosine decay to `min_lr_ratio * lr`.
  wsd      warmup-stable-decay: warmup, constant, then the last
           `decay_fraction` of the steps decay to `min_lr_ratio * lr`
           (`decay_shape` linear or 1-sqrt, as in Hägele et al. 2024).
  linear   linear warmup, then linear decay to `min_lr_ratio * lr`.
  constant linear warmup, then constant.

An anneal (configs/anneal.py) is `wsd` with warmup_steps=0, decay_fraction=1
and min_lr_ratio=0: from `lr` straight down to zero, linear or 1-sqrt; its
`lr` is where the pre-training schedule stood at the checkpoint,
`checkpoint_lr(meta_config, step)`.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lmstack.errors import ConfigError


def _decay(shape, frac):
  """Decay factor in [0, 1] at fraction `frac` of the decay phase."""
  if shape == "linear":
    return 1.0 - frac
  if shape == "1-sqrt":
    return 1.0 - jnp.sqrt(frac)
  if shape == "cosine":
    return 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
  raise ConfigError(f"optim.decay_shape={shape!r}; expected linear, 1-sqrt or cosine")


def make_schedule(cfg, total_steps):
  """An optax schedule from the `optim` config section."""
  peak, warmup = cfg.lr, cfg.warmup_steps
  floor = cfg.min_lr_ratio * peak
  if cfg.schedule not in ("cosine", "wsd", "linear", "constant"):
    raise ConfigError(f"optim.schedule={cfg.schedule!r}; expected cosine, wsd, linear or constant")
  if warmup > total_steps and cfg.schedule != "constant":
    raise ConfigError(f"optim.warmup_steps={warmup} must not exceed the {total_steps} training steps")
  decay_start = warmup
  if cfg.schedule == "wsd":
    decay_start = max(warmup, int(round(total_steps * (1 - cfg.decay_fraction))))
  shape = {"cosine": "cosine", "linear": "linear", "wsd": cfg.decay_shape}.get(cfg.schedule)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * jnp.minimum(1.0, (step + 1) / max(warmup, 1))
    if shape is None:
      return warm
    frac = jnp.clip((step - decay_start) / max(total_steps - decay_start, 1), 0.0, 1.0)
    decayed = floor + (peak - floor) * _decay(shape, frac)
    return jnp.where(step < warmup, warm, jnp.where(step < decay_start, peak, decayed))

  return schedule


def checkpoint_lr(meta_config, step):
  """The learning rate a training run's schedule gave at `step`.

  `meta_config` is the resolved config a checkpoint's meta holds (a dict);
  a WSD run's stable-phase checkpoints all give its peak `lr`.
  """
  try:
    cfg = ml_collections.ConfigDict(meta_config["optim"])
    total = int(meta_config["train"]["steps"])
  except (KeyError, TypeError):
    raise ConfigError("the checkpoint's meta has no optim/train config (a params checkpoint: soup, import, "
                      "extend_vocab); give the learning rate") from None
  return float(f"{float(make_schedule(cfg, total)(step)):.6g}")  # float32 noise off: 1e-3, not 0.00099999993


def _decay_mask(params):
  # Weight decay on weight matrices only; RMSNorm scales (any path through a
  # `*norm*` module) and biases are left alone.
  def decays(path, _):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return not any("norm" in n or n == "bias" for n in names)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg, total_steps):
  """AdamW with global-norm clipping; returns (tx, schedule)."""
  schedule = make_schedule(cfg, total_steps)
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=_decay_mask))
  return optax.chain(*parts), schedule
