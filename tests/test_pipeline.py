"""The whole pipeline in one command (lmstack/pipeline.py): overrides, hand-offs, skipping finished stages.

  python -m pytest -q tests/test_pipeline.py
"""

import json
import os
import subprocess
import sys

import pytest

from configs import pretrain
from lmstack import pipeline
from lmstack.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_overrides_are_typed_like_their_fields():
  per_stage = pipeline.parse_overrides(["pretrain.train.steps=7", "pretrain.optim.lr=3e-4", "dpo.dpo.beta=0.2",
                                        "pretrain.mesh.shape=(2,-1,1)", "pretrain.train.tensorboard=false",
                                        "pretrain.data.tokenizer=x.model"])
  assert per_stage["dpo"] == {"dpo.beta": "0.2"} and per_stage["sft"] == {}
  config = pretrain.get_config("runlocal")
  for field, value in per_stage["pretrain"].items():
    pipeline.set_field(config, field, value)
  assert (config.train.steps, config.optim.lr, config.mesh.shape, config.train.tensorboard, config.data.tokenizer) == (
      7, 3e-4, (2, -1, 1), False, "x.model")


@pytest.mark.parametrize("item,message", [
    ("pretrain.train.steps", "expected STAGE.FIELD=VALUE"),
    ("sfx.train.steps=3", "unknown stage 'sfx'"),
])
def test_bad_override_flags(item, message):
  with pytest.raises(ConfigError, match=message):
    pipeline.parse_overrides([item])


@pytest.mark.parametrize("field,value,message", [
    ("train.setps", "3", "unknown config field train.setps"),
    ("train.steps.x", "3", "unknown config field train.steps.x"),
    ("train.steps", "many", "is not of type int"),
    ("train.steps", "2.5", "train.steps=2.5"),
    ("train.tensorboard", "maybe", "expected true or false"),
])
def test_bad_override_values(field, value, message):
  with pytest.raises(ConfigError, match=message):
    pipeline.set_field(pretrain.get_config("runlocal"), field, value)


def _read_rows(workdir):
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _pipeline(workdir, *flags, rc=0):
  # One CPU device (not conftest's 8): compiling for one is faster, and the stages need no mesh.
  env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=8", "").strip()}
  out = subprocess.run([sys.executable, "-m", "lmstack.pipeline", f"--workdir={workdir}", "--runlocal", *flags],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
  assert out.returncode == rc, out.stderr[-3000:]
  if rc:
    return out.stderr, None
  with open(workdir / "pipeline.json", encoding="utf-8") as f:
    return out.stdout, json.load(f)


@pytest.mark.slow
def test_tiny_pipeline_hands_off_each_stage_and_skips_when_done(tmp_path):
  out, summary = _pipeline(tmp_path, "--override=sft.train.steps=5")
  stages = summary["stages"]
  assert [s["stage"] for s in stages] == ["pretrain", "anneal", "sft", "dpo"]
  assert [s["steps"] for s in stages] == [4, 4, 5, 4]
  assert [s["status"] for s in stages] == ["trained"] * 4
  prev = ""
  for s in stages:
    step_dir = tmp_path / s["stage"] / "checkpoints" / str(s["steps"])
    with open(step_dir / "meta" / "metadata", encoding="utf-8") as f:
      assert json.load(f)["config"]["init_from"] == prev  # what the stage started from
    assert s["init_from"] == prev and s["final"]["eval/loss"] > 0
    prev = str(step_dir)
  assert "--config=configs/lora.py:init_from=" in stages[2]["command"]
  dpo = stages[3]["final"]
  assert dpo["start/rewards/accuracies"] == 0.5 and dpo["start/rewards/margins"] == 0  # policy == reference
  assert dpo["eval/rewards/margins"] != 0  # and after 4 steps it is not
  dpo_evals = [r for r in _read_rows(tmp_path / "dpo") if "eval/loss" in r]
  assert [r["step"] for r in dpo_evals] == [0, 2, 4]  # eval_at_start, then eval_every=2
  assert {k: dpo[k] for k in dpo if k.startswith("eval/")} == {k: v for k, v in dpo_evals[-1].items()
                                                                 if k.startswith("eval/")}
  assert "total wall time" in out and "rewards/accuracies" in out.splitlines()[-2]

  # The same command again: every stage is done, nothing trains.
  out, again = _pipeline(tmp_path, "--override=sft.train.steps=5")
  assert [s["status"] for s in again["stages"]] == ["skipped (done)"] * 4
  assert [s["final"] for s in again["stages"]] == [s["final"] for s in stages]
  assert [s["wall_s"] for s in again["stages"]] == [s["wall_s"] for s in stages]
  assert out.count("; skipped\n") == 4 and not [line for line in out.splitlines() if line.startswith("step")]

  # Training the anneal further resumes it; the SFT stage built on its old last step is then out of date.
  err, _ = _pipeline(tmp_path, "--override=sft.train.steps=5", "--override=anneal.train.steps=5", rc=1)
  assert err.strip().splitlines()[-1].startswith(f"error: stage sft in {tmp_path / 'sft'} started from "
                                                 f"{tmp_path / 'anneal' / 'checkpoints' / '4'}, but")
  with open(tmp_path / "anneal" / "metrics.jsonl", encoding="utf-8") as f:
    assert max(json.loads(line)["step"] for line in f) == 5
