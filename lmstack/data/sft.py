"""Grain pipeline for supervised fine-tuning: prompt -> response, loss on the response.

  data = config.data  # kind="sft"
  ds = make_sft_dataset(data, tok, seq_len=256, batch_size=8, seed=0)
  batch = next(iter(ds))  # inputs, targets, segment_ids, positions, loss_mask: int32 [B, T]

Examples come from (`data.format`):
  jsonl      records with `prompt_field` and `response_field` strings, or with
             `messages_field`, a chat ([{"role", "content"}, ...]) rendered with
             the tokenizer's chat template (lmstack.data.chat; ChatML for
             lmstack's own tokenizer) and trained on the assistant turns;
  wordnet    the shipped WordNet glosses: "Define: <word>" -> the gloss;
  humaneval  the shipped HumanEval problems: the prompt (signature and
             docstring) -> the canonical solution.
The built-in sets hold out every 20th example (WordNet) or every 8th
(HumanEval) as the eval split.

A prompt/response example becomes [bos] prompt `separator` response [eos]
(prompt and response encoded separately, so the boundary is exact); its loss
mask is 1 on the response and eos. An example longer than seq_len + 1 tokens
loses the end of its response; one with no response token left is dropped.
Examples are packed first-fit into rows with segment ids and positions, like
pre-training, and `loss_mask` is packed with them (0 on padding).
"""

import functools
import gzip
import json
import os

import grain
import numpy as np

from lmstack.data import sources
from lmstack.data.chat import ChatTemplate, check_messages
from lmstack.data.pipeline import PadBatch, _ThreadPrefetch, _check_split
from lmstack.errors import ConfigError, DataError

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "data")
FORMATS = ("jsonl", "wordnet", "humaneval")
_FEATURES = ("inputs", "targets", "loss_mask")


@functools.lru_cache(maxsize=4)
def _read_jsonl(path):
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    return tuple(json.loads(line) for line in f if line.strip())


def wordnet_examples(split, path=None):
  """"Define: <word>" -> gloss, one per synset (every 20th held out)."""
  rows = _read_jsonl(path or os.path.join(ASSETS, "wordnet_glosses.jsonl.gz"))
  out = []
  for i, row in enumerate(rows):
    if (i % 20 == 0) == (split == "eval"):
      word = row["words"][0].replace("_", " ")
      out.append({"prompt": f"Define: {word}", "response": row["gloss"]})
  return out


def humaneval_examples(split, path=None):
  """The problem's prompt -> its canonical solution (every 8th held out)."""
  rows = _read_jsonl(path or os.path.join(ASSETS, "HumanEval.jsonl.gz"))
  return [{"prompt": r["prompt"], "response": r["canonical_solution"]}
          for i, r in enumerate(rows) if (i % 8 == 0) == (split == "eval")]


def jsonl_examples(paths, prompt_field="prompt", response_field="response", messages_field=""):
  """Records of JSONL files, checked: each a prompt/response pair or a chat."""
  files = sources.expand_paths(paths)
  out = []
  for where, record in sources.jsonl_records(files):
    if messages_field:
      if messages_field not in record:
        raise DataError(f"{where}: no field {messages_field!r} (fields: {sources.field_names(record)}); "
                        "set data.messages_field")
      check_messages(record[messages_field], where, messages_field)
      out.append({"messages": record[messages_field], "where": where})
      continue
    for field in (prompt_field, response_field):
      if not isinstance(record.get(field), str):
        raise DataError(f"{where}: expected string fields {prompt_field!r} and {response_field!r} "
                        f"(fields: {sources.field_names(record)}); set data.prompt_field / data.response_field")
    if not record[response_field].strip():
      raise DataError(f"{where}: field {response_field!r} is empty")
    out.append({"prompt": record[prompt_field], "response": record[response_field], "where": where})
  if not out:
    raise DataError(f"no examples in {', '.join(files)}")
  return out


def split_source(data_cfg, split):
  """The files of a split (`format=jsonl`), or the built-in set's name: for messages."""
  if data_cfg.format != "jsonl":
    return f"data.format={data_cfg.format}"
  return data_cfg.train_files if split == "train" else data_cfg.eval_files


def examples(data_cfg, split):
  """The examples of one split as dicts {prompt, response} or {messages}."""
  _check_split(split)
  fmt = data_cfg.format
  if fmt == "wordnet":
    return wordnet_examples(split)
  if fmt == "humaneval":
    return humaneval_examples(split)
  if fmt == "jsonl":
    files = data_cfg.train_files if split == "train" else data_cfg.eval_files
    return jsonl_examples(files, data_cfg.get("prompt_field", "prompt"), data_cfg.get("response_field", "response"),
                          data_cfg.get("messages_field", ""))
  raise ConfigError(f"config.data.format={fmt!r} for kind=sft; expected one of {', '.join(FORMATS)}")


class Encode:
  """An example -> {inputs, targets, loss_mask} of at most seq_len tokens, or None."""

  def __init__(self, tokenizer, seq_len, separator="\n"):
    self.tokenizer, self.seq_len, self.separator = tokenizer, seq_len, separator
    self._chat = None

  def encode(self, example):
    """(ids, mask) of the whole example, before truncation."""
    tok = self.tokenizer
    if "messages" in example:
      if self._chat is None:
        self._chat = ChatTemplate.from_tokenizer(tok)
      enc = self._chat.encode_chat(example["messages"], add_bos=True)
      return enc.ids, enc.loss_mask
    prompt = [tok.bos_id] + list(tok.encode(example["prompt"] + self.separator))
    response = list(tok.encode(example["response"])) + [tok.eos_id]
    ids = np.asarray(prompt + response, np.int32)
    return ids, np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(response), np.int32)])

  def __call__(self, example):
    try:
      ids, mask = self.encode(example)
    except DataError as e:  # e.g. a chat the template refuses: name the record
      if "where" not in example:
        raise
      raise DataError(f"{example['where']}: {e}") from None
    ids, mask = ids[:self.seq_len + 1], mask[:self.seq_len + 1]
    if len(ids) < 2 or not mask[1:].any():
      return None
    return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:].astype(np.int32)}


def _rename(packed):
  return {"inputs": packed["inputs"], "targets": packed["targets"], "loss_mask": packed["loss_mask"],
          "segment_ids": packed["inputs_segment_ids"], "positions": packed["inputs_positions"]}


def make_sft_dataset(data_cfg, tokenizer, *, seq_len, batch_size, seed, split="train", shard_index=0,
                     shard_count=1):
  """Packed SFT batches of one split (see the module docstring); the train
  split is shuffled with `seed` every epoch and repeats forever."""
  _check_split(split)
  if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
    raise DataError("the SFT tokenizer needs bos and eos pieces")
  data = examples(data_cfg, split)
  ds = grain.MapDataset.source(data)[shard_index::shard_count]
  if not len(ds):
    raise DataError(f"SFT shard {shard_index} of {shard_count} has no example ({len(data)} in the {split} split)")
  encode = Encode(tokenizer, seq_len, data_cfg.get("separator", "\n"))
  if not any(encode(ds[i]) is not None for i in range(len(ds))):  # stops at the first example that fits
    raise DataError(f"{split_source(data_cfg, split)}: no example of the {split} split has a response token "
                    f"within its first seq_len={seq_len} tokens (config.train.seq_len): prompts too long, or chats "
                    "without an assistant turn")
  if split == "train":
    ds = ds.shuffle(seed=int(seed) % 2**32).repeat()
  ds = ds.map(encode).filter(lambda x: x is not None)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=64))
  it = grain.experimental.FirstFitPackIterDataset(it, length_struct={k: seq_len for k in _FEATURES},
                                                  num_packing_bins=batch_size, shuffle_bins=False)
  it = it.map(_rename)
  if split == "train":
    it = it.batch(batch_size, drop_remainder=True)
  else:
    it = it.batch(batch_size, drop_remainder=False).map(PadBatch(batch_size))
  return _ThreadPrefetch(it, 2)


def check_examples(data_cfg, tokenizer, seq_len, split="train"):
  """(examples, truncated, dropped) counts of a split: what packing will do."""
  encode = Encode(tokenizer, seq_len, data_cfg.get("separator", "\n"))
  total = truncated = dropped = 0
  for ex in examples(data_cfg, split):
    ids, mask = encode.encode(ex)
    total += 1
    if len(ids) > seq_len + 1:
      truncated += 1
      if not mask[1:seq_len + 1].any():
        dropped += 1
  return total, truncated, dropped
