"""Loading a checkpoint never unpickles: every pickle entry point raises while
lmstack restores one, and pickle bombs planted in a checkpoint stay inert."""

import contextlib
import dataclasses
import os
import pickle
import sys

import numpy as np
import pytest

from lmstack import checkpoint as ckpt_lib
from lmstack.errors import CheckpointError

_WATCH = {"on": False, "events": []}


def _audit(event, args):
  # Any unpickling of an object that is not a plain builtin looks up its class.
  if _WATCH["on"] and event == "pickle.find_class":
    _WATCH["events"].append(args)


sys.addaudithook(_audit)  # cannot be removed; inert unless _WATCH["on"]


class _Bomb:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))  # unpickling creates the marker file


@contextlib.contextmanager
def no_pickle(monkeypatch):
  """Makes every Python-level way to unpickle raise, and counts C-level ones."""
  def refuse(*args, **kwargs):
    raise AssertionError("checkpoint loading tried to unpickle")

  monkeypatch.setattr(pickle, "load", refuse)
  monkeypatch.setattr(pickle, "loads", refuse)
  monkeypatch.setattr(pickle, "Unpickler", refuse)
  monkeypatch.setattr(np, "load", refuse)
  _WATCH.update(on=True, events=[])
  try:
    yield
  finally:
    _WATCH["on"] = False
  assert _WATCH["events"] == [], f"unpickled classes: {_WATCH['events']}"


def _plant_bombs(step_dir, marker):
  """Pickle bombs beside every item of a checkpoint step, under names a loader might try."""
  bomb = pickle.dumps(_Bomb(str(marker)))
  items = [d for d in os.listdir(step_dir) if os.path.isdir(os.path.join(step_dir, d))]
  assert items
  for name in ["evil.pkl", "checkpoint"] + [f"{d}/{n}" for d in items for n in ("evil.pkl", "_pickle", "data.pkl")]:
    with open(os.path.join(step_dir, name), "wb") as f:
      f.write(bomb)


@pytest.fixture(scope="module")
def params_ckpt(tmp_path_factory, tiny_cfg):
  import jax
  from flax import nnx

  from lmstack.convert.hf import save_params_checkpoint
  from lmstack.model.transformer import Transformer
  cfg = dataclasses.replace(tiny_cfg, vocab_size=64, dtype="float32")
  state = nnx.state(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
  path = save_params_checkpoint(tmp_path_factory.mktemp("p") / "ckpt", state, cfg, source="test")
  return path, jax.tree.map(np.asarray, nnx.to_pure_dict(state))


def test_restore_params_never_unpickles(params_ckpt, tmp_path, monkeypatch):
  path, expected = params_ckpt
  marker = tmp_path / "exploded"
  _plant_bombs(os.path.join(path, "0"), marker)
  with no_pickle(monkeypatch):
    params, _, meta = ckpt_lib.restore_params(path)
  assert meta["source"] == "test" and not marker.exists()
  np.testing.assert_array_equal(np.asarray(params["embed"]), expected["embed"])
  np.testing.assert_array_equal(np.asarray(params["blocks"]["attn"]["q"]), expected["blocks"]["attn"]["q"])


def test_pickled_meta_is_an_error_not_an_execution(params_ckpt, tmp_path, monkeypatch):
  import shutil
  path = shutil.copytree(params_ckpt[0], tmp_path / "ckpt")
  marker = tmp_path / "exploded"
  with open(os.path.join(path, "0", "meta", "metadata"), "wb") as f:
    f.write(pickle.dumps(_Bomb(str(marker))))
  with no_pickle(monkeypatch), pytest.raises(CheckpointError, match="unreadable"):
    ckpt_lib.restore_params(path)
  assert not marker.exists()


def test_training_checkpoint_restore_never_unpickles(tmp_path, monkeypatch):
  import jax.numpy as jnp
  state = {"step": jnp.asarray(3), "params": {"w": jnp.arange(6.0).reshape(2, 3)}}
  ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints", async_save=False)
  ckpt.save(3, state, {"position": 7}, {"model": {}, "note": "x"})
  ckpt.wait()
  marker = tmp_path / "exploded"
  _plant_bombs(os.path.join(tmp_path, "checkpoints", "3"), marker)
  with no_pickle(monkeypatch):
    meta = ckpt.read_meta(3)
    restored, data = ckpt.restore(3, ckpt_lib.abstract_like(state))
  ckpt.close()
  assert meta["note"] == "x" and data == {"position": 7} and not marker.exists()
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.arange(6.0).reshape(2, 3))


def test_the_guard_sees_unpickling(tmp_path, monkeypatch):
  """Not vacuous: the bomb goes off when unpickled, even by the C unpickler,
  and no_pickle notices."""
  import _pickle
  marker = tmp_path / "exploded"
  with pytest.raises(AssertionError, match="unpickled classes"), no_pickle(monkeypatch):
    _pickle.loads(pickle.dumps(_Bomb(str(marker))))
  assert marker.exists()
  with pytest.raises(AssertionError, match="tried to unpickle"), no_pickle(monkeypatch):
    pickle.loads(b"")
