"""KV-cache decoding against recomputing the whole prefix, and sampling rules."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmstack.errors import ConfigError
from lmstack.model.generate import generate, generate_without_cache, sample_logits
from lmstack.model.transformer import Transformer


@pytest.fixture(scope="module")
def model(tiny_cfg):
  cfg = dataclasses.replace(tiny_cfg, dtype="float32", vocab_size=64, init_std=0.3)
  return Transformer(cfg, nnx.Rngs(0))


def test_cached_greedy_equals_full_recompute_for_ragged_prompts(model):
  prompts = [[5, 9, 1, 33, 2, 7, 7, 60, 4], [12], [3, 3, 3, 40]]
  cached = generate(model, prompts, max_new_tokens=20)
  full = generate_without_cache(model, prompts, max_new_tokens=20)
  assert cached == full
  assert len({tuple(r) for r in cached}) == 3  # not a degenerate constant output


def test_each_row_decodes_as_if_alone(model):
  prompts = [[5, 9, 1, 33, 2], [12, 8]]
  together = generate(model, prompts, max_new_tokens=12)
  alone = [generate(model, [p], max_new_tokens=12)[0] for p in prompts]
  assert together == alone


def test_stop_tokens_end_a_row(model):
  free = generate(model, [[5, 9, 1]], max_new_tokens=16)[0]
  stop = free[5]
  first = free.index(stop)
  out = generate(model, [[5, 9, 1]], max_new_tokens=16, stop_ids=[stop])[0]
  assert out == free[:first + 1]


def test_sliding_window_cache_equals_recompute(tiny_cfg):
  cfg = dataclasses.replace(tiny_cfg, dtype="float32", vocab_size=64, init_std=0.3, sliding_window=5)
  m = Transformer(cfg, nnx.Rngs(2))
  prompts = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10]]
  assert generate(m, prompts, max_new_tokens=10) == generate_without_cache(m, prompts, max_new_tokens=10)


def test_sampling_rules():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.split(jax.random.key(0), 1)[0]
  greedy = sample_logits(logits, keys)
  assert set(np.asarray(greedy).tolist()) == {0}
  top2 = np.asarray(sample_logits(logits, keys, temperature=1.0, top_k=2))
  assert set(top2.tolist()) == {0, 1}
  assert abs((top2 == 0).mean() - 0.5 / 0.8) < 0.03
  # top_p=0.7: the smallest set reaching 0.7 is {0, 1} (0.5, then 0.8).
  nucleus = np.asarray(sample_logits(logits, keys, temperature=1.0, top_p=0.7))
  assert set(nucleus.tolist()) == {0, 1}
  full = np.asarray(sample_logits(logits, keys, temperature=1.0))
  assert abs((full == 3).mean() - 0.05) < 0.015


def test_sampled_generation_is_seeded(model):
  a = generate(model, [[5, 9, 1]], max_new_tokens=10, temperature=1.0, seed=1)
  b = generate(model, [[5, 9, 1]], max_new_tokens=10, temperature=1.0, seed=1)
  c = generate(model, [[5, 9, 1]], max_new_tokens=10, temperature=1.0, seed=2)
  assert a == b and a != c


def test_prompt_longer_than_context(model):
  with pytest.raises(ConfigError, match="exceeds the model's context of 128"):
    generate(model, [[1] * 120], max_new_tokens=16)
  with pytest.raises(ConfigError, match="at least one token"):
    generate(model, [[]], max_new_tokens=4)


@pytest.mark.slow
def test_generate_tool_on_a_trained_checkpoint(tmp_path):
  import os
  import subprocess
  import sys

  from configs import pretrain
  from lmstack import checkpoint as ckpt_lib
  from lmstack.train import build, trainer
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = pretrain.get_config("runlocal")
  config.train.update(steps=2, eval_every=0)
  trainer.run(config, str(tmp_path))

  # Parameters alone equal the full training state's parameters.
  full = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
  cfg = build.model_config(config)
  params, cfg2, meta = ckpt_lib.restore_params(str(tmp_path))
  assert cfg2 == cfg and meta["model"]["d_model"] == cfg.d_model
  raw = full.manager.restore(2)["state"]["params"]
  ours, theirs = jax.tree.leaves(params), jax.tree.leaves(raw)  # raw adds a "value" level
  assert len(ours) == len(theirs) == len(jax.tree.leaves(nnx.state(Transformer(cfg, nnx.Rngs(0)), nnx.Param)))
  for a, b in zip(ours, theirs):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  out = subprocess.run([sys.executable, "tools/generate.py", f"--ckpt={tmp_path}", "--prompt=To be, or not",
                        "--max_new_tokens=8"], cwd=repo, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.startswith("=== 'To be, or not'\nTo be, or not")
  assert "tokens in" in out.stderr
