"""Tests of lmstack/data/tokenizer.py and tools/train_tokenizer.py.

  python -m pytest tests/test_tokenizer.py -q
"""

import gzip
import json
import pickle

import pytest
from sentencepiece import sentencepiece_model_pb2

from lmstack import assets
from lmstack.data import sources
from lmstack.data import tokenizer as lms_tokenizer
from lmstack.data.tokenizer import Tokenizer
from lmstack.errors import DataError
from tools import train_tokenizer as train_tokenizer_tool

EMOJI = "\U0001f642"  # 🙂, absent from the corpus: 4 UTF-8 bytes.


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.load(assets.DEFAULT_TOKENIZER)


@pytest.fixture(scope="module")
def botchan_slice(tmp_path_factory):
  """The first ~60 KB of the default corpus (Botchan), as a text file."""
  text = sources.read_text(assets.resolve(assets.DEFAULT_TRAIN_FILES))
  path = tmp_path_factory.mktemp("tok") / "botchan.txt"
  path.write_text(text[:60_000], encoding="utf-8")
  return str(path)


def _proto(tokenizer):
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(tokenizer.to_bytes())
  return proto


def test_default_tokenizer_special_ids(tok):
  assert tok.vocab_size == 8192
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
  proto = _proto(tok)
  assert proto.trainer_spec.model_type == proto.trainer_spec.BPE
  assert proto.trainer_spec.byte_fallback


def test_default_tokenizer_round_trip_on_real_text(tok):
  docs = sources.text_documents(assets.resolve(assets.DEFAULT_EVAL_FILES))
  for doc in docs[:200]:
    ids = tok.encode(doc)
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == doc
  odd = f"  indented\n\tcode  x = 12345\n\nHAMLET. {EMOJI} 東京 ｆｕｌｌ "
  assert tok.decode(tok.encode(odd)) == odd


def test_byte_fallback(tok):
  ids = tok.encode(EMOJI)
  assert [tok.id_to_piece(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
  assert tok.unk_id not in ids
  assert tok.decode(ids) == EMOJI


def test_bytes_and_pickle_round_trip(tok):
  text = "To be, or not to be: that is the question."
  again = Tokenizer.from_bytes(tok.to_bytes())
  unpickled = pickle.loads(pickle.dumps(tok))
  assert again.encode(text) == unpickled.encode(text) == tok.encode(text)
  assert unpickled.to_bytes() == tok.to_bytes()


def test_load_errors(tmp_path):
  with pytest.raises(DataError, match="tokenizer not found.*nope.model") as e:
    Tokenizer.load(str(tmp_path / "nope.model"))
  assert "\n" not in str(e.value)
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"this is not a model proto")
  with pytest.raises(DataError, match="bad.model.*not a valid SentencePiece"):
    Tokenizer.load(str(bad))


def test_train_tokenizer_bpe_byte_fallback_deterministic(tmp_path, botchan_slice):
  # A JSONL.gz input next to the text file: both kinds feed the trainer.
  jsonl = tmp_path / "extra.jsonl.gz"
  with gzip.open(jsonl, "wt", encoding="utf-8") as f:
    f.write(json.dumps({"body": "Porcupine and Red Shirt\nwent to the hot springs."}) + "\n")
  inputs = f"{botchan_slice},{jsonl}"
  first = lms_tokenizer.train_tokenizer(
      inputs, vocab_size=600, jsonl_field="body", output=str(tmp_path / "a/tok")
  )
  second = lms_tokenizer.train_tokenizer(inputs, vocab_size=600, jsonl_field="body")
  assert first.to_bytes() == second.to_bytes()  # Deterministic.
  assert (tmp_path / "a/tok.model").read_bytes() == first.to_bytes()
  assert (tmp_path / "a/tok.vocab").exists()

  proto = _proto(first)
  assert proto.trainer_spec.model_type == proto.trainer_spec.BPE
  assert proto.trainer_spec.byte_fallback
  assert first.vocab_size == 600
  assert (first.pad_id, first.unk_id, first.bos_id, first.eos_id) == (0, 1, 2, 3)
  text = f"Botchan said {EMOJI}\n  and left."
  ids = first.encode(text)
  assert first.unk_id not in ids
  assert {"<0xF0>", "<0x9F>"} <= {first.id_to_piece(i) for i in ids}
  assert first.decode(ids) == text


def test_default_tokenizer_is_reproducible():
  # The command recorded in lmstack/assets/corpus/README.md.
  again = lms_tokenizer.train_tokenizer(assets.DEFAULT_TRAIN_FILES, vocab_size=8192)
  assert again.to_bytes() == Tokenizer.load(assets.DEFAULT_TOKENIZER).to_bytes()


def test_train_tokenizer_tool(tmp_path, botchan_slice):
  out = tmp_path / "tool/tok"
  train_tokenizer_tool.main(
      [f"--input={botchan_slice}", "--vocab_size=400", f"--output={out}"]
  )
  assert Tokenizer.load(f"{out}.model").vocab_size == 400


def test_train_tokenizer_errors(tmp_path, botchan_slice):
  with pytest.raises(DataError, match="missing.txt"):
    lms_tokenizer.train_tokenizer(str(tmp_path / "missing.txt"), vocab_size=400)
  with pytest.raises(DataError, match="vocab_size=100 is too small"):
    lms_tokenizer.train_tokenizer(botchan_slice, vocab_size=100)
