"""Document sources: text, JSONL, ArrayRecord, TFDS, each a grain.MapDataset.

A *document* is the unit the pipeline shuffles, shards and wraps in bos/eos
(lmstack/data/pipeline.py). Each reader returns a `grain.MapDataset` whose
elements are documents: `str` for text, JSONL and TFDS text fields, or an int32
numpy array of token ids for ArrayRecord files (already tokenized by
tools/prepare_data.py) and integer TFDS features.

  ds = text_source("lmstack/assets/corpus/train.txt")
  ds = jsonl_source("data/*.jsonl.gz", field="text")
  ds = array_record_source("data/tokens-*.array_record")
  ds = tfds_source("my_corpus:1.0.0", "train", data_dir="~/tfds", field="text")

Paths are comma-separated strings or lists; each entry may be a glob and may
start with `<pkg>/` (see lmstack/assets). Text and JSONL files are read into
memory, which is right for corpora up to a few GB; convert anything bigger to
ArrayRecord once with tools/prepare_data.py, which is also the fast path on TPU
hosts because nothing is tokenized during training.

Bad input raises `DataError` with one line naming the file: a path or glob
that matches nothing, a JSONL line that is not JSON or lacks the field, a
corpus without a single non-empty document. A few invalid UTF-8 bytes are
*not* an error: they (and, in JSONL, escapes of lone surrogates) are replaced
with U+FFFD and one warning per file gives the count, because one stray byte in
a multi-GB crawl should not kill a training run. A file that does not look like
text is refused: one with NUL bytes, or with more than MAX_INVALID_SHARE of its
bytes invalid UTF-8 (a binary file, or text in another encoding such as
Latin-1). `config.data.allow_invalid_text=True` (the `invalid_text_allowed`
context) reads such files anyway, with the replacement.
"""

from collections.abc import Sequence
import contextlib
import contextvars
import glob
import gzip
import json
import logging
import os
import re

import grain
import numpy as np

from lmstack import assets
from lmstack.errors import DataError

# Botchan (and many crawls) has one sentence per line and no blank lines, so
# "a run of non-empty lines" would make the whole book one document: one
# shuffle unit, and one bos per book. Capping a document at ~4 KB of text
# (about 1,000 tokens, one long training row) keeps hundreds of shuffle units in
# such files, while real paragraphs, far shorter than 4 KB, are never cut.
MAX_DOC_CHARS = 4096

# Above this share of invalid UTF-8 bytes a file is not text (or not UTF-8): 1 in 1,000. Real UTF-8
# corpora with stray bytes sit far below it (a mis-encoded byte every few pages), while Latin-1 prose has
# about 1-3 % non-ASCII bytes and a binary file mostly invalid ones.
MAX_INVALID_SHARE = 1e-3
_ALLOW_INVALID = contextvars.ContextVar("allow_invalid_text", default=False)

_GLOB_CHARS = re.compile(r"[*?\[]")
_SURROGATE_ESCAPES = re.compile("[\udc80-\udcff]")
# In JSON text: an escaped surrogate (json.loads pairs what it can); in a str: one left unpaired.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_SURROGATES = re.compile("[\ud800-\udfff]")

PathsArg = str | Sequence[str]


def expand_paths(paths: PathsArg, *, what: str = "data file") -> list[str]:
  """Expands comma-separated paths and globs into a sorted list of files.

  Args:
    paths: "a.txt,dir/*.jsonl" or ["a.txt", "dir/*.jsonl"].
    what: how the error message names the files ("data file", "tokenizer").

  Returns:
    Files in the order given; each glob's matches sorted, so that the document
    order (and hence shuffling and sharding) does not depend on the file system.
  """
  if isinstance(paths, str):
    paths = paths.split(",")
  entries = [p.strip() for p in paths if p and p.strip()]
  if not entries:
    raise DataError(
        f"no {what} given (expected comma-separated paths or globs)"
    )
  files = []
  for entry in entries:
    path = assets.resolve(entry)
    if _GLOB_CHARS.search(path):
      matches = sorted(p for p in glob.glob(path) if os.path.isfile(p))
    else:
      matches = [path] if os.path.isfile(path) else []
    if not matches:
      raise DataError(f"{what} not found: {entry!r} matches no file")
    files.extend(matches)
  return files


@contextlib.contextmanager
def invalid_text_allowed(allowed: bool = True):
  """Within the block, read_text accepts files that do not look like text (see the module docstring)."""
  token = _ALLOW_INVALID.set(bool(allowed))
  try:
    yield
  finally:
    _ALLOW_INVALID.reset(token)


def read_text(path: str) -> str:
  """Reads a UTF-8 file (`.gz` too), replacing invalid bytes with U+FFFD.

  A leading BOM is dropped and CRLF line ends become "\\n". A file with NUL
  bytes or more than MAX_INVALID_SHARE invalid bytes raises DataError unless
  `invalid_text_allowed`.
  """
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        data = f.read()
    else:
      with open(path, "rb") as f:
        data = f.read()
  except (OSError, EOFError) as e:
    raise DataError(f"cannot read {path}: {e}") from None
  num_bad = 0
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    # surrogateescape maps each bad byte to one lone surrogate, which gives an
    # exact count; "replace" would merge a bad sequence into one U+FFFD.
    text = data.decode("utf-8", errors="surrogateescape")
    text, num_bad = _SURROGATE_ESCAPES.subn("\ufffd", text)
  num_nul = data.count(0)
  if (num_nul or num_bad > MAX_INVALID_SHARE * len(data)) and not _ALLOW_INVALID.get():
    what = (f"{num_nul:,} NUL bytes" if num_nul else
            f"{num_bad:,} of its {len(data):,} bytes ({num_bad / len(data):.1%}) are not UTF-8")
    raise DataError(f"{path} does not look like UTF-8 text ({what}; the limit is {MAX_INVALID_SHARE:.1%} "
                    "invalid and no NUL); set config.data.allow_invalid_text=True to read it anyway")
  if num_bad:
    logging.warning(
        "%s: %d invalid UTF-8 bytes replaced with U+FFFD", path, num_bad
    )
  # A BOM is not part of the first line, and Windows line ends are newlines.
  return text.removeprefix("\ufeff").replace("\r\n", "\n")


def split_documents(text: str, max_doc_chars: int = MAX_DOC_CHARS) -> list[str]:
  """Splits plain text into documents: runs of non-blank lines.

  A document also ends before a line that would take it past `max_doc_chars`
  (see MAX_DOC_CHARS); a single longer line stays whole. Trailing whitespace is
  dropped from each line, leading whitespace (verse, code) is kept.
  """
  docs, lines, size = [], [], 0
  for line in text.split("\n"):
    line = line.rstrip()
    if lines and (not line or size + len(line) + 1 > max_doc_chars):
      docs.append("\n".join(lines))
      lines, size = [], 0
    if line:
      lines.append(line)
      size += len(line) + 1
  if lines:
    docs.append("\n".join(lines))
  return docs


def text_documents(
    paths: PathsArg, *, max_doc_chars: int = MAX_DOC_CHARS
) -> list[str]:
  """All documents of plain-text files, in file order."""
  files = expand_paths(paths)
  docs = []
  for path in files:
    docs.extend(split_documents(read_text(path), max_doc_chars))
  return _check_not_empty(docs, files)


def jsonl_documents(paths: PathsArg, *, field: str = "text") -> list[str]:
  """The `field` of every record of JSONL files (`.gz` too), in file order.

  Blank lines are skipped, and so are records whose text is empty. A line that
  is not a JSON object with a string `field` raises DataError naming file:line.
  """
  files = expand_paths(paths)
  docs = []
  for where, record in jsonl_records(files):
    if field not in record:
      raise DataError(
          f"{where}: record has no field {field!r} (fields: {field_names(record)});"
          " set data.jsonl_field"
      )
    value = record[field]
    if not isinstance(value, str):
      raise DataError(
          f"{where}: field {field!r} is a {type(value).__name__},"
          " expected a string"
      )
    if value.strip():
      docs.append(value)
  return _check_not_empty(docs, files)


def jsonl_records(paths: PathsArg):
  """Yields ("file:line", record) for every JSON object of JSONL files (`.gz`
  too), skipping blank lines. A line that is not valid JSON, or not an
  object, raises DataError naming file:line.

  Like invalid UTF-8 (read_text), a lone surrogate escape ("\\ud800", which
  no tokenizer can encode) becomes U+FFFD, with one warning per file.
  """
  for path in expand_paths(paths):
    num_bad = 0
    for lineno, line in enumerate(read_text(path).split("\n"), start=1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
      except (ValueError, RecursionError) as e:  # a 5,000-digit number; arrays nested 100,000 deep
        raise DataError(f"{where}: not valid JSON ({_first_line(e)})") from None
      if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
      if _SURROGATE_ESCAPE.search(line):
        num_bad += _replace_lone_surrogates(record)
      yield where, record
    if num_bad:
      logging.warning("%s: %d lone surrogate escapes replaced with U+FFFD", path, num_bad)


def field_names(record: dict, limit: int = 200) -> str:
  """A record's keys for a one-line message: unprintable ones quoted, the list cut at `limit` characters."""
  text = ", ".join(k if isinstance(k, str) and k.isprintable() else repr(k) for k in record)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _replace_lone_surrogates(record) -> int:
  """Replaces lone surrogates in the strings of a JSON value, in place; returns how many."""
  count, stack = 0, [record]
  while stack:  # not recursive: JSON may nest as deep as the parser allowed
    node = stack.pop()
    for key, value in list(node.items() if isinstance(node, dict) else enumerate(node)):
      if isinstance(value, str):
        value, n = _LONE_SURROGATES.subn("\ufffd", value)
        if n:
          node[key], count = value, count + n
      elif isinstance(value, (dict, list)):
        stack.append(value)
  return count


def text_source(
    paths: PathsArg, *, max_doc_chars: int = MAX_DOC_CHARS
) -> grain.MapDataset:
  """Plain-text files as a MapDataset of `str` documents (split_documents)."""
  return grain.MapDataset.source(
      text_documents(paths, max_doc_chars=max_doc_chars)
  )


def jsonl_source(paths: PathsArg, field: str = "text") -> grain.MapDataset:
  """JSONL files as a MapDataset of `str` documents, one per record."""
  return grain.MapDataset.source(jsonl_documents(paths, field=field))


def decode_token_record(record: bytes) -> np.ndarray:
  """One ArrayRecord record (little-endian int32 bytes) -> int32 token ids."""
  if len(record) % 4:
    raise DataError(
        f"ArrayRecord record of {len(record)} bytes is not int32 token ids;"
        " write the files with tools/prepare_data.py"
    )
  return np.frombuffer(record, dtype="<i4").astype(np.int32)


def array_record_source(paths: PathsArg) -> grain.MapDataset:
  """Pre-tokenized ArrayRecord files as a MapDataset of int32 id arrays.

  Each record is one document's token ids without bos/eos, as written by
  tools/prepare_data.py (lmstack/data/prepare.py); the pipeline adds them.
  """
  files = expand_paths(paths)
  try:
    source = grain.sources.ArrayRecordDataSource(files)
    num_records = len(source)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(
        f"cannot open ArrayRecord files {', '.join(files)}: {_first_line(e)}"
    ) from None
  if not num_records:
    raise DataError(f"empty corpus: no record in {', '.join(files)}")
  return grain.MapDataset.source(source).map(decode_token_record)


class TfdsField:
  """Picks one feature of a TFDS example: text -> str, integer array -> ids."""

  def __init__(self, field: str):
    self.field = field

  def __call__(self, example):
    value = example[self.field]
    if isinstance(value, bytes):
      return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.integer):
      return value.astype(np.int32)
    return str(value)


def tfds_source(
    name: str, split: str, data_dir: str | None = None, field: str = "text"
) -> grain.MapDataset:
  """A prepared TFDS dataset through `tfds.data_source` (no TensorFlow).

  The dataset must have been prepared with `file_format="array_record"`,
  the only format tfds reads without TensorFlow. `field` names a Text feature
  (documents) or an integer Sequence/Tensor feature (pre-tokenized ids).
  """
  import tensorflow_datasets as tfds  # Heavy import, only when used.

  if not name:
    raise DataError("data.tfds_name is empty (expected e.g. 'my_corpus:1.0.0')")
  data_dir = assets.resolve(data_dir) if data_dir else None
  where = f"tfds dataset {name!r} split {split!r} (data_dir={data_dir!r})"
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir)
    num_records = len(source)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"cannot open {where}: {_first_line(e)}") from None
  if not num_records:
    raise DataError(f"empty corpus: {where} has no example")
  example = source[0]
  if field not in example:
    raise DataError(
        f"{where}: examples have no field {field!r} (fields:"
        f" {', '.join(example)}); set data.jsonl_field"
    )
  return grain.MapDataset.source(source).map(TfdsField(field))


def _check_not_empty(docs: list[str], files: list[str]) -> list[str]:
  if not docs:
    raise DataError(
        f"empty corpus: no non-empty document in {', '.join(files)}"
    )
  return docs


def _first_line(e: Exception) -> str:
  lines = str(e).strip().splitlines()
  return lines[0] if lines else type(e).__name__
