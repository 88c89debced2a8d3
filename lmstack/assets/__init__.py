"""Files shipped inside the package: the default corpus and tokenizer.

Configs refer to them through `resolve`, so that one config works whether
lmstack is installed (site-packages), installed in editable mode, or run from
a checkout; a config written with an absolute path would break when copied to a
TPU VM whose virtualenv lives elsewhere. A path that starts with `<pkg>/` means
"inside the lmstack package":

  resolve("<pkg>/assets/corpus/train.txt")
  # -> /.../site-packages/lmstack/assets/corpus/train.txt

What the files are and how they were made: assets/corpus/README.md.
"""

import os
import pathlib

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent
ASSETS_DIR = PACKAGE_DIR / "assets"

PKG_PREFIX = "<pkg>/"

# The same paths as configs spell them (portable) ...
DEFAULT_TRAIN_FILES = PKG_PREFIX + "assets/corpus/train.txt"
DEFAULT_EVAL_FILES = PKG_PREFIX + "assets/corpus/valid.txt"
DEFAULT_TOKENIZER = PKG_PREFIX + "assets/tokenizer/default.model"


def resolve(path: str) -> str:
  """Expands a leading `<pkg>/` to the package directory, and `~`."""
  path = str(path).strip()
  if path.startswith(PKG_PREFIX):
    return str(PACKAGE_DIR / path[len(PKG_PREFIX):])
  return os.path.expanduser(path)


def default_corpus_paths() -> dict[str, str]:
  """Absolute paths of the embedded corpus and tokenizer."""
  return {
      "train": resolve(DEFAULT_TRAIN_FILES),
      "eval": resolve(DEFAULT_EVAL_FILES),
      "tokenizer": resolve(DEFAULT_TOKENIZER),
  }
