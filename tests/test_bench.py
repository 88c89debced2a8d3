"""tools/bench.py runs end to end on a tiny model and reports consistent figures.

The figures themselves (speed, MFU) are not asserted: they depend on the
machine; the relations between them are.
"""

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "bench.py")
PEAKS = (2e11, 1e11)


def _run(*args):
  out = subprocess.run([sys.executable, BENCH, "--presets=tiny", "--batch_size=8", "--seq_len=32", "--steps=2",
                        *args], capture_output=True, text=True, check=False, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pretrain", "lora"])
def test_train_modes_report_consistent_figures(mode):
  stdout = _run(f"--mode={mode}", f"--peaks={PEAKS[0]},{PEAKS[1]}", "--json")
  r = json.loads(next(line[7:] for line in stdout.splitlines() if line.startswith("RESULT ")))
  from lmstack.model.transformer import PRESETS
  cfg = PRESETS["tiny"]
  assert r["params"] == cfg.num_params()
  assert (r["trainable"] == r["params"]) == (mode == "pretrain")
  assert r["step_min_s"] <= r["step_median_s"] <= r["step_max_s"]
  assert r["tokens_per_s"] == pytest.approx(8 * 32 / r["step_median_s"])
  assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / PEAKS[0])
  if mode == "pretrain":
    assert r["flops_per_token"] == cfg.flops_per_token(32)
    assert r["opt_state_bytes"] >= 8 * r["params"]  # two float32 Adam moments per parameter
  else:  # a frozen base: no weight gradients for it, Adam only over the adapters
    assert r["flops_per_token"] < cfg.flops_per_token(32)
    assert r["opt_state_bytes"] < 8 * r["params"] / 4
  assert r["step_memory_bytes"] > 0 and r["ideal_bytes"] > 0


@pytest.mark.slow
def test_checkpoint_mode():
  lines = _run("--mode=checkpoint").splitlines()
  row = lines[lines.index(next(line for line in lines if line.strip().startswith("preset"))) + 1].split()
  state_mb, sync_s, async_s, on_disk_s = map(float, row[1:])
  assert row[0] == "tiny" and state_mb > 0 and sync_s > 0 and 0 < async_s <= on_disk_s


def test_grad_accum_that_does_not_divide_the_batch_is_one_line_error():
  out = subprocess.run([sys.executable, BENCH, "--presets=tiny", "--batch_size=8", "--grad_accum=3", "--peaks=1,1"],
                       capture_output=True, text=True, check=False, timeout=300)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1] == "error: --grad_accum=3 does not divide the batch of 8", out.stderr
