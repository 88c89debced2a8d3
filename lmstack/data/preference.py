"""Grain pipeline for preference pairs (DPO): a prompt, a chosen and a rejected response.

  data = config.data  # kind="preference"
  ds = make_preference_dataset(data, tok, seq_len=64, batch_size=8, seed=0)
  batch = next(iter(ds))
  # inputs, targets, segment_ids, positions, loss_mask: int32 [B, 2, T]
  # (pair axis: 0 = prompt + chosen, 1 = prompt + rejected); index: int32 [B, 2]

Both responses of a pair run in one batch, so the step sees a batch of B
pairs as 2B rows; every array keeps the pairs on its leading axis, which is
what sharding (batch axis) and gradient accumulation (micro-batches of whole
pairs) split. Rows are not packed: each is [bos] prompt `separator` response
[eos] padded to seq_len (segment id 1 on real tokens, 0 on padding), and its
loss mask is 1 on the response and eos, so a row's log-probability is summed
over the response only. A row longer than seq_len + 1 tokens loses the end of
its response; a pair with a row without response tokens, or whose two rows
are identical after the cut, is dropped. `index` numbers the rows of the
split (2i: pair i's chosen row, 2i + 1 its rejected one): the key of the
reference log-probabilities that `reference=precomputed` stores
(lmstack/train/reference.py). Padding pairs (the end of the eval split) are
all zeros.

Pairs come from (`data.format`):
  jsonl            records with `prompt_field`, `chosen_field` and
                   `rejected_field`: strings, or chats: chosen/rejected lists of
                   messages ending with the assistant's turn (the conversation
                   so far in `prompt_field` as a list of messages, or as the
                   shared start of both lists), rendered with the tokenizer's
                   chat template and scored on that last turn only;
  wordnet_pairs    the shipped WordNet glosses: "Define: <word>" -> its true
                   gloss (chosen) vs the gloss of a random synset of another
                   word, of another part of speech (`rejected_pos=other`, so
                   the word alone decides the pair) or of any (`any`);
  humaneval_pairs  the shipped HumanEval problems: the prompt -> the canonical
                   solution vs a corrupted copy of it (an operator swapped, a
                   constant changed, a return value replaced or a line dropped;
                   still valid Python).
Both built-in sets hold out the examples SFT holds out (every 20th synset,
every 8th problem), and build `pairs_per_prompt` pairs per example with
rejected responses drawn from a fixed seed, so the pairs never depend on the
run's seed. The train split is shuffled with `seed` every epoch and repeats
forever; its iterator state is JSON (exact resume).
"""

import ast
import functools
import io
import os
import tokenize

import grain
import numpy as np

from lmstack.data import sft, sources
from lmstack.data.chat import ChatTemplate, check_messages
from lmstack.data.pipeline import _ThreadPrefetch, _check_split
from lmstack.errors import ConfigError, DataError, show

FORMATS = ("jsonl", "wordnet_pairs", "humaneval_pairs")
FEATURES = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
PAIR_SEED = 20240601  # fixed: the pairs are data, not a function of the run's seed


# ---------------------------------------------------------------------------
# Pairs: dicts {prompt, chosen, rejected} (text) or {chosen, rejected} (chats)


@functools.lru_cache(maxsize=8)
def wordnet_pairs(split, pairs_per_prompt=1, rejected_pos="other"):
  """"Define: <word>" -> its true gloss vs the gloss of another word's synset.

  rejected_pos="other" draws the rejected gloss from another part of speech
  (a noun's gloss vs a verb's, adjective's or adverb's), so that the word
  alone decides a pair; "any" draws it from any synset. Never a gloss of the
  same word. Same split as SFT: every 20th synset held out.
  """
  if rejected_pos not in ("other", "any"):
    raise ConfigError(f"config.data.rejected_pos={rejected_pos!r}; expected other or any")
  rows = sft._read_jsonl(os.path.join(sft.ASSETS, "wordnet_glosses.jsonl.gz"))
  rows = [r for i, r in enumerate(rows) if (i % 20 == 0) == (split == "eval")]
  prompts = [f"Define: {r['words'][0].replace('_', ' ')}" for r in rows]
  pos = np.asarray([{"s": "a"}.get(r["pos"], r["pos"]) for r in rows])
  glosses_of = {}
  for prompt, r in zip(prompts, rows):
    glosses_of.setdefault(prompt, set()).add(r["gloss"])
  rng = np.random.default_rng([PAIR_SEED, 0 if split == "train" else 1])
  out = []
  for i, r in enumerate(rows):
    for _ in range(pairs_per_prompt):
      while True:
        j = int(rng.integers(len(rows)))
        if (j != i and rows[j]["gloss"] not in glosses_of[prompts[i]]
            and (rejected_pos == "any" or pos[j] != pos[i])):
          break
      out.append({"prompt": prompts[i], "chosen": r["gloss"], "rejected": rows[j]["gloss"]})
  return tuple(out)


# Operator swaps that keep the code valid and change what it computes.
_SWAPS = {"<": ">=", ">": "<=", "<=": ">", ">=": "<", "==": "!=", "!=": "==", "+": "-", "-": "+", "*": "+",
          "//": "%", "%": "//", "and": "or", "or": "and", "True": "False", "False": "True", "min": "max",
          "max": "min", "+=": "-=", "-=": "+="}
_CORRUPTIONS = ("operator", "constant", "return", "drop_line")


def corrupt(prompt, solution, rng):
  """A wrong but valid-Python variant of `solution` (a function body), or None.

  Tries the corruptions in an order drawn from `rng`, each at a place drawn
  from `rng`; keeps the first that changes the text and still parses.
  """
  lines = solution.split("\n")
  starts = np.cumsum([0] + [len(line) + 1 for line in lines])
  try:
    tokens = list(tokenize.generate_tokens(io.StringIO(solution).readline))
  except (tokenize.TokenError, IndentationError, SyntaxError):
    tokens = []
  offset = lambda rc: int(starts[rc[0] - 1]) + rc[1]

  def edits(kind):
    """Candidate (start, end, replacement) edits of one kind."""
    if kind == "operator":
      return [(offset(t.start), offset(t.end), _SWAPS[t.string]) for t in tokens
              if t.type in (tokenize.OP, tokenize.NAME) and t.string in _SWAPS]
    if kind == "constant":
      return [(offset(t.start), offset(t.end), str(int(t.string) + 1)) for t in tokens
              if t.type == tokenize.NUMBER and t.string.isdigit()]
    if kind == "return":
      out = []
      for i, line in enumerate(lines):
        body = line.strip()
        if body.startswith("return ") and body not in ("return None", "return"):
          out.append((int(starts[i]) + line.index("return"), int(starts[i]) + len(line), "return None"))
      return out
    body = [i for i, line in enumerate(lines) if line.strip() and not line.strip().startswith("#")]
    return [(int(starts[i]), int(starts[i + 1]), "") for i in body] if len(body) > 1 else []

  for kind in rng.permutation(_CORRUPTIONS):
    candidates = edits(kind)
    for c in rng.permutation(len(candidates)):
      start, end, text = candidates[c]
      bad = solution[:start] + text + solution[end:]
      if bad.strip() == solution.strip():
        continue
      try:
        ast.parse(prompt + bad)
      except SyntaxError:
        continue
      return bad
  return None


@functools.lru_cache(maxsize=8)
def humaneval_pairs(split, pairs_per_prompt=1):
  """The problem's prompt -> canonical solution vs corrupted ones (distinct)."""
  rows = sft._read_jsonl(os.path.join(sft.ASSETS, "HumanEval.jsonl.gz"))
  out = []
  for i, r in enumerate(rows):
    if (i % 8 == 0) != (split == "eval"):
      continue
    seen = set()
    for k in range(4 * pairs_per_prompt):  # a few more tries than pairs: corruptions can coincide
      if len(seen) == pairs_per_prompt:
        break
      bad = corrupt(r["prompt"], r["canonical_solution"], np.random.default_rng([PAIR_SEED, i, k]))
      if bad is not None and bad not in seen:
        seen.add(bad)
        out.append({"prompt": r["prompt"], "chosen": r["canonical_solution"], "rejected": bad,
                    "task_id": r["task_id"]})
  return tuple(out)


def _as_messages(value, where, field):
  if isinstance(value, str):
    return [{"role": "assistant", "content": value}]
  if (not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value)
      or value[-1].get("role") != "assistant"):
    raise DataError(f"{where}: field {field!r} must be a string or a list of messages ending with an assistant "
                    "turn")
  check_messages(value, where, field)
  return value


def jsonl_pairs(paths, prompt_field="prompt", chosen_field="chosen", rejected_field="rejected"):
  """Records of JSONL files, checked: text pairs or chats (see the module doc)."""
  files = sources.expand_paths(paths)
  out = []
  for where, record in sources.jsonl_records(files):
    missing = [f for f in (chosen_field, rejected_field) if f not in record]
    if missing:
      raise DataError(f"{where}: no field {missing[0]!r} (fields: {sources.field_names(record)}); set "
                      "data.prompt_field / data.chosen_field / data.rejected_field")
    prompt, chosen, rejected = record.get(prompt_field), record[chosen_field], record[rejected_field]
    if prompt is None and isinstance(chosen, str):
      raise DataError(f"{where}: no field {prompt_field!r} (fields: {sources.field_names(record)}); "
                      "set data.prompt_field")
    if all(isinstance(x, str) for x in (prompt, chosen, rejected)):
      empty = chosen_field if not chosen.strip() else rejected_field if not rejected.strip() else None
      if empty:
        raise DataError(f"{where}: field {empty!r} is empty")
      out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "where": where})
      continue
    if prompt is None:
      prompt = []
    elif isinstance(prompt, str):
      prompt = [{"role": "user", "content": prompt}]
    elif not isinstance(prompt, list):
      raise DataError(f"{where}: field {prompt_field!r} must be a string or a list of messages")
    elif prompt:
      check_messages(prompt, where, prompt_field)
    out.append({"chosen": prompt + _as_messages(chosen, where, chosen_field),
                "rejected": prompt + _as_messages(rejected, where, rejected_field), "where": where})
  if not out:
    raise DataError(f"no preference pairs in {', '.join(files)}")
  return tuple(out)


def pairs(data_cfg, split):
  """The pairs of one split, in a fixed order (their index is their place)."""
  _check_split(split)
  fmt, k = data_cfg.format, data_cfg.get("pairs_per_prompt", 1)
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ConfigError(f"config.data.pairs_per_prompt={show(k)} must be an integer >= 1")
  if fmt == "wordnet_pairs":
    return wordnet_pairs(split, k, data_cfg.get("rejected_pos", "other"))
  if fmt == "humaneval_pairs":
    return humaneval_pairs(split, k)
  if fmt == "jsonl":
    files = data_cfg.train_files if split == "train" else data_cfg.eval_files
    return jsonl_pairs(files, data_cfg.get("prompt_field", "prompt"), data_cfg.get("chosen_field", "chosen"),
                       data_cfg.get("rejected_field", "rejected"))
  raise ConfigError(f"config.data.format={fmt!r} for kind=preference; expected one of {', '.join(FORMATS)}")


# ---------------------------------------------------------------------------
# Encoding: a pair -> two padded rows


def _last_run(mask):
  """`mask` kept only on its last run of ones: a chat's final assistant turn."""
  ones = np.flatnonzero(mask)
  out = np.zeros_like(mask)
  if len(ones):
    gaps = np.flatnonzero(np.diff(ones) > 1)
    out[ones[gaps[-1] + 1 if len(gaps) else 0]:ones[-1] + 1] = 1
  return out


class EncodePair:
  """A pair -> {inputs, targets, segment_ids, positions, loss_mask: [2, T], index: [2]}, or None."""

  def __init__(self, tokenizer, seq_len, separator="\n"):
    self.tokenizer, self.seq_len, self.separator = tokenizer, seq_len, separator
    self._chat = None

  def row(self, pair, which):
    """(ids, mask) of prompt + pair[which], before truncation."""
    tok = self.tokenizer
    if "prompt" not in pair:  # a chat
      if self._chat is None:
        self._chat = ChatTemplate.from_tokenizer(tok)
      enc = self._chat.encode_chat(pair[which], add_bos=True)
      return enc.ids, _last_run(enc.loss_mask)
    prompt = [tok.bos_id] + list(tok.encode(pair["prompt"] + self.separator))
    response = list(tok.encode(pair[which])) + [tok.eos_id]
    return (np.asarray(prompt + response, np.int32),
            np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(response), np.int32)]))

  def __call__(self, indexed):
    index, pair = indexed
    t = self.seq_len
    out = {k: np.zeros((2, t), np.int32) for k in FEATURES}
    rows = []
    for r, which in enumerate(("chosen", "rejected")):
      try:
        ids, mask = self.row(pair, which)
      except DataError as e:  # e.g. a chat the template refuses: name the record
        if "where" not in pair:
          raise
        raise DataError(f"{pair['where']}: {e}") from None
      ids, mask = ids[:t + 1], mask[:t + 1]
      if len(ids) < 2 or not mask[1:].any():
        return None
      n = len(ids) - 1
      out["inputs"][r, :n], out["targets"][r, :n], out["loss_mask"][r, :n] = ids[:-1], ids[1:], mask[1:]
      out["segment_ids"][r, :n], out["positions"][r, :n] = 1, np.arange(n)
      rows.append(ids.tobytes())
    if rows[0] == rows[1]:
      return None
    out["index"] = np.asarray([2 * index, 2 * index + 1], np.int32)
    return out


class PadPairs:
  """Pads a short final batch with all-zero pairs (segment ids 0: never scored)."""

  def __init__(self, batch_size):
    self.batch_size = batch_size

  def __call__(self, batch):
    missing = self.batch_size - len(batch["inputs"])
    return {k: np.pad(v, [(0, missing)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()} if missing else batch


def make_preference_dataset(data_cfg, tokenizer, *, seq_len, batch_size, seed, split="train", shard_index=0,
                            shard_count=1):
  """Batches of B pairs of one split (see the module docstring); the eval
  split is read once in index order, its last batch padded."""
  _check_split(split)
  if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
    raise DataError("the preference tokenizer needs bos and eos pieces")
  data = pairs(data_cfg, split)
  ds = grain.MapDataset.source(list(enumerate(data)))[shard_index::shard_count]
  if not len(ds):
    raise DataError(f"preference shard {shard_index} of {shard_count} has no pair ({len(data)} in the {split} split)")
  encode = EncodePair(tokenizer, seq_len, data_cfg.get("separator", "\n"))
  if not any(encode(ds[i]) is not None for i in range(len(ds))):  # stops at the first pair that fits
    raise DataError(f"{sft.split_source(data_cfg, split)}: no pair of the {split} split keeps a response token "
                    f"of both rows within seq_len={seq_len} (config.train.seq_len) with chosen != rejected")
  if split == "train":
    ds = ds.shuffle(seed=int(seed) % 2**32).repeat()
  ds = ds.map(encode).filter(lambda x: x is not None)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=64))
  if split == "train":
    it = it.batch(batch_size, drop_remainder=True)
  else:
    it = it.batch(batch_size, drop_remainder=False).map(PadPairs(batch_size))
  return _ThreadPrefetch(it, 2)


def num_rows(data_cfg, split):
  """Rows (2 per pair) of a split: the size of its reference table."""
  return 2 * len(pairs(data_cfg, split))


def check_pairs(data_cfg, tokenizer, seq_len, split="train"):
  """(pairs, truncated, dropped) counts of a split: what encoding will do."""
  encode = EncodePair(tokenizer, seq_len, data_cfg.get("separator", "\n"))
  total = truncated = dropped = 0
  for i, pair in enumerate(pairs(data_cfg, split)):
    total += 1
    truncated += any(len(encode.row(pair, w)[0]) > seq_len + 1 for w in ("chosen", "rejected"))
    dropped += encode((i, pair)) is None
  return total, truncated, dropped
