"""Schedules against their closed forms; the weight-decay mask; the plot tool."""

import json
import math
import os
import subprocess
import sys

import ml_collections
import pytest

from lmstack.errors import ConfigError
from lmstack.train import optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**kw):
  base = dict(lr=1.0, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2,
              decay_shape="linear", b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0)
  return ml_collections.ConfigDict({**base, **kw})


def test_warmup_cosine():
  s = optim.make_schedule(_cfg(), 110)
  assert float(s(0)) == pytest.approx(0.1)  # (step + 1) / warmup
  assert float(s(9)) == pytest.approx(1.0)
  assert float(s(10)) == pytest.approx(1.0)
  assert float(s(60)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
  assert float(s(110)) == pytest.approx(0.1)


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_is_flat_then_decays(shape):
  s = optim.make_schedule(_cfg(schedule="wsd", decay_shape=shape, min_lr_ratio=0.0), 100)
  assert [float(s(i)) for i in (10, 50, 80)] == [1.0, 1.0, 1.0]  # stable until 80% of the steps
  frac = 10 / 20
  want = 1 - frac if shape == "linear" else 1 - math.sqrt(frac)
  assert float(s(90)) == pytest.approx(want, rel=1e-6)
  assert float(s(100)) == pytest.approx(0.0, abs=1e-7)


def test_schedule_errors():
  with pytest.raises(ConfigError, match="schedule"):
    optim.make_schedule(_cfg(schedule="exp"), 100)
  with pytest.raises(ConfigError, match="warmup_steps=10 must not exceed the 9 training steps"):
    optim.make_schedule(_cfg(), 9)


def test_weight_decay_skips_norms():
  from flax import nnx
  from lmstack.model.transformer import PRESETS, Transformer
  params = nnx.state(Transformer(PRESETS["tiny"], nnx.Rngs(0)), nnx.Param)
  mask = nnx.to_flat_state(optim._decay_mask(params))
  decayed = {"/".join(map(str, k)) for k, v in mask if v is True or getattr(v, "get_value", lambda: v)() is True}
  assert "blocks/attn/q" in decayed and "embed" in decayed
  assert not any("norm" in k for k in decayed)


def test_plot_tool_writes_png(tmp_path):
  rows = [{"step": s, "train/loss": 9 - s / 10, "train/lr": 1e-3} for s in range(1, 21)]
  rows += [{"step": 10, "eval/loss": 8.5}, {"step": 20, "eval/loss": 7.5}]
  run = tmp_path / "run"
  run.mkdir()
  (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  out = tmp_path / "loss.png"
  res = subprocess.run([sys.executable, "tools/plot.py", str(run), f"--out={out}"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
  missing = subprocess.run([sys.executable, "tools/plot.py", str(tmp_path / "nope")], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
  assert missing.returncode == 1 and "no metrics file" in missing.stderr
