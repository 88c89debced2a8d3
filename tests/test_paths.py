"""gs:// workdirs go through the same code as local ones (lmstack/paths.py, etils.epath).

There is no network here: Cloud Storage is stood in for by fsspec's in-memory
filesystem registered as `gs`, which is what epath uses for gs:// when
TensorFlow is absent. Orbax's array writes (tensorstore) cannot be faked this
way, so a whole run is tested with an epath.Path workdir on the local disk.

  python -m pytest -q tests/test_paths.py
"""

import builtins
import importlib.util
import json
import os
import sys

import pytest
from etils import epath

from configs import pretrain
from lmstack import metrics, paths
from lmstack.train import trainer


@pytest.fixture
def no_local_io_on_urls(monkeypatch):
  """Fails a test that hands a gs:// path to os.path, os.makedirs or open()."""
  def guard(fn):
    def checked(path, *args, **kwargs):
      assert "://" not in os.fspath(path), f"{fn.__name__}({path!r}) on a URL"
      return fn(path, *args, **kwargs)
    checked.__name__ = fn.__name__
    return checked
  for name in ("abspath", "isdir", "exists", "isfile"):
    monkeypatch.setattr(os.path, name, guard(getattr(os.path, name)))
  monkeypatch.setattr(os, "makedirs", guard(os.makedirs))
  monkeypatch.setattr(builtins, "open", guard(builtins.open))


@pytest.fixture
def fake_gcs(monkeypatch):
  """gs:// backed by memory, through fsspec (epath's gs:// backend without TensorFlow)."""
  if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("with TensorFlow installed epath reads gs:// through tf.io.gfile, which this cannot fake")
  import fsspec
  from etils.epath import backend
  from fsspec.implementations.memory import MemoryFileSystem

  class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    root_marker = ""
    store = {}  # its own, not MemoryFileSystem's
    pseudo_dirs = [""]

    def __init__(self, *args, finalize_on_close=True, **kwargs):
      del finalize_on_close
      super().__init__(*args, **kwargs)

  saved = {k: fsspec.registry.get(k) for k in ("gs", "gcs")}
  for name in ("gs", "gcs"):
    fsspec.register_implementation(name, FakeGCS, clobber=True)
  backend._FileSystemSpecBackend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  yield FakeGCS.store
  for name, cls in saved.items():
    if cls is None:
      sys.modules["fsspec.registry"]._registry.pop(name, None)  # pylint: disable=protected-access
    else:
      fsspec.register_implementation(name, cls, clobber=True)
  backend._FileSystemSpecBackend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def test_url_paths_stay_urls(no_local_io_on_urls):
  run = paths.as_path("gs://bucket/runs/7b")
  assert paths.is_remote(run) and not paths.is_remote("/tmp/run")
  assert str(run / "checkpoints" / "200") == "gs://bucket/runs/7b/checkpoints/200"
  assert str(run / "metrics.jsonl") == "gs://bucket/runs/7b/metrics.jsonl"
  assert str(paths.as_path(run)) == "gs://bucket/runs/7b"
  assert str(paths.as_path("rel/run")) == os.path.join(os.getcwd(), "rel", "run")  # local: absolute


def test_metrics_on_gs(fake_gcs, no_local_io_on_urls):
  writer = metrics.MetricWriter("gs://bucket/run", 10, tensorboard=False)
  writer.write(1, {"loss": 2.5}, prefix="train/")
  writer.write(2, {"loss": 2.25}, prefix="train/")
  assert "gs://bucket/run/metrics.jsonl" not in fake_gcs or not fake_gcs["gs://bucket/run/metrics.jsonl"].getvalue()
  writer.close()  # an object cannot be appended to: it is written whole, at most every 30 s and at the end
  # A resumed run's writer continues the file.
  writer = metrics.MetricWriter("gs://bucket/run", 10, tensorboard=False)
  writer.write(3, {"loss": 2.0}, prefix="eval/")
  writer.close()
  rows = [json.loads(line) for line in epath.Path("gs://bucket/run/metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r.get("train/loss", r.get("eval/loss"))) for r in rows] == [(1, 2.5), (2, 2.25), (3, 2.0)]


def test_remote_append_file_rewrites_at_most_every_interval(fake_gcs):
  f = paths.AppendFile("gs://bucket/log.txt", interval=3600)
  f.write("a\n")
  f.flush()
  assert not epath.Path("gs://bucket/log.txt").exists()
  f.flush(force=True)
  f.write("b\n")
  f.flush()
  assert epath.Path("gs://bucket/log.txt").read_text() == "a\n"
  f.close()
  assert epath.Path("gs://bucket/log.txt").read_text() == "a\nb\n"


@pytest.mark.slow
def test_tiny_pretrain_with_an_epath_workdir(tmp_path, capsys):
  config = pretrain.get_config("runlocal")
  config.train.update(steps=2, eval_every=0, tensorboard=False)
  workdir = epath.Path(tmp_path) / "run"
  trainer.run(config, workdir)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
  config.train.steps = 3
  trainer.run(config, str(workdir))  # the same run, named by a string
  assert f"resumed from {workdir / 'checkpoints' / '2'}" in capsys.readouterr().out
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3]


def test_stage_configs_find_a_checkpoint_on_gs(fake_gcs, no_local_io_on_urls):
  """init_from=gs://... : the config helpers read the newest step's meta through epath."""
  from configs import common
  meta = {"model": {"d_model": 64}, "config": {"data": {"tokenizer": "t.model"}}}
  epath.Path("gs://bucket/run/checkpoints/4/meta/metadata").write_text(json.dumps({"model": {}}))
  epath.Path("gs://bucket/run/checkpoints/12/meta/metadata").write_text(json.dumps(meta))
  assert common.checkpoint_step("gs://bucket/run") == ("gs://bucket/run/checkpoints/12", 12)
  assert common.checkpoint_meta("gs://bucket/run") == meta
  assert common.checkpoint_tokenizer("gs://bucket/run/checkpoints/12") == ""
  with pytest.raises(ValueError, match="holds no checkpoint step directory"):
    common.checkpoint_step("gs://bucket/empty")
