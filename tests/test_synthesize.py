"""Synthetic data: distillation and backtranslation from a tiny random teacher,
and verification that keeps passing code and survives hanging or crashing code."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from lmstack.synth import generate_data as gd
from lmstack.synth import verify

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = [sys.executable, os.path.join(REPO, "tools", "synthesize.py")]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """A params checkpoint of a randomly initialised tiny model, with lmstack's tokenizer."""
  from flax import nnx

  from lmstack.convert.hf import save_params_checkpoint
  from lmstack.data.tokenizer import load_tokenizer
  from lmstack.model.transformer import PRESETS, Transformer
  cfg = dataclasses.replace(PRESETS["tiny"], dtype="float32", init_std=0.3)
  tok = load_tokenizer(os.path.join(REPO, "lmstack", "assets", "tokenizer", "default.model"))
  path = tmp_path_factory.mktemp("teacher") / "ckpt"
  save_params_checkpoint(path, nnx.state(Transformer(cfg, nnx.Rngs(0)), nnx.Param), cfg, source="test",
                         tokenizer=tok)
  return str(path)


def _read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _tool(*args):
  r = subprocess.run(TOOL + list(args), capture_output=True, text=True, cwd=REPO, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  summary = [line for line in r.stdout.splitlines() if line.startswith("summary ")]
  return json.loads(summary[-1][len("summary "):]), r


def test_distill_and_backtranslate(teacher):
  model, tok = gd.load_teacher(teacher)
  sampling = gd.Sampling(max_new_tokens=8, batch_size=2, temperature=1.0, seed=3)
  prompts = [{"prompt": "To be, or not", "task_id": "t/1"}, {"prompt": "HAMLET."}, {"prompt": "word " * 200},
             {"prompt": "ROMEO. But soft"}]
  out = list(gd.distill(model, tok, prompts, sampling=sampling))
  assert [reason for _, reason in out] == ["kept", "kept", "prompt_too_long", "kept"]
  assert out[0][0]["task_id"] == "t/1" and "task_id" not in out[1][0]
  for (rec, _), src in zip(out, prompts):
    if rec:
      assert set(rec) <= {"prompt", "response", "task_id"} and rec["prompt"] == src["prompt"]
      assert isinstance(rec["response"], str) and rec["response"].strip()
  answers = [{"text": "Paris is the capital of France."}, {"text": " ".join(["long answer"] * 300)}]
  out = list(gd.backtranslate(model, tok, answers, sampling=sampling))
  assert [reason for _, reason in out] == ["kept", "kept"]  # the long answer is cut in the teacher's prompt
  for (rec, _), src in zip(out, answers):
    assert rec["response"] == src["text"] and rec["prompt"] and "\n\n" not in rec["prompt"]


def test_distill_cli(teacher, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("To be, or not\nHAMLET. Who's there?\n\n" + "word " * 200 + "\n")
  out, rejected = tmp_path / "distilled.jsonl", tmp_path / "rejected.jsonl"
  summary, r = _tool("--mode=distill", f"--ckpt={teacher}", f"--input={prompts}", f"--output={out}",
                     f"--rejected={rejected}", "--max_new_tokens=8", "--batch_size=2", "--temperature=0.8")
  assert summary == {"mode": "distill", "total": 3, "kept": 2, "dropped": {"prompt_too_long": 1}}
  rows = _read_jsonl(out)
  assert [row["prompt"] for row in rows] == ["To be, or not", "HAMLET. Who's there?"]
  assert all(set(row) == {"prompt", "response"} and row["response"] for row in rows)
  assert _read_jsonl(rejected)[0]["reason"] == "prompt_too_long"
  assert "distill: 2/2 prompts" in r.stderr


@pytest.mark.slow
def test_backtranslate_cli(teacher, tmp_path):
  answers = tmp_path / "answers.jsonl"
  answers.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["The sky is blue.", "Use a list."]))
  out = tmp_path / "bt.jsonl"
  summary, _ = _tool("--mode=backtranslate", f"--ckpt={teacher}", f"--input={answers}", f"--output={out}",
                     "--max_new_tokens=8")
  assert summary["total"] == 2 and summary["kept"] + sum(summary["dropped"].values()) == 2
  rows = _read_jsonl(out)
  assert [row["response"] for row in rows] == ["The sky is blue.", "Use a list."][:len(rows)]


def test_verify_keeps_passing_and_drops_the_rest(tmp_path):
  problems = verify.load_problems()
  p0, p2 = problems["HumanEval/0"], problems["HumanEval/2"]
  own = {"prompt": "def double(x):\n", "test": "def check(f):\n    assert f(2) == 4\n", "entry_point": "double"}
  body = "    return x * 2\n"
  records = [
      {"task_id": "HumanEval/0", "prompt": p0["prompt"], "response": p0["canonical_solution"]},  # by task_id
      {"prompt": p2["prompt"], "response": p2["canonical_solution"] + "\n\nprint('junk after')\n"},  # by prompt
      dict(own, response=f"Here you go:\n```python\ndef double(x):\n{body}```\n"),  # its own tests, fenced
      {"task_id": "HumanEval/0", "response": "    return True\n"},  # wrong
      dict(own, response="    while True:\n        pass\n"),  # hangs
      dict(own, response="    import os\n    os.abort()\n"),  # crashes the interpreter
      dict(own, response="    x = bytearray(1 << 40)\n"),  # a huge allocation
      dict(own, response="    import sys\n    sys.exit(0)\n"),  # exits before the tests
      dict(own, response="    import os\n    while True:\n        os.fork()\n"),  # a fork bomb
      {"prompt": "def unknown():\n", "response": "    pass\n"},  # no tests anywhere
  ]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  out, rejected = tmp_path / "kept.jsonl", tmp_path / "rejected.jsonl"
  summary, r = _tool("--mode=verify", f"--input={tmp_path / 'in.jsonl'}", f"--output={out}",
                     f"--rejected={rejected}", "--timeout_s=2", "--memory_mb=512", "--workers=2")
  assert summary == {"mode": "verify", "total": 10, "kept": 3, "dropped": {
      "failed:AssertionError": 1, "timeout": 1, "crash:SIGABRT": 1, "crash:MemoryError": 1,
      "failed:early exit": 1, "failed:PermissionError": 1, "no_tests": 1}}
  kept = _read_jsonl(out)
  assert [k.get("task_id") for k in kept] == ["HumanEval/0", None, None]
  assert "junk after" not in kept[1]["response"] and kept[2]["response"] == f"def double(x):\n{body}"
  assert [x["reason"] for x in _read_jsonl(rejected)][-1] == "no_tests"
  assert "verify: 9/9 samples" in r.stderr and "sandbox: network" in r.stderr
