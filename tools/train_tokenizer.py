"""Trains a SentencePiece BPE tokenizer: byte fallback, pad=0 unk=1 bos=2 eos=3.

  python tools/train_tokenizer.py --input=a.txt,b.jsonl.gz --vocab_size=8192 \
      --output=path/prefix

writes path/prefix.model (load with lmstack.data.tokenizer.Tokenizer.load) and
path/prefix.vocab. Inputs are plain-text and JSONL files (`.gz` too, globs
allowed); JSONL text is read from --jsonl_field. The same inputs and flags give
a byte-identical model. The choices behind the model are documented in
lmstack/data/tokenizer.py.

The default tokenizer, lmstack/assets/tokenizer/default.model, was made with

  python tools/train_tokenizer.py --input=lmstack/assets/corpus/train.txt \
      --vocab_size=8192 --output=lmstack/assets/tokenizer/default
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
# pylint: disable=g-import-not-at-top
from lmstack.data import tokenizer as lms_tokenizer
from lmstack.errors import LmstackError


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n", maxsplit=1)[0]
  )
  parser.add_argument("--input", required=True,
                      help="comma-separated text/JSONL files or globs")
  parser.add_argument("--vocab_size", type=int, default=8192)
  parser.add_argument("--output", required=True,
                      help="output prefix: writes PREFIX.model, PREFIX.vocab")
  parser.add_argument("--jsonl_field", default="text")
  parser.add_argument("--input_sentence_size", type=int, default=5_000_000,
                      help="use at most this many lines (seeded sample)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--character_coverage", type=float, default=0.9999)
  parser.add_argument("--verbose", action="store_true")
  args = parser.parse_args(argv)
  try:
    tok = lms_tokenizer.train_tokenizer(
        args.input,
        vocab_size=args.vocab_size,
        output=args.output,
        jsonl_field=args.jsonl_field,
        input_sentence_size=args.input_sentence_size,
        seed=args.seed,
        character_coverage=args.character_coverage,
        verbose=args.verbose,
    )
  except LmstackError as e:
    sys.exit(f"error: {e}")
  print(f"wrote {args.output}.model and {args.output}.vocab: {tok}")


if __name__ == "__main__":
  main()
