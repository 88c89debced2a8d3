"""SentencePiece tokenizer: a small wrapper, and BPE training (byte fallback).

  tok = Tokenizer.load("<pkg>/assets/tokenizer/default.model")
  ids = tok.encode("To be, or not to be")    # no bos/eos (the pipeline adds)
  tok.decode(ids)                             # -> "To be, or not to be"
  blob = tok.to_bytes()                       # the model proto, for checkpoints
  Tokenizer.from_bytes(blob)

`train_tokenizer` is what tools/train_tokenizer.py runs:

  python tools/train_tokenizer.py --input=a.txt,b.jsonl.gz --vocab_size=8192 \
      --output=path/prefix          # writes path/prefix.model and .vocab

Special ids are fixed for every lmstack tokenizer: pad=0, unk=1, bos=2,
eos=3 (pieces <pad>, <unk>, <s>, </s>). Training choices and why:
  * BPE with byte_fallback: any UTF-8 text (emoji, CJK in a mostly English
    corpus) encodes losslessly via <0xNN> byte pieces instead of <unk>.
  * identity normalization, remove_extra_whitespaces=False: decode(encode(s))
    == s, so indentation in code and runs of spaces survive.
  * add_dummy_prefix=False: documents are encoded whole, and a word after a
    newline has no leading space; training on lines without a dummy "▁" keeps
    the pieces learned for line starts the ones that occur at encode time.
    The newline itself is not in the training lines; it encodes as <0x0A>.
  * split_digits: numbers as digit sequences, as in Llama and Gemma.
  * deterministic: the model is written through `model_writer` (so no path
    ends up in the proto), the sentence sampler is seeded, and BPE merges are
    deterministic, so the same inputs give a byte-identical model.
"""

from collections.abc import Iterator, Sequence
import io
import os

import sentencepiece as spm

from lmstack import assets
from lmstack.data import sources
from lmstack.errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# SentencePiece drops training sentences longer than max_sentence_length
# bytes; long lines (minified text, JSONL without newlines) are cut into
# chunks of this many characters (<= 4 bytes each) so they still count.
_MAX_LINE_CHARS = 4096


class Tokenizer:
  """A SentencePiece model that pickles as its serialized proto.

  grain may pickle map functions that hold a tokenizer (worker processes), and
  a SentencePieceProcessor cannot be pickled; so pickle the proto bytes and
  rebuild the processor from them on unpickling.
  """

  def __init__(self, model_proto: bytes):
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor()
    self._sp.LoadFromSerializedProto(self._proto)

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    """Reads a `.model` file; `<pkg>/` paths point into the package."""
    resolved = assets.resolve(path)
    try:
      with open(resolved, "rb") as f:
        proto = f.read()
    except OSError as e:
      raise DataError(
          f"tokenizer not found: cannot read {path!r} ({e.strerror})"
      ) from None
    return cls.from_bytes(proto, name=path)

  @classmethod
  def from_bytes(cls, model_proto: bytes, *, name: str = "<bytes>"):
    try:
      return cls(model_proto)
    except (RuntimeError, OSError, TypeError) as e:
      raise DataError(
          f"tokenizer {name!r} is not a valid SentencePiece model"
          f" ({sources._first_line(e)})"  # pylint: disable=protected-access
      ) from None

  def to_bytes(self) -> bytes:
    """The serialized ModelProto; `from_bytes` gives the same tokenizer."""
    return self._proto

  def __getstate__(self):
    return {"proto": self._proto}

  def __setstate__(self, state):
    self.__init__(state["proto"])

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos."""
    return self._sp.EncodeAsIds(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.DecodeIds([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    return self._sp.IdToPiece(int(i))

  @property
  def vocab_size(self) -> int:
    return self._sp.GetPieceSize()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  def __repr__(self):
    return (
        f"Tokenizer(vocab_size={self.vocab_size}, pad={self.pad_id},"
        f" bos={self.bos_id}, eos={self.eos_id})"
    )


def training_lines(
    files: Sequence[str], jsonl_field: str = "text"
) -> Iterator[str]:
  """The sentences a tokenizer trains on: every non-blank line of every file.

  A file whose name contains `.jsonl` is read as JSONL (its `jsonl_field`
  split into lines); anything else as plain text.
  """
  for path in files:
    if ".jsonl" in os.path.basename(path):
      texts = sources.jsonl_documents([path], field=jsonl_field)
    else:
      texts = [sources.read_text(path)]
    for text in texts:
      for line in text.split("\n"):
        line = line.rstrip()
        for start in range(0, len(line), _MAX_LINE_CHARS):
          yield line[start:start + _MAX_LINE_CHARS]


def train_tokenizer(
    inputs: sources.PathsArg,
    *,
    vocab_size: int,
    output: str | None = None,
    jsonl_field: str = "text",
    input_sentence_size: int = 5_000_000,
    seed: int = 0,
    character_coverage: float = 0.9999,
    num_threads: int | None = None,
    verbose: bool = False,
) -> Tokenizer:
  """Trains a BPE SentencePiece model with byte fallback (see module doc).

  Args:
    inputs: text and JSONL files (comma-separated string or list; globs and
      `.gz` accepted).
    vocab_size: size of the vocabulary, including the 4 special and 256 byte
      pieces.
    output: if given, writes `{output}.model` and `{output}.vocab`.
    jsonl_field: the field holding the text in JSONL records.
    input_sentence_size: at most this many lines are used; above that,
      SentencePiece samples lines with the seeded generator.
    seed: seed of that sampler.
    character_coverage: the rarest characters beyond this fraction get no
      piece of their own and fall back to bytes.
    num_threads: trainer threads (default: all cores).
    verbose: show SentencePiece's training log.

  Returns:
    The trained tokenizer.
  """
  if vocab_size < 260 + 8:
    raise DataError(
        f"vocab_size={vocab_size} is too small: expected >= 268 (4 special"
        " and 256 byte pieces come first)"
    )
  files = sources.expand_paths(inputs)
  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.Train(
        sentence_iterator=training_lines(files, jsonl_field),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=character_coverage,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=4 * _MAX_LINE_CHARS,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_piece="<pad>",
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=0 if verbose else 2,
    )
  except RuntimeError as e:
    raise DataError(
        f"tokenizer training on {', '.join(files)} failed:"
        f" {sources._first_line(e)}"  # pylint: disable=protected-access
    ) from None
  tokenizer = Tokenizer(model.getvalue())
  if output:
    output = assets.resolve(output)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output + ".model", "wb") as f:
      f.write(tokenizer.to_bytes())
    # The .vocab file is for people (SentencePiece's format: piece, score).
    sp = tokenizer._sp  # pylint: disable=protected-access
    with open(output + ".vocab", "w", encoding="utf-8") as f:
      for i in range(tokenizer.vocab_size):
        f.write(f"{sp.IdToPiece(i)}\t{sp.GetScore(i):g}\n")
  return tokenizer
