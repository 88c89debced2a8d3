"""Tokenizes text/JSONL into ArrayRecord shards for data.format="array_record".

  python tools/prepare_data.py --input="data/*.jsonl.gz,extra.txt" \
      --tokenizer="<pkg>/assets/tokenizer/default.model" \
      --output=data/tokens --num_shards=8

writes data/tokens-00000-of-00008.array_record, ... and prints document and
token counts. One record per document, int32 ids without bos/eos (the pipeline
adds them); see lmstack/data/prepare.py. Use the same tokenizer in the
training config (data.tokenizer) as here.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
# pylint: disable=g-import-not-at-top
from lmstack import assets
from lmstack.data import prepare
from lmstack.data.tokenizer import load_tokenizer
from lmstack.errors import LmstackError


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n", maxsplit=1)[0]
  )
  parser.add_argument("--input", required=True,
                      help="comma-separated text/JSONL files or globs")
  parser.add_argument("--tokenizer", default=assets.DEFAULT_TOKENIZER)
  parser.add_argument("--output", required=True, help="output path prefix")
  parser.add_argument("--num_shards", type=int, default=1)
  parser.add_argument("--jsonl_field", default="text")
  args = parser.parse_args(argv)
  try:
    stats = prepare.prepare_array_records(
        args.input,
        load_tokenizer(args.tokenizer),
        args.output,
        num_shards=args.num_shards,
        jsonl_field=args.jsonl_field,
    )
  except LmstackError as e:
    sys.exit(f"error: {e}")
  for path, docs, tokens in zip(
      stats["files"], stats["documents_per_shard"], stats["tokens_per_shard"]
  ):
    print(f"{path}: {docs:,} documents, {tokens:,} tokens")
  print(f"total: {stats['documents']:,} documents, {stats['tokens']:,} tokens"
        " (without bos/eos)")


if __name__ == "__main__":
  main()
