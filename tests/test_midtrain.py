"""Mid-training: the anneal config and schedule, WSD hand-off, souping,
vocabulary extension and long-context extension.

  python -m pytest -q tests/test_midtrain.py            # ~2 min on 2 cores
  python -m pytest -q tests/test_midtrain.py -m "not slow"
"""

import dataclasses
import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import anneal, common, extend, pretrain
from lmstack import checkpoint as ckpt_lib
from lmstack.data import mixture
from lmstack.data.tokenizer import load_tokenizer
from lmstack.errors import CheckpointError
from lmstack.model.transformer import PRESETS
from lmstack.train import build, optim, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "lmstack", "assets", "tokenizer", "default.model")


def _tool(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _fake_checkpoint(root, step, **optim_cfg):
  """A step directory whose meta is all a config reads (no arrays)."""
  config = pretrain.get_config()
  config.optim.update(optim_cfg)
  config.train.update(steps=1000, batch_size=16, seq_len=128)
  config.data.tokenizer = TOKENIZER
  meta_dir = root / "checkpoints" / str(step) / "meta"
  meta_dir.mkdir(parents=True)
  meta = {"config": config.to_dict(), "model": dataclasses.asdict(PRESETS["tiny"])}
  (meta_dir / "metadata").write_text(json.dumps(meta))
  return root


# ---------------------------------------------------------------------------
# Anneal config and schedule (no training)


def test_anneal_starts_at_the_checkpoints_lr_and_decays_to_zero(tmp_path):
  ckpt = _fake_checkpoint(tmp_path, 300, schedule="wsd", lr=2e-3, decay_fraction=0.2, warmup_steps=20)
  config = anneal.get_config(f"init_from={ckpt}")
  o = config.optim
  assert (o.schedule, o.warmup_steps, o.decay_fraction, o.min_lr_ratio) == ("wsd", 0, 1.0, 0.0)
  assert o.lr == 2e-3  # a stable-phase checkpoint: the peak
  assert config.init_from == str(ckpt) and config.data.kind == "mixture"
  assert (config.train.batch_size, config.train.seq_len) == (16, 128)  # the pre-training run's
  assert config.train.steps == 30  # 10% of 300 steps of the same size
  assert config.model.d_model == PRESETS["tiny"].d_model and config.data.tokenizer == TOKENIZER
  s = optim.make_schedule(config.optim, config.train.steps)
  assert float(s(0)) == pytest.approx(2e-3)
  assert float(s(15)) == pytest.approx(1e-3)
  assert float(s(30)) == pytest.approx(0.0, abs=1e-9)
  lrs = [float(s(i)) for i in range(31)]
  assert all(a > b for a, b in zip(lrs, lrs[1:]))
  sq = optim.make_schedule(anneal.get_config(f"init_from={ckpt},decay=1-sqrt").optim, 40)
  assert float(sq(10)) == pytest.approx(2e-3 * (1 - math.sqrt(0.25)))


def test_anneal_from_a_decaying_checkpoint_and_budgets(tmp_path):
  ckpt = _fake_checkpoint(tmp_path, 900, schedule="wsd", lr=1e-3, decay_fraction=0.2, min_lr_ratio=0.0)
  config = anneal.get_config(f"init_from={ckpt}/checkpoints/900,fraction=0.05")
  assert config.optim.lr == pytest.approx(1e-3 * (1 - 100 / 200))  # halfway down the WSD decay
  assert config.train.steps == 45
  assert anneal.get_config(f"init_from={ckpt},lr=5e-4").optim.lr == 5e-4
  assert anneal.get_config(f"init_from={ckpt},tokens=20480").train.steps == 10  # 20480 / (16 x 128)
  # FLOPs: the same as tokens at the pre-training run's seq_len
  assert anneal.get_config(f"init_from={ckpt},fraction=0.05,budget=flops").train.steps == 45
  with pytest.raises(ValueError, match="budget='x'"):
    anneal.get_config(f"init_from={ckpt},budget=x")
  with pytest.raises(ValueError, match="needs init_from"):
    anneal.get_config("")


def test_checkpoint_lr_needs_a_training_config():
  assert optim.checkpoint_lr({"optim": dict(lr=1e-3, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1,
                                            decay_fraction=0.2, decay_shape="linear"),
                              "train": {"steps": 110}}, 9) == pytest.approx(1e-3)
  with pytest.raises(Exception, match="give the learning rate"):
    optim.checkpoint_lr({}, 10)


def test_extend_config_rope_and_seq_len(tmp_path):
  ckpt = _fake_checkpoint(tmp_path, 100)
  pi = extend.get_config(f"init_from={ckpt},seq_len=512,rope=pi")
  m = pi.model
  assert (m.max_seq_len, m.rope_scaling, m.rope_scaling_factor) == (512, "linear", 4.0)
  assert (pi.train.seq_len, pi.train.batch_size) == (512, 4)  # 16 x 128 tokens per step kept
  theta = extend.get_config(f"init_from={ckpt},seq_len=512,rope=theta").model
  h = PRESETS["tiny"].head_dim
  assert theta.rope_scaling == "none" and theta.rope_theta == pytest.approx(1e4 * 4 ** (h / (h - 2)))
  dom = extend.get_config(f"init_from={ckpt},domain=python_docs,replay=0.2")
  assert mixture.source_weights(dom.data) == pytest.approx({"python_docs": 0.8, "pretrain": 0.2})
  with pytest.raises(ValueError, match="rope='yarn'"):
    extend.get_config(f"init_from={ckpt},rope=yarn")


# ---------------------------------------------------------------------------
# Training from a small WSD run


@pytest.fixture(scope="module")
def wsd_run(tmp_path_factory):
  """A tiny WSD pre-training run in its stable phase: checkpoints 3 and 6."""
  workdir = str(tmp_path_factory.mktemp("wsd"))
  config = pretrain.get_config("runlocal")
  config.optim.update(schedule="wsd", decay_fraction=0.0)
  config.train.update(steps=6, checkpoint_every=3, eval_every=0)
  trainer.run(config, workdir)
  return workdir


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_anneal_trains_on_the_mixture(wsd_run, tmp_path):
  config = anneal.get_config(f"init_from={wsd_run}/checkpoints/3,runlocal,seed=1")
  assert config.optim.lr == pytest.approx(1e-3)  # stable phase
  config.train.update(steps=4, log_every=1)
  last = trainer.run(config, str(tmp_path))
  lrs = [r["train/lr"] for r in _metrics(tmp_path) if "train/lr" in r]
  assert lrs == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])  # no warmup, linear to zero at step 4
  assert math.isfinite(last["eval/loss"])


def test_soup_is_the_weighted_mean(wsd_run, tmp_path):
  soup = _tool("soup")
  a, b = f"{wsd_run}/checkpoints/3", f"{wsd_run}/checkpoints/6"
  out = tmp_path / "soup"
  soup.write_soup([a, b], str(out), weights=[1, 3])
  got, cfg, meta = ckpt_lib.restore_params(out)
  pa, _, meta_a = ckpt_lib.restore_params(a)
  pb, _, _ = ckpt_lib.restore_params(b)
  for g, x, y in zip(jax.tree.leaves(got), jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_allclose(np.asarray(g), 0.25 * np.asarray(x) + 0.75 * np.asarray(y), rtol=1e-6, atol=1e-7)
  assert meta["tokenizer_model"] == meta_a["tokenizer_model"]
  assert load_tokenizer(str(out / "tokenizer.model")).to_bytes() == load_tokenizer(TOKENIZER).to_bytes()
  # A config started from the soup takes its shape and its tokenizer.
  config = anneal.get_config(f"init_from={out},runlocal,lr=1e-3,tokens=4096")
  assert config.model.d_model == cfg.d_model and config.data.tokenizer == str(out / "tokenizer.model")
  assert common.checkpoint_tokenizer(str(out / "0")) == str(out / "tokenizer.model")

  # Shapes must agree: a one-line error naming the odd one out.
  other_cfg = dataclasses.replace(cfg, n_layers=1)
  other = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), ckpt_lib.abstract_params(other_cfg))
  from lmstack.convert.hf import save_params_checkpoint
  save_params_checkpoint(tmp_path / "other", other, other_cfg)
  with pytest.raises(CheckpointError, match="n_layers: 2 vs 1"):
    soup.soup([a, str(tmp_path / "other")])
  with pytest.raises(SystemExit, match="at least 2 checkpoints"):
    soup.main([f"--ckpt={a}", f"--out={tmp_path / 'x'}"])


@pytest.mark.slow
def test_extend_vocab_keeps_old_ids_and_trains(wsd_run, tmp_path):
  ev = _tool("extend_vocab")
  out = tmp_path / "ext"
  corpus = "<pkg>/assets/data/sympy_docs.jsonl.gz"
  report = ev.extend(wsd_run, corpus, str(out), vocab_size=1000)
  old = load_tokenizer(TOKENIZER)
  new = load_tokenizer(str(out / "tokenizer.model"))
  assert report["added"] > 50 and new.vocab_size == old.vocab_size + report["added"]
  assert [new.id_to_piece(i) for i in range(old.vocab_size)] == [old.id_to_piece(i) for i in range(old.vocab_size)]
  s = report["new"]
  assert s["lossless"] and s["tokens_after"] < 0.95 * s["tokens_before"]  # the new domain got cheaper
  assert report["old"]["lossless"] and report["old"]["identical_docs"] > 0.8 * report["old"]["docs"]

  params, cfg, _ = ckpt_lib.restore_params(out)
  before, _, _ = ckpt_lib.restore_params(wsd_run)
  n = old.vocab_size
  assert cfg.vocab_size == new.vocab_size and params["embed"].shape[0] == new.vocab_size
  np.testing.assert_array_equal(params["embed"][:n], before["embed"])
  np.testing.assert_allclose(params["embed"][n:], np.broadcast_to(before["embed"].mean(0), params["embed"][n:].shape),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(params["unembed"][:, n:].T,
                             np.broadcast_to(before["unembed"].mean(1), (new.vocab_size - n, cfg.d_model)),
                             rtol=1e-5, atol=1e-7)

  # Continue pre-training on the new domain with the grown vocabulary.
  config = extend.get_config(f"init_from={out},domain=sympy_docs,runlocal")
  assert config.model.vocab_size == new.vocab_size
  config.train.update(steps=2, eval_every=0)
  last = trainer.run(config, str(tmp_path / "run"))
  assert math.isfinite(last["loss"])


def _long_position_loss(params, model_cfg, batches, start):
  """Mean next-token loss over targets at positions >= start."""
  graphdef, state = nnx.split(ckpt_lib.model_from_params(params, model_cfg))

  @jax.jit
  def sums(state, b):
    logits = nnx.merge(graphdef, state)(b["inputs"], b["positions"], b["segment_ids"])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), b["targets"][..., None], -1)[..., 0]
    mask = (b["segment_ids"] > 0) & (b["positions"] >= start)
    return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask)

  total, count = 0.0, 0
  for b in batches:
    t, c = sums(state, b)
    total, count = total + float(t), count + int(c)
  assert count > 1000
  return total / count


@pytest.mark.slow
def test_long_context_128_to_512(tmp_path):
  short = pretrain.get_config("runlocal")
  short.model.max_seq_len = 128
  short.optim.update(schedule="wsd", decay_fraction=0.0)
  short.train.update(steps=6, seq_len=128, eval_every=0, checkpoint_every=6)
  trainer.run(short, str(tmp_path / "short"))

  config = extend.get_config(f"init_from={tmp_path / 'short'},domain=python_docs,replay=0.0,seq_len=512,rope=pi,"
                             "lr=1e-3,runlocal")
  config.train.update(steps=5, seq_len=512, batch_size=8, eval_every=0, log_every=1)
  long_cfg = build.model_config(config)
  assert long_cfg.max_seq_len == 512 and long_cfg.rope_scaling_factor == 4.0

  data = mixture.only_source(config.data, "python_docs")
  data.sources.python_docs.max_eval_docs = 6
  batches = list(mixture.make_mixture_dataset(data, None, seq_len=512, batch_size=8, seed=0, split="eval"))
  before = _long_position_loss(ckpt_lib.restore_params(tmp_path / "short")[0], long_cfg, batches, 128)
  last = trainer.run(config, str(tmp_path / "long"))
  losses = [r["train/loss"] for r in _metrics(tmp_path / "long") if "train/loss" in r]
  assert len(losses) == 5 and all(math.isfinite(x) for x in losses) and math.isfinite(last["grad_norm"])
  after = _long_position_loss(ckpt_lib.restore_params(tmp_path / "long")[0], long_cfg, batches, 128)
  print(f"loss at positions >= 128: {before:.4f} -> {after:.4f}")
  assert after < before - 0.05, (before, after)
