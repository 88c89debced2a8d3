"""Multi-host: when jax.distributed starts, the multi-slice mesh, and a real 2-process run on CPU.

  python -m pytest -q tests/test_distributed.py
"""

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lmstack import distributed, sharding
from lmstack.errors import EXIT_PREEMPTED, CheckpointError, ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("env,tpu_host,expected", [
    ({}, False, ""),
    ({"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, False, ""),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, False, "JAX_COORDINATOR_ADDRESS"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1", "MEGASCALE_NUM_SLICES": "2"}, False, "multi-slice"),
    ({"MEGASCALE_NUM_SLICES": "1"}, False, ""),
    ({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1"}, False, "TPU pod"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False, ""),  # one host
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
      "SLURM_NTASKS": "2"}, False, "SLURM"),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
      "SLURM_NTASKS": "1"}, False, ""),  # an interactive one-task job
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:5", "OMPI_COMM_WORLD_SIZE": "4"}, False, "Open MPI"),
    ({}, True, "Cloud TPU VM"),
    ({"JAX_PLATFORMS": "cpu"}, True, ""),  # the tests on a TPU VM
])
def test_cluster_reason(env, tpu_host, expected):
  reason = distributed.cluster_reason(env, tpu_host)
  assert (expected in reason) if expected else reason == ""


def test_initialize_modes():
  assert distributed.initialize("off", {"JAX_COORDINATOR_ADDRESS": "x:1"}) == ""
  assert distributed.initialize("auto", {}) == "" or distributed.on_tpu_host()
  with pytest.raises(ConfigError, match="expected one of auto, on, off"):
    distributed.initialize("yes", {})
  assert jax.process_count() == 1  # nothing above started the runtime


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  id: int
  slice_index: int
  platform: str = "cpu"
  device_kind: str = "fake"
  process_index: int = 0


def test_multi_slice_mesh_is_data_parallel_over_slices():
  devices = [FakeDevice(i, i // 4) for i in range(8)]  # 2 slices of 4
  grid = sharding.device_grid((1, -1, 1), devices, dcn_shape=(-1, 1, 1))
  assert grid.shape == (2, 4, 1, 1)  # data, fsdp, sequence, tensor
  assert [[d.slice_index for d in row.ravel()] for row in grid] == [[0] * 4, [1] * 4]
  grid = sharding.device_grid((1, 2, 2), devices, dcn_shape=(2, 1, 1))
  assert grid.shape == (2, 2, 1, 2) and {d.slice_index for d in grid[1].ravel()} == {1}
  with pytest.raises(ConfigError, match=r"dcn_shape=\(4, 1, 1\) needs 4 slices, the devices are in 2"):
    sharding.device_grid((1, -1, 1), devices, dcn_shape=(4, 1, 1))
  with pytest.raises(ConfigError, match="mesh of one slice"):
    sharding.device_grid((1, 8, 1), devices, dcn_shape=(2, 1, 1))


def test_dcn_shape_on_one_slice():
  assert sharding.make_mesh((1, -1, 1), dcn_shape=(-1, 1, 1)).devices.shape == (1, 8, 1, 1)
  with pytest.raises(ConfigError, match=r"needs 2 slices, the devices are in 1"):
    sharding.make_mesh((1, -1, 1), dcn_shape=(2, 1, 1))


def test_data_state_one_process_keeps_its_format():
  state = {"next_index": 3}
  assert distributed.data_state_to_save(state) == state
  assert distributed.restore_data_state(state) == state
  with pytest.raises(CheckpointError, match="from 2 process"):
    distributed.restore_data_state({"process_states": [state, state]})
  assert distributed.any_process(True) and not distributed.any_process(False)
  assert list(distributed.same_count(iter([1, 2]))) == [1, 2]


# ---------------------------------------------------------------------------
# Two processes on this machine, 4 CPU devices each, against one process with 8.

# A constant learning rate, so that a run's length does not change its steps; only the final evaluation,
# over the whole held-out split.
_FLAGS = ["--config.optim.schedule=constant", "--config.train.checkpoint_every=2", "--config.train.eval_every=100000",
          "--config.train.eval_batches=0"]

# One process, 8 devices, reading what the two processes read: the shards of
# both, each at half the batch, side by side (process 0's rows first).
_REFERENCE = r"""
import sys, numpy as np
from configs import pretrain
from lmstack.data import datasets
from lmstack.train import trainer

make = datasets.make_dataset

class Both:  # a dataset: each iter() starts again (the trainer reads a first batch to check the data)
  def __init__(self, parts):
    self.parts = parts
  def __iter__(self):
    return BothIterator([iter(p) for p in self.parts])

class BothIterator:
  def __init__(self, its):
    self.its = its
  def __next__(self):
    bs = [next(it) for it in self.its]
    return {k: np.concatenate([b[k] for b in bs]) for k in bs[0]}
  def get_state(self):
    return [it.get_state() for it in self.its]

def two_shards(data_cfg, tokenizer, *, batch_size, split="train", **kw):
  if split != "train":
    return make(data_cfg, tokenizer, batch_size=batch_size, split=split, **kw)
  kw.update(shard_count=2)
  return Both([make(data_cfg, tokenizer, batch_size=batch_size // 2, split=split, **{**kw, "shard_index": i})
               for i in range(2)])

datasets.make_dataset = two_shards
config = pretrain.get_config("runlocal")
config.train.update(steps=int(sys.argv[2]), checkpoint_every=2, eval_every=100000, eval_batches=0)
config.optim.schedule = "constant"
trainer.run(config, sys.argv[1])
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_two(workdir, steps, extra=()):
  port = _free_port()
  procs = []
  for i in range(2):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}
    cmd = [sys.executable, "-m", "lmstack.main", "--config=configs/pretrain.py:runlocal", f"--workdir={workdir}",
           f"--config.train.steps={steps}", *_FLAGS, *extra]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  return procs


def _finish(procs, status=0):
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=400))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == status, err[-3000:]
  return [out for out, _ in outs]


def _rows(workdir):
  try:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      return [json.loads(line) for line in f]
  except (OSError, ValueError):  # not written yet, or a line half-written
    return []


def _losses(workdir):
  return {r["step"]: r["train/loss"] for r in _rows(workdir) if "train/loss" in r}


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  # SIGTERM reaches one of the two processes (as a maintenance event may): both stop at the same step.
  two = tmp_path / "two"
  # Logs every 3 steps, saves every 5: several processes decide to stop together only at those steps.
  cadence = ["--config.train.log_every=3", "--config.train.checkpoint_every=5"]
  procs = _start_two(two, 100000, cadence)
  deadline = time.time() + 300
  while time.time() < deadline and len(_losses(two)) < 3 and all(p.poll() is None for p in procs):
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGTERM)
  first = _finish(procs, status=EXIT_PREEMPTED)  # both processes: saved, resumable
  assert "distributed: process 0 of 2, 4 of 8 devices" in first[0]
  assert "distributed: process 1 of 2" in first[1] and "loss" not in first[1]  # process 0 logs
  stopped = int(re.search(r"SIGTERM: saving step ([0-9]+) and stopping", first[0])[1])
  assert stopped % 3 == 0 or stopped % 5 == 0, stopped  # no host sync at the other steps
  with open(two / "checkpoints" / str(stopped) / "data" / "metadata", encoding="utf-8") as f:
    assert len(json.load(f)["process_states"]) == 2  # each process's data iterator
  # Both resume, each from its own data state, for two more steps.
  resumed = _finish(_start_two(two, stopped + 2, cadence))
  assert f"resumed from {two / 'checkpoints' / str(stopped)}" in resumed[0]

  ref = subprocess.run([sys.executable, "-c", _REFERENCE, str(tmp_path / "one"), str(stopped + 2)], cwd=REPO,
                       capture_output=True, text=True, timeout=400, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert ref.returncode == 0, ref.stderr[-3000:]

  # One set of metrics files, from process 0; a library log per process.
  assert sorted(os.listdir(two)) == ["checkpoints", "logs", "metrics.jsonl", "tb"]
  assert sorted(os.listdir(two / "logs")) == ["lmstack-0.log", "lmstack-1.log"]
  assert len(os.listdir(two / "tb")) == 2  # one events file per start
  steps = sorted({1, *range(3, stopped + 1, 3), stopped + 1, stopped + 2})  # the first, every 3rd, the last
  assert sorted(_losses(two)) == steps
  assert sorted(_losses(tmp_path / "one")) == list(range(1, stopped + 3))
  np.testing.assert_allclose([_losses(two)[s] for s in steps], [_losses(tmp_path / "one")[s] for s in steps],
                             rtol=2e-5)
  # The whole held-out split, unevenly sharded (padded with empty batches), against one process reading all of it.
  final = lambda rows: [r["eval/loss"] for r in rows if "eval/loss" in r][-1]
  np.testing.assert_allclose(final(_rows(two)), final(_rows(tmp_path / "one")), rtol=1e-4)
