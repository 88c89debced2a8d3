"""Tests of lmstack/data: sources, the packed LM pipeline, ArrayRecord, TFDS.

  python -m pytest tests/test_data.py -q

All on the embedded corpus (real text) or small files written to tmp_path.
"""

import collections
import gzip
import json
import logging
import os
import pickle

import ml_collections
import numpy as np
import pytest

from lmstack import assets
from lmstack.data import pipeline
from lmstack.data import prepare
from lmstack.data import sources
from lmstack.data.tokenizer import Tokenizer
from lmstack.errors import ConfigError, DataError

SEQ_LEN, BATCH = 64, 4


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.load(assets.DEFAULT_TOKENIZER)


def data_config(**overrides) -> ml_collections.ConfigDict:
  """The `data` block of configs/pretrain.py, with overrides."""
  cfg = ml_collections.ConfigDict(dict(
      format="text",
      train_files=assets.DEFAULT_TRAIN_FILES,
      eval_files=assets.DEFAULT_EVAL_FILES,
      jsonl_field="text",
      tfds_name="",
      tfds_data_dir="",
      tfds_train_split="train",
      tfds_eval_split="validation",
      tokenizer=assets.DEFAULT_TOKENIZER,
  ))
  cfg.update(overrides)
  return cfg


def take(ds_or_it, n):
  it = iter(ds_or_it)
  return [next(it) for _ in range(n)]


def segments(batches):
  """Each packed piece as (inputs, targets) tuples of token ids."""
  out = []
  for b in batches:
    for row in range(b["inputs"].shape[0]):
      seg = b["segment_ids"][row]
      for s in range(1, seg.max() + 1):
        mask = seg == s
        out.append((tuple(b["inputs"][row][mask]), tuple(b["targets"][row][mask])))
  return out


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---------------------------------------------------------------------------
# Sources


def test_asset_paths_resolve():
  paths = assets.default_corpus_paths()
  for path in paths.values():
    assert os.path.isfile(path), path
  assert assets.resolve("<pkg>/assets") == str(assets.ASSETS_DIR)


SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="needs ../shared/data")
def test_make_corpus_reproduces_the_embedded_corpus(tmp_path, capsys):
  from tools import make_corpus  # pylint: disable=g-import-not-at-top
  make_corpus.main([f"--data_dir={SHARED_DATA}", f"--out_dir={tmp_path}"])
  capsys.readouterr()
  for name in ("train.txt", "valid.txt"):
    shipped = (assets.ASSETS_DIR / "corpus" / name).read_bytes()
    assert (tmp_path / name).read_bytes() == shipped, name


def test_split_documents_blank_lines_and_cap():
  text = "a b\nc d  \n\n\n  e\n \nf\n"
  assert sources.split_documents(text) == ["a b\nc d", "  e", "f"]
  # One sentence per line and no blank lines (like Botchan): capped.
  lines = "\n".join(f"sentence {i:03d}." for i in range(100))  # 14 chars each
  docs = sources.split_documents(lines, max_doc_chars=150)
  assert all(len(d) <= 150 for d in docs) and len(docs) == 10
  assert "\n".join(docs) == lines


def test_text_source_bom_crlf_and_globs(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfone\r\ntwo\r\n\r\nthree\r\n")
  (tmp_path / "b.txt").write_text("four\n", encoding="utf-8")
  ds = sources.text_source(f"{tmp_path}/*.txt")
  assert list(ds[i] for i in range(len(ds))) == ["one\ntwo", "three", "four"]


def test_default_corpus_documents():
  train = sources.text_documents(assets.DEFAULT_TRAIN_FILES)
  valid = sources.text_documents(assets.DEFAULT_EVAL_FILES)
  assert len(train) > 10_000 and len(valid) > 500
  assert 0.04 < len(valid) / (len(train) + len(valid)) < 0.06
  # Held out by whole documents: a valid document is never inside a train one.
  long_valid = [d for d in valid if len(d) > 200]
  train_text = "\n\n".join(train)
  assert not any(d in train_text for d in long_valid[:100])


def test_missing_path_and_empty_corpus(tmp_path):
  with pytest.raises(DataError, match=r"not found: '.*nothing-\*\.txt' matches no file"):
    sources.text_source(f"{tmp_path}/nothing-*.txt")
  empty = tmp_path / "empty.txt"
  empty.write_text("\n  \n\n", encoding="utf-8")
  with pytest.raises(DataError, match="empty corpus") as e:
    sources.text_source(str(empty))
  assert "\n" not in str(e.value)
  with pytest.raises(DataError, match="empty corpus"):
    pipeline.make_lm_dataset(
        data_config(train_files=str(empty)), None, seq_len=8, batch_size=2, seed=0
    )


def test_invalid_utf8_is_replaced_with_one_warning(tmp_path, caplog):
  path = tmp_path / "bad.txt"
  filler = b"plain text line\n" * 250  # 4,000 bytes: 3 invalid ones are under MAX_INVALID_SHARE
  path.write_bytes(b"caf\xe9 ok\n\nbad \xff\xfe end\n\n" + filler)
  with caplog.at_level(logging.WARNING):
    docs = sources.text_documents(str(path))
  assert docs[:2] == ["caf\ufffd ok", "bad \ufffd\ufffd end"]
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1
  assert "bad.txt" in warnings[0].getMessage()
  assert "3 invalid UTF-8 bytes" in warnings[0].getMessage()


@pytest.mark.parametrize("how", ["binary", "nul", "latin1"])
def test_a_file_that_is_not_text_is_refused_unless_allowed(tmp_path, how):
  path = tmp_path / "corpus.txt"
  with open(assets.resolve(assets.DEFAULT_EVAL_FILES), "rb") as f:
    text = f.read()[:20000]
  if how == "binary":  # the case: a corpus overwritten by random bytes
    data = np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes()
  elif how == "nul":  # one NUL is enough: no text file has one
    data = text[:10000] + b"\x00" + text[10000:]
  else:  # text in Latin-1: every accented letter is an invalid UTF-8 byte
    data = ("Caf\u00e9 cr\u00e8me na\u00efve. " * 200).encode("latin-1")
  path.write_bytes(data)
  with pytest.raises(DataError, match=r"corpus.txt does not look like UTF-8 text .*allow_invalid_text=True") as e:
    sources.text_documents(str(path))
  assert "\n" not in str(e.value)
  with sources.invalid_text_allowed():
    docs = sources.text_documents(str(path))
  assert docs and any("\ufffd" in d for d in docs) == (how != "nul")
  # A share just under the limit is read, with the replacement.
  bad = int(sources.MAX_INVALID_SHARE * len(text)) - 1
  path.write_bytes(text[:1000] + b"\xff" * bad + text[1000:])
  assert sum(d.count("\ufffd") for d in sources.text_documents(str(path))) == bad


def test_jsonl_source_gz_and_field(tmp_path):
  path = tmp_path / "docs.jsonl.gz"
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write(json.dumps({"body": "first doc", "id": 1}) + "\n\n")
    f.write(json.dumps({"body": ""}) + "\n")  # Empty text: skipped.
    f.write(json.dumps({"body": "second\ndoc"}) + "\n")
  ds = sources.jsonl_source(str(path), field="body")
  assert [ds[i] for i in range(len(ds))] == ["first doc", "second\ndoc"]


def test_jsonl_bad_lines(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "ok"}\n{"text": broken\n', encoding="utf-8")
  with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
    sources.jsonl_source(str(path))
  path.write_text('{"text": "ok"}\n\n{"content": "x"}\n', encoding="utf-8")
  with pytest.raises(DataError, match=r"bad.jsonl:3: record has no field 'text' \(fields: content\)"):
    sources.jsonl_source(str(path))
  path.write_text('{"text": 7}\n', encoding="utf-8")
  with pytest.raises(DataError, match=r"bad.jsonl:1: field 'text' is a int"):
    sources.jsonl_source(str(path))


def test_unknown_format_and_split():
  with pytest.raises(ConfigError, match="data.format: expected one of"):
    pipeline.make_lm_dataset(data_config(format="csv"), None, seq_len=8, batch_size=2, seed=0)
  with pytest.raises(ConfigError, match="split"):
    pipeline.make_lm_dataset(data_config(), None, seq_len=8, batch_size=2, seed=0, split="test")


# ---------------------------------------------------------------------------
# Packing


def check_packing_invariants(batches, tok, seq_len=SEQ_LEN, batch_size=BATCH):
  for b in batches:
    assert set(b) == {"inputs", "targets", "segment_ids", "positions"}
    for k, v in b.items():
      assert v.shape == (batch_size, seq_len) and v.dtype == np.int32, k
    for row in range(batch_size):
      seg, pos = b["segment_ids"][row], b["positions"][row]
      inp, tgt = b["inputs"][row], b["targets"][row]
      used = seg > 0
      # Padding only at the end, segments numbered 1..k in order.
      n = used.sum()
      assert used[:n].all() and not used[n:].any()
      assert (inp[~used] == 0).all() and (tgt[~used] == 0).all() and (pos[~used] == 0).all()
      if n:
        assert seg[0] == 1 and set(np.diff(seg[:n])) <= {0, 1}
      for s in range(1, seg.max() + 1):
        idx = np.flatnonzero(seg == s)
        assert (np.diff(idx) == 1).all()  # One contiguous run per piece.
        assert (pos[idx] == np.arange(len(idx))).all()  # Positions restart.
        # targets are the next inputs within a piece.
        assert (tgt[idx[:-1]] == inp[idx[1:]]).all()
        assert tok.bos_id not in tgt[idx]
        # eos only ever ends a piece.
        assert tok.eos_id not in tgt[idx[:-1]]


def test_train_batches_invariants_on_real_text(tok):
  batches = take(pipeline.make_lm_dataset(
      data_config(), tok, seq_len=SEQ_LEN, batch_size=BATCH, seed=0), 20)
  check_packing_invariants(batches, tok)
  pieces = segments(batches)
  # Most pieces start a document, and what they hold is text of the corpus.
  starts = [p for p in pieces if p[0][0] == tok.bos_id]
  assert len(starts) > len(pieces) / 2
  corpus = "\n\n" + "\n\n".join(sources.text_documents(assets.DEFAULT_TRAIN_FILES))
  for inputs, _ in starts[:50]:
    assert "\n\n" + tok.decode(inputs[1:]) in corpus
  fill = np.mean([(b["segment_ids"] > 0).mean() for b in batches])
  assert fill > 0.8


def test_eval_split_is_one_pass_over_every_target(tok):
  ds = pipeline.make_lm_dataset(
      data_config(), tok, seq_len=SEQ_LEN, batch_size=BATCH, seed=0, split="eval")
  batches = list(ds)
  check_packing_invariants(batches, tok)
  pieces = segments(batches)
  targets = np.concatenate([np.asarray(t, np.int32) for _, t in pieces])
  expected = pipeline.split_tokens(data_config(), tok, "eval")
  assert len(targets) == len(expected)
  np.testing.assert_array_equal(
      np.bincount(targets, minlength=tok.vocab_size),
      np.bincount(expected, minlength=tok.vocab_size))
  num_docs = len(sources.text_documents(assets.DEFAULT_EVAL_FILES))
  assert sum(p[0][0] == tok.bos_id for p in pieces) == num_docs
  # Same batches again: the eval split is not shuffled.
  assert_batches_equal(batches[:3], take(ds, 3))


def test_eval_last_batch_padded(tmp_path, tok):
  path = tmp_path / "five.txt"
  path.write_text("\n\n".join(f"Document number {i}." for i in range(5)), encoding="utf-8")
  # Seq 8: each short document fills a row of its own -> 5 rows, batch of 4.
  batches = list(pipeline.make_lm_dataset(
      data_config(eval_files=str(path)), tok, seq_len=8, batch_size=4, seed=0, split="eval"))
  assert [b["inputs"].shape for b in batches] == [(4, 8)] * len(batches)
  last = batches[-1]
  assert (last["segment_ids"].max(axis=1) == 0).any()  # Padded rows.
  check_packing_invariants(batches, tok, seq_len=8, batch_size=4)


def test_dataset_pickles(tmp_path, tok):
  # grain pickles the dataset (and its map functions) for worker processes.
  path = tmp_path / "few.txt"
  path.write_text("One small document.\n\nAnd another one.", encoding="utf-8")
  ds = pipeline.make_lm_dataset(
      data_config(eval_files=str(path)), tok, seq_len=16, batch_size=2, seed=0, split="eval")
  assert_batches_equal(list(pickle.loads(pickle.dumps(ds))), list(ds))


def test_long_document_is_cut_into_overlapping_pieces(tok):
  pieces = pipeline.Pieces(seq_len=4, bos_id=2, eos_id=3).flat_map(
      np.arange(10, 20, dtype=np.int32))
  # tokens: 2, 10..19, 3 (12 tokens, 11 targets) -> pieces of <= 5 tokens.
  assert [p["inputs"].tolist() for p in pieces] == [
      [2, 10, 11, 12], [13, 14, 15, 16], [17, 18, 19]]
  assert [p["targets"].tolist() for p in pieces] == [
      [10, 11, 12, 13], [14, 15, 16, 17], [18, 19, 3]]
  assert pipeline.Pieces(4, 2, 3).flat_map(np.zeros([0], np.int32)) == []


def test_seed_determinism(tok):
  def first(seed):
    return take(pipeline.make_lm_dataset(
        data_config(), tok, seq_len=SEQ_LEN, batch_size=BATCH, seed=seed), 3)
  assert_batches_equal(first(1), first(1))
  a, b = first(1), first(2)
  assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))


def shard_pieces(cfg, tok, index, count):
  ds = pipeline.make_lm_dataset(
      cfg, tok, seq_len=SEQ_LEN, batch_size=BATCH, seed=0, split="eval",
      shard_index=index, shard_count=count)
  return collections.Counter(p for p in segments(ds) if p[0][0] == tok.bos_id)


def test_shards_are_disjoint_and_cover_the_split(tmp_path, tok):
  # Real text: the two shards together hold exactly the split's pieces.
  cfg = data_config()
  whole = shard_pieces(cfg, tok, 0, 1)
  assert shard_pieces(cfg, tok, 0, 2) + shard_pieces(cfg, tok, 1, 2) == whole
  # Distinct documents: no document is read by two of three processes.
  path = tmp_path / "numbered.txt"
  path.write_text("\n\n".join(f"Document {i} here." for i in range(30)), encoding="utf-8")
  cfg = data_config(eval_files=str(path))
  shards = [shard_pieces(cfg, tok, i, 3) for i in range(3)]
  assert all(sum(s.values()) == 10 for s in shards)
  assert not (set(shards[0]) & set(shards[1]) or set(shards[1]) & set(shards[2])
              or set(shards[0]) & set(shards[2]))
  with pytest.raises(ConfigError, match="shard_index=2"):
    pipeline.make_lm_dataset(data_config(), tok, seq_len=8, batch_size=2, seed=0,
                             shard_index=2, shard_count=2)


def test_iterator_state_resumes_exactly(tok):
  ds = pipeline.make_lm_dataset(
      data_config(), tok, seq_len=SEQ_LEN, batch_size=BATCH, seed=3)
  it = iter(ds)
  take(it, 7)
  state = json.loads(json.dumps(it.get_state()))  # JSON round trip.
  expected = take(it, 5)
  resumed = iter(ds)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 5), expected)
  # A fresh pipeline object (as after a restart) resumes the same way.
  again = iter(pipeline.make_lm_dataset(
      data_config(), tok, seq_len=SEQ_LEN, batch_size=BATCH, seed=3))
  again.set_state(state)
  assert_batches_equal(take(again, 5), expected)


def test_iterator_state_across_epochs(tmp_path, tok):
  path = tmp_path / "tiny.txt"
  path.write_text("\n\n".join(f"Short document {i} of the tiny corpus." for i in range(12)),
                  encoding="utf-8")
  ds = pipeline.make_lm_dataset(
      data_config(train_files=str(path)), tok, seq_len=32, batch_size=2, seed=5)
  it = iter(ds)
  batches = take(it, 6)  # Several epochs of 12 documents.
  state = json.dumps(it.get_state())
  expected = take(it, 6)
  resumed = iter(ds)
  resumed.set_state(json.loads(state))
  assert_batches_equal(take(resumed, 6), expected)
  # Each epoch is a new permutation: the bos-first pieces of the first two
  # epochs hold the same documents in a different order.
  firsts = [p for p in segments(batches + expected) if p[0][0] == tok.bos_id]
  epoch1, epoch2 = firsts[:12], firsts[12:24]
  assert sorted(epoch1) == sorted(epoch2) and epoch1 != epoch2


# ---------------------------------------------------------------------------
# Other formats read through make_lm_dataset


def eval_target_counts(cfg, tok):
  ds = pipeline.make_lm_dataset(cfg, tok, seq_len=SEQ_LEN, batch_size=BATCH, seed=0, split="eval")
  return pipeline._token_counts(ds, tok.vocab_size)  # pylint: disable=protected-access


def test_jsonl_pipeline_matches_text(tmp_path, tok):
  docs = sources.text_documents(assets.DEFAULT_EVAL_FILES)[:150]
  text_path, jsonl_path = tmp_path / "docs.txt", tmp_path / "docs.jsonl.gz"
  text_path.write_text("\n\n".join(docs), encoding="utf-8")
  with gzip.open(jsonl_path, "wt", encoding="utf-8") as f:
    for d in docs:
      f.write(json.dumps({"text": d}) + "\n")
  np.testing.assert_array_equal(
      eval_target_counts(data_config(format="jsonl", eval_files=str(jsonl_path)), tok),
      eval_target_counts(data_config(eval_files=str(text_path)), tok))


def test_array_record_via_prepare_data(tmp_path, tok, capsys):
  from tools import prepare_data  # pylint: disable=g-import-not-at-top
  prefix = tmp_path / "records/valid"
  prepare_data.main([f"--input={assets.DEFAULT_EVAL_FILES}", f"--output={prefix}",
                     "--num_shards=3"])
  out = capsys.readouterr().out
  files = prepare.shard_paths(str(prefix), 3)
  assert all(os.path.isfile(f) for f in files)
  expected = pipeline.split_tokens(data_config(), tok, "eval")
  num_docs = len(sources.text_documents(assets.DEFAULT_EVAL_FILES))
  assert f"total: {num_docs:,} documents, {len(expected) - num_docs:,} tokens" in out

  cfg = data_config(format="array_record", eval_files=f"{prefix}-*.array_record",
                    train_files=f"{prefix}-*.array_record")
  counts = eval_target_counts(cfg, tok)
  np.testing.assert_array_equal(counts, np.bincount(expected, minlength=tok.vocab_size))
  check_packing_invariants(take(pipeline.make_lm_dataset(
      cfg, tok, seq_len=SEQ_LEN, batch_size=BATCH, seed=0), 3), tok)


def build_tfds_corpus(data_dir, train_docs, valid_docs):
  """Writes an ArrayRecord TFDS dataset "lmstack_test_corpus:1.0.0" without TF."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class LmstackTestCorpus(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(train_docs),
              "validation": self._generate_examples(valid_docs)}

    def _generate_examples(self, docs):
      for i, doc in enumerate(docs):
        yield i, {"text": doc}

  builder = LmstackTestCorpus(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()  # Writes files only: nothing to download.
  return builder


def test_tfds_array_record_without_tensorflow(tmp_path, tok):
  import sys  # pylint: disable=g-import-not-at-top
  docs = sources.text_documents(assets.DEFAULT_EVAL_FILES)
  build_tfds_corpus(tmp_path / "tfds", docs[100:], docs[:100])
  assert "tensorflow" not in sys.modules  # tfds wrote it without TF.
  cfg = data_config(format="tfds", tfds_name="lmstack_test_corpus:1.0.0",
                    tfds_data_dir=str(tmp_path / "tfds"))
  text_path = tmp_path / "valid100.txt"
  text_path.write_text("\n\n".join(docs[:100]), encoding="utf-8")
  np.testing.assert_array_equal(eval_target_counts(cfg, tok),
                                eval_target_counts(data_config(eval_files=str(text_path)), tok))
  check_packing_invariants(take(pipeline.make_lm_dataset(
      cfg, tok, seq_len=SEQ_LEN, batch_size=BATCH, seed=0), 3), tok)
  with pytest.raises(DataError, match="cannot open tfds dataset 'no_such_corpus'"):
    pipeline.make_lm_dataset(data_config(format="tfds", tfds_name="no_such_corpus",
                                         tfds_data_dir=str(tmp_path / "tfds")),
                             tok, seq_len=8, batch_size=2, seed=0)
  cfg.jsonl_field = "body"
  with pytest.raises(DataError, match="no field 'body'"):
    pipeline.make_lm_dataset(cfg, tok, seq_len=8, batch_size=2, seed=0)


# ---------------------------------------------------------------------------
# Unigram baseline


def test_unigram_cross_entropy_by_hand():
  # Train counts over V=4: [3, 1, 0, 0] -> p = [4, 2, 1, 1] / 8.
  train = np.array([0, 0, 0, 1])
  h = pipeline.unigram_cross_entropy(train, np.array([0, 2]), vocab_size=4)
  assert h == pytest.approx(-(np.log(4 / 8) + np.log(1 / 8)) / 2)
  # Lists of documents and packed batches count the same tokens.
  assert pipeline.unigram_cross_entropy([train[:2], train[2:]], [np.array([0, 2])], 4) == h
  batch = {"targets": np.array([[0, 2, 0]]), "segment_ids": np.array([[1, 1, 0]])}
  assert pipeline.unigram_cross_entropy(train, [batch], 4) == h


def test_unigram_cross_entropy_default_corpus(tok):
  train = pipeline.split_tokens(data_config(), tok, "train")
  valid = pipeline.split_tokens(data_config(), tok, "eval")
  h = pipeline.unigram_cross_entropy(train, valid, tok.vocab_size)
  assert 5.5 < h < 7.5 < np.log(tok.vocab_size)
