"""Data: document sources, the SentencePiece tokenizer and Grain LM pipelines.

  sources.py    text / JSONL / ArrayRecord / TFDS readers -> grain.MapDataset
  tokenizer.py  Tokenizer (SentencePiece wrapper), train_tokenizer
  pipeline.py   make_lm_dataset: packed next-token batches; unigram baseline
  prepare.py    text/JSONL -> pre-tokenized ArrayRecord shards
"""
