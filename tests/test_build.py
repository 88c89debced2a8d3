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


def _steps_along(grid, axis):
  """Pairs of devices that are neighbours on mesh axis `axis`."""
  n = grid.shape[axis]
  return zip(np.take(grid, range(n - 1), axis).flat, np.take(grid, range(1, n), axis).flat)


def test_meshes_follow_the_tpu_torus():
  devices = _v5p_4x4x4()
  grid = sharding.device_grid((4, 4, 1, 4), devices)  # data, fsdp, sequence, tensor
  assert sorted(d.id for d in grid.flat) == list(range(64))
  # Every step along `tensor` and along `fsdp` (the axes with the most traffic) is one link of the torus.
  for axis in (1, 3):
    for a, b in _steps_along(grid, axis):
      assert _torus_distance(a, b) == 1, (axis, a, b)
  # A plain reshape of the numbering (what the trainer did) does not: fsdp steps jump 4 rows of the torus.
  plain = np.asarray(devices).reshape(4, 16, 1, 1)
  assert max(_torus_distance(a, b) for a, b in _steps_along(plain, 1)) > 1
  grid = sharding.device_grid((1, 4, 4, 4), devices)  # a sequence axis: its ring on the torus too
  for axis in (1, 2, 3):
    for a, b in _steps_along(grid, axis):
      assert _torus_distance(a, b) == 1, (axis, a, b)


def test_devices_that_are_not_tpus_keep_their_order():
  import jax
  devices = jax.devices()
  assert list(sharding.device_grid((1, -1, 1), devices).flat) == devices
  assert list(sharding.device_grid((2, 2, 2), devices).flat) == devices


def _lora_losses(frozen_dtype, method="lora"):
  """Three LoRA steps of the tiny model on one fixed batch: (losses, frozen bytes, frozen dtypes)."""
  import jax
  from flax import nnx
  from lmstack.train import build
  config = stage_config("lora")
  config.peft.method = method
  config.frozen_dtype = frozen_dtype
  config.model.dtype = "bfloat16"
  mesh, rules = build.mesh_for(config)
  b = build.build(config, mesh, rules)
  state, frozen = b.model.init()
  rng = np.random.default_rng(0)
  t = config.train
  tok = rng.integers(4, b.model_cfg.vocab_size, (t.batch_size, t.seq_len + 1)).astype(np.int32)
  batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "segment_ids": np.ones_like(tok[:, 1:]),
           "positions": np.broadcast_to(np.arange(t.seq_len, dtype=np.int32), tok[:, 1:].shape).copy(),
           "loss_mask": np.ones_like(tok[:, 1:])}
  batch = {k: jax.device_put(v, b.data_sh) for k, v in batch.items()}
  losses = []
  with sharding.use(mesh, rules):
    for _ in range(3):
      state, metrics = b.train_step(state, frozen, batch)
      losses.append(float(metrics["loss"]))
  dtypes = {"/".join(map(str, p)): str(v.dtype) for p, v in nnx.to_flat_state(frozen)}
  return losses, sum(x.nbytes for x in jax.tree.leaves(frozen)), dtypes


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_a_bf16_frozen_base_trains_exactly_as_a_float32_one(method):
  low, low_bytes, dtypes = _lora_losses("auto", method)
  full, full_bytes, full_dtypes = _lora_losses("float32", method)
  # The matmuls cast their weights to bfloat16 either way (model.dtype): the same operands, the same sums.
  assert low == full
  assert set(full_dtypes.values()) == {"float32"}
  assert dtypes["blocks/attn/q"] == dtypes["blocks/mlp/down"] == "bfloat16"
  assert dtypes["embed"] == dtypes["blocks/attn_norm/scale"] == "float32"  # gathered / elementwise: kept
  # Two bytes saved on every element of the block linears (and of the output projection, untied and
  # without LoRA folded into it): L (2 d n h + 2 d k h + 3 d f) [+ d V].
  from lmstack.model.transformer import PRESETS
  c = PRESETS["tiny"]
  elements = c.n_layers * (2 * c.d_model * c.n_heads * c.head_dim + 2 * c.d_model * c.n_kv_heads * c.head_dim
                           + 3 * c.d_model * c.mlp_dim)
  if dtypes["unembed"] == "bfloat16":
    elements += c.d_model * c.vocab_size
  assert (method == "prefix") == (dtypes["unembed"] == "bfloat16")  # LoRA's default targets include unembed
  assert full_bytes - low_bytes == 2 * elements
