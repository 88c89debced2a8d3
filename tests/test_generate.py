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
