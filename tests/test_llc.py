"""Tests of lmstack/analysis/llc.py and tools/llc.py.

Known answers: the LLC of a regular model is d/2 (full-rank linear regression
with d weights), and that of reduced-rank regression at a rank-0 truth is
Aoyagi & Watanabe's value (1.5 for 2 -> 2 -> 2, against 4 = d/2 for its 8
weights). Both run SGLD with minibatches, in float32, as the LM estimator does.
Then the lmstack adapter on a tiny trained checkpoint: sharded over 8 fake
devices it agrees with one device, and the CLI writes its traces and plot.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmstack.analysis import llc
from lmstack.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sum_sq_loss(predict):
  """loss_fn(params, batch) -> (0.5 * sum of squared errors, rows): a Gaussian NLL up to a constant."""
  def loss_fn(params, batch):
    r = predict(params, batch["x"]) - batch["y"]
    return 0.5 * jnp.sum(r ** 2), r.shape[0]
  return loss_fn


def test_llc_of_full_rank_linear_regression_is_half_its_dimension():
  d, n, num_batches = 10, 2000, 10
  rng = np.random.default_rng(0)
  x_nd = rng.normal(size=(n, d)).astype(np.float32)
  y_n = (x_nd @ rng.normal(size=d) + rng.normal(size=n)).astype(np.float32)
  w_star = np.linalg.lstsq(x_nd.astype(np.float64), y_n.astype(np.float64), rcond=None)[0]  # the minimum
  batches = {"x": x_nd.reshape(num_batches, n // num_batches, d), "y": y_n.reshape(num_batches, n // num_batches)}
  config = llc.SGLDConfig(step_size=3e-4, gamma=1.0, num_chains=4, num_draws=1000, num_burnin=200)
  result = llc.estimate_llc(_sum_sq_loss(lambda p, x: x @ p["w"]), {"w": jnp.asarray(w_star, jnp.float32)},
                            batches, config)
  assert result.n == n and result.nbeta == pytest.approx(n / np.log(n))
  assert result.loss_trace.shape == (4, 1200)
  assert result.llc_mean == pytest.approx(d / 2, rel=0.15)


def test_llc_of_reduced_rank_regression_matches_aoyagi():
  m, h, o, n, num_batches = 2, 2, 2, 20000, 20
  lam, multiplicity = llc.rrr_learning_coefficient(m, o, h, 0)
  assert (lam, multiplicity) == (1.5, 1)
  rng = np.random.default_rng(0)
  x_nm = rng.normal(size=(n, m)).astype(np.float32)
  # The truth is the zero map, realised exactly (y = 0), so w* = 0 is the
  # minimum of the empirical loss too; its zero set {A B = 0} is singular.
  batches = {"x": x_nm.reshape(num_batches, n // num_batches, m), "y": np.zeros((num_batches, n // num_batches, o),
                                                                              np.float32)}
  params = {"a": jnp.zeros((m, h)), "b": jnp.zeros((h, o))}
  config = llc.SGLDConfig(step_size=1e-4, gamma=1.0, num_chains=4, num_draws=8000, num_burnin=2000)
  result = llc.estimate_llc(_sum_sq_loss(lambda p, x: x @ p["a"] @ p["b"]), params, batches, config)
  regular = (m * h + h * o) / 2  # 4.0: what a regular model with these 8 weights would have
  assert result.llc_mean == pytest.approx(lam, rel=0.15)
  assert result.llc_mean < 0.5 * regular


def test_rrr_learning_coefficient_formula():
  rrr = llc.rrr_learning_coefficient
  assert rrr(1, 1, 1, 0) == (0.5, 2)  # y = x w1 w2 at w1 w2 = 0
  assert rrr(1, 1, 1, 1) == (0.5, 1)  # at w1 w2 != 0: one effective parameter
  assert rrr(3, 3, 3, 3)[0] == 4.5  # a full-rank 3 x 3 map: 9 effective parameters, regular
  assert rrr(2, 2, 2, 0) == (1.5, 1)
  assert rrr(1, 1, 2, 1)[0] == 0.5  # m + n < h + r
  assert rrr(1, 4, 1, 0) == (0.5, 1)  # m + h < n + r: y = x a b, b in R^4: K = a^2 |b|^2
  with pytest.raises(ConfigError):
    rrr(2, 2, 1, 2)


def test_sgld_config_is_checked():
  with pytest.raises(ConfigError, match="step_size"):
    llc.estimate_llc(None, {}, {}, llc.SGLDConfig(step_size=0.0))
  with pytest.raises(ConfigError, match="num_chains"):
    llc.SGLDConfig(num_chains=0).check()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  from configs import pretrain
  from lmstack.train import trainer
  workdir = str(tmp_path_factory.mktemp("llc_run"))
  config = pretrain.get_config("runlocal")
  config.train.update(steps=4, checkpoint_every=2, keep_checkpoints=5, tensorboard=False)
  trainer.run(config, workdir)
  return workdir


@pytest.mark.slow
def test_checkpoint_llc_sharded_matches_one_device(tiny_run):
  data = llc.checkpoint_data(tiny_run, seq_len=32, batch_size=8, num_batches=2)
  assert data.batches["inputs"].shape == (2, 8, 32) and 0 < data.n <= 2 * 8 * 32
  config = llc.SGLDConfig(step_size=1e-5, gamma=100.0, num_chains=1, num_draws=4, num_burnin=2)
  sharded = llc.CheckpointLLC(data, config, mesh_shape=(2, 4, 1))
  single = llc.CheckpointLLC(data, config, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
  a, b = sharded(tiny_run, step=2), single(tiny_run, step=2)
  assert a.init_loss == pytest.approx(b.init_loss, rel=1e-5)
  np.testing.assert_allclose(a.loss_trace, b.loss_trace, rtol=1e-4)
  assert np.isfinite(a.llc_mean)
  later = sharded(tiny_run, step=4)  # same shape: the compiled sampler is reused
  assert len(sharded._samplers) == 1 and later.init_loss < a.init_loss


@pytest.mark.slow
def test_llc_tool_writes_traces_and_plot(tiny_run, tmp_path):
  out, png = tmp_path / "llc.json", tmp_path / "llc.png"
  cmd = [sys.executable, os.path.join(REPO, "tools", "llc.py"), f"--ckpt={tiny_run}", "--chains=2", "--draws=5",
         "--burnin=2", "--num_batches=2", "--seq_len=32", f"--out={out}", f"--plot={png}"]
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  result = json.loads(out.read_text())
  assert [c["step"] for c in result["checkpoints"]] == [2, 4]
  assert np.asarray(result["checkpoints"][0]["loss_trace"]).shape == (2, 7)
  assert png.stat().st_size > 10_000
  bad = subprocess.run(cmd[:2] + [f"--ckpt={tmp_path / 'nope'}"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode == 1 and bad.stderr.strip().startswith("error: checkpoint not found")
