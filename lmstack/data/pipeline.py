"""Grain pipeline for language modelling: packed next-token batches.

  tok = load_tokenizer(config.data.tokenizer)
  ds = make_lm_dataset(config.data, tok, seq_len=512, batch_size=8, seed=0)
  it = iter(ds)
  batch = next(it)          # dict of int32 [batch_size, seq_len] numpy arrays
  state = it.get_state()    # JSON-serialisable; it.set_state(state) resumes

What a batch holds. Each document becomes `[bos] + ids + [eos]` and is cut
into pieces of at most seq_len + 1 tokens that overlap by one token, so that
every token after bos is a target exactly once. A piece gives
inputs = piece[:-1], targets = piece[1:]; pieces are packed first-fit into
rows of seq_len (grain.experimental.FirstFitPackIterDataset):

  inputs       token ids, 0 on padding
  targets      the next token of each input, 0 on padding
  segment_ids  1..k for the k pieces in a row, 0 on padding: attention and
               the loss must mask with it (packed pieces never see each other)
  positions    0, 1, ... restarting at every piece

Train split: documents are shuffled globally with `seed`, differently in each
epoch, and repeat forever. Eval split: one pass in file order; the last batch
is padded with all-zero rows (segment_ids 0), so eval shapes stay static and no
document is dropped. With several processes, process `shard_index` of
`shard_count` reads every shard_count-th document (a disjoint slice) and
`batch_size` is the per-process batch.

Iterator state is a small nested dict of ints, e.g.
  {"parent": {"parent": {"next_index": 812}, "next_index_in_buffer": 0},
   "next_row": 3, "counter": 27}
valid only for the same data config, seq_len, batch_size, seed and shard.
"""

import atexit
from collections.abc import Iterable
import math
import weakref

import grain
import ml_collections
import numpy as np

from lmstack.data import sources
from lmstack.data.tokenizer import AnyTokenizer, load_tokenizer
from lmstack.errors import ConfigError, DataError

FORMATS = ("text", "jsonl", "array_record", "tfds")
SPLITS = ("train", "eval")

# Documents tokenized ahead by grain's reader threads, and batches made ahead by
# one more thread, so that the trainer's next() rarely waits.
_READ_THREADS = 2
_READ_BUFFER = 64
_BATCH_PREFETCH = 2


def documents(data_cfg: ml_collections.ConfigDict, split: str):
  """The document source of a split, as chosen by `data_cfg.format`."""
  _check_split(split)
  fmt = data_cfg.format
  if fmt == "tfds":
    tfds_split = (
        data_cfg.tfds_train_split if split == "train"
        else data_cfg.tfds_eval_split
    )
    # data.jsonl_field also names the TFDS feature: one "text field" knob.
    return sources.tfds_source(
        data_cfg.tfds_name, tfds_split, data_cfg.tfds_data_dir or None,
        field=data_cfg.jsonl_field,
    )
  files = data_cfg.train_files if split == "train" else data_cfg.eval_files
  if fmt == "text":
    return sources.text_source(files)
  if fmt == "jsonl":
    return sources.jsonl_source(files, field=data_cfg.jsonl_field)
  if fmt == "array_record":
    return sources.array_record_source(files)
  raise ConfigError(
      f"data.format: expected one of {'|'.join(FORMATS)}, got {fmt!r}"
  )


class Tokenize:
  """Document -> int32 ids (no bos/eos); pre-tokenized arrays pass through."""

  def __init__(self, tokenizer: AnyTokenizer):
    self.tokenizer = tokenizer

  def __call__(self, doc) -> np.ndarray:
    if isinstance(doc, np.ndarray):
      return doc.astype(np.int32, copy=False)
    return np.asarray(self.tokenizer.encode(doc), dtype=np.int32)


class Pieces(grain.experimental.FlatMapTransform):
  """Token ids -> next-token pieces {inputs, targets} of <= seq_len each."""

  max_fan_out = 1 << 20  # Only read by MapDataset.flat_map; we use IterDataset.

  def __init__(self, seq_len: int, bos_id: int, eos_id: int):
    self.seq_len, self.bos_id, self.eos_id = seq_len, bos_id, eos_id

  def flat_map(self, ids: np.ndarray) -> list[dict[str, np.ndarray]]:
    if not len(ids):  # An empty record would be a lone bos -> eos.
      return []
    tokens = np.concatenate(
        [[self.bos_id], ids, [self.eos_id]]
    ).astype(np.int32)
    pieces = []
    # Stride seq_len, length seq_len + 1: the last token of one piece is the
    # first input of the next, so no target is lost at a cut.
    for start in range(0, len(tokens) - 1, self.seq_len):
      piece = tokens[start:start + self.seq_len + 1]
      pieces.append({"inputs": piece[:-1], "targets": piece[1:]})
    return pieces


def check_some_tokens(docs, tokenize, what: str):
  """DataError unless some document of `docs` has a token: a repeating split
  of documents that all tokenize to nothing would never fill a row."""
  if not any(len(tokenize(docs[i])) for i in range(len(docs))):  # stops at the first
    raise DataError(f"empty corpus: no document of {what} has a token")


def _where(data_cfg, split: str) -> str:
  if data_cfg.format == "tfds":
    return f"tfds {data_cfg.tfds_name}"
  return data_cfg.train_files if split == "train" else data_cfg.eval_files


def _rename_packed(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  # The packer gives segment ids and positions per feature; inputs and
  # targets are packed identically, so one copy is enough.
  return {
      "inputs": packed["inputs"],
      "targets": packed["targets"],
      "segment_ids": packed["inputs_segment_ids"],
      "positions": packed["inputs_positions"],
  }


class PadBatch:
  """Pads a short final batch with all-zero rows (segment_ids 0)."""

  def __init__(self, batch_size: int):
    self.batch_size = batch_size

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    missing = self.batch_size - len(batch["inputs"])
    if not missing:
      return batch
    return {k: np.pad(v, ((0, missing), (0, 0))) for k, v in batch.items()}


def make_lm_dataset(
    data_cfg: ml_collections.ConfigDict,
    tokenizer: AnyTokenizer | None,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    split: str = "train",
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.IterDataset:
  """Packed LM batches of one split (see the module docstring).

  Args:
    data_cfg: the `data` config (format, train_files, eval_files, ...).
    tokenizer: the tokenizer; None loads `data_cfg.tokenizer`.
    seq_len: tokens per row.
    batch_size: rows per batch, per process.
    seed: shuffle seed (train split only).
    split: "train" (shuffled, repeats forever) or "eval" (one pass).
    shard_index: this process's index, in [0, shard_count).
    shard_count: number of processes reading the data.

  Returns:
    An IterDataset of dicts with int32 `inputs`, `targets`, `segment_ids`,
    `positions`, each [batch_size, seq_len].
  """
  _check_split(split)
  if seq_len < 1 or batch_size < 1:
    raise ConfigError(
        f"seq_len={seq_len} and batch_size={batch_size} must be >= 1"
    )
  if not 0 <= shard_index < shard_count:
    raise ConfigError(
        f"shard_index={shard_index} must be in [0, shard_count={shard_count})"
    )
  if tokenizer is None:
    tokenizer = load_tokenizer(data_cfg.tokenizer)
  if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
    raise DataError(
        f"data.tokenizer {data_cfg.get('tokenizer', '')!r} has no bos or eos"
        " piece (expected bos=2, eos=3; see tools/train_tokenizer.py)"
    )

  ds = documents(data_cfg, split)
  num_docs = len(ds)
  # Shard before shuffling: each process owns a fixed, disjoint set of
  # documents, and the shuffle permutes that set.
  ds = ds[shard_index::shard_count]
  if not len(ds):
    raise DataError(
        f"empty corpus: shard {shard_index} of {shard_count} has no document"
        f" ({num_docs} documents in the {split} split)"
    )
  tokenize = Tokenize(tokenizer)
  check_some_tokens(ds, tokenize, f"the {split} split ({_where(data_cfg, split)})")
  if split == "train":
    # shuffle-then-repeat reshuffles every epoch (seed + epoch).
    ds = ds.shuffle(seed=int(seed) % 2**32).repeat()
  ds = ds.map(tokenize)
  it_ds = ds.to_iter_dataset(
      grain.ReadOptions(
          num_threads=_READ_THREADS, prefetch_buffer_size=_READ_BUFFER
      )
  )
  it_ds = grain.experimental.FlatMapIterDataset(
      it_ds, Pieces(seq_len, tokenizer.bos_id, tokenizer.eos_id)
  )
  # One bin per row of a batch; the documents are already shuffled, so the
  # bins need not be, and an unshuffled order is easier to check.
  it_ds = grain.experimental.FirstFitPackIterDataset(
      it_ds,
      length_struct={"inputs": seq_len, "targets": seq_len},
      num_packing_bins=batch_size,
      shuffle_bins=False,
  )
  it_ds = it_ds.map(_rename_packed)
  if split == "train":
    it_ds = it_ds.batch(batch_size, drop_remainder=True)
  else:
    it_ds = it_ds.batch(batch_size, drop_remainder=False)
    it_ds = it_ds.map(PadBatch(batch_size))
  return _ThreadPrefetch(it_ds, _BATCH_PREFETCH)


# A prefetching iterator still alive at interpreter exit makes grain 0.2.18
# print "Exception ignored in DatasetIterator.__del__": its close() is not
# idempotent and reads module globals that teardown has already cleared. So
# close live iterators at exit, and make a second close() a no-op.
_LIVE_ITERATORS = weakref.WeakSet()


class _PrefetchIterator(grain.experimental.ThreadPrefetchDatasetIterator):

  def close(self):
    if not self._closed:
      super().close()


class _ThreadPrefetch(grain.IterDataset):
  """grain's ThreadPrefetchIterDataset, with a quiet exit (see above)."""

  def __init__(self, parent: grain.IterDataset, prefetch_buffer_size: int):
    super().__init__(parent)
    self._prefetch_buffer_size = prefetch_buffer_size

  def __iter__(self):
    it = _PrefetchIterator(self._parent.__iter__(), self._prefetch_buffer_size)
    _LIVE_ITERATORS.add(it)
    return it


@atexit.register
def _close_live_iterators():
  for it in list(_LIVE_ITERATORS):
    it.close()


# ---------------------------------------------------------------------------
# Unigram baseline: the loss a model without context would reach.


def split_tokens(
    data_cfg: ml_collections.ConfigDict,
    tokenizer: AnyTokenizer | None,
    split: str,
    *,
    max_documents: int | None = None,
) -> np.ndarray:
  """The target tokens of one pass over a split: each document's ids + eos.

  These are exactly the tokens the model is scored on (bos is never a target),
  in file order. ~0.3 s for the 1.8 MB default corpus.
  """
  if tokenizer is None:
    tokenizer = load_tokenizer(data_cfg.tokenizer)
  ds = documents(data_cfg, split)
  if max_documents is not None:
    ds = ds[:max_documents]
  tokenize = Tokenize(tokenizer)
  eos = np.asarray([tokenizer.eos_id], np.int32)
  parts = []
  # Indexing, not iter(ds): iterating a MapDataset starts grain's reader
  # thread pool, ten times slower here for a one-pass count.
  for i in range(len(ds)):
    ids = tokenize(ds[i])
    if len(ids):
      parts.extend((ids, eos))
  return np.concatenate(parts) if parts else np.zeros([0], np.int32)


def _token_counts(tokens, minlength: int) -> np.ndarray:
  """Counts of each id in an int array, an iterable of int arrays, or of
  batches from make_lm_dataset (targets where segment_ids > 0)."""
  if isinstance(tokens, np.ndarray):
    return np.bincount(tokens.ravel().astype(np.int64), minlength=minlength)
  counts = np.zeros([minlength], np.int64)
  for item in tokens:
    if isinstance(item, dict):
      item = item["targets"][item["segment_ids"] > 0]
    c = np.bincount(np.asarray(item, np.int64).ravel(), minlength=minlength)
    if len(c) > len(counts):
      counts = np.pad(counts, (0, len(c) - len(counts)))
    counts[:len(c)] += c
  return counts


def unigram_cross_entropy(
    train_tokens: np.ndarray | Iterable,
    eval_tokens: np.ndarray | Iterable,
    vocab_size: int | None = None,
) -> float:
  """Cross-entropy (nats/token) of eval under an add-one unigram model of train.

  The best model that ignores context scores about this; a trained LM's
  held-out loss should fall well below it. p(w) = (count_train(w) + 1) /
  (N_train + V), summed over the V ids of the vocabulary.

  Args:
    train_tokens: int array of token ids, an iterable of such arrays, or a
      finite iterable of make_lm_dataset batches (their scored targets).
    eval_tokens: the same, for the held-out tokens.
    vocab_size: V; default: 1 + the largest id seen.

  Returns:
    -mean log p(eval token), in nats.
  """
  train = _token_counts(train_tokens, vocab_size or 0)
  evals = _token_counts(eval_tokens, vocab_size or 0)
  vocab = max(vocab_size or 0, len(train), len(evals))
  train = np.pad(train, (0, vocab - len(train)))
  evals = np.pad(evals, (0, vocab - len(evals)))
  if not evals.sum():
    raise DataError("unigram_cross_entropy: no eval tokens")
  log_p = np.log(train + 1.0) - math.log(train.sum() + vocab)
  return float(-(evals * log_p).sum() / evals.sum())


def _check_split(split: str):
  if split not in SPLITS:
    raise ConfigError(f"split: expected one of {SPLITS}, got {split!r}")
