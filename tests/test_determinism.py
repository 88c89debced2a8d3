"""Determinism: the same config and seed train bitwise-identically, run twice or stopped and resumed.

For every stage (pre-training, annealing on a mixture, SFT with full
fine-tuning and with LoRA and dropout, DPO) a tiny run goes straight through,
and the same run is stopped by SIGTERM after step K (it saves step K, as on a
TPU maintenance event) and resumed in its workdir. Every logged training
metric of every step must be equal with `==`: the steps before K show that two
runs agree, the steps after K that the checkpoint restores the whole state
(parameters, optimizer, step, data iterator, dropout keys). (Stopping with
train.steps=K instead would change the schedule: cosine and WSD decay over
the run's steps.) The slow test runs each stage once more in a fresh process
with another PYTHONHASHSEED.

  python -m pytest -q tests/test_determinism.py               # ~2.5 min on 2 CPU cores
  python -m pytest -q tests/test_determinism.py -m "not slow"
"""

import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys
from unittest import mock

import jax
from jax.experimental.compilation_cache import compilation_cache
import pytest

from configs import anneal, dpo, lora, pretrain, sft
from lmstack.data import datasets
from lmstack.errors import Preempted
from lmstack.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, STOP_AT = 5, 2
TIMING = ("tokens_per_sec", "mfu")  # wall-clock figures, the only metrics that may differ


def _config(stage, base_run):
  """A tiny run of `stage`, started from the pre-training run `base_run` (except pre-training itself)."""
  make = {
      "pretrain": lambda: pretrain.get_config("runlocal"),
      "anneal": lambda: anneal.get_config(f"init_from={base_run},runlocal"),
      "sft": lambda: sft.get_config(f"init_from={base_run},runlocal"),
      "lora": lambda: lora.get_config(f"init_from={base_run},runlocal"),
      "dpo": lambda: dpo.get_config(f"init_from={base_run},runlocal"),
  }[stage]
  config = make()
  config.train.update(steps=STEPS, log_every=1, eval_every=0, checkpoint_every=STEPS, tensorboard=False,
                      peak_flops=0.0)
  if stage == "lora":
    config.peft.dropout = 0.1  # random masks, drawn from the seed and the step
  return config


def _train_metrics(workdir):
  """step -> {metric: value} of the training steps in workdir/metrics.jsonl (the last line of each step)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for row in map(json.loads, f):
      metrics = {k: v for k, v in row.items() if k.startswith("train/") and k[len("train/"):] not in TIMING}
      if metrics:
        out[row["step"]] = metrics
  return out


class _SigtermAt:
  """A train iterator that sends this process SIGTERM as the loop takes its `k`-th batch."""

  def __init__(self, it, k):
    self._it, self._k, self._n = it, k, 0

  def __next__(self):
    self._n += 1
    if self._n == self._k:
      # The trainer's handler must be installed: the default action would end pytest.
      assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
      os.kill(os.getpid(), signal.SIGTERM)
    return next(self._it)

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)


class _Dataset:

  def __init__(self, ds, k):
    self._ds, self._k = ds, k

  def __iter__(self):
    return _SigtermAt(iter(self._ds), self._k)


@contextlib.contextmanager
def _sigterm_after_step(k):
  """Runs inside stop after step `k` as preempted (SIGTERM), saving it."""
  make = datasets.make_dataset

  def make_dataset(*args, split="train", **kwargs):
    ds = make(*args, split=split, **kwargs)
    return _Dataset(ds, k) if split == "train" else ds

  with mock.patch.object(datasets, "make_dataset", make_dataset):
    yield


@pytest.fixture(scope="module", autouse=True)
def compile_once(tmp_path_factory):
  """The three runs of a stage compile the same programs: XLA's persistent cache compiles them once
  (~12 s -> ~1.5 s a run on 2 cores). The slow test's fresh processes compile their own."""
  options = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("xla_cache")),
             "jax_persistent_cache_min_compile_time_secs": 0.0, "jax_persistent_cache_min_entry_size_bytes": 0}
  before = {name: getattr(jax.config, name) for name in options}
  for name, value in options.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()  # JAX decides once whether to use the cache: decide again
  yield
  for name, value in before.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def runs(base_run, tmp_path_factory):
  """stage -> (straight metrics, stopped-run metrics, resumed metrics), each run once per module."""
  cache = {}

  def get(stage):
    if stage not in cache:
      root = tmp_path_factory.mktemp(stage)
      trainer.run(_config(stage, base_run), str(root / "straight"))
      with _sigterm_after_step(STOP_AT), pytest.raises(Preempted, match=f"SIGTERM at step {STOP_AT} of "):
        trainer.run(_config(stage, base_run), str(root / "stopped"))
      stopped = _train_metrics(root / "stopped")
      trainer.run(_config(stage, base_run), str(root / "stopped"))  # resumes from step STOP_AT
      cache[stage] = _train_metrics(root / "straight"), stopped, _train_metrics(root / "stopped"), root
    return cache[stage]

  return get


STAGES = ["pretrain", "anneal", "sft", "lora", "dpo"]


@pytest.mark.parametrize("stage", STAGES)
def test_two_runs_agree_and_a_resume_continues_exactly(runs, stage):
  straight, stopped, resumed, root = runs(stage)
  assert sorted(straight) == list(range(1, STEPS + 1))
  assert sorted(stopped) == list(range(1, STOP_AT + 1))  # SIGTERM: saved step STOP_AT and stopped
  assert sorted(os.listdir(root / "stopped" / "checkpoints")) == [str(STOP_AT), str(STEPS)]
  assert {s: straight[s] for s in stopped} == stopped  # two runs, the same numbers
  assert resumed == straight  # and the resume continues them bit for bit
  losses = [straight[s]["train/loss"] for s in sorted(straight)]
  assert len(set(losses)) == len(losses)  # it trains: the comparison is not of constants


@pytest.mark.slow
def test_a_fresh_process_with_another_hash_seed_agrees(runs, base_run, tmp_path):
  """The same runs in a new process, compiling afresh: no dependence on set or dict order under another
  hash seed, nor on the compilation cache."""
  jobs = [(_config(stage, base_run), str(tmp_path / stage)) for stage in STAGES]
  (tmp_path / "jobs.pickle").write_bytes(pickle.dumps(jobs))
  code = ("import pickle, sys; from lmstack.train import trainer; "
          "[trainer.run(config, workdir) for config, workdir in pickle.load(open(sys.argv[1], 'rb'))]")
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # no persistent cache
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "jobs.pickle")], cwd=REPO, capture_output=True,
                       text=True, timeout=900, env={**env, "PYTHONHASHSEED": "12345"})
  assert out.returncode == 0, out.stderr[-2000:]
  for stage in STAGES:
    assert _train_metrics(tmp_path / stage) == runs(stage)[0], stage
