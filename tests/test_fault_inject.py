"""tools/fault_inject.py: kill -9 a run again and again, then compare it with an uninterrupted one.

  python -m pytest -q -n 0 tests/test_fault_inject.py          # -m "not slow" skips the end-to-end runs

The end-to-end tests run the tool on configs/pretrain.py:runlocal; the comparison is also run on two
workdirs of which one has a changed metric and a changed array, so that it is seen to fail.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "fault_inject.py")
_spec = importlib.util.spec_from_file_location("fault_inject", TOOL)
fault_inject = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fault_inject)


def _tool(*args, timeout=900):
  return subprocess.run([sys.executable, TOOL, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,message", [
    (["--workdir=w"], "the following arguments are required: --config"),
    (["--config=configs/nope.py", "--workdir=w"], "no such file configs/nope.py"),
    (["--config=configs/pretrain.py", "--workdir=w", "--kills=-1"], "--kills=-1; expected at least 0"),
    (["--config=configs/pretrain.py", "--workdir=w", "--kills=two"], "invalid int value"),
    (["--config=configs/pretrain.py", "--workdir=w", "--steps=3"], "unknown arguments --steps=3"),
    (["--config=configs/pretrain.py", "--workdir=w", "--", "--workdir=x"], "sets --config, --workdir"),
    (["--config=configs/pretrain.py", "--workdir=w", "--exclude=(a"], "not a list of regular expressions"),
])
def test_usage_errors_are_one_line(args, message):
  out = _tool(*args)
  assert out.returncode == 2, out.stderr
  assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ") and message in out.stderr, out.stderr
  assert not os.path.exists(os.path.join(REPO, "w"))


def test_a_used_workdir_is_refused(tmp_path):
  (tmp_path / "killed").mkdir()
  (tmp_path / "killed" / "metrics.jsonl").write_text("{}\n")
  out = _tool("--config=configs/pretrain.py", f"--workdir={tmp_path}")
  assert out.returncode == 2 and out.stderr == f"error: {tmp_path / 'killed'} is not empty (a previous run?); " \
                                               "choose a new --workdir or delete it\n", out.stderr


def test_a_failing_run_is_one_line_and_status_1(tmp_path):
  out = _tool("--config=configs/pretrain.py:runlocal", f"--workdir={tmp_path}", "--", "--config.train.setps=3")
  assert out.returncode == 1, out.stderr
  assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: straight process 0 exited with status 1: "
                                                               "error: unknown config field setps"), out.stderr


class _Args:
  kills, seed, max_delay = 5, 3, 0.3


def test_kill_plan_alternates_and_follows_the_logged_steps():
  plan = fault_inject.kill_plan(_Args(), list(range(1, 41)), [0.4, 0.5, 0.6])
  assert plan == fault_inject.kill_plan(_Args(), list(range(1, 41)), [0.4, 0.5, 0.6])  # the seed decides
  assert [k for k, _, _ in plan] == ["save", "step", "save", "step", "save"]
  targets = [t for _, t, _ in plan]
  assert targets == sorted(set(targets)) and 1 <= targets[0] and targets[-1] < 40  # before the last step
  assert all(0 <= d <= 0.25 for k, _, d in plan if k == "save") and all(0 <= d <= 0.3 for _, _, d in plan)
  # Logged every 10 steps: the kills come at logged steps; more kills than steps repeat some.
  many = fault_inject.kill_plan(_Args(), [1, 10, 20, 30], [])
  assert len(many) == 5 and {t for _, t, _ in many} <= {1, 10, 20}


def test_wall_clock_metrics_are_excluded_by_name():
  for key in ("train/tokens_per_sec", "train/mfu", "train/step_time", "eval/seconds", "train/time"):
    assert fault_inject.excluded(key), key
  for key in ("train/loss", "train/lr", "train/grad_norm", "train/skipped_total", "eval/perplexity", "eval/beta",
              "eval/accuracy", "train/rewards/margins"):
    assert not fault_inject.excluded(key), key


def _rewrite_rows(workdir, change):
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  rows = change(rows)
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def _next_float(x):
  return float(np.nextafter(x, np.inf))


def test_comparison_detects_a_changed_metric_and_array(base_run, tmp_path):
  """The check can fail: one bit of one logged loss, one element of one array, a metric logged twice."""
  from lmstack import checkpoint as ckpt_lib
  straight, same, changed = (str(tmp_path / d) for d in ("straight", "same", "changed"))
  for d in (straight, same, changed):
    shutil.copytree(base_run, d)

  def wall_clock_only(rows):  # another run's speed: not a difference
    return [{**r, **({"train/tokens_per_sec": r["train/tokens_per_sec"] * 2} if "train/tokens_per_sec" in r else {}),
             "time": r["time"] + 100} for r in rows]

  _rewrite_rows(same, wall_clock_only)
  report, problems = fault_inject.compare(straight, same)
  assert problems == [], problems
  assert report["metrics"]["compared"] > 10 and report["state"]["compared"] > 10
  assert {"time", "train/tokens_per_sec"} <= set(report["metrics"]["excluded"])

  # One bit of step 2's loss; then step 3 logged again (a resume) with the same value: only the first is wrong.
  def one_bit(rows):
    rows = [{**r, "train/loss": _next_float(r["train/loss"])} if r["step"] == 2 and "train/loss" in r else r
            for r in rows]
    return rows + [r for r in rows if r["step"] == 3 and "train/loss" in r]

  _rewrite_rows(changed, one_bit)
  # One element of one array of the final checkpoint, saved again in its place.
  ckpt_dir = os.path.join(changed, "checkpoints")
  step, arrays, data = fault_inject.final_checkpoint(changed)
  manager = ckpt_lib.Checkpointer(ckpt_dir).manager
  full = manager.restore(step)
  manager.close()
  meta = json.loads(open(os.path.join(ckpt_dir, str(step), "meta", "metadata"), encoding="utf-8").read())
  state = full["state"]
  embed = np.array(state["params"]["embed"]["value"])
  embed.flat[7] = _next_float(embed.flat[7])
  state["params"]["embed"]["value"] = embed
  shutil.rmtree(os.path.join(ckpt_dir, str(step)))
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, async_save=False)
  ckpt.save(step, state, data, meta)
  ckpt.close()

  report, problems = fault_inject.compare(straight, changed)
  differing = report["metrics"]["differing"]
  assert [(s, k) for s, k, _, _ in differing] == [(2, "train/loss")], differing
  assert report["metrics"]["recomputed_differing"] == []  # step 3's second value equals its first
  assert report["state"]["differing"] == ["['params']['embed']['value']"], report["state"]
  assert len(problems) == 2 and "step 2 train/loss" in problems[0] and "embed" in problems[1], problems

  # A step logged again after a resume with another value: a difference even if the first was right.
  _rewrite_rows(same, lambda rows: rows + [{**rows[0], "train/loss": rows[0]["train/loss"] + 1}])
  report, problems = fault_inject.compare(straight, same)
  assert len(report["metrics"]["recomputed_differing"]) == 1 and len(report["metrics"]["differing"]) == 1
  assert len(problems) == 2 and "logged again after a resume changed" in problems[1], problems


def _check_result(workdir, out, kills):
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  with open(os.path.join(workdir, "fault_inject.json"), encoding="utf-8") as f:
    result = json.load(f)
  assert result["passed"] and result["problems"] == []
  assert result["kills"] == kills and result["restarts"] == kills and result["kills_mid_save"] > 0
  assert result["metrics_differing"] == 0 and result["recomputed_differing"] == 0 and result["metrics_compared"] > 0
  assert result["arrays_differing"] == 0 and result["arrays_compared"] > 0 and result["data_state_same"]
  assert result["checkpoints_lost"] == 0 and "train/tokens_per_sec" in result["excluded_keys"]
  assert "kill | moment | last logged step | newest checkpoint | save in flight | resumed from" in out.stdout
  assert len(re.findall(r"^kill \d+/\d+ ", out.stdout, re.M)) == kills and "bit for bit: passed" in out.stdout
  return result


@pytest.mark.slow
def test_random_kills_match_an_uninterrupted_run(tmp_path):
  out = _tool("--config=configs/pretrain.py:runlocal", "--kills=3", "--seed=2", f"--workdir={tmp_path}", "--",
              "--config.train.steps=14", "--config.train.checkpoint_every=1", "--config.train.tensorboard=false")
  result = _check_result(tmp_path, out, 3)
  assert [row["kind"] for row in result["table"]] == ["save", "step", "save"]
  assert result["final_steps"] == [14, 14]


@pytest.mark.slow
def test_two_processes_killed_together_match(tmp_path):
  """Two JAX processes of 4 CPU devices each; a kill takes both (a lost host) and both start again."""
  out = _tool("--config=configs/pretrain.py:runlocal", "--kills=1", "--seed=2", "--processes=2",
              f"--workdir={tmp_path}", "--", "--config.train.steps=6", "--config.train.checkpoint_every=1",
              "--config.train.eval_every=3", "--config.train.tensorboard=false")
  result = _check_result(tmp_path, out, 1)
  assert result["processes"] == 2 and result["table"][0]["kind"] == "save"
  assert sorted(os.listdir(tmp_path / "logs")) == [f"{r}-p{i}.log" for r in ("killed-0", "killed-1", "straight")
                                                   for i in (0, 1)]
  with open(tmp_path / "logs" / "straight-p1.log", encoding="utf-8") as f:
    assert "distributed: process 1 of 2, 4 of 8 devices" in f.read()
