"""A weighted mixture of language-modelling sources (annealing, domain extension).

  config.data.kind = "mixture"          # lmstack/data/datasets.py dispatches here
  ds = make_mixture_dataset(config.data, tok, seq_len=256, batch_size=16, seed=0)
  it = iter(ds); batch = next(it)       # the same dict of int32 [B, T] arrays as
  state = it.get_state()                # lmstack/data/pipeline.py; JSON state

`config.data.sources` names the sources, each a ConfigDict (see
`configs/common.py: mixture_data` for the shipped quality mix):

  weight       share of the *scored tokens* of the train split (normalised;
               0 turns a source off)
  format       text | jsonl | wordnet (JSONL rows {"words","pos","gloss"},
               rendered "dog, domestic dog (noun): a member of the genus Canis")
  train_files  comma-separated globs (`<pkg>/` points into the package)
  eval_files   its held-out files; "" holds out every `data.holdout_every`-th
               document of train_files instead (after chunking, see below)
  jsonl_field  the text field of `jsonl` rows
  max_eval_docs  evenly spaced held-out documents kept (0: all), to bound eval time

Documents. Text files split as in pre-training (sources.text_documents); a
JSONL document longer than `data.chunk_chars` is cut at paragraph breaks into
chunks of at most that many characters (blank lines kept), so a 80 KB manual
page is many shuffle units and the held-out split has every part of the docs.

How sources mix. Each source is packed into rows on its own, exactly as
pre-training packs its corpus (shuffled with a seed derived from `seed` and its
index, repeated forever), and the mixture takes whole rows: the next row comes
from the source whose scored tokens so far, divided by its weight, are
smallest. The realised token shares therefore match the weights to within one
row at every step, for any seed, and a row never mixes sources. The iterator
state is {"parents": [each source's pipeline state], "tokens": [scored tokens
per source], "done": [...]}, so a resumed run sees exactly the same batches.

The eval split is one pass over every source's held-out documents (rows still
interleaved by weight until each source is exhausted), the last batch padded
with segment_ids-0 rows, as in pre-training. `only_source(data_cfg, name)` is
the config of one source alone, for a per-source held-out loss.
"""

import functools
import gzip
import json

import grain
import ml_collections
import numpy as np

from lmstack.data import pipeline, sources
from lmstack.data.tokenizer import AnyTokenizer, load_tokenizer
from lmstack.errors import ConfigError, DataError, show

FORMATS = ("text", "jsonl", "wordnet")
_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


# ---------------------------------------------------------------------------
# Documents of one source


def chunk_text(text: str, max_chars: int) -> list[str]:
  """Cuts `text` at blank lines (then at line ends) into chunks <= max_chars.

  Paragraphs are joined back with their blank line; a single line longer than
  `max_chars` stays whole (as in sources.split_documents).
  """
  if len(text) <= max_chars:
    return [text] if text.strip() else []
  chunks, cur = [], ""
  for para in text.split("\n\n"):
    parts = [para] if len(para) <= max_chars else para.split("\n")
    sep = "\n\n" if len(parts) == 1 else "\n"
    for i, part in enumerate(parts):
      joiner = sep if i else "\n\n"
      if cur and len(cur) + len(joiner) + len(part) > max_chars:
        chunks.append(cur)
        cur = ""
      cur = cur + joiner + part if cur else part
  if cur.strip():
    chunks.append(cur)
  return [c for c in chunks if c.strip()]


def render_wordnet(row: dict) -> str:
  """{"words": ["dog", "domestic_dog"], "pos": "n", "gloss": ...} -> one line."""
  words = ", ".join(w.replace("_", " ") for w in row["words"])
  return f"{words} ({_POS.get(row['pos'], row['pos'])}): {row['gloss']}"


def _wordnet_documents(paths) -> list[str]:
  docs = []
  for path in sources.expand_paths(paths):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
      for lineno, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          docs.append(render_wordnet(json.loads(line)))
        except (ValueError, KeyError, TypeError, AttributeError):
          raise DataError(f"{path}:{lineno}: not a WordNet row {{\"words\", \"pos\", \"gloss\"}}") from None
  if not docs:
    raise DataError(f"empty corpus: no WordNet row in {paths}")
  return docs


@functools.lru_cache(maxsize=16)
def _documents(fmt: str, files: str, field: str, chunk_chars: int) -> tuple[str, ...]:
  """All documents of a source's files, in file order (cached: eval rebuilds
  its dataset at every evaluation)."""
  if fmt == "text":
    return tuple(sources.text_documents(files, max_doc_chars=chunk_chars))
  if fmt == "jsonl":
    docs = sources.jsonl_documents(files, field=field)
    return tuple(c for d in docs for c in chunk_text(d, chunk_chars))
  if fmt == "wordnet":
    return tuple(_wordnet_documents(files))
  raise ConfigError(f"data.sources.*.format={fmt!r}; expected one of {'|'.join(FORMATS)}")


def source_documents(src: ml_collections.ConfigDict, split: str, holdout_every: int,
                     chunk_chars: int) -> list[str]:
  """The documents of one split of one source (see the module docstring)."""
  field = src.get("jsonl_field", "text")
  if src.get("eval_files"):
    files = src.train_files if split == "train" else src.eval_files
    docs = list(_documents(src.format, files, field, chunk_chars))
  else:
    if holdout_every < 2:
      raise ConfigError(f"data.holdout_every={holdout_every} must be >= 2 (or give the source eval_files)")
    every = _documents(src.format, src.train_files, field, chunk_chars)
    keep = (lambda j: j % holdout_every != 0) if split == "train" else (lambda j: j % holdout_every == 0)
    docs = [d for j, d in enumerate(every) if keep(j)]
  cap = src.get("max_eval_docs", 0)
  if split == "eval" and cap and len(docs) > cap:
    docs = [docs[int(i)] for i in np.linspace(0, len(docs) - 1, cap).round()]
  return docs


# ---------------------------------------------------------------------------
# Mixing packed rows by scored tokens


class _MixIterator(grain.DatasetIterator):
  """Takes the next row from the source furthest below its token share."""

  def __init__(self, parents, weights, finite):
    super().__init__(parents)
    self._weights = weights
    self._finite = finite
    self._tokens = [0] * len(parents)
    self._done = [False] * len(parents)

  def __next__(self):
    while True:
      live = [i for i in range(len(self._parents)) if not self._done[i]]
      if not live:
        raise StopIteration
      i = min(live, key=lambda j: (self._tokens[j] / self._weights[j], j))
      try:
        row = next(self._parents[i])
      except StopIteration:
        if not self._finite:
          raise DataError("a train source of the mixture ran out of rows") from None
        self._done[i] = True
        continue
      self._tokens[i] += int(np.count_nonzero(row["segment_ids"]))
      return row

  def get_state(self):
    return {"parents": [p.get_state() for p in self._parents], "tokens": list(self._tokens),
            "done": list(self._done)}

  def set_state(self, state):
    for parent, parent_state in zip(self._parents, state["parents"]):
      parent.set_state(parent_state)
    self._tokens = [int(t) for t in state["tokens"]]
    self._done = [bool(d) for d in state["done"]]


class _MixIterDataset(grain.IterDataset):

  def __init__(self, parents, weights, finite):
    super().__init__(parents)
    self._weights, self._finite = weights, finite

  def __iter__(self):
    return _MixIterator([p.__iter__() for p in self._parents], self._weights, self._finite)


def _packed_rows(docs, tokenizer, seq_len, bins, seed, split):
  """One source's packed rows (unbatched), as lmstack/data/pipeline.py packs them."""
  ds = grain.MapDataset.source(docs)
  if split == "train":
    ds = ds.shuffle(seed=seed).repeat()
  ds = ds.map(pipeline.Tokenize(tokenizer))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=pipeline._READ_THREADS,  # pylint: disable=protected-access
                                               prefetch_buffer_size=pipeline._READ_BUFFER))  # pylint: disable=protected-access
  it_ds = grain.experimental.FlatMapIterDataset(it_ds, pipeline.Pieces(seq_len, tokenizer.bos_id, tokenizer.eos_id))
  it_ds = grain.experimental.FirstFitPackIterDataset(
      it_ds, length_struct={"inputs": seq_len, "targets": seq_len}, num_packing_bins=bins, shuffle_bins=False)
  return it_ds.map(pipeline._rename_packed)  # pylint: disable=protected-access


def source_weights(data_cfg: ml_collections.ConfigDict) -> dict[str, float]:
  """{name: normalised weight} of the sources that are on (weight > 0)."""
  srcs = data_cfg.get("sources") or {}
  if not srcs:
    raise ConfigError("data.kind='mixture' needs data.sources (see configs/common.py: mixture_data)")
  weights = {}
  for name, src in srcs.items():
    if not hasattr(src, "get"):
      raise ConfigError(f"data.sources.{name}={show(src)}; expected a section with weight, format, train_files, ...")
    w = src.get("weight", 0.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 or not np.isfinite(w):
      raise ConfigError(f"data.sources.{name}.weight={show(w)} must be a finite number >= 0")
    for key, default in (("format", None), ("train_files", None), ("eval_files", ""), ("jsonl_field", "text")):
      if not isinstance(src.get(key, default), str):
        raise ConfigError(f"data.sources.{name}.{key}={show(src.get(key))}; expected a string")
    cap = src.get("max_eval_docs", 0)
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
      raise ConfigError(f"data.sources.{name}.max_eval_docs={show(cap)}; expected an integer >= 0 (0: all)")
    if w > 0:
      weights[name] = w
  if not weights:
    raise ConfigError("data.sources: every weight is 0; give at least one source a positive weight")
  total = sum(weights.values())
  return {k: v / total for k, v in weights.items()}


def only_source(data_cfg: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """A copy of a mixture's data config with only `name` switched on."""
  if name not in data_cfg.sources:
    raise ConfigError(f"data.sources has no {name!r}; it has {sorted(data_cfg.sources)}")
  out = ml_collections.ConfigDict(data_cfg.to_dict())
  for other in out.sources:
    out.sources[other].weight = 1.0 if other == name else 0.0
  return out


def make_mixture_dataset(
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
  """Packed batches of a weighted mixture (see the module docstring).

  Takes make_lm_dataset's arguments and returns the same batches: dicts of
  int32 `inputs`, `targets`, `segment_ids`, `positions`, [batch_size, seq_len].
  """
  pipeline._check_split(split)  # pylint: disable=protected-access
  if seq_len < 1 or batch_size < 1:
    raise ConfigError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
  if not 0 <= shard_index < shard_count:
    raise ConfigError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
  weights = source_weights(data_cfg)
  if tokenizer is None:
    tokenizer = load_tokenizer(data_cfg.tokenizer)
  if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
    raise DataError(f"data.tokenizer {data_cfg.get('tokenizer', '')!r} has no bos or eos piece")
  holdout = data_cfg.get("holdout_every", 20)
  chunk = data_cfg.get("chunk_chars", sources.MAX_DOC_CHARS)
  for name, value in (("holdout_every", holdout), ("chunk_chars", chunk)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConfigError(f"data.{name}={show(value)}; expected an integer >= 1")
  parents = []
  for index, name in enumerate(data_cfg.sources):
    if name not in weights:
      continue
    docs = source_documents(data_cfg.sources[name], split, holdout, chunk)[shard_index::shard_count]
    if not docs:
      raise DataError(f"data.sources.{name}: no {split} document for shard {shard_index} of {shard_count}")
    pipeline.check_some_tokens(docs, pipeline.Tokenize(tokenizer), f"data.sources.{name} ({split} split)")
    source_seed = int(np.random.SeedSequence([int(seed) % 2**32, index]).generate_state(1)[0])
    parents.append(_packed_rows(docs, tokenizer, seq_len, batch_size, source_seed, split))
  ds = _MixIterDataset(parents, list(weights.values()), finite=split != "train")
  if split == "train":
    ds = ds.batch(batch_size, drop_remainder=True)
  else:
    ds = ds.batch(batch_size, drop_remainder=False).map(pipeline.PadBatch(batch_size))
  return pipeline._ThreadPrefetch(ds, pipeline._BATCH_PREFETCH)  # pylint: disable=protected-access
