"""End-to-end training: smoke run, exact resume after a kill, bad input."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

import fault_hooks
from configs import pretrain
from lmstack.errors import CheckpointError, ConfigError, DataError
from lmstack.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**train):
  config = pretrain.get_config("runlocal")
  config.train.update(train)
  return config


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _train_losses(workdir):
  """step -> train/loss, the last logged value of each step."""
  return {r["step"]: r["train/loss"] for r in _rows(workdir) if "train/loss" in r}


def _tree_digest(path):
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for name in sorted(files):
      p = os.path.join(root, name)
      h.update(p.encode())
      with open(p, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


def test_runlocal_trains_checkpoints_and_logs(tmp_path):
  config = _config(steps=6, eval_every=3, checkpoint_every=2, keep_checkpoints=2)
  last = trainer.run(config, str(tmp_path))
  losses = _train_losses(tmp_path)
  assert sorted(losses) == [1, 2, 3, 4, 5, 6]
  assert losses[6] < losses[1]
  evals = [r for r in _rows(tmp_path) if "eval/loss" in r]
  assert len(evals) == 2 and evals[-1]["eval/loss"] < evals[0]["eval/loss"] + 0.5
  assert last["eval/perplexity"] > 1
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "6"]  # saved at 2, 4, 6; the newest 2 kept
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))


def _main(workdir, *flags, env=None):
  main = [fault_hooks.MAIN] if env else ["-m", "lmstack.main"]  # faults come in through the test seam
  cmd = [sys.executable, *main, "--config=configs/pretrain.py:runlocal", f"--workdir={workdir}",
         *flags]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})},
                        timeout=600)


@pytest.mark.slow
def test_killed_run_resumes_with_identical_losses(tmp_path):
  flags = ["--config.train.steps=20", "--config.train.checkpoint_every=5", "--config.train.eval_every=0"]
  straight = _main(tmp_path / "straight", *flags)
  assert straight.returncode == 0, straight.stderr[-2000:]

  killed = _main(tmp_path / "killed", *flags, env={"LMSTACK_FAULT_KILL_AT_STEP": "10"})
  assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL, mid async save of step 10
  before = _train_losses(tmp_path / "killed")
  assert max(before) == 10
  resumed = _main(tmp_path / "killed", *flags)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from" in resumed.stdout

  want, got = _train_losses(tmp_path / "straight"), _train_losses(tmp_path / "killed")
  assert sorted(want) == list(range(1, 21)) and sorted(got) == list(range(1, 21))
  # Bitwise: same program, same data order, same restored state.
  assert got == want
  assert all(before[s] == want[s] for s in before)


def test_unknown_config_key_is_one_line(tmp_path):
  out = _main(tmp_path, "--config.train.setps=3")
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == [
      'error: unknown config field setps; Did you mean "steps" instead of "setps"?']
  assert not os.path.exists(tmp_path / "checkpoints")


def test_missing_corpus(tmp_path):
  config = _config()
  config.data.train_files = str(tmp_path / "nowhere.txt")
  with pytest.raises(DataError, match="nowhere.txt"):
    trainer.run(config, str(tmp_path / "run"))


def test_empty_corpus(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n  \n")
  config = _config()
  config.data.train_files = str(empty)
  with pytest.raises(DataError, match="empty"):
    trainer.run(config, str(tmp_path / "run"))


def test_invalid_utf8_is_replaced_with_a_warning(tmp_path, caplog):
  bad = tmp_path / "bad.txt"
  # 2 invalid bytes in 2,600: under sources.MAX_INVALID_SHARE, so replaced, not refused
  bad.write_bytes(b"To be, or not to be: that is the question.\n" * 60 + b"bad \xff\xfe bytes\n")
  config = _config(steps=2)
  config.data.train_files = str(bad)
  with caplog.at_level("WARNING"):
    trainer.run(config, str(tmp_path / "run"))
  assert any("bad.txt" in r.getMessage() for r in caplog.records)


def test_tokenizer_larger_than_vocab(tmp_path):
  config = _config()
  config.model.vocab_size = 1000
  with pytest.raises(DataError, match="8192 pieces but config.model.vocab_size=1000"):
    trainer.run(config, str(tmp_path))


def test_bad_config_values(tmp_path):
  with pytest.raises(ConfigError, match="seq_len"):
    trainer.run(_config(seq_len=4096), str(tmp_path))
  with pytest.raises(ConfigError, match="grad_accum_steps"):
    trainer.run(_config(grad_accum_steps=3), str(tmp_path))


def test_checkpoint_of_another_shape_is_refused_and_kept(tmp_path):
  trainer.run(_config(steps=2, eval_every=0), str(tmp_path))
  digest = _tree_digest(tmp_path / "checkpoints")
  config = _config(steps=4, eval_every=0)
  config.model.n_layers = 3
  with pytest.raises(CheckpointError, match="n_layers: checkpoint 2 vs config 3"):
    trainer.run(config, str(tmp_path))
  assert _tree_digest(tmp_path / "checkpoints") == digest


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip"])
def test_corrupt_checkpoint_is_refused_and_kept(tmp_path, damage):
  """The only checkpoint is damaged: a one-line error, nothing changed. (With an
  older intact one the run falls back to it: tests/test_faults.py.)"""
  trainer.run(_config(steps=2, eval_every=0), str(tmp_path))
  state_dir = tmp_path / "checkpoints" / "2" / "state"
  files = sorted((p for p in state_dir.rglob("*") if p.is_file() and p.stat().st_size > 64),
                 key=lambda p: -p.stat().st_size)
  if damage == "truncate":
    with open(files[0], "r+b") as f:
      f.truncate(files[0].stat().st_size // 2)
  elif damage == "flip":  # loads silently but for the manifest
    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 0x10
    files[0].write_bytes(bytes(data))
  else:
    (tmp_path / "checkpoints" / "2" / "meta" / "metadata").unlink()
  digest = _tree_digest(tmp_path / "checkpoints")
  with pytest.raises(CheckpointError, match=r"none of the 1 checkpoints in .*checkpoints is intact \(newest: "
                                            r"checkpoint .*checkpoints/2"):
    trainer.run(_config(steps=4, eval_every=0), str(tmp_path))
  assert _tree_digest(tmp_path / "checkpoints") == digest


@pytest.mark.slow
def test_sigterm_saves_exits_75_and_resumes_exactly(tmp_path):
  import signal
  import time
  # A constant learning rate, so that the interrupted run (asked for 100000 steps) and the uninterrupted one
  # (asked for as many as the two parts together) take the same steps.
  flags = ["--config.train.checkpoint_every=1000", "--config.train.eval_every=0", "--config.optim.schedule=constant"]
  cmd = [sys.executable, "-m", "lmstack.main", "--config=configs/pretrain.py:runlocal", f"--workdir={tmp_path / 'run'}",
         "--config.train.steps=100000", *flags]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  def steps_logged():
    try:
      return len(_train_losses(tmp_path / "run"))
    except (OSError, ValueError):  # not written yet, or a line half-written
      return 0

  deadline = time.time() + 300
  while time.time() < deadline and steps_logged() < 3:
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 75, err[-2000:]  # lmstack.errors.EXIT_PREEMPTED: saved, resumable
  assert err.splitlines()[-1].startswith("preempted: SIGTERM at step "), err[-2000:]
  before = _train_losses(tmp_path / "run")
  stopped = max(before)
  assert f"SIGTERM: saving step {stopped}" in out
  assert str(stopped) in os.listdir(tmp_path / "run" / "checkpoints")

  # The relaunch resumes from the SIGTERM checkpoint and matches an uninterrupted run bit for bit.
  total = f"--config.train.steps={stopped + 5}"
  resumed = _main(tmp_path / "run", total, *flags)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"resumed from {tmp_path / 'run' / 'checkpoints' / str(stopped)}" in resumed.stdout
  straight = _main(tmp_path / "straight", total, *flags)
  assert straight.returncode == 0, straight.stderr[-2000:]
  want, got = _train_losses(tmp_path / "straight"), _train_losses(tmp_path / "run")
  assert sorted(want) == sorted(got) == list(range(1, stopped + 6))
  assert got == want
  assert all(before[s] == want[s] for s in before)


def test_init_from_starts_from_another_runs_parameters(tmp_path):
  import jax
  import numpy as np
  from lmstack import checkpoint as ckpt_lib
  trainer.run(_config(steps=3, eval_every=0), str(tmp_path / "source"))
  # lr 0: the first step leaves the parameters where init_from put them.
  config = _config(steps=1, eval_every=0)
  config.init_from = str(tmp_path / "source")
  config.optim.update(lr=0.0, schedule="constant")
  config.seed = 7  # a different fresh init, so equality below means "loaded"
  trainer.run(config, str(tmp_path / "stage2"))
  src, _, _ = ckpt_lib.restore_params(str(tmp_path / "source"))
  dst, _, _ = ckpt_lib.restore_params(str(tmp_path / "stage2"))
  assert len(jax.tree.leaves(src)) == 9 + 3  # 9 stacked block params; embed, final norm, unembed
  for a, b in zip(jax.tree.leaves(src), jax.tree.leaves(dst)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The stage's own step counter and schedule start from zero.
  assert sorted(_train_losses(tmp_path / "stage2")) == [1]


def test_init_from_of_another_shape_is_refused(tmp_path):
  trainer.run(_config(steps=2, eval_every=0), str(tmp_path / "source"))
  config = _config(steps=2, eval_every=0)
  config.init_from = str(tmp_path / "source")
  config.model.mlp_dim = 128
  with pytest.raises(CheckpointError, match="mlp_dim: checkpoint 192 vs config 128"):
    trainer.run(config, str(tmp_path / "stage2"))


def test_config_takes_model_and_tokenizer_from_init_from(tmp_path):
  source = _config(steps=2, eval_every=0)
  source.model.n_layers = 3
  trainer.run(source, str(tmp_path / "source"))
  config = pretrain.get_config(f"runlocal,init_from={tmp_path / 'source'}")
  assert config.init_from == str(tmp_path / "source")
  assert config.model.n_layers == 3 and config.model.d_model == source.model.d_model
  assert config.data.tokenizer == source.data.tokenizer
  config.train.update(steps=1, eval_every=0)
  trainer.run(config, str(tmp_path / "stage2"))
  assert sorted(_train_losses(tmp_path / "stage2")) == [1]


def test_profile_steps_write_a_trace_of_those_steps_for_tensorboard(tmp_path):
  import glob  # pylint: disable=import-outside-toplevel
  import gzip  # pylint: disable=import-outside-toplevel
  trainer.run(_config(steps=4, eval_every=0, profile_steps="2:4"), str(tmp_path))
  runs = glob.glob(str(tmp_path / "tb" / "plugins" / "profile" / "*"))
  assert len(runs) == 1, runs  # one trace, where TensorBoard's profile plugin looks
  assert glob.glob(os.path.join(runs[0], "*.xplane.pb"))
  with gzip.open(glob.glob(os.path.join(runs[0], "*.trace.json.gz"))[0]) as f:
    events = json.load(f)["traceEvents"]
  # The compiled step's XLA ops are in it: the trace covers steps 2 and 3, not only the host.
  assert sum(1 for e in events if e.get("ph") == "X" and "fusion" in e.get("name", "")) > 10


@pytest.mark.parametrize("value", ["5", "4:2", "0:3", "a:b", "2:2"])
def test_a_bad_profile_range_is_one_line(tmp_path, value):
  with pytest.raises(ConfigError, match="train.profile_steps"):
    trainer.run(_config(profile_steps=value), str(tmp_path))


def _wandb_records(path):
  """The protobuf records of an offline W&B run file: a 7-byte header (":W&B", magic, version), then
  LevelDB-log blocks of 32 KiB whose records are (crc32c, length, type 1 full / 2 first / 3 middle / 4 last)."""
  import struct  # pylint: disable=import-outside-toplevel
  from wandb.proto import wandb_internal_pb2  # pylint: disable=import-outside-toplevel
  with open(path, "rb") as f:
    data = f.read()
  assert data[:4] == b":W&B"
  pos, block, buf, out = 7, 32768, b"", []
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's tail too short for a header is padding
      pos += block - pos % block
      continue
    _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
    chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
    buf = chunk if kind in (1, 2) else buf + chunk
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(buf)
      out.append(record)
  return out


def test_wandb_offline_logs_the_scalars_and_the_config_and_resumes_the_same_run(tmp_path):
  import glob  # pylint: disable=import-outside-toplevel
  pytest.importorskip("wandb")  # in the test extra; optional for users
  config = _config(steps=4, eval_every=2, checkpoint_every=2, wandb_project="lmstack-test", wandb_mode="offline")
  trainer.run(config, str(tmp_path))
  run_id = (tmp_path / "wandb_run_id").read_text().strip()
  runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / f"run-{run_id}.wandb"))
  assert len(runs) == 1, runs
  records = _wandb_records(runs[0])
  run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
  assert run.project == "lmstack-test" and run.run_id == run_id
  logged = {u.key: json.loads(u.value_json) for u in run.config.update}
  assert logged["train"]["steps"] == 4 and logged["train"]["wandb_mode"] == "offline"  # the run's config
  losses = {}
  for r in records:
    if r.WhichOneof("record_type") == "history":
      row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
      if "train/loss" in row:
        losses[row["_step"]] = row["train/loss"]
  assert losses == pytest.approx(_train_losses(tmp_path))  # every logged step, as metrics.jsonl has it
  # A longer run in the same workdir continues the same W&B run.
  config.train.steps = 6
  trainer.run(config, str(tmp_path))
  assert (tmp_path / "wandb_run_id").read_text().strip() == run_id
  assert len(glob.glob(str(tmp_path / "wandb" / "offline-run-*" / f"run-{run_id}.wandb"))) == 2


def test_wandb_is_not_imported_unless_a_project_is_named(tmp_path):
  code = ("import sys; from lmstack.metrics import MetricWriter; w = MetricWriter(sys.argv[1], 1, tensorboard=False); "
          "w.write(1, {'loss': 1.0}); w.close(); print('wandb' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.stdout.strip() == "False", out.stderr


def test_wandb_without_the_package_or_with_a_bad_mode_is_one_line(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` raises ImportError
  with pytest.raises(ConfigError, match="needs the wandb package: pip install wandb"):
    trainer.run(_config(wandb_project="p"), str(tmp_path / "a"))
  with pytest.raises(ConfigError, match="train.wandb_mode"):
    trainer.run(_config(wandb_project="p", wandb_mode="sometimes"), str(tmp_path / "b"))
