"""The README, docs/ and the docstrings hold no placeholder left for later (RESULTS_PLACEHOLDER, TODO, ...)."""

import ast
import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A marker is a whole upper-case word, alone or a part of an UPPER_SNAKE name (RESULTS_PLACEHOLDER,
# TABLE_HERE). Whole words only: `-XXXXX-of-NNNNN` (a shard name) and `todo`, `Todo` are left alone.
MARKERS = ("PLACEHOLDER", "TODO", "TBD", "FIXME", "XXX")
_WORD = re.compile(r"[A-Za-z0-9_]+")


def markers(text):
  """[(line number, word)] of the placeholder markers in `text`."""
  found = []
  for n, line in enumerate(text.splitlines(), 1):
    for word in _WORD.findall(line):
      parts = word.split("_")
      if any(p in MARKERS for p in parts) or (len(parts) > 1 and parts[-1] == "HERE" and word.isupper()):
        found.append((n, word))
  return found


def test_markers_are_whole_words():
  assert markers("a\n```\nRESULTS_PLACEHOLDER\n```\nTABLE_HERE and FIGURE_HERE") == [
      (3, "RESULTS_PLACEHOLDER"), (5, "TABLE_HERE"), (5, "FIGURE_HERE")]
  assert markers("TODO: x. TBD (FIXME) XXX, FIXME_LATER") == [
      (1, "TODO"), (1, "TBD"), (1, "FIXME"), (1, "XXX"), (1, "FIXME_LATER")]
  assert markers("train-XXXXX-of-NNNNN.array_record, todo, Todo, TODOS, here, HERE, TBDs, placeholder") == []


DOCS = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))


def test_the_scan_reads_the_docs():
  assert len(DOCS) >= 2 and all(os.path.getsize(p) > 200 for p in DOCS)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: os.path.relpath(p, REPO))
def test_docs_have_no_placeholder(path):
  with open(path, encoding="utf-8") as f:
    found = markers(f.read())
  assert not found, f"{os.path.relpath(path, REPO)}: placeholder markers at (line, word) {found}"


def _docstrings(path):
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node, clean=False)
      if doc:
        yield getattr(node, "lineno", 1), doc


def test_docstrings_have_no_placeholder():
  files = [p for d in ("lmstack", "tools", "configs") for p in glob.glob(os.path.join(REPO, d, "**", "*.py"),
                                                                          recursive=True)]
  assert len(files) > 20
  found = [(os.path.relpath(p, REPO), line, word) for p in sorted(files) for line, doc in _docstrings(p)
           for _, word in markers(doc)]
  assert not found, f"placeholder markers in docstrings (file, line of the def, word): {found}"
