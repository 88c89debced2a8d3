"""Faults: NaN and spiking steps skipped inside the compiled step, repeated
kill -9, damaged checkpoints, a full disk during a save.

The step-level tests drive `make_train_step` directly with a loss that a batch
field can poison; the run-level ones inject faults through the trainer's test
seam (tests/fault_hooks.py), real subprocesses and real files. `pytest -s tests/test_faults.py` prints the kill test's table.
"""

import dataclasses
import functools
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import pretrain
from lmstack import checkpoint as ckpt_lib
from lmstack import sharding
from lmstack.errors import CheckpointError, TrainingError
from lmstack.train import losses, optim, trainer
from lmstack.train import state as state_lib
from lmstack.train import step as step_lib
import fault_hooks
from test_train import _rows, _train_losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------
# The guard inside the step


def _scaled_loss(model, batch, rng=None):
  """next_token_loss times the batch's "scale" (NaN: a poisoned batch; 10: a spike)."""
  batch = dict(batch)
  scale = batch.pop("scale").max()
  loss_sum, weight, metrics = losses.next_token_loss(model, batch, rng)
  return loss_sum * scale, weight, metrics


def _batch(cfg, seed, scale=1.0, b=8, t=32):
  rng = np.random.default_rng(seed)
  tok = rng.integers(4, cfg.vocab_size, (b, t + 1)).astype(np.int32)
  return dict(inputs=tok[:, :-1], targets=tok[:, 1:], segment_ids=np.ones((b, t), np.int32),
              positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
              scale=np.full((b, t), scale, np.float32))


def _stepper(tiny_cfg, guard):
  """(train_step, fresh state, frozen, put) on one device."""
  step, m, put = _compiled(tiny_cfg, guard)
  state, frozen = m.init()
  return step, state, frozen, put


@functools.lru_cache(maxsize=None)
def _compiled(tiny_cfg, guard):
  cfg = dataclasses.replace(tiny_cfg, dtype="float32")
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  rules = sharding.resolve_rules("fsdp")
  optim_cfg = ml_collections.ConfigDict(dict(lr=1e-3, schedule="constant", warmup_steps=0, min_lr_ratio=0.1,
                                             decay_fraction=0.2, decay_shape="linear", b1=0.9, b2=0.95, eps=1e-8,
                                             weight_decay=0.1, grad_clip=1.0))
  tx, schedule = optim.make_optimizer(optim_cfg, 100)
  m = state_lib.init_sharded(cfg, ".*", tx, mesh, rules, seed=0)
  data_sh = sharding.batch_sharding(mesh, rules)
  step = state_lib.jit_train_step(m, _scaled_loss, tx, schedule, 1, data_sh, guard=guard)
  return step, m, lambda b: {k: jax.device_put(v, data_sh) for k, v in b.items()}


def _host(tree):
  return [np.asarray(x).copy() for x in jax.tree.leaves(tree)]


def _same(a, b):
  return len(a) == len(b) and all(x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True) for x, y in zip(a, b))


def test_nan_step_is_skipped_bitwise_and_training_continues(tiny_cfg):
  step, state, frozen, put = _stepper(tiny_cfg, step_lib.Guard(max_consecutive_skips=3))
  state, m1 = step(state, frozen, put(_batch(tiny_cfg, 0)))
  params, opt = _host(state["params"]), _host(state["opt_state"])
  state, m2 = step(state, frozen, put(_batch(tiny_cfg, 1, scale=np.nan)))
  assert not np.isfinite(float(m2["loss"])) and float(m2["skipped"]) == 1 and int(m2["skipped_total"]) == 1
  # Params and optimizer state (moments, count) are those of before the poisoned step, bit for bit.
  assert _same(_host(state["params"]), params) and _same(_host(state["opt_state"]), opt)
  assert int(state["step"]) == 2 and int(state["guard"]["consecutive"]) == 1
  assert int(state["guard"]["count"]) == 1  # the NaN did not enter the running statistics
  state, m3 = step(state, frozen, put(_batch(tiny_cfg, 2)))
  assert np.isfinite(float(m3["loss"])) and float(m3["skipped"]) == 0 and int(m3["skipped_total"]) == 1
  assert not _same(_host(state["params"]), params)  # the next good step trains again
  assert all(np.isfinite(x).all() for x in _host(state["params"]))
  assert int(state["guard"]["consecutive"]) == 0 and int(state["guard"]["tripped"]) == 0
  np.testing.assert_allclose(float(state["guard"]["mean"]), np.mean([float(m1["loss"]), float(m3["loss"])]),
                             rtol=1e-6)


def test_nonfinite_steps_apply_when_the_guard_is_off(tiny_cfg):
  """The control: the same poisoned batch wrecks the params without skip_nonfinite."""
  step, state, frozen, put = _stepper(tiny_cfg, step_lib.Guard(skip_nonfinite=False))
  state, _ = step(state, frozen, put(_batch(tiny_cfg, 1, scale=np.nan)))
  assert not all(np.isfinite(x).all() for x in _host(state["params"]))
  assert int(state["guard"]["total"]) == 0


@pytest.mark.parametrize("zscore", [4.0, 0.0])
def test_loss_spike_is_skipped(tiny_cfg, zscore):
  warmup = 6
  step, state, frozen, put = _stepper(tiny_cfg, step_lib.Guard(spike_zscore=zscore, spike_warmup_steps=warmup))
  applied = []
  for i in range(warmup + 2):
    state, m = step(state, frozen, put(_batch(tiny_cfg, i)))
    assert float(m["skipped"]) == 0, f"an ordinary step {i + 1} was taken for a spike"
    applied.append(float(m["loss"]))
  # Fewer than 1/(1 - ema_decay) updates: the statistics are the plain mean and (population) variance.
  np.testing.assert_allclose(float(state["guard"]["mean"]), np.mean(applied), rtol=1e-6)
  np.testing.assert_allclose(float(state["guard"]["var"]), np.var(applied), rtol=1e-3)
  params = _host(state["params"])
  state, m = step(state, frozen, put(_batch(tiny_cfg, 100, scale=3.0)))  # finite, three times the loss
  if zscore:
    assert float(m["skipped"]) == 1 and _same(_host(state["params"]), params)
    assert int(state["guard"]["count"]) == len(applied)  # the spike is kept out of the statistics
  else:
    assert float(m["skipped"]) == 0 and not _same(_host(state["params"]), params)
  state, m = step(state, frozen, put(_batch(tiny_cfg, 101)))
  assert float(m["skipped"]) == 0


def test_consecutive_skips_trip_the_guard(tiny_cfg):
  step, state, frozen, put = _stepper(tiny_cfg, step_lib.Guard(max_consecutive_skips=3))
  state, _ = step(state, frozen, put(_batch(tiny_cfg, 0)))
  for i in range(2):
    state, _ = step(state, frozen, put(_batch(tiny_cfg, 1, scale=np.inf)))
  state, _ = step(state, frozen, put(_batch(tiny_cfg, 2)))  # a good step resets the run of skips
  assert int(state["guard"]["consecutive"]) == 0 and int(state["guard"]["tripped"]) == 0
  for i in range(3):
    state, _ = step(state, frozen, put(_batch(tiny_cfg, 1, scale=np.nan)))
  assert int(state["guard"]["tripped"]) == 7 and int(state["guard"]["total"]) == 5
  state, _ = step(state, frozen, put(_batch(tiny_cfg, 2)))
  assert int(state["guard"]["tripped"]) == 7  # sticky until the trainer sees it


# ---------------------------------------------------------------------------
# The guard in the trainer


def _config(**train):
  config = pretrain.get_config("runlocal")
  config.train.update(eval_every=0, **train)
  return config




def test_fault_steps_parse():
  assert fault_hooks.parse_steps("3, 5-7,12") == {3, 5, 6, 7, 12} and fault_hooks.parse_steps("") == set()


def test_production_trainer_has_no_fault_code():
  """Fault injection lives behind the test seam (trainer.Hooks), not in the loop."""
  with open(trainer.__file__, encoding="utf-8") as f:
    source = f.read()
  assert "LMSTACK_FAULT" not in source and "os.kill" not in source and "fault_nan" not in source


def test_trainer_skips_nan_steps_and_resumes_the_guard(tmp_path):
  trainer.run(_config(steps=6), str(tmp_path), hooks=fault_hooks.Faults(nan_steps={3}))
  rows = {r["step"]: r for r in _rows(tmp_path) if "train/loss" in r}
  assert sorted(rows) == [1, 2, 3, 4, 5, 6]
  assert [rows[s]["train/skipped"] for s in range(1, 7)] == [0, 0, 1, 0, 0, 0]
  assert [rows[s]["train/skipped_total"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
  assert not np.isfinite(rows[3]["train/loss"]) and all(np.isfinite(rows[s]["train/loss"]) for s in (4, 5, 6))
  # The guard's counters are part of the checkpoint.
  ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
  state = ckpt.manager.restore(6)["state"]
  assert int(state["guard"]["total"]) == 1 and int(state["guard"]["count"]) == 5


def test_nan_steps_with_evaluation_finish(tmp_path):
  """The eval step takes the plain loss: a run with NaN train steps evaluates (it crashed with KeyError)."""
  config = _config(steps=4)
  config.train.update(eval_every=2, eval_batches=2)
  last = trainer.run(config, str(tmp_path), hooks=fault_hooks.Faults(nan_steps={1}))
  assert np.isfinite(last["eval/loss"])
  evals = [r for r in _rows(tmp_path) if "eval/loss" in r]
  assert [r["step"] for r in evals] == [2, 4] and all(np.isfinite(r["eval/loss"]) for r in evals)


def test_consecutive_skips_stop_the_run_and_keep_the_checkpoints(tmp_path):
  # log_every 10: the trip (at step 5) is first seen at the save of step 6, which it prevents.
  config = _config(steps=10, log_every=10, max_consecutive_skips=3)
  with pytest.raises(TrainingError) as e:
    trainer.run(config, str(tmp_path), hooks=fault_hooks.Faults(nan_steps=range(3, 100)))
  message = str(e.value)
  assert "\n" not in message
  assert re.fullmatch(r"stopped at step 6: 3 steps in a row were skipped, up to step 5 \(.*\); the last good "
                      r"checkpoint is step 4 in .*/checkpoints", message), message
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
  for step in (2, 4):
    assert ckpt_lib.verify_manifest(str(tmp_path / "checkpoints" / str(step)))


def test_nonfinite_loss_stops_without_skipping(tmp_path):
  with pytest.raises(FloatingPointError, match="loss is nan at step 3; the last good checkpoint is step 2"):
    trainer.run(_config(steps=4, skip_nonfinite=False), str(tmp_path), hooks=fault_hooks.Faults(nan_steps={3}))


# ---------------------------------------------------------------------------
# Damaged checkpoints


def _largest_array_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
           if os.sep + "d" + os.sep in os.path.join(r, f)]
  return max(files, key=os.path.getsize)


def damage(step_dir, how):
  """Flips a byte in, or truncates, the largest array file; or deletes the meta."""
  if how == "delete":
    os.remove(os.path.join(step_dir, "meta", "metadata"))
    return
  path = _largest_array_file(step_dir)
  with open(path, "r+b") as f:
    if how == "truncate":
      f.truncate(os.path.getsize(path) // 2)
    else:
      f.seek(os.path.getsize(path) // 2)
      byte = f.read(1)
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
def test_damaged_checkpoint_is_skipped_for_the_previous_one(tmp_path, how, capsys):
  def config(steps):
    config = _config(steps=steps)
    config.optim.schedule = "constant"  # the same learning rates whatever the run's length
    return config

  trainer.run(config(4), str(tmp_path))
  first = _train_losses(tmp_path)
  bad = tmp_path / "checkpoints" / "4"
  damage(str(bad), how)
  with pytest.raises(CheckpointError, match="checkpoints/4"):
    ckpt_lib.verify_manifest(str(bad))
  capsys.readouterr()
  trainer.run(config(6), str(tmp_path))
  out = capsys.readouterr().out
  assert f"warning: skipped checkpoint {bad}, moved to {bad}.corrupt-" in out
  assert f"resumed from {tmp_path / 'checkpoints' / '2'}\n" in out
  aside = [d for d in os.listdir(tmp_path / "checkpoints") if d.startswith("4.corrupt-")]
  assert len(aside) == 1  # kept for inspection, not deleted
  assert sorted(d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == ["2", "4", "6"]
  # Steps 3 and 4 ran again from step 2's state and data: the same losses.
  rows = [r for r in _rows(tmp_path) if "train/loss" in r]
  again = {r["step"]: r["train/loss"] for r in rows[4:]}
  assert sorted(again) == [3, 4, 5, 6] and again[3] == first[3] and again[4] == first[4]
  for step in (2, 4, 6):
    assert ckpt_lib.verify_manifest(str(tmp_path / "checkpoints" / str(step)))


def test_flipped_byte_loads_silently_without_the_manifest(tmp_path):
  """Why the manifest exists: Orbax itself reads a flipped array byte without complaint."""
  trainer.run(_config(steps=2), str(tmp_path))
  step_dir = str(tmp_path / "checkpoints" / "2")
  before = _host(ckpt_lib.Checkpointer(tmp_path / "checkpoints").manager.restore(2)["state"])
  damage(step_dir, "flip")
  with pytest.raises(CheckpointError, match="differs from its manifest"):
    ckpt_lib.restore_params(step_dir)  # init_from, generation and export check it too
  os.remove(os.path.join(step_dir, ckpt_lib.MANIFEST))
  after = _host(ckpt_lib.Checkpointer(tmp_path / "checkpoints").manager.restore(2)["state"])
  assert sum(not np.array_equal(a, b) for a, b in zip(before, after)) == 1  # one array silently changed
  # So a checkpoint of this version without its manifest is damaged, for restore_params as for a resume.
  with pytest.raises(CheckpointError, match="lacks its manifest.sha256.json"):
    ckpt_lib.restore_params(step_dir)


def test_checkpoint_without_its_manifest_is_skipped(tmp_path, capsys):
  """The issue's case: manifest deleted and a byte flipped; the resume must not take that step."""
  config = _config(steps=4)
  config.optim.schedule = "constant"
  trainer.run(config, str(tmp_path))
  bad = tmp_path / "checkpoints" / "4"
  damage(str(bad), "flip")
  os.remove(bad / ckpt_lib.MANIFEST)
  capsys.readouterr()
  config.train.steps = 6
  trainer.run(config, str(tmp_path))
  out = capsys.readouterr().out
  assert re.search(rf"warning: skipped checkpoint {bad}, moved to {bad}.corrupt-\d+: checkpoint {bad} lacks its "
                   r"manifest.sha256.json \(its meta says one was written\)", out), out
  assert f"resumed from {tmp_path / 'checkpoints' / '2'}\n" in out


def test_checkpoint_from_before_manifests_is_named_once(tmp_path, capsys):
  """A checkpoint whose meta has no "manifest" field (older lmstack) resumes, with one warning saying so."""
  config = _config(steps=2)
  trainer.run(config, str(tmp_path))
  step_dir = tmp_path / "checkpoints" / "2"
  os.remove(step_dir / ckpt_lib.MANIFEST)
  meta_file = step_dir / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  del meta["manifest"]  # as written before manifests existed
  meta_file.write_text(json.dumps(meta))
  capsys.readouterr()
  config.train.steps = 3
  trainer.run(config, str(tmp_path))
  out = capsys.readouterr().out
  assert out.count("predates manifests") == 1, out
  assert f"warning: checkpoint {step_dir} predates manifests" in out and f"resumed from {step_dir}\n" in out


def test_checkpoint_without_guard_state_resumes(tmp_path):
  """A checkpoint from before the step guard restores with a fresh guard."""
  ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints", async_save=False)
  old = {"step": jnp.asarray(3), "params": {"w": jnp.arange(6.0)}}
  ckpt.save(3, old, {"position": 7}, {"model": {}})
  ckpt.close()
  assert ckpt_lib.verify_manifest(str(tmp_path / "checkpoints" / "3")) is True  # sync saves get one too
  target = ckpt_lib.abstract_like({**old, "guard": step_lib.init_guard()})
  step, state, data, skipped, verified = ckpt_lib.Checkpointer(tmp_path / "checkpoints").restore_newest(target)
  assert (step, data, skipped, verified) == (3, {"position": 7}, [], True)
  assert {k: int(v) for k, v in state["guard"].items()} == {k: 0 for k in step_lib.init_guard()}
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.arange(6.0))


# ---------------------------------------------------------------------------
# Subprocesses: repeated kill -9, a full disk


def _cmd(workdir, *flags):
  return [sys.executable, "-m", "lmstack.main", "--config=configs/pretrain.py:runlocal", f"--workdir={workdir}",
          *flags]


def _main(workdir, *flags, **kwargs):
  return subprocess.run(_cmd(workdir, *flags), cwd=REPO, capture_output=True, text=True, timeout=600, **kwargs)


def _logged(workdir):
  """(train/loss rows so far, tolerating a line being written)."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      lines = f.read().splitlines()
  except OSError:
    return []
  rows = []
  for line in lines:
    try:
      rows.append(json.loads(line))
    except ValueError:
      break
  return [r for r in rows if "train/loss" in r]


def _complete_steps(ckpt_dir):
  return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) if os.path.isdir(ckpt_dir) else []


def _verified(step_dir):
  try:
    return ckpt_lib.verify_manifest(step_dir)
  except CheckpointError:
    return False


@pytest.mark.slow
def test_random_kills_resume_bit_for_bit(tmp_path):
  """kill -9 at random moments, again and again; every restart resumes from the
  newest complete checkpoint, and every logged loss equals an uninterrupted run's."""
  steps, n_kills, seed = 40, 7, 20240610
  flags = [f"--config.train.steps={steps}", "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=3",
           "--config.train.eval_every=0", "--config.train.async_checkpoint=true", "--config.train.tensorboard=false"]
  straight = _main(tmp_path / "straight", *flags)
  assert straight.returncode == 0, straight.stderr[-2000:]
  want = _train_losses(tmp_path / "straight")
  assert sorted(want) == list(range(1, steps + 1))

  workdir, ckpt_dir = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
  rng = random.Random(seed)
  fig = dict(kills=0, kills_mid_save=0, restarts=0, steps_recomputed=0, checkpoints_lost=0, newest_unverified=0,
             runs_differing=0)
  table = []  # per kill: delay, last logged step, newest complete checkpoint, a save in flight, resumed from
  for attempt in range(n_kills + 1):
    seen = len(_logged(workdir))
    proc = subprocess.Popen(_cmd(workdir, *flags), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    killed = False
    if attempt < n_kills:
      # Kill after a random 1-4 more logged steps and a random part of a step,
      # counted in steps rather than seconds so that a fast machine does not
      # finish the run before the last kill.
      more = rng.randint(1, 4)
      deadline = time.time() + 300
      while proc.poll() is None and len(_logged(workdir)) < seen + more and time.time() < deadline:
        time.sleep(0.01)
      delay = rng.uniform(0.0, 0.3)
      time.sleep(delay)
      if proc.poll() is None:
        proc.kill()  # SIGKILL
        killed = True
    out, err = proc.communicate(timeout=600)
    rows = _logged(workdir)[seen:]
    if attempt:
      fig["restarts"] += 1
      resumed = re.search(r"resumed from .*/checkpoints/(\d+)\n", out)
      resumed = int(resumed.group(1)) if resumed else 0
      table[-1].append(resumed)
      fig["checkpoints_lost"] += resumed != table[-1][2]
      fig["steps_recomputed"] += table[-1][1] - resumed
      assert "warning: skipped checkpoint" not in out, out[-2000:]
    # Every loss this process logged equals the uninterrupted run's, bit for bit.
    fig["runs_differing"] += any(r["train/loss"] != want[r["step"]] for r in rows)
    if not killed:
      assert proc.returncode == 0, err[-2000:]
      break
    assert proc.returncode == -signal.SIGKILL
    fig["kills"] += 1
    mid_save = any(d.endswith(".orbax-checkpoint-tmp") for d in os.listdir(ckpt_dir))
    fig["kills_mid_save"] += mid_save
    complete = _complete_steps(ckpt_dir)  # a step directory Orbax has renamed into place
    newest = complete[-1] if complete else 0
    fig["newest_unverified"] += bool(complete) and not _verified(str(ckpt_dir / str(newest)))
    table.append([delay, max((r["step"] for r in rows), default=0), newest, mid_save])

  print(f"\nkill -9 fault injection: {steps} steps, a checkpoint every step (async, keep 3), seed {seed}")
  print("kill | delay s | last logged step | newest checkpoint | save in flight | resumed from")
  for i, (delay, last, newest, mid_save, resumed) in enumerate(table, 1):
    print(f"{i:4d} | {delay:7.2f} | {last:16d} | {newest:17d} | {str(mid_save):>14} | {resumed:12d}")
  got = _train_losses(workdir)
  fig["runs_differing"] += got != want
  print(" | ".join(f"{k} {v}" for k, v in fig.items()))
  assert sorted(got) == list(range(1, steps + 1))
  assert fig["kills"] == n_kills and fig["restarts"] == n_kills
  assert fig["checkpoints_lost"] == 0 and fig["runs_differing"] == 0 and fig["newest_unverified"] == 0
  assert fig["kills_mid_save"] > 0  # some kills did land while a save was in flight


def _limit_file_size(limit):
  def preexec():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
  return preexec


@pytest.mark.slow
def test_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(tmp_path):
  flags = ["--config.train.eval_every=0", "--config.train.checkpoint_every=2", "--config.train.tensorboard=false"]
  first = _main(tmp_path, "--config.train.steps=2", *flags)
  assert first.returncode == 0, first.stderr[-2000:]
  # The state's array files are megabytes; metrics and logs stay far below 256 KB.
  full = _main(tmp_path, "--config.train.steps=4", *flags, preexec_fn=_limit_file_size(256 * 1024))
  assert full.returncode == 1, full.stderr[-3000:]
  # One line, and only that: Orbax's and tensorstore's tracebacks go to the run's log file.
  errors = full.stderr.splitlines()
  assert len(errors) == 1, full.stderr[-3000:]
  with open(tmp_path / "logs" / "lmstack.log", encoding="utf-8") as f:
    assert "File too large" in f.read()
  assert re.fullmatch(r"error: saving checkpoint .*/checkpoints/4 failed \(\[Errno 27\] File too large\); the "
                      r"previous checkpoint, step 2, is kept", errors[0]), errors
  assert _complete_steps(tmp_path / "checkpoints") == [2]
  assert ckpt_lib.verify_manifest(str(tmp_path / "checkpoints" / "2"))
  logged = _train_losses(tmp_path)  # steps 3 and 4 trained before the save failed

  resumed = _main(tmp_path, "--config.train.steps=4", *flags)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"resumed from {tmp_path / 'checkpoints' / '2'}" in resumed.stdout
  assert _complete_steps(tmp_path / "checkpoints") == [2, 4]
  again = _train_losses(tmp_path)
  assert again[3] == logged[3] and again[4] == logged[4]
