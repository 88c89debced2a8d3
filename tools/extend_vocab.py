"""Extends a checkpoint's vocabulary for a new domain or language.

  python tools/extend_vocab.py --ckpt=runs/pretrain \
      --corpus='<pkg>/assets/data/python_docs.jsonl.gz' --vocab_size=4096 --out=ckpt/pyvocab
  python -m lmstack.main --config=configs/extend.py:init_from=ckpt/pyvocab --workdir=runs/pyvocab

1. Trains a SentencePiece BPE tokenizer of --vocab_size pieces on the new corpus
   (text and JSONL files, as tools/train_tokenizer.py).
2. Appends its pieces that the old vocabulary lacks (at most --max_new_pieces)
   to the old SentencePiece model, with scores below every old piece: old ids
   keep their pieces, and old merges take precedence over new ones.
3. Grows the embedding (and an untied output layer) by one row per new piece,
   each initialised to the mean of the existing rows (Hewitt 2021), so the new
   tokens start as "an average token" rather than noise.
4. Writes a params checkpoint with the extended tokenizer in its meta and
   beside it (out/tokenizer.model).

It prints how the new tokenizer encodes a sample of the new corpus (tokens per
character, before and after) and of the old tokenizer's own text: old ids are
unchanged, but old text that contains a new piece may encode in fewer tokens.
"""

import argparse
import dataclasses
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
# pylint: disable=g-import-not-at-top
from configs import common
from lmstack.errors import CheckpointError, DataError, LmstackError


def merge_pieces(old_proto, new_proto, max_new=0):
  """The old ModelProto bytes with the new one's missing NORMAL pieces appended.

  Returns (merged proto bytes, number of pieces added). New pieces keep their
  order in the new model and get scores below the old minimum.
  """
  from sentencepiece import sentencepiece_model_pb2 as pb

  old, new = pb.ModelProto(), pb.ModelProto()
  old.ParseFromString(old_proto)
  new.ParseFromString(new_proto)
  if old.trainer_spec.model_type != pb.TrainerSpec.BPE:
    raise DataError("vocabulary extension supports SentencePiece BPE models only")
  have = {p.piece for p in old.pieces}
  floor = min(p.score for p in old.pieces)
  added = 0
  for p in new.pieces:
    if p.type != pb.ModelProto.SentencePiece.NORMAL or p.piece in have:
      continue
    if max_new and added >= max_new:
      break
    added += 1
    old.pieces.add(piece=p.piece, score=floor - added, type=pb.ModelProto.SentencePiece.NORMAL)
    have.add(p.piece)
  old.trainer_spec.vocab_size = len(old.pieces)
  return old.SerializeToString(), added


def grow_params(params, model_cfg, old_tokens, new_vocab):
  """Params with embedding rows [old_tokens, new_vocab) set to the mean of rows
  [0, old_tokens) (rows past the old tokenizer are padding and are replaced)."""
  import jax.numpy as jnp

  def grow(table, axis):
    real = jnp.take(table, jnp.arange(old_tokens), axis=axis)
    mean = jnp.mean(real, axis=axis, keepdims=True)
    reps = [1, 1]
    reps[axis] = new_vocab - old_tokens
    return jnp.concatenate([real, jnp.tile(mean, reps)], axis=axis)

  out = dict(params)
  out["embed"] = grow(params["embed"], 0)
  if not model_cfg.tie_embeddings:
    out["unembed"] = grow(params["unembed"], 1)
  return out, dataclasses.replace(model_cfg, vocab_size=new_vocab)


def _sample(files, n_docs=200):
  from lmstack.data import sources
  docs = []
  for path in sources.expand_paths(files):
    docs += sources.jsonl_documents([path]) if ".jsonl" in path else sources.text_documents([path])
  return docs[::max(1, len(docs) // n_docs)]


def extend(ckpt, corpus, out, vocab_size, max_new=0, seed=0):
  """Runs steps 1-4; returns a report dict (see the module docstring)."""
  import base64
  from lmstack import checkpoint as ckpt_lib
  from lmstack.convert.hf import save_params_checkpoint
  from lmstack.data import tokenizer as tok_lib

  out = os.path.abspath(out)
  if os.path.isdir(out) and os.listdir(out):
    raise CheckpointError(f"{out} already exists and is not empty; choose a new output directory")
  params, model_cfg, meta = ckpt_lib.restore_params(ckpt)
  if not meta.get("tokenizer_model"):
    raise CheckpointError(f"checkpoint {ckpt} carries no tokenizer to extend")
  old_tok = tok_lib.tokenizer_from_bytes(base64.b64decode(meta["tokenizer_model"]))
  if old_tok.kind != "sentencepiece" or old_tok.to_bytes().startswith(tok_lib.ENVELOPE_MAGIC):
    raise DataError(f"checkpoint {ckpt}: only a plain SentencePiece tokenizer can be extended")
  with tempfile.TemporaryDirectory() as tmp:
    new_tok = tok_lib.train_tokenizer(corpus, vocab_size=vocab_size, output=os.path.join(tmp, "new"), seed=seed)
  merged, added = merge_pieces(old_tok.to_bytes(), new_tok.to_bytes(), max_new)
  tok = tok_lib.Tokenizer(merged, name=os.path.join(out, "tokenizer.model"))
  new_vocab = max(model_cfg.vocab_size, tok.vocab_size)
  params, new_cfg = grow_params(params, model_cfg, old_tok.vocab_size, new_vocab)
  save_params_checkpoint(out, params, new_cfg, source=f"{os.path.abspath(ckpt)} + {added} pieces from {corpus}",
                         tokenizer=tok)
  common.write_tokenizer_beside(out, merged)

  report = {"added": added, "vocab_size": tok.vocab_size}
  for name, texts in (("new", _sample(corpus)), ("old", _old_text(meta))):
    if not texts:
      continue
    before = sum(len(old_tok.encode(t)) for t in texts)
    after = sum(len(tok.encode(t)) for t in texts)
    same = sum(old_tok.encode(t) == tok.encode(t) for t in texts)
    lossless = all(tok.decode(tok.encode(t)) == t for t in texts)
    report[name] = dict(docs=len(texts), tokens_before=before, tokens_after=after,
                        identical_docs=same, lossless=lossless)
  return report


def _old_text(meta):
  """A sample of the checkpoint's own training text, where its config names it."""
  data = meta.get("config", {}).get("data", {})
  files = data.get("train_files") if data.get("format") in ("text", "jsonl") else ""
  try:
    return _sample(files) if files else []
  except DataError:
    return []


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
  parser.add_argument("--ckpt", required=True, help="workdir, step dir or params checkpoint")
  parser.add_argument("--corpus", required=True, help="comma-separated text/JSONL files or globs of the new data")
  parser.add_argument("--vocab_size", type=int, default=4096, help="pieces of the tokenizer trained on --corpus")
  parser.add_argument("--max_new_pieces", type=int, default=0, help="append at most this many (0: all)")
  parser.add_argument("--out", required=True, help="the new params checkpoint directory")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  try:
    r = extend(args.ckpt, args.corpus, args.out, args.vocab_size, args.max_new_pieces, args.seed)
  except LmstackError as e:
    sys.exit(f"error: {e}")
  print(f"wrote {args.out}: {r['added']} new pieces, vocabulary {r['vocab_size']}")
  for name, what in (("new", "new corpus"), ("old", "old training text")):
    if name in r:
      s = r[name]
      print(f"  {what}: {s['tokens_before']:,} -> {s['tokens_after']:,} tokens over {s['docs']} documents; "
            f"{s['identical_docs']} encode identically; decode(encode(x)) == x: {s['lossless']}")


if __name__ == "__main__":
  main()
