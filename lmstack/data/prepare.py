"""Tokenizes text/JSONL once into ArrayRecord shards (tools/prepare_data.py).

  python tools/prepare_data.py --input=data/*.jsonl.gz \
      --tokenizer="<pkg>/assets/tokenizer/default.model" \
      --output=data/tokens --num_shards=8
  # -> data/tokens-00000-of-00008.array_record ... ; then in the config:
  #    data.format = "array_record"
  #    data.train_files = "data/tokens-*.array_record"

One record per document: its token ids as little-endian int32 bytes, *without*
bos/eos; make_lm_dataset adds them for every format, so a document yields the
same training tokens whether it is read as text or from ArrayRecord. Documents
are the ones the text and JSONL readers produce (lmstack/data/sources.py) and
go round-robin to the shards (document i to shard i % num_shards), which keeps
shards balanced and the output deterministic. Records are written with
group_size 1 so that grain's random access reads one record, not a group.
"""

import os

from array_record.python import array_record_module
import numpy as np

from lmstack import assets
from lmstack.data import sources
from lmstack.data.tokenizer import Tokenizer
from lmstack.errors import DataError


def shard_paths(output_prefix: str, num_shards: int) -> list[str]:
  return [
      f"{output_prefix}-{i:05d}-of-{num_shards:05d}.array_record"
      for i in range(num_shards)
  ]


def file_documents(path: str, jsonl_field: str = "text") -> list[str]:
  """A file's documents: JSONL records if `.jsonl` is in its name, else text."""
  if ".jsonl" in os.path.basename(path):
    return sources.jsonl_documents([path], field=jsonl_field)
  return sources.text_documents([path])


def prepare_array_records(
    inputs: sources.PathsArg,
    tokenizer: Tokenizer,
    output_prefix: str,
    *,
    num_shards: int = 1,
    jsonl_field: str = "text",
) -> dict:
  """Writes `{output_prefix}-XXXXX-of-NNNNN.array_record` shards.

  Returns:
    {"files": [...], "documents": int, "tokens": int,
     "documents_per_shard": [...], "tokens_per_shard": [...]}
  """
  if num_shards < 1:
    raise DataError(f"num_shards={num_shards}: expected >= 1")
  files = sources.expand_paths(inputs)
  output_prefix = assets.resolve(output_prefix)
  os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
  paths = shard_paths(output_prefix, num_shards)
  writers = [
      array_record_module.ArrayRecordWriter(p, "group_size:1") for p in paths
  ]
  docs_per_shard = [0] * num_shards
  tokens_per_shard = [0] * num_shards
  index = 0
  try:
    for path in files:
      for doc in file_documents(path, jsonl_field):
        ids = np.asarray(tokenizer.encode(doc), dtype="<i4")
        if not len(ids):
          continue
        shard = index % num_shards
        writers[shard].write(ids.tobytes())
        docs_per_shard[shard] += 1
        tokens_per_shard[shard] += len(ids)
        index += 1
  finally:
    for writer in writers:
      writer.close()
  return {
      "files": paths,
      "documents": sum(docs_per_shard),
      "tokens": sum(tokens_per_shard),
      "documents_per_shard": docs_per_shard,
      "tokens_per_shard": tokens_per_shard,
  }
