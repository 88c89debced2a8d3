"""Tokenizers behind one interface: SentencePiece and Hugging Face JSON.

  tok = load_tokenizer("<pkg>/assets/tokenizer/default.model")  # SentencePiece
  tok = load_tokenizer("path/to/hf_model_dir")      # tokenizer.json + configs
  tok = load_tokenizer("path/to/tokenizer.json")    # just the file
  ids = tok.encode("To be, or not to be")    # no bos/eos (the pipeline adds)
  tok.decode(ids)                             # -> "To be, or not to be"
  tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, tok.eos_ids
  blob = tok.to_bytes()                       # for checkpoints
  tokenizer_from_bytes(blob)                  # the same tokenizer, either kind

Both kinds (`Tokenizer` for SentencePiece, `HFTokenizer` for the `tokenizers`
package; no `transformers` needed) have the same API: encode, decode,
encode_with_offsets, id_to_piece, piece_to_id, vocab_size, pad_id, unk_id,
bos_id, eos_id, eos_ids (all stop tokens, e.g. Llama 3's <|eot_id|> and
<|end_of_text|>), special_tokens and chat_template (for lmstack.data.chat),
to_bytes, and they pickle (grain may send them to worker processes).

What `load_tokenizer` reads from a Hugging Face model directory:
  tokenizer.json           the tokenizer (else tokenizer.model: SentencePiece)
  tokenizer_config.json    bos_token, eos_token, pad_token, unk_token (strings
                           or AddedToken dicts), any other `*_token`, and
                           chat_template (a string, or a list of named ones)
  chat_template.jinja      the chat template, where newer transformers put it
  generation_config.json,  bos/eos/pad_token_id (an int or a list): used for
  config.json              tokens tokenizer_config.json does not name, and
                           every eos id listed joins `eos_ids`
A special id is -1 when nothing names it (a bare tokenizer.json has none; a
SentencePiece model has its own). A file path reads only that file.

Bytes. A SentencePiece tokenizer loaded from a `.model` file (or from bytes)
serializes as its raw ModelProto, exactly as checkpoints have always stored
it. Anything else (a tokenizer.json, or a `.model` with a tokenizer_config)
serializes as an envelope, `ENVELOPE_MAGIC`, one line of JSON (kind, resolved
special tokens and ids, chat template), a newline, then the payload (the
tokenizer.json text as read, or the ModelProto). The magic cannot begin a
ModelProto (those start with field tag 0x0a), so `tokenizer_from_bytes` tells
the kinds apart. The payload is the file as read, not re-serialized, so the
bytes depend on the files only, not on the `tokenizers` version; checkpoints
compare them to detect a changed tokenizer.

Decoding keeps special tokens as text for Hugging Face tokenizers (as
transformers' `decode` does); SentencePiece control pieces (<s>, </s>) decode
to nothing. tokenizer_config's clean_up_tokenization_spaces is not applied.

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

from collections.abc import Iterator, Mapping, Sequence
import io
import json
import os
from typing import Any

import sentencepiece as spm
import tokenizers

from lmstack import assets
from lmstack.data import sources
from lmstack.errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# SentencePiece drops training sentences longer than max_sentence_length
# bytes; long lines (minified text, JSONL without newlines) are cut into
# chunks of this many characters (<= 4 bytes each) so they still count.
_MAX_LINE_CHARS = 4096

# First bytes of an enveloped tokenizer (see the module docstring). A
# serialized ModelProto starts with 0x0a (field 1, its pieces), never "l".
ENVELOPE_MAGIC = b"lmstack-tokenizer/1\n"
KINDS = ("sentencepiece", "hf")

# The files of a Hugging Face model directory that load_tokenizer reads.
HF_TOKENIZER_FILE = "tokenizer.json"
SP_TOKENIZER_FILE = "tokenizer.model"
_CONFIG_FILES = (
    "tokenizer_config.json", "generation_config.json", "config.json"
)
_CHAT_TEMPLATE_FILE = "chat_template.jinja"

_SPECIAL_KEYS = ("bos", "eos", "pad", "unk")

_first_line = sources._first_line  # pylint: disable=protected-access


class _TokenizerBase:
  """What both kinds share: special tokens, chat template, bytes, pickling.

  A subclass sets `_config` (the resolved special tokens, ids and chat
  template: what the envelope stores) and implements the model calls.
  """

  kind = ""
  name = "<bytes>"
  _config: dict[str, Any] | None = None

  # -- Special tokens.

  def _special_id(self, key: str) -> int:
    return int(self._config[f"{key}_id"])

  @property
  def pad_id(self) -> int:
    return self._special_id("pad")

  @property
  def unk_id(self) -> int:
    return self._special_id("unk")

  @property
  def bos_id(self) -> int:
    return self._special_id("bos")

  @property
  def eos_id(self) -> int:
    return self._special_id("eos")

  @property
  def eos_ids(self) -> list[int]:
    """Every id that ends a generation: eos_id first, then the ones that
    generation_config.json / config.json list (e.g. Llama 3's <|eot_id|>)."""
    return [int(i) for i in self._config["eos_ids"]]

  @property
  def special_tokens(self) -> dict[str, Any]:
    """Template variables: bos_token, eos_token, ... -> their strings (only
    those set), and additional_special_tokens (a list) when given."""
    return dict(self._config["special_tokens"])

  @property
  def chat_template(self) -> str | dict[str, str] | None:
    """The chat template: a string, {name: template} when the config lists
    several, or None (lmstack.data.chat then uses its ChatML fallback)."""
    template = self._config.get("chat_template")
    return dict(template) if isinstance(template, dict) else template

  # -- Bytes and pickling.

  def _payload(self) -> bytes:
    raise NotImplementedError

  def to_bytes(self) -> bytes:
    """Bytes that `tokenizer_from_bytes` turns back into this tokenizer."""
    header = json.dumps(
        {"kind": self.kind, "config": self._config},
        sort_keys=True, ensure_ascii=True, separators=(",", ":"),
    ).encode("ascii")
    return ENVELOPE_MAGIC + header + b"\n" + self._payload()

  def __getstate__(self):
    return {"bytes": self.to_bytes(), "name": self.name}

  def __setstate__(self, state):
    other = tokenizer_from_bytes(
        state["bytes"], name=state.get("name", "<bytes>"))
    self.__dict__.update(other.__dict__)

  def __repr__(self):
    return (
        f"{type(self).__name__}(vocab_size={self.vocab_size},"
        f" pad={self.pad_id}, bos={self.bos_id}, eos={self.eos_id})"
    )


class Tokenizer(_TokenizerBase):
  """A SentencePiece model that pickles as its serialized proto.

  grain may pickle map functions that hold a tokenizer (worker processes), and
  a SentencePieceProcessor cannot be pickled; so pickle the proto bytes and
  rebuild the processor from them on unpickling.

  `config` (from a Hugging Face directory's tokenizer_config.json, see
  `load_tokenizer`) overrides the special tokens of the proto and adds a chat
  template; without it `to_bytes` is the raw proto.
  """

  kind = "sentencepiece"

  def __init__(
      self,
      model_proto: bytes,
      *,
      config: Mapping[str, Any] | None = None,
      name: str = "<bytes>",
  ):
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor()
    self._sp.LoadFromSerializedProto(self._proto)
    self.name = name
    self._has_config = config is not None
    self._config = _normalize_config(
        self._proto_config() if config is None else config
    )
    _check_ids(self._config, self.vocab_size, name)

  def _proto_config(self) -> dict[str, Any]:
    ids = {
        "bos": self._sp.bos_id(), "eos": self._sp.eos_id(),
        "pad": self._sp.pad_id(), "unk": self._sp.unk_id(),
    }
    config = {f"{k}_id": i for k, i in ids.items()}
    config["special_tokens"] = {
        f"{k}_token": self._sp.IdToPiece(i) for k, i in ids.items() if i >= 0
    }
    config["eos_ids"] = [ids["eos"]] if ids["eos"] >= 0 else []
    return config

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    """Reads a `.model` file; `<pkg>/` paths point into the package."""
    return cls.from_bytes(_read_file(path), name=path)

  @classmethod
  def from_bytes(cls, model_proto: bytes, *, name: str = "<bytes>"):
    """A raw ModelProto, or the envelope of a SentencePiece `to_bytes`."""
    if bytes(model_proto[:len(ENVELOPE_MAGIC)]) == ENVELOPE_MAGIC:
      tok = tokenizer_from_bytes(model_proto, name=name)
      if not isinstance(tok, cls):
        raise DataError(
            f"tokenizer {name!r} is a {tok.kind} tokenizer, not SentencePiece;"
            " load it with tokenizer_from_bytes"
        )
      return tok
    try:
      return cls(model_proto, name=name)
    except (RuntimeError, OSError, TypeError) as e:
      raise DataError(
          f"tokenizer {name!r} is not a valid SentencePiece model"
          f" ({_first_line(e)})"
      ) from None

  def _payload(self) -> bytes:
    return self._proto

  def to_bytes(self) -> bytes:
    """The serialized ModelProto (an envelope when loaded with a config);
    `from_bytes` gives the same tokenizer."""
    return super().to_bytes() if self._has_config else self._proto

  def __getstate__(self):
    return {"proto": self._proto, "config": self._config if self._has_config
            else None, "name": self.name}

  def __setstate__(self, state):
    self.__init__(
        state["proto"], config=state.get("config"),
        name=state.get("name", "<bytes>"),
    )

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos."""
    return self._sp.EncodeAsIds(text)

  def encode_with_offsets(
      self, text: str
  ) -> tuple[list[int], list[tuple[int, int]]]:
    """`encode(text)` and each token's (start, end) character offsets; the
    byte pieces of one character all start at that character."""
    out = self._sp.Encode(text, return_type="offset_mapping")
    return list(out["ids"]), [tuple(o) for o in out["offsets"]]

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.DecodeIds([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    return self._sp.IdToPiece(int(i))

  def piece_to_id(self, piece: str) -> int:
    """The id of a piece, -1 if the vocabulary has no such piece."""
    i = self._sp.PieceToId(piece)
    # PieceToId maps every unknown piece to unk.
    return i if self._sp.IdToPiece(i) == piece else -1

  @property
  def vocab_size(self) -> int:
    return self._sp.GetPieceSize()


class HFTokenizer(_TokenizerBase):
  """A Hugging Face `tokenizers` tokenizer (a tokenizer.json file).

  Special tokens written in the text (e.g. "<|im_start|>" from a chat
  template) encode to their ids, as in transformers; `encode` adds none
  (the post-processor's bos is skipped).
  """

  kind = "hf"

  def __init__(
      self,
      tokenizer_json: bytes | str,
      config: Mapping[str, Any] | None = None,
      *,
      name: str = "<bytes>",
  ):
    if isinstance(tokenizer_json, str):
      tokenizer_json = tokenizer_json.encode("utf-8")
    self._json = bytes(tokenizer_json)
    self.name = name
    try:
      text = self._json.decode("utf-8")
      json.loads(text)  # A clear message for broken JSON (line, column).
      self._tok = tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
      raise DataError(
          f"tokenizer {name!r} is not a valid Hugging Face tokenizer.json"
          f" ({type(e).__name__}: {_first_line(e)})"
      ) from None
    self._tok_raw = None  # For encode_with_offsets, made on first use.
    vocab = self._tok.get_vocab(with_added_tokens=True)
    # Added tokens may sit above the model's vocabulary (or fill holes), so
    # size by the largest id: every id encode returns is < vocab_size.
    self._vocab_size = max(vocab.values(), default=-1) + 1
    self._set_config(config or {})

  def _set_config(self, config: Mapping[str, Any]):
    self._config = _normalize_config(config)
    _check_ids(self._config, self._vocab_size, self.name)

  def _payload(self) -> bytes:
    return self._json

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without added bos/eos."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(
      self, text: str
  ) -> tuple[list[int], list[tuple[int, int]]]:
    """`encode(text)` and each token's (start, end) character offsets.

    The offsets are untrimmed: a ByteLevel post-processor with trim_offsets
    would move a whitespace token's start onto the next character. Without
    special tokens added, post-processors leave the ids alone, so a copy
    without one gives the same ids with the true offsets.
    """
    if self._tok_raw is None:
      raw = tokenizers.Tokenizer.from_str(self._json.decode("utf-8"))
      raw.post_processor = None
      self._tok_raw = raw
    enc = self._tok_raw.encode(text, add_special_tokens=False)
    return enc.ids, [tuple(o) for o in enc.offsets]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def id_to_piece(self, i: int) -> str:
    piece = self._tok.id_to_token(int(i))
    if piece is None:
      raise IndexError(f"token id {i} is not in tokenizer {self.name!r}")
    return piece

  def piece_to_id(self, piece: str) -> int:
    """The id of a token, -1 if the vocabulary has no such token."""
    i = self._tok.token_to_id(piece)
    return -1 if i is None else int(i)

  @property
  def vocab_size(self) -> int:
    return self._vocab_size


AnyTokenizer = Tokenizer | HFTokenizer


def load_tokenizer(path: str) -> AnyTokenizer:
  """A tokenizer from a `.model` file, a tokenizer.json, a Hugging Face model
  directory or a file holding `to_bytes()` (see the module docstring).

  Args:
    path: the file or directory; `<pkg>/` points into the package.

  Returns:
    A `Tokenizer` (SentencePiece) or an `HFTokenizer`.

  Raises:
    DataError: (one line, naming the file) the path does not exist, a
      directory holds no tokenizer, or a file is corrupt.
  """
  resolved = assets.resolve(path)
  if os.path.isdir(resolved):
    return _load_directory(path, resolved)
  data = _read_file(path)
  if data.startswith(ENVELOPE_MAGIC):
    return tokenizer_from_bytes(data, name=path)
  # A serialized ModelProto starts with 0x0a (a newline), so look at the
  # name, or at a first byte "{" itself.
  if resolved.endswith(".json") or data.lstrip(b" \t\r")[:1] == b"{":
    return HFTokenizer(data, name=path)
  return Tokenizer.from_bytes(data, name=path)


def tokenizer_from_bytes(data: bytes, *, name: str = "<bytes>") -> AnyTokenizer:
  """The tokenizer of `to_bytes()`, of either kind; a raw SentencePiece
  ModelProto (what checkpoints stored before envelopes) loads too."""
  data = bytes(data)
  if not data.startswith(ENVELOPE_MAGIC):
    return Tokenizer.from_bytes(data, name=name)
  header, sep, payload = data[len(ENVELOPE_MAGIC):].partition(b"\n")
  try:
    meta = json.loads(header.decode("ascii")) if sep else None
  except ValueError:
    meta = None
  if not isinstance(meta, dict) or meta.get("kind") not in KINDS:
    raise DataError(
        f"tokenizer {name!r} has a damaged header (expected JSON with a kind"
        f" in {KINDS} after {ENVELOPE_MAGIC[:-1].decode()})"
    )
  if meta["kind"] == "hf":
    return HFTokenizer(payload, meta.get("config"), name=name)
  try:
    return Tokenizer(payload, config=meta.get("config"), name=name)
  except (RuntimeError, OSError, TypeError) as e:
    raise DataError(
        f"tokenizer {name!r} is not a valid SentencePiece model"
        f" ({_first_line(e)})"
    ) from None


# ---------------------------------------------------------------------------
# Reading files and Hugging Face configs.


def _read_file(path: str) -> bytes:
  try:
    with open(assets.resolve(path), "rb") as f:
      return f.read()
  except OSError as e:
    raise DataError(
        f"tokenizer not found: cannot read {path!r} ({e.strerror})"
    ) from None


def _read_json(path: str) -> dict[str, Any] | None:
  """A JSON object file, None if absent; a one-line DataError if broken."""
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(
        f"tokenizer config {path!r} is unreadable"
        f" ({type(e).__name__}: {_first_line(e)})"
    ) from None
  if not isinstance(obj, dict):
    raise DataError(f"tokenizer config {path!r} is not a JSON object")
  return obj


def _load_directory(path: str, resolved: str) -> AnyTokenizer:
  hf_file = os.path.join(resolved, HF_TOKENIZER_FILE)
  sp_file = os.path.join(resolved, SP_TOKENIZER_FILE)
  configs = {
      f: _read_json(os.path.join(resolved, f)) for f in _CONFIG_FILES
  }
  template_file = os.path.join(resolved, _CHAT_TEMPLATE_FILE)
  chat_template = None
  if os.path.exists(template_file):
    chat_template = _read_file(template_file).decode("utf-8", "replace")
  has_config = chat_template is not None or any(configs.values())
  if os.path.exists(hf_file):
    tok = HFTokenizer(_read_file(hf_file), name=hf_file)
    defaults = {}
  elif os.path.exists(sp_file):
    tok = Tokenizer.from_bytes(_read_file(sp_file), name=sp_file)
    if not has_config:
      return tok  # A bare model: to_bytes stays the raw proto.
    defaults = {
        k: tok._special_id(k)  # pylint: disable=protected-access
        for k in _SPECIAL_KEYS
    }
  else:
    raise DataError(
        f"tokenizer directory {path!r} holds no {HF_TOKENIZER_FILE} or"
        f" {SP_TOKENIZER_FILE}"
    )
  config = _resolve_config(
      configs, tok.piece_to_id, tok.id_to_piece, defaults,
      os.path.join(resolved, _CONFIG_FILES[0]),
  )
  if chat_template is not None:  # chat_template.jinja wins, as in transformers.
    config["chat_template"] = chat_template
  if isinstance(tok, HFTokenizer):
    tok.name = path
    tok._set_config(config)  # pylint: disable=protected-access
    return tok
  return Tokenizer(tok.to_bytes(), config=config, name=path)


def _token_content(value, where: str) -> str | None:
  """A special token of tokenizer_config.json: a string, an AddedToken dict
  ({"content": ..., ...}) or null."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, Mapping) and isinstance(value.get("content"), str):
    return value["content"]
  raise DataError(
      f"{where} is neither a string nor an AddedToken dict: {value!r:.80}"
  )


def _as_id_list(value) -> list[int]:
  if isinstance(value, bool):
    return []
  if isinstance(value, int):
    return [value]
  if isinstance(value, list):
    return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
  return []


def _resolve_config(configs, piece_to_id, id_to_piece, defaults, where):
  """Special tokens, ids and chat template from a model directory's configs.

  A special token named in tokenizer_config.json wins; else the first id in
  generation_config.json, then config.json; else `defaults` (the proto's, for
  SentencePiece); else -1.
  """
  tc = configs.get("tokenizer_config.json") or {}
  id_sources = [
      configs.get("generation_config.json") or {},
      configs.get("config.json") or {},
  ]
  config: dict[str, Any] = {}
  special_tokens: dict[str, Any] = {}
  # Every `*_token` of tokenizer_config (cls_token, mask_token, ...) becomes a
  # template variable, as transformers passes its special_tokens_map.
  for key, value in tc.items():
    if key.endswith("_token") and key[:-len("_token")] not in _SPECIAL_KEYS:
      if isinstance(value, Mapping):
        value = value.get("content")
      if isinstance(value, str):
        special_tokens[key] = value
  for key in _SPECIAL_KEYS:
    token = _token_content(tc.get(f"{key}_token"), f"{where}: {key}_token")
    if token is not None:
      i = piece_to_id(token)
      if i < 0:
        raise DataError(
            f"{where}: {key}_token {token!r} is not in the tokenizer's"
            " vocabulary"
        )
    else:
      ids = [
          ids[0] for ids in (_as_id_list(s.get(f"{key}_token_id"))
                             for s in id_sources) if ids
      ]
      i = ids[0] if ids else defaults.get(key, -1)
      token = _safe_piece(id_to_piece, i)
    config[f"{key}_id"] = i
    if token is not None:
      special_tokens[f"{key}_token"] = token
  extra = tc.get("additional_special_tokens")
  if isinstance(extra, list):
    special_tokens["additional_special_tokens"] = [
        _token_content(t, f"{where}: additional_special_tokens") for t in extra
    ]
  eos_ids = [config["eos_id"]]
  for s in id_sources:
    eos_ids += _as_id_list(s.get("eos_token_id"))
  config["eos_ids"] = list(dict.fromkeys(i for i in eos_ids if i >= 0))
  config["special_tokens"] = special_tokens
  config["chat_template"] = _chat_template(tc.get("chat_template"), where)
  return config


def _safe_piece(id_to_piece, i: int) -> str | None:
  if i < 0:
    return None
  try:
    return id_to_piece(i)
  except (IndexError, ValueError):
    return None  # Reported by _check_ids.


def _chat_template(value, where: str) -> str | dict[str, str] | None:
  """tokenizer_config's chat_template: a string, or a list of
  {"name": ..., "template": ...} -> {name: template}."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, list) and all(
      isinstance(t, Mapping) and isinstance(t.get("name"), str)
      and isinstance(t.get("template"), str) for t in value
  ):
    return {t["name"]: t["template"] for t in value}
  raise DataError(
      f"{where}: chat_template is neither a string nor a list of"
      " {\"name\", \"template\"} objects"
  )


def _normalize_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """The stored config: every key present, JSON types only (so that bytes
  and pickles round-trip exactly)."""
  out = {f"{k}_id": int(config.get(f"{k}_id", -1)) for k in _SPECIAL_KEYS}
  eos_ids = config.get("eos_ids")
  if eos_ids is None:
    eos_ids = [out["eos_id"]] if out["eos_id"] >= 0 else []
  out["eos_ids"] = [int(i) for i in eos_ids]
  out["special_tokens"] = dict(config.get("special_tokens") or {})
  out["chat_template"] = config.get("chat_template")
  return out


def _check_ids(config: Mapping[str, Any], vocab_size: int, name: str):
  ids = [config[f"{k}_id"] for k in _SPECIAL_KEYS] + list(config["eos_ids"])
  bad = [i for i in ids if i >= vocab_size or i < -1]
  if bad:
    raise DataError(
        f"tokenizer {name!r}: special token id {bad[0]} is outside its"
        f" vocabulary of {vocab_size}"
    )


# ---------------------------------------------------------------------------
# Training (tools/train_tokenizer.py).


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
