"""HumanEval-style verification of generated code, run in the sandbox.

  from lmstack.synth import verify
  problems = verify.load_problems()            # HumanEval: {task_id: problem}, 164 problems
  p = problems["HumanEval/0"]
  v = verify.check_completion(p, p["canonical_solution"], timeout_s=5)
  v.status, v.reason                           # "passed" | "failed" | "timeout" | "crash", one line why
  for i, v in verify.check_many([(p, completion), ...], workers=4):   # as they finish
    ...

A problem is {"task_id", "prompt", "test", "entry_point"} (HumanEval's
fields). The program run is

  prompt + completion + "\\n\\n" + test + f"\\n\\ncheck({entry_point})\\n"

(a completion that defines entry_point itself replaces the prompt's stub) in
`lmstack.synth.sandbox` (its own process, time and memory limits, no
network, a throw-away directory). `passed` means the program reached its last
line: every assertion of `check` held and nothing exited early; a completion
that calls sys.exit(0) or os._exit(0) before the tests is `failed`. A failing,
hanging or crashing sample is a verdict, never an exception.

A model's response becomes a completion with `extract_code`: the first
```-fenced block if there is one; a continuation of the prompt (a function
body) is cut at the first line back at column 0 that is not part of the body
(HumanEval's stop sequences: a new def, class, if, print or comment); a
response that defines `entry_point` itself is used whole, after the prompt's
imports and helpers.
"""

import concurrent.futures
import dataclasses
import gzip
import json
import os
import re

from lmstack.synth import sandbox

HUMANEVAL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "data",
                         "HumanEval.jsonl.gz")
STATUSES = ("passed", "failed", "timeout", "crash")


@dataclasses.dataclass
class Verdict:
  status: str  # one of STATUSES
  reason: str  # one line: "all tests passed", "AssertionError", "wall-clock limit of 5 s", ...
  seconds: float


def load_problems(path=HUMANEVAL):
  """{task_id: problem} from a HumanEval-format JSONL (.gz) file."""
  from lmstack.errors import DataError
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rt", encoding="utf-8") as f:
      rows = [json.loads(line) for line in f if line.strip()]
  except (OSError, ValueError) as e:
    raise DataError(f"problems file {path} is unreadable ({type(e).__name__}: {e})") from None
  for i, row in enumerate(rows):
    missing = [k for k in ("task_id", "prompt", "test", "entry_point") if k not in row]
    if missing:
      raise DataError(f"{path} line {i + 1}: a problem needs task_id, prompt, test and entry_point; "
                      f"it lacks {missing}")
  return {row["task_id"]: row for row in rows}


def program(problem, completion):
  """The Python program that tests `completion` against `problem`.

  A completion that defines the entry point itself replaces the prompt's stub
  (what comes before it in the prompt, imports and helpers, stays)."""
  prompt, entry = problem["prompt"], re.escape(problem["entry_point"])
  if re.search(rf"^def\s+{entry}\s*\(", completion, re.M):
    stub = list(re.finditer(rf"^def\s+{entry}\s*\(", prompt, re.M))
    prompt = prompt[:stub[-1].start()] if stub else prompt + "\n"
  return prompt + completion + "\n\n" + problem["test"] + "\n\n" + f"check({problem['entry_point']})\n"


_FENCE = re.compile(r"```[ \t]*[\w+-]*[ \t]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(response, entry_point):
  """The completion to test from a model's response (see the module doc)."""
  fenced = _FENCE.search(response)
  code = fenced.group(1) if fenced else response
  if re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", code, re.M):
    return code.strip("\n") + "\n"  # a whole function: replaces the prompt's stub
  lines, out = code.split("\n"), []
  for i, line in enumerate(lines):
    if i > 0 and line[:1] not in ("", " ", "\t") and any(l.strip() for l in out):
      break
    out.append(line)
  return "\n".join(out).rstrip() + "\n"


def check_completion(problem, completion, *, timeout_s=5.0, memory_mb=1024, **limits):
  """Runs `completion` against `problem`'s tests in the sandbox; a Verdict."""
  res = sandbox.run_python(program(problem, completion), timeout_s=timeout_s, memory_mb=memory_mb, **limits)
  if res.status == "ok":
    if res.finished:
      return Verdict("passed", "all tests passed", res.seconds)
    return Verdict("failed", f"exited before the tests ended ({res.reason})", res.seconds)
  if res.status == "error":
    return Verdict("failed", res.reason, res.seconds)
  return Verdict(res.status, res.reason, res.seconds)


def check_many(pairs, *, workers=None, **limits):
  """Yields (index, Verdict) for each (problem, completion) as they finish,
  `workers` sandboxes at a time (default: twice the number of CPUs, as a
  sample spends much of its ~0.1 s starting a process)."""
  pairs = list(pairs)
  workers = workers or 2 * (os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    futures = {pool.submit(check_completion, p, c, **limits): i for i, (p, c) in enumerate(pairs)}
    for fut in concurrent.futures.as_completed(futures):
      yield futures[fut], fut.result()


def reason_kind(verdict):
  """A short key for counting verdicts: "passed", "failed:AssertionError",
  "timeout", "crash:SIGSEGV", "crash:MemoryError", ..."""
  if verdict.status in ("passed", "timeout"):
    return verdict.status
  head = verdict.reason.split(":")[0].split(" (")[0].strip()
  if head.startswith("killed by "):
    head = head[len("killed by "):]
  if head.startswith("exited before"):
    head = "early exit"
  return f"{verdict.status}:{head}"
