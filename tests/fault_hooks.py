"""Fault injection through the trainer's test seam (`trainer.Hooks`), in-process or as a command.

In a test:
  trainer.run(config, workdir, hooks=fault_hooks.Faults(nan_steps={3}))
As a command (what the subprocess tests run instead of `python -m lmstack.main`; the same flags):
  LMSTACK_FAULT_KILL_AT_STEP=10 python tests/fault_hooks.py --config=configs/pretrain.py:runlocal --workdir=/tmp/x

  LMSTACK_FAULT_KILL_AT_STEP=N   SIGKILL right after step N (after its save, if any, has started: the kill
                                 may land mid-save), as a crash or an OOM kill would
  LMSTACK_FAULT_NAN_STEPS=3,5-7  those steps' (1-based) loss, and so gradients, are NaN inside the compiled
                                 step, as a bad batch or a numerical blow-up would make them
"""

import functools
import os
import signal
import sys

MAIN = os.path.abspath(__file__)
# As `python -m lmstack.main` from the repository would: this checkout's lmstack (whatever pip installed)
# and its configs (config files import `configs.common`).
sys.path.insert(0, os.path.dirname(os.path.dirname(MAIN)))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lmstack.train import trainer  # noqa: E402


def parse_steps(spec):
  """"3,5-7" -> {3, 5, 6, 7}."""
  steps = set()
  for part in filter(None, spec.replace(" ", "").split(",")):
    lo, _, hi = part.partition("-")
    steps.update(range(int(lo), int(hi or lo) + 1))
  return steps


class Faults(trainer.Hooks):
  """A trainer.Hooks that poisons `nan_steps` and kills the process after step `kill_at_step`."""

  def __init__(self, nan_steps=(), kill_at_step=0):
    self.nan_steps, self.kill_at_step = set(nan_steps), kill_at_step

  def train_loss(self, loss_fn):
    if not self.nan_steps:
      return loss_fn

    def loss(model, batch, rng):
      batch = dict(batch)
      poisoned = batch.pop("fault_nan").max() > 0
      loss_sum, weight, metrics = loss_fn(model, batch, rng)
      return jnp.where(poisoned, jnp.nan, 1.0) * loss_sum, weight, metrics
    return loss

  def train_batch(self, step, batch):
    if not self.nan_steps:
      return batch
    # Shaped like the batch's first field, so it shards (and splits into micro-batches) as the batch does.
    flag = np.full(np.shape(next(iter(batch.values()))), float(step in self.nan_steps), np.float32)
    return {**batch, "fault_nan": flag}

  def after_step(self, step):
    if step == self.kill_at_step:
      os.kill(os.getpid(), signal.SIGKILL)


def from_env(env=os.environ):
  return Faults(parse_steps(env.get("LMSTACK_FAULT_NAN_STEPS", "")),
                int(env.get("LMSTACK_FAULT_KILL_AT_STEP", "0")))


def main():
  from absl import app  # pylint: disable=import-outside-toplevel
  from lmstack import main as lmstack_main  # pylint: disable=import-outside-toplevel
  trainer.run = functools.partial(trainer.run, hooks=from_env())  # what lmstack.main calls
  sys.argv[0] = "lmstack.main"
  app.run(lmstack_main.main, flags_parser=lmstack_main.parse_flags)


if __name__ == "__main__":
  main()
