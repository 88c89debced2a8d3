"""What the table tools share (tools/aot_table.py, tools/long_context.py): one run of tools/aot_compile.py
read back as its JSON figures, and a README block between two marker lines, read or replaced atomically.
No flags, so either tool can import it."""

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AOT_TOOL = os.path.join(ROOT, "tools", "aot_compile.py")
README = os.path.join(ROOT, "README.md")


def run_aot(args):
  """(the figures, seconds) of one aot_compile.py run; exit 0 and 1 both carry figures."""
  t0 = time.perf_counter()
  out = subprocess.run([sys.executable, AOT_TOOL, *args], capture_output=True, text=True, cwd=ROOT, check=False)
  rows = [json.loads(l[len("RESULT "):]) for l in out.stdout.splitlines() if l.startswith("RESULT ")]
  if out.returncode not in (0, 1) or not rows:
    raise RuntimeError(f"python tools/aot_compile.py {' '.join(args)} failed:\n{out.stderr[-2000:]}")
  return rows[0], time.perf_counter() - t0


def split_block(path, begin, end):
  """(text before `begin`, the block between the markers, text after `end`) of the file at `path`."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if begin not in text or end not in text:
    raise SystemExit(f"error: {path} has no {begin} ... {end} lines to write the table between")
  head, rest = text.split(begin, 1)
  block, tail = rest.split(end, 1)
  return head, block, tail


def write_block(table, path, begin, end):
  """`table` between the marker lines, the rest of the file kept; atomic: a kill never leaves half a file."""
  head, _, tail = split_block(path, begin, end)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(f"{head}{begin}\n{table}\n{end}{tail}")
  os.replace(path + ".tmp", path)
