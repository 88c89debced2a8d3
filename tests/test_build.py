"""One build path (lmstack/train/build.py): the program the trainer runs is the one tools/aot_compile.py
compiles, and meshes follow the TPU torus.

The trainer's program is lowered from its real first batch (the Hooks.first_step seam), in this
process; the AOT tool's from abstract inputs, in a process of its own (its absl flags would clash with
lmstack.main's), over the same 8 fake CPU devices. The lowered texts must be equal.
"""

import hashlib
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from lmstack import sharding
from lmstack.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = {  # (config file argument, overrides): pre-training, LoRA fine-tuning, DPO on LoRA
    "pretrain": ("pretrain.py:runlocal", {}),
    "lora": ("sft.py:method=lora,runlocal", {"train.grad_accum_steps": 2, "train.batch_size": 16}),
    "dpo": ("dpo.py:method=lora,runlocal", {}),
}


def stage_config(name):
  """The stage's config, a one-step run (the AOT process builds it with this same function)."""
  import importlib
  sys.path.insert(0, ROOT)
  file, _, arg = STAGES[name][0].partition(":")
  config = importlib.import_module(f"configs.{file[:-3]}").get_config(arg)
  for key, value in STAGES[name][1].items():
    section, field = key.split(".")
    config[section][field] = value
  config.train.update(steps=1, eval_every=0, checkpoint_every=1, tensorboard=False)
  return config


class _Capture(trainer.Hooks):
  def __init__(self):
    self.text = None

  def first_step(self, built, state, frozen, batch):
    self.text = built.train_step.lower(state, frozen, batch).as_text()


def _aot_text(name):
  code = (f"import sys; sys.path[:0] = [{os.path.join(ROOT, 'tests')!r}, {os.path.join(ROOT, 'tools')!r}]\n"
          "import hashlib, jax, aot_compile, test_build\n"
          f"_, lowered = aot_compile.lower_step(test_build.stage_config({name!r}), jax.devices())\n"
          "print('SHA', hashlib.sha256(lowered.as_text().encode()).hexdigest())\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return [l.split()[1] for l in out.stdout.splitlines() if l.startswith("SHA ")][0]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STAGES))
def test_the_aot_tool_lowers_the_program_the_trainer_runs(name, tmp_path):
  config = stage_config(name)
  hooks = _Capture()
  trainer.run(config, str(tmp_path / "run"), hooks=hooks)
  assert hooks.text and "stablehlo" in hooks.text
  assert hashlib.sha256(hooks.text.encode()).hexdigest() == _aot_text(name)


class _Chip:
  """What mesh_utils reads of a TPU device: a v5p chip (one megacore device) at `coords` in the torus."""
  platform, device_kind, core_on_chip, slice_index, process_index = "tpu", "TPU v5", 0, 0, 0

  def __init__(self, i, coords):
    self.id, self.coords = i, coords

  def __repr__(self):
    return f"chip{self.coords}"


def _v5p_4x4x4():
  """64 chips numbered as the runtime does (x fastest, then y, then z)."""
  return [_Chip(i, (x, y, z)) for i, (z, y, x) in enumerate(itertools.product(range(4), repeat=3))]


def _torus_distance(a, b, dims=(4, 4, 4)):
  return sum(min(abs(p - q), d - abs(p - q)) for p, q, d in zip(a.coords, b.coords, dims))


def test_meshes_follow_the_tpu_torus():
  devices = _v5p_4x4x4()
  grid = sharding.device_grid((4, 4, 4), devices)  # data, fsdp, tensor
  assert sorted(d.id for d in grid.flat) == list(range(64))
  # Every step along `tensor` and along `fsdp` (the axes with the most traffic) is one link of the torus.
  for axis in (1, 2):
    for a, b in zip(np.take(grid, range(3), axis).flat, np.take(grid, range(1, 4), axis).flat):
      assert _torus_distance(a, b) == 1, (axis, a, b)
  # A plain reshape of the numbering (what the trainer did) does not: fsdp steps jump 4 rows of the torus.
  plain = np.asarray(devices).reshape(4, 16, 1)
  assert max(_torus_distance(a, b) for a, b in zip(plain[:, :-1].flat, plain[:, 1:].flat)) > 1
  grid = sharding.device_grid((1, 16, 4), devices)
  for a, b in zip(grid[..., :-1].flat, grid[..., 1:].flat):
    assert _torus_distance(a, b) == 1


def test_devices_that_are_not_tpus_keep_their_order():
  import jax
  devices = jax.devices()
  assert list(sharding.device_grid((1, -1, 1), devices).flat) == devices
  assert list(sharding.device_grid((2, 2, 2), devices).flat) == devices
