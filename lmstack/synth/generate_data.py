"""Teacher generations for SFT: distillation and backtranslation.

  from lmstack.synth import generate_data as gd
  model, tok = gd.load_teacher("runs/sft")
  for record, reason in gd.distill(model, tok, [{"prompt": "Write a haiku"}], max_new_tokens=64):
    ...   # record {"prompt", "response"} (None when dropped), reason "kept" or why not
  for record, reason in gd.backtranslate(model, tok, [{"text": "Paris is the capital of France."}]):
    ...   # record {"prompt": the generated question, "response": the given text}

Distillation: the teacher (any lmstack checkpoint: a training workdir or a
params checkpoint, whose meta carries the tokenizer) continues each prompt; the
record is {"prompt": prompt, "response": generation}, plus the input's
"task_id" if it has one (so that `lmstack.synth.verify` can find its tests).
Backtranslation: the teacher reads an existing answer inside
BACKTRANSLATE_TEMPLATE and writes the question it answers (its first
paragraph); the record pairs that question with the answer. With `chat=True`
prompts are wrapped as one user turn of the tokenizer's chat template (ChatML
when it has none), and generations are cut at its end-of-turn marker.

Prompts are decoded `batch_size` at a time by lmstack.model.generate (KV
cache; the batch is padded to a constant size so that it compiles once per
prompt-length bucket). Dropped: a prompt longer than the context leaves room
for ("prompt_too_long"), an empty generation ("empty"), an empty answer to
backtranslate ("empty_answer"): the SFT reader refuses empty responses.
"""

import base64
import dataclasses
import gzip
import json
import os
import time

from lmstack.errors import CheckpointError, DataError

BACKTRANSLATE_TEMPLATE = ("Below is a response. Write the instruction or question that it answers.\n\n"
                          "Response:\n{answer}\n\nInstruction:")


@dataclasses.dataclass
class Sampling:
  max_new_tokens: int = 256
  temperature: float = 0.0  # 0: greedy
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  batch_size: int = 8


def load_teacher(ckpt, dtype="float32"):
  """(model, tokenizer) from a training workdir or a params checkpoint."""
  from lmstack import checkpoint as ckpt_lib
  from lmstack.data.tokenizer import tokenizer_from_bytes
  params, cfg, meta = ckpt_lib.restore_params(ckpt)
  if not meta.get("tokenizer_model"):
    raise CheckpointError(f"checkpoint {ckpt} carries no tokenizer")
  tokenizer = tokenizer_from_bytes(base64.b64decode(meta["tokenizer_model"]))
  cfg = dataclasses.replace(cfg, dtype=dtype, remat="none")
  return ckpt_lib.model_from_params(params, cfg), tokenizer


def read_records(path, field, limit=0):
  """Dicts from a JSONL file (.gz too) that have `field`, or {field: line}
  for each non-empty line of any other file."""
  opener = gzip.open if path.endswith(".gz") else open
  jsonl = path.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz"))
  records = []
  try:
    with opener(path, "rt", encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        if jsonl:
          try:
            row = json.loads(line)
          except ValueError:
            raise DataError(f"{path} line {n} is not JSON") from None
          if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise DataError(f"{path} line {n} has no string field {field!r} (choose one with --field)")
        else:
          row = {field: line.rstrip("\n")}
        records.append(row)
        if limit and len(records) >= limit:
          break
  except OSError as e:
    raise DataError(f"cannot read {path}: {e.strerror or e}") from None
  return records


class _Prompter:
  """Text -> prompt token ids (plain or chat), and generated ids -> text."""

  def __init__(self, tok, chat):
    self.tok = tok
    self.chat = None
    self.end_markers = ()
    if chat:
      from lmstack.data.chat import ChatTemplate
      self.chat = ChatTemplate.from_tokenizer(tok)
      self.end_markers = self.chat.end_markers

  def encode(self, text):
    tok = self.tok
    if self.chat is None:
      ids = tok.encode(text)
    else:
      rendered = self.chat.render_chat([{"role": "user", "content": text}], add_generation_prompt=True)
      ids = list(self.chat._encode_with_offsets(rendered)[0])  # noqa: SLF001 - splits special pieces out
    bos = [tok.bos_id] if tok.bos_id >= 0 and not (ids and ids[0] == tok.bos_id) else []
    return bos + ids

  def decode(self, new_ids):
    text = self.tok.decode([t for t in new_ids if t not in self.tok.eos_ids])
    for marker in self.end_markers:
      text = text.split(marker)[0]
    return text


def generate_texts(model, prompter, id_lists, sampling, progress=None):
  """Generated texts, one per prompt (a list of ids), in order.

  `progress(done, total, new_tokens, seconds)` is called after each batch.
  """
  from lmstack.model.generate import generate
  s, out, tokens, t0 = sampling, [], 0, time.perf_counter()
  for start in range(0, len(id_lists), s.batch_size):
    batch = id_lists[start:start + s.batch_size]
    padded = batch + [batch[0]] * (s.batch_size - len(batch))  # one compiled shape per length bucket
    new = generate(model, padded, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                   top_p=s.top_p, stop_ids=prompter.tok.eos_ids, seed=s.seed + start)[:len(batch)]
    tokens += sum(len(n) for n in new)
    out += [prompter.decode(n) for n in new]
    if progress:
      progress(len(out), len(id_lists), tokens, time.perf_counter() - t0)
  return out


def _budget(model, sampling):
  budget = model.cfg.max_seq_len - sampling.max_new_tokens
  if budget < 2:
    raise DataError(f"max_new_tokens={sampling.max_new_tokens} leaves no room for a prompt in the "
                    f"teacher's context of {model.cfg.max_seq_len} tokens")
  return budget


def distill(model, tok, records, *, field="prompt", chat=False, sampling=None, progress=None):
  """Yields (record or None, reason) per input record, in order."""
  sampling = sampling or Sampling()
  prompter, budget = _Prompter(tok, chat), _budget(model, sampling)
  ids = [prompter.encode(r[field]) for r in records]
  fits = [i for i, x in enumerate(ids) if len(x) <= budget]
  texts = dict(zip(fits, generate_texts(model, prompter, [ids[i] for i in fits], sampling, progress)))
  for i, r in enumerate(records):
    if i not in texts:
      yield None, "prompt_too_long"
    elif not texts[i].strip():
      yield None, "empty"
    else:
      rec = {"prompt": r[field], "response": texts[i]}
      if "task_id" in r:
        rec["task_id"] = r["task_id"]
      yield rec, "kept"


def backtranslate(model, tok, records, *, field="text", chat=False, template=BACKTRANSLATE_TEMPLATE,
                  sampling=None, progress=None):
  """Yields (record or None, reason) per input record, in order. An answer
  too long for the context is cut inside the teacher's prompt (the record
  keeps it whole)."""
  sampling = sampling or Sampling()
  prompter, budget = _Prompter(tok, chat), _budget(model, sampling)
  if "{answer}" not in template:
    raise DataError("the backtranslation template needs an {answer} placeholder")
  overhead = len(prompter.encode(template.format(answer="")))
  room = max(budget - overhead - 8, 0)  # 8: tokenization may merge differently at the seams
  ids = []
  for r in records:
    answer_ids = tok.encode(r[field])
    shown = r[field] if len(answer_ids) <= room else tok.decode(answer_ids[:room])
    ids.append(prompter.encode(template.format(answer=shown)))
  fits = [i for i, x in enumerate(ids) if len(x) <= budget]
  texts = dict(zip(fits, generate_texts(model, prompter, [ids[i] for i in fits], sampling, progress)))
  for i, r in enumerate(records):
    if i not in texts:
      yield None, "prompt_too_long"
      continue
    question = texts[i].strip().split("\n\n")[0].strip()
    if not r[field].strip():
      yield None, "empty_answer"
    elif not question:
      yield None, "empty"
    else:
      yield {"prompt": question, "response": r[field]}, "kept"


def write_jsonl(path, records):
  """Writes records to `path` (atomically: a temporary file, then rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(tmp, path)
