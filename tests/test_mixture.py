"""The weighted mixture (lmstack/data/mixture.py): realised token shares, exact
resume, held-out splits, document chunking and rendering.

  python -m pytest -q tests/test_mixture.py
"""

import json

import ml_collections
import numpy as np
import pytest

from configs import common
from lmstack.data import mixture
from lmstack.data.tokenizer import load_tokenizer
from lmstack.errors import ConfigError, DataError

TOKENIZER = "<pkg>/assets/tokenizer/default.model"
WORDS = {"a": "apple", "b": "banana", "c": "cherry"}


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def word_sources(tmp_path_factory):
  """Three text sources, each made of one word, so a row tells its source.

  Documents have different lengths (3 to 80 words) so rows pack differently.
  """
  root = tmp_path_factory.mktemp("mix")
  rng = np.random.default_rng(0)
  srcs = {}
  for name, word in WORDS.items():
    for split, n in (("train", 60), ("eval", 7)):
      docs = [" ".join([word] * int(rng.integers(3, 80))) for _ in range(n)]
      (root / f"{name}_{split}.txt").write_text("\n\n".join(docs) + "\n")
    srcs[name] = dict(weight=1.0, format="text", train_files=str(root / f"{name}_train.txt"),
                      eval_files=str(root / f"{name}_eval.txt"), jsonl_field="text", max_eval_docs=0)
  return srcs


def _data(srcs, **weights):
  srcs = {k: dict(v, weight=float(weights.get(k, 0.0))) for k, v in srcs.items()}
  return ml_collections.ConfigDict(dict(kind="mixture", tokenizer=TOKENIZER, holdout_every=20, chunk_chars=4096,
                                        sources=srcs))


def _word_ids(tok):
  return {name: set(tok.encode(word)) | set(tok.encode(" " + word)) for name, word in WORDS.items()}


def _shares(batches, tok):
  """Scored tokens per source, each row attributed by the words it holds."""
  ids = _word_ids(tok)
  counts = dict.fromkeys(WORDS, 0)
  for batch in batches:
    for inputs, seg in zip(batch["inputs"], batch["segment_ids"]):
      real = inputs[seg > 0]
      if not len(real):  # a padding row of the last eval batch
        continue
      owner = [name for name, s in ids.items() if np.isin(real, list(s)).any()]
      assert len(owner) == 1, "a row mixes sources"
      counts[owner[0]] += int((seg > 0).sum())
  total = sum(counts.values())
  return {k: v / total for k, v in counts.items()}


@pytest.mark.parametrize("seed", [0, 1])
def test_realised_token_shares_match_weights(word_sources, tok, seed):
  cfg = _data(word_sources, a=0.5, b=0.3, c=0.2)
  it = iter(mixture.make_mixture_dataset(cfg, tok, seq_len=64, batch_size=8, seed=seed))
  batches = [next(it) for _ in range(150)]  # 76,800 token slots, several epochs of each source
  assert all(b["inputs"].shape == (8, 64) and b["inputs"].dtype == np.int32 for b in batches)
  shares = _shares(batches, tok)
  assert shares == pytest.approx({"a": 0.5, "b": 0.3, "c": 0.2}, abs=0.005)
  # and already within a few rows after 10 batches
  assert _shares(batches[:10], tok) == pytest.approx({"a": 0.5, "b": 0.3, "c": 0.2}, abs=0.03)


def test_seed_changes_order_not_shares(word_sources, tok):
  cfg = _data(word_sources, a=0.5, b=0.5)
  runs = []
  for seed in (0, 1):
    it = iter(mixture.make_mixture_dataset(cfg, tok, seq_len=64, batch_size=8, seed=seed))
    runs.append([next(it) for _ in range(20)])
  assert any((x["segment_ids"] != y["segment_ids"]).any() for x, y in zip(*runs))
  assert _shares(runs[0], tok)["a"] == pytest.approx(_shares(runs[1], tok)["a"], abs=0.03)


def test_iterator_state_resumes_exactly(word_sources, tok):
  cfg = _data(word_sources, a=0.2, b=0.5, c=0.3)
  ds = mixture.make_mixture_dataset(cfg, tok, seq_len=64, batch_size=4, seed=3)
  it = iter(ds)
  for _ in range(23):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  want = [next(it) for _ in range(12)]
  resumed = iter(mixture.make_mixture_dataset(cfg, tok, seq_len=64, batch_size=4, seed=3))
  resumed.set_state(state)
  got = [next(resumed) for _ in range(12)]
  for w, g in zip(want, got):
    for k in w:
      np.testing.assert_array_equal(w[k], g[k])


def test_eval_is_one_padded_pass_over_every_source(word_sources, tok):
  cfg = _data(word_sources, a=0.6, b=0.2, c=0.2)
  batches = list(mixture.make_mixture_dataset(cfg, tok, seq_len=64, batch_size=8, seed=0, split="eval"))
  scored = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
  want = 0
  for src in cfg.sources.values():
    for doc in mixture.source_documents(src, "eval", 20, 4096):
      want += len(tok.encode(doc)) + 1  # ids + eos; bos is never a target
  assert scored == want
  assert all(b["inputs"].shape == (8, 64) for b in batches)
  # the eval pass is the same every time (nothing random)
  again = list(mixture.make_mixture_dataset(cfg, tok, seq_len=64, batch_size=8, seed=5, split="eval"))
  assert all((x["inputs"] == y["inputs"]).all() for x, y in zip(batches, again))


def test_only_source(word_sources, tok):
  cfg = _data(word_sources, a=0.6, b=0.2, c=0.2)
  one = mixture.only_source(cfg, "b")
  assert mixture.source_weights(one) == {"b": 1.0}
  assert cfg.sources.a.weight == 0.6  # the original is untouched
  batches = list(mixture.make_mixture_dataset(one, tok, seq_len=64, batch_size=8, seed=0, split="eval"))
  assert _shares(batches, tok) == {"a": 0.0, "b": 1.0, "c": 0.0}
  with pytest.raises(ConfigError, match="no 'd'"):
    mixture.only_source(cfg, "d")


def test_held_out_documents_are_disjoint_and_deterministic():
  cfg = common.mixture_data(common.QUALITY_MIX, TOKENIZER)
  for name in ("python_docs", "sympy_docs", "wordnet"):
    src = ml_collections.ConfigDict(dict(cfg.sources[name], max_eval_docs=0))
    train = mixture.source_documents(src, "train", 20, 4096)
    held = mixture.source_documents(src, "eval", 20, 4096)
    assert len(held) == pytest.approx((len(train) + len(held)) / 20, abs=1)
    assert not set(held) & set(train)  # wordnet too: no held-out document is also a train document
    assert held == mixture.source_documents(src, "eval", 20, 4096)
  capped = mixture.source_documents(cfg.sources.python_docs, "eval", 20, 4096)
  assert len(capped) == cfg.sources.python_docs.max_eval_docs


def test_shipped_quality_mix_trains_and_evaluates(tok):
  cfg = common.mixture_data(common.QUALITY_MIX, TOKENIZER)
  it = iter(mixture.make_mixture_dataset(cfg, tok, seq_len=64, batch_size=8, seed=0))
  for _ in range(20):
    batch = next(it)
  assert (batch["segment_ids"] > 0).mean() > 0.9  # rows are packed full
  tokens = np.asarray(it.get_state()["tokens"], float)
  names = sorted(cfg.sources)  # ConfigDict iterates its keys sorted
  weights = np.asarray([common.QUALITY_MIX[n] for n in names])
  assert tokens / tokens.sum() == pytest.approx(weights / weights.sum(), abs=0.02)


def test_chunk_text_cuts_at_paragraphs():
  paras = [("x" * n) for n in (100, 50, 300, 20, 10)]
  text = "\n\n".join(paras)
  chunks = mixture.chunk_text(text, 200)
  assert all(len(c) <= 200 or c == paras[2] for c in chunks)  # a 300-char line stays whole
  assert "\n\n".join(chunks) == text  # nothing lost or reordered
  lines = "\n".join(["y" * 30] * 20)  # one long paragraph: cut at line ends
  parts = mixture.chunk_text(lines, 100)
  assert all(len(p) <= 100 for p in parts) and "\n".join(parts) == lines
  assert mixture.chunk_text("short", 100) == ["short"] and mixture.chunk_text("  \n", 100) == []


def test_render_wordnet():
  row = {"words": ["dog", "domestic_dog"], "pos": "n", "gloss": "a member of the genus Canis"}
  assert mixture.render_wordnet(row) == "dog, domestic dog (noun): a member of the genus Canis"


def test_errors(word_sources, tok, tmp_path):
  with pytest.raises(ConfigError, match="every weight is 0"):
    mixture.make_mixture_dataset(_data(word_sources), tok, seq_len=64, batch_size=8, seed=0)
  bad = _data(word_sources, a=1.0)
  bad.sources.a.format = "csv"
  with pytest.raises(ConfigError, match="format='csv'"):
    mixture.make_mixture_dataset(bad, tok, seq_len=64, batch_size=8, seed=0)
  (tmp_path / "wn.jsonl").write_text('{"words": ["x"]}\n')
  wn = _data(word_sources, a=1.0)
  wn.sources.a.update(format="wordnet", train_files=str(tmp_path / "wn.jsonl"), eval_files="")
  with pytest.raises(DataError, match="wn.jsonl:1: not a WordNet row"):
    mixture.make_mixture_dataset(wn, tok, seq_len=64, batch_size=8, seed=0)
  with pytest.raises(ConfigError, match="weight=-1"):
    mixture.source_weights(_data(word_sources, a=-1.0))
