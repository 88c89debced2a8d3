"""Synthetic SFT data: distill a teacher, backtranslate answers, keep only verified code.

  # Distillation: a teacher checkpoint answers prompts (JSONL field --field, or one prompt per line)
  python tools/synthesize.py --mode=distill --ckpt=runs/sft --input=prompts.jsonl --output=distilled.jsonl \\
      --max_new_tokens=256 --temperature=0.8 --top_p=0.95
  # Backtranslation: the teacher writes the question each existing answer answers
  python tools/synthesize.py --mode=backtranslate --ckpt=runs/sft \\
      --input=lmstack/assets/data/python_docs.jsonl.gz --field=text --output=backtranslated.jsonl
  # Verification: run HumanEval-style tests on generated code in the sandbox; keep what passes
  python tools/synthesize.py --mode=distill --ckpt=runs/code --input=lmstack/assets/data/HumanEval.jsonl.gz \\
      --output=code.jsonl --max_new_tokens=192
  python tools/synthesize.py --mode=verify --input=code.jsonl --output=verified.jsonl --rejected=rejected.jsonl

Output records are {"prompt", "response"} JSONL (what `data.kind="sft"`
reads). Verify finds each record's tests by its "test" and "entry_point"
fields, else by "task_id", else by an exact prompt match in --problems
(default: the HumanEval copy in lmstack/assets/data); the kept record's
response is the code that was tested (`lmstack.synth.verify.extract_code`).
Each sample runs in lmstack.synth.sandbox (own process, --timeout_s,
--memory_mb, no network, a throw-away directory): a failing, hanging or
crashing sample is dropped, never the run. The run ends with the kept count
and the dropped ones by reason; --rejected keeps the dropped records with a
"reason" field.
"""

import collections
import json
import sys
import time

from absl import app, flags, logging

_MODE = flags.DEFINE_enum("mode", None, ["distill", "backtranslate", "verify"], "What to do.", required=True)
_INPUT = flags.DEFINE_string("input", None, "JSONL (.gz) records, or a text file of one item per line.",
                             required=True)
_OUTPUT = flags.DEFINE_string("output", None, "JSONL of the kept records.", required=True)
_REJECTED = flags.DEFINE_string("rejected", None, "Optional JSONL of the dropped records, with a reason.")
_FIELD = flags.DEFINE_string("field", None, "The input field: default prompt (distill), text "
                             "(backtranslate), response (verify; completion also works).")
_LIMIT = flags.DEFINE_integer("limit", 0, "Use only the first N records (0: all).")
# distill / backtranslate
_CKPT = flags.DEFINE_string("ckpt", None, "Teacher: a training workdir or params checkpoint.")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap prompts in the tokenizer's chat template.")
_TEMPLATE = flags.DEFINE_string("template", None, "Backtranslation prompt with an {answer} placeholder.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 for greedy decoding.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1.0: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Prompts decoded together.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Matmul input dtype for decoding.")
# verify
_PROBLEMS = flags.DEFINE_string("problems", None, "HumanEval-format problems (default: the bundled HumanEval).")
_TIMEOUT = flags.DEFINE_float("timeout_s", 5.0, "Wall-clock limit per sample.")
_MEMORY = flags.DEFINE_integer("memory_mb", 1024, "Address-space limit per sample.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Samples verified at once (0: twice the number of CPUs).")


def _print_progress(mode):
  last = [0.0]

  def progress(done, total, tokens, seconds):
    now = time.monotonic()
    if done == total or now - last[0] >= 1.0:
      last[0] = now
      print(f"{mode}: {done}/{total} prompts | {tokens:,} new tokens | {tokens / max(seconds, 1e-9):,.0f} "
            "tokens/s (including compilation)", file=sys.stderr, flush=True)
  return progress


def _generate(mode, field):
  from lmstack.errors import ConfigError
  from lmstack.synth import generate_data as gd
  if not _CKPT.value:
    raise ConfigError(f"--mode={mode} needs --ckpt (a teacher checkpoint)")
  records = gd.read_records(_INPUT.value, field, _LIMIT.value)
  model, tok = gd.load_teacher(_CKPT.value, _DTYPE.value)
  sampling = gd.Sampling(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                         top_p=_TOP_P.value, seed=_SEED.value, batch_size=_BATCH.value)
  kw = dict(field=field, chat=_CHAT.value, sampling=sampling, progress=_print_progress(mode))
  if mode == "distill":
    outcomes = gd.distill(model, tok, records, **kw)
  else:
    outcomes = gd.backtranslate(model, tok, records, template=_TEMPLATE.value or gd.BACKTRANSLATE_TEMPLATE, **kw)
  kept, rejected = [], []
  for r, (rec, reason) in zip(records, outcomes):
    if rec is None:
      rejected.append(dict(r, reason=reason))
    else:
      kept.append(rec)
  return len(records), kept, rejected


def _find_problem(record, problems, by_prompt):
  if "test" in record and "entry_point" in record:
    return {"task_id": record.get("task_id"), "prompt": record.get("prompt", ""), "test": record["test"],
            "entry_point": record["entry_point"]}
  if record.get("task_id") in problems:
    return problems[record["task_id"]]
  return by_prompt.get(str(record.get("prompt", "")).strip())


def _verify(field):
  from lmstack.synth import generate_data as gd
  from lmstack.synth import sandbox, verify
  iso = sandbox.probe()
  print("sandbox: " + "; ".join(f"{k} {v}" for k, v in iso.items() if k != "status"), file=sys.stderr)
  if iso.get("network") == "none" or iso.get("filesystem", "none").startswith("none"):
    logging.warning("the sandbox lacks kernel isolation here (see lmstack/synth/sandbox.py); only Python "
                    "guards stand between generated code and this machine")
  problems = verify.load_problems(_PROBLEMS.value or verify.HUMANEVAL)
  by_prompt = {p["prompt"].strip(): p for p in problems.values()}
  records = gd.read_records(_INPUT.value, field, _LIMIT.value)
  jobs, rejected = [], []
  for i, r in enumerate(records):
    problem = _find_problem(r, problems, by_prompt)
    if problem is None:
      rejected.append((i, dict(r, reason="no_tests")))
    else:
      jobs.append((i, problem, verify.extract_code(r[field], problem["entry_point"])))
  counts, kept, t0, last = collections.Counter(), [], time.monotonic(), 0.0
  pairs = [(p, c) for _, p, c in jobs]
  for n, (j, v) in enumerate(verify.check_many(pairs, workers=_WORKERS.value or None, timeout_s=_TIMEOUT.value,
                                               memory_mb=_MEMORY.value), 1):
    i, _, code = jobs[j]
    counts[v.status] += 1
    if v.status == "passed":
      kept.append((i, dict(records[i], response=code)))
    else:
      rejected.append((i, dict(records[i], reason=verify.reason_kind(v), detail=v.reason)))
    now = time.monotonic()
    if n == len(jobs) or now - last >= 1.0:
      last = now
      print(f"verify: {n}/{len(jobs)} samples | " + " | ".join(f"{s} {counts[s]}" for s in verify.STATUSES)
            + f" | {n / (now - t0):.1f} samples/s", file=sys.stderr, flush=True)
  return len(records), [r for _, r in sorted(kept)], [r for _, r in sorted(rejected)]


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from lmstack.errors import LmstackError
  from lmstack.synth import generate_data as gd
  mode = _MODE.value
  field = _FIELD.value or {"distill": "prompt", "backtranslate": "text", "verify": "response"}[mode]
  t0 = time.monotonic()
  try:
    total, kept, rejected = _verify(field) if mode == "verify" else _generate(mode, field)
    gd.write_jsonl(_OUTPUT.value, kept)
    if _REJECTED.value:
      gd.write_jsonl(_REJECTED.value, rejected)
  except LmstackError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  reasons = collections.Counter(r["reason"] for r in rejected)
  print(f"{mode}: kept {len(kept)} of {total} in {time.monotonic() - t0:.1f} s -> {_OUTPUT.value}")
  print(f"dropped {len(rejected)}" + "".join(f"\n  {k:32s} {n}" for k, n in reasons.most_common()))
  print("summary " + json.dumps({"mode": mode, "total": total, "kept": len(kept), "dropped": dict(reasons)}))
  return 0


if __name__ == "__main__":
  app.run(main)
