"""Workdir paths, local or remote (`gs://bucket/run`), through one API: `etils.epath`.

Orbax takes epath paths, so a run on a TPU pod writes its checkpoints, metrics
and TensorBoard events straight to Cloud Storage through the same code as a
local run. epath reads gs:// with TensorFlow's gfile or, without TensorFlow,
with gcsfs (the `tpu` extra installs it).
"""

import os
import time

from etils import epath


def is_remote(path):
  """A URL such as gs://bucket/run (not a local file path)."""
  return "://" in os.fspath(path)


def as_path(path):
  """An epath.Path: a local path made absolute (Orbax wants that), a URL as given."""
  text = os.fspath(path)
  return epath.Path(text if is_remote(text) else os.path.abspath(text))


class AppendFile:
  """A text file that grows by lines, like `open(path, "a")`.

  A cloud object cannot be appended to, so a remote file is kept in memory
  (from what it held before, so a resumed run continues it) and rewritten
  whole on `flush` at most every `interval` seconds, and on `close`.
  """

  def __init__(self, path, interval=30.0):
    self.path = as_path(path)
    self.remote = is_remote(self.path)
    self.interval = interval
    if self.remote:
      self._text = [self.path.read_text()] if self.path.exists() else []
      self._written = time.monotonic()
    else:
      self._file = self.path.open("a", encoding="utf-8")

  def write(self, text):
    if self.remote:
      self._text.append(text)
    else:
      self._file.write(text)

  def flush(self, force=False):
    if not self.remote:
      self._file.flush()
    elif force or time.monotonic() - self._written >= self.interval:
      self.path.write_text("".join(self._text))
      self._written = time.monotonic()

  def close(self):
    if self.remote:
      self.flush(force=True)
    else:
      self._file.close()
