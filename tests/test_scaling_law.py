"""Tests of lmstack/analysis/scaling.py and tools/scaling_law.py.

Known answers: the published constants evaluated by hand, the closed-form
compute-optimal allocation against a brute-force search, a fit that recovers
the constants behind noisy synthetic points (inside its bootstrap intervals),
and a 2 x 2 micro-sweep of real training runs.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lmstack.analysis import scaling
from lmstack.errors import ConfigError, DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = [sys.executable, os.path.join(REPO, "tools", "scaling_law.py")]


def test_law_terms_match_hand_computation():
  law = scaling.CONSTANTS["hoffmann2022"]
  model_term, data_term, e = law.terms(70e9, 1.4e12)  # Chinchilla
  assert model_term == pytest.approx(406.4 / 70e9 ** 0.34)
  assert data_term == pytest.approx(410.7 / 1.4e12 ** 0.28)
  assert e == 1.69
  assert law.loss(70e9, 1.4e12) == pytest.approx(1.69 + model_term + data_term)
  assert law.loss(70e9, 1.4e12) == pytest.approx(1.9366, abs=1e-4)
  besiroglu = scaling.CONSTANTS["besiroglu2024"]
  assert besiroglu.loss(70e9, 1.4e12) == pytest.approx(1.9739, abs=1e-4)
  with pytest.raises(ConfigError, match="unknown scaling-law constants"):
    scaling.get_law("kaplan")


@pytest.mark.parametrize("name", sorted(scaling.CONSTANTS))
def test_compute_optimal_allocation_minimises_the_loss(name):
  law = scaling.CONSTANTS[name]
  for flops in (1e18, 1e21, 5.76e23):
    n_opt, d_opt = law.compute_optimal(flops)
    assert 6 * n_opt * d_opt == pytest.approx(flops)
    # Brute force over N on the constraint D = C / 6N.
    n_grid = np.geomspace(n_opt / 100, n_opt * 100, 200_001)
    n_best = n_grid[np.argmin(law.loss(n_grid, flops / (6 * n_grid)))]
    assert n_best == pytest.approx(n_opt, rel=1e-3)
  # The optimal split of the compute of a given (N, D) keeps the compute and lowers the loss.
  n_split, d_split = law.optimal_split(280e9, 300e9)  # Gopher
  assert 6 * n_split * d_split == pytest.approx(6 * 280e9 * 300e9)
  assert law.loss(n_split, d_split) < law.loss(280e9, 300e9)


def _synthetic(law, noise, seed=0):
  rng = np.random.default_rng(seed)
  n, d = (x.ravel() for x in np.meshgrid(np.geomspace(1e7, 1e10, 6), np.geomspace(3e8, 3e11, 5)))
  return n, d, law.loss(n, d) * np.exp(rng.normal(0.0, noise, n.shape))


def test_fit_recovers_the_constants_of_noisy_synthetic_points():
  true = scaling.CONSTANTS["besiroglu2024"]
  n, d, loss = _synthetic(true, noise=0.005)
  fit = scaling.fit_law(n, d, loss, bootstrap=40)
  law = fit.law
  assert fit.num_starts == 4500 and fit.num_points == 30
  assert law.E == pytest.approx(true.E, rel=0.03)
  assert law.alpha == pytest.approx(true.alpha, abs=0.03)
  assert law.beta == pytest.approx(true.beta, abs=0.03)
  # A and B trade off against the exponents: looser, in log space.
  assert abs(np.log(law.A / true.A)) < 0.5 and abs(np.log(law.B / true.B)) < 0.5
  assert len(fit.bootstrap_laws) == 40
  for name in scaling.NAMES:
    lo, hi = fit.intervals[name]
    assert lo <= getattr(law, name) <= hi
    assert lo <= getattr(true, name) <= hi, name
  # The fitted law's allocation is close to the true one.
  assert fit.law.compute_optimal(1e21)[0] == pytest.approx(true.compute_optimal(1e21)[0], rel=0.3)
  lo, hi = scaling.interval_of(fit, lambda l: l.compute_optimal(1e21)[0])
  assert lo <= true.compute_optimal(1e21)[0] <= hi


def test_fit_rejects_bad_points():
  with pytest.raises(DataError, match="at least 5"):
    scaling.fit_law([1e6] * 4, [1e8] * 4, [3.0] * 4)
  with pytest.raises(DataError, match="positive"):
    scaling.fit_law([1e6] * 5, [1e8] * 5, [3.0, 3.0, -1.0, 3.0, 3.0])
  with pytest.raises(DataError, match="different lengths"):
    scaling.fit_law([1e6] * 5, [1e8] * 6, [3.0] * 5)


def _tool(*args, cwd=REPO):
  return subprocess.run(TOOL + list(args), cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_eval_and_allocate():
  r = _tool("eval", "--n=70e9", "--d=1.4e12")
  assert r.returncode == 0, r.stderr
  assert "hoffmann2022" in r.stdout and "besiroglu2024" in r.stdout
  assert "L=1.9366 = E 1.6900 + A/N^alpha 0.0835 + B/D^beta 0.1632" in r.stdout
  r = _tool("allocate", "--constants=hoffmann2022", "--compute=5.76e23")
  assert r.returncode == 0, r.stderr
  assert "N_opt=3.22e+10" in r.stdout
  r = _tool("eval", "--constants=kaplan", "--n=1", "--d=1")
  assert r.returncode == 1 and r.stderr.strip().startswith("error: unknown scaling-law constants")


@pytest.mark.slow
def test_cli_fit_writes_json_and_plot(tmp_path):
  n, d, loss = _synthetic(scaling.CONSTANTS["hoffmann2022"], noise=0.002, seed=1)
  points = tmp_path / "points.csv"
  points.write_text("n,d,loss\n" + "".join(f"{a},{b},{c}\n" for a, b, c in zip(n, d, loss)))
  r = _tool("fit", f"--points={points}", "--bootstrap=10", f"--out={tmp_path / 'fit.json'}",
            f"--plot={tmp_path / 'fit.png'}")
  assert r.returncode == 0, r.stderr
  out = json.loads((tmp_path / "fit.json").read_text())
  assert out["constants"]["alpha"] == pytest.approx(0.34, abs=0.03)
  assert set(out["intervals"]) == set(scaling.NAMES) and len(out["points"]) == 30
  assert (tmp_path / "fit.png").stat().st_size > 10_000


@pytest.mark.slow
def test_micro_sweep_trains_records_and_plots(tmp_path):
  """A 2 x 2 sweep of 2- and 3-step runs; a re-run trains nothing."""
  args = ("sweep", f"--workdir={tmp_path}", "--widths=16,32", "--steps=2,3", "--batch_size=8", "--seq_len=32",
          "--eval_batches=2")
  r = _tool(*args)
  assert r.returncode == 0, r.stderr
  rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert [(x["width"], x["steps"]) for x in rows] == [(16, 2), (16, 3), (32, 2), (32, 3)]
  for x in rows:
    assert x["d"] == x["steps"] * 8 * 32 and x["n"] == x["n_total"] > x["n_non_embedding"]
    assert np.isfinite(x["loss"]) and 5 < x["loss"] < 10
  assert rows[2]["n"] > rows[0]["n"]
  assert (tmp_path / "frontier.png").stat().st_size > 10_000
  assert "4 points cannot determine" in r.stdout
  again = _tool(*args)
  assert again.returncode == 0 and "sweep: width" not in again.stdout
  assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 4
