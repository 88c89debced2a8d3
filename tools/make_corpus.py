"""Makes the embedded default corpus, lmstack/assets/corpus/{train,valid}.txt.

  python tools/make_corpus.py                      # from ../shared/data
  python tools/make_corpus.py --data_dir=/path/to/data --out_dir=/tmp/corpus

Input (see lmstack/assets/corpus/README.md for origin and licence):
  * botchan.txt: the whole novel with the translator's note, without the
    Project Gutenberg header, licence and transcriber's errata; a blank line
    is put before each "CHAPTER" heading so that no document spans two
    chapters.
  * shakespeare.txt: the thirteen plays in PLAYS, whole, in that order.
    The source file concatenates 42 works without newlines between them
    ("[Exeunt.]AS YOU LIKE IT"), so each work is located by its
    "by William Shakespeare" byline and its title is cut off the line above.

Both are split into documents exactly as the text reader does
(`lmstack.data.sources.split_documents`: runs of non-blank lines, at most
MAX_DOC_CHARS characters). Every 20th document (index % 20 == 19) goes to
valid.txt, the rest to train.txt; documents are separated by a blank line, so
that reading either file gives back exactly these documents and none is in
both. The output is byte-for-byte reproducible.
"""

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lmstack.data import sources  # pylint: disable=g-import-not-at-top

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLAYS = (
    "AS YOU LIKE IT",
    "HAMLET, PRINCE OF DENMARK",
    "JULIUS CAESAR",
    "THE TRAGEDY OF KING LEAR",
    "MACBETH",
    "THE MERCHANT OF VENICE",
    "A MIDSUMMER NIGHT'S DREAM",
    "MUCH ADO ABOUT NOTHING",
    "OTHELLO, THE MOOR OF VENICE",
    "ROMEO AND JULIET",
    "THE TAMING OF THE SHREW",
    "THE TEMPEST",
    "TWELFTH NIGHT; OR, WHAT YOU WILL",
)
VALID_EVERY = 20

_BYLINE = "by William Shakespeare"
# What ends the previous work on a title line: a stage direction, a sentence,
# a quotation, or the "THE END" some works finish with.
_END_OF_PREVIOUS = re.compile(r"\]|\}|\.'?|THE END")


def shakespeare_works(text: str) -> dict[str, str]:
  """Splits shakespeare.txt into {title: text of the work}."""
  lines = text.split("\n")
  starts = []  # (line index of the title, column where the title starts)
  for i, line in enumerate(lines):
    if line.strip() == _BYLINE:
      t = i - 1
      while not lines[t].strip():
        t -= 1
      column = 0
      for m in _END_OF_PREVIOUS.finditer(lines[t]):
        column = m.end()
      starts.append((t, column))
  works = {}
  for k, (t, column) in enumerate(starts):
    title = lines[t][column:].strip()
    if k + 1 < len(starts):
      next_t, next_column = starts[k + 1]
      body = [lines[t][column:]] + lines[t + 1:next_t]
      body.append(lines[next_t][:next_column])
    else:
      body = [lines[t][column:]] + lines[t + 1:]
    while body and body[-1].strip() in ("", "THE END"):
      body.pop()
    works[title] = "\n".join(body)
  return works


def botchan_novel(text: str) -> str:
  """The novel without the Gutenberg header and footer, chapters separated."""
  lines = text.split("\n")
  first = lines.index("BOTCHAN (MASTER DARLING)")  # After "Produced by ...".
  # The novel ends with "--(THE END)--"; the transcriber's errata list and
  # the Gutenberg footer follow.
  last = lines.index("--(THE END)--") + 1
  out = []
  for line in lines[first:last]:
    if line.startswith("CHAPTER ") or line == "BOTCHAN (MASTER DARLING)":
      out.append("")
    out.append(line)
  return "\n".join(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
      "--data_dir", default=os.path.join(os.path.dirname(_ROOT), "shared", "data")
  )
  parser.add_argument(
      "--out_dir", default=os.path.join(_ROOT, "lmstack", "assets", "corpus")
  )
  args = parser.parse_args(argv)

  works = shakespeare_works(
      sources.read_text(os.path.join(args.data_dir, "shakespeare.txt"))
  )
  missing = [t for t in PLAYS if t not in works]
  if missing:
    sys.exit(f"not found in shakespeare.txt: {missing}; have {sorted(works)}")
  botchan = sources.read_text(os.path.join(args.data_dir, "botchan.txt"))
  texts = [botchan_novel(botchan)]
  texts += [works[t] for t in PLAYS]

  docs = [d for text in texts for d in sources.split_documents(text)]
  splits = {"train": [], "valid": []}
  for i, doc in enumerate(docs):
    held_out = i % VALID_EVERY == VALID_EVERY - 1
    splits["valid" if held_out else "train"].append(doc)

  os.makedirs(args.out_dir, exist_ok=True)
  for name, split_docs in splits.items():
    path = os.path.join(args.out_dir, f"{name}.txt")
    with open(path, "w", encoding="utf-8", newline="\n") as f:
      f.write("\n\n".join(split_docs) + "\n")
    # Reading the file back must give the same documents (no merge or split).
    assert sources.text_documents(path) == split_docs, path
    print(
        f"{path}: {os.path.getsize(path):,} bytes, {len(split_docs):,}"
        " documents"
    )


if __name__ == "__main__":
  main()
