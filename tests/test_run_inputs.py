"""Everything a run reads is checked before its first step, and every failure is one line.

  python -m pytest -q tests/test_run_inputs.py

Eval data (of every stage), a corpus that is not text, the workdir, OS errors in
the metrics files, and a SIGTERM before the first step (exit status 75).
"""

import json
import os
import signal
import subprocess
import sys
from unittest import mock

import pytest

from configs import dpo, pretrain, sft
from lmstack import errors
from lmstack.data import datasets
from lmstack.errors import ConfigError, DataError, Preempted
from lmstack.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _ReachedModel(Exception):
  pass


def _until_model(config, workdir):
  """trainer.run up to building the model: what it checks first (config, workdir, tokenizer, data)."""
  with mock.patch.object(trainer.build_lib, "build", side_effect=_ReachedModel):
    with pytest.raises(_ReachedModel):
      trainer.run(config, str(workdir))


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _steps(workdir):
  return sorted(d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _bad_file(tmp_path, how):
  """A path that is missing, empty, or a file of random bytes."""
  path = tmp_path / f"eval-{how}.txt"
  if how == "empty":
    path.write_text("")
  elif how == "binary":
    path.write_bytes(os.urandom(50_000))
  return str(path)


@pytest.mark.parametrize("how,message", [("missing", "data file not found"), ("empty", "empty corpus"),
                                         ("binary", "does not look like UTF-8 text")])
def test_bad_eval_data_stops_a_resume_before_any_checkpoint(tmp_path, how, message):
  """The issue's case: a resumed run trained and rotated its checkpoints before the first evaluation failed."""
  workdir = tmp_path / "run"
  config = pretrain.get_config("runlocal")
  config.train.update(steps=2, checkpoint_every=1, keep_checkpoints=1, eval_every=2)
  trainer.run(config, str(workdir))
  rows_before, steps_before = _rows(workdir), _steps(workdir)
  assert steps_before == ["2"]
  config.train.steps = 6
  config.data.eval_files = _bad_file(tmp_path, how)
  with pytest.raises(DataError, match=message) as e:
    trainer.run(config, str(workdir))
  assert "\n" not in str(e.value)
  assert _steps(workdir) == steps_before and _rows(workdir) == rows_before  # nothing trained, nothing rotated


def _jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
@pytest.mark.parametrize("how", ["missing", "malformed"])
def test_sft_and_dpo_eval_data_are_read_before_the_model(tmp_path, stage, how):
  record = (dict(prompt="Define: cat", response="a small domesticated feline") if stage == "sft" else
            dict(prompt="Define: cat", chosen="a small feline", rejected="a large river"))
  config = (sft if stage == "sft" else dpo).get_config("runlocal,data=jsonl" if stage == "sft" else
                                                      "runlocal,data=jsonl")
  config.data.train_files = _jsonl(tmp_path / "train.jsonl", [record] * 40)
  if how == "missing":
    config.data.eval_files, message = str(tmp_path / "nope.jsonl"), "data file not found"
  else:
    bad = tmp_path / "eval.jsonl"
    bad.write_text(json.dumps(record) + "\n{not json\n")
    config.data.eval_files, message = str(bad), r"eval.jsonl:2: not valid JSON"
  with pytest.raises(DataError, match=message):
    _until_model(config, tmp_path / "run")
  config.data.eval_files = config.data.train_files  # the control: good eval data gets past the data checks
  _until_model(config, tmp_path / "run")


def test_a_corpus_that_is_not_text_is_refused_unless_allowed(tmp_path):
  """The issue's case: a binary file as the corpus trained 249 steps to loss 10.2 and overwrote checkpoints."""
  config = pretrain.get_config("runlocal")
  config.data.train_files = _bad_file(tmp_path, "binary")
  with pytest.raises(DataError, match=r"eval-binary.txt does not look like UTF-8 text \(\d+ NUL bytes; .*\); "
                                      r"set config.data.allow_invalid_text=True"):
    _until_model(config, tmp_path / "run")
  config.data.allow_invalid_text = True
  _until_model(config, tmp_path / "run")


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_workdir_that_cannot_be_a_directory_is_one_line(tmp_path, where):
  afile = tmp_path / "afile"
  afile.write_text("x")
  workdir = afile if where == "file" else afile / "run"
  with pytest.raises(ConfigError, match=rf"--workdir={workdir} is not a writable directory \(\[Errno (17|20)\] "):
    _until_model(pretrain.get_config("runlocal"), workdir)


def _main(workdir, *flags):
  cmd = [sys.executable, "-m", "lmstack.main", "--config=configs/pretrain.py:runlocal", f"--workdir={workdir}",
         "--config.train.tensorboard=false", *flags]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_os_errors_on_the_command_line_are_one_line(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("x")
  out = _main(afile / "run")
  assert out.returncode == 1
  assert out.stderr.splitlines() == [f"error: --workdir={afile / 'run'} is not a writable directory ([Errno 20] "
                                     f"Not a directory: '{afile / 'run'}')"], out.stderr
  # An OSError past the workdir check: metrics.jsonl cannot be opened.
  (tmp_path / "run" / "metrics.jsonl").mkdir(parents=True)
  out = _main(tmp_path / "run")
  assert out.returncode == 1
  assert out.stderr.splitlines() == [f"error: [Errno 21] Is a directory: '{tmp_path / 'run' / 'metrics.jsonl'}'"]


def test_os_error_text():
  assert errors.os_error(OSError(28, "No space left on device", "/x/m.jsonl")) == (
      "[Errno 28] No space left on device: '/x/m.jsonl'")
  assert errors.os_error(OSError("plain")) == "OSError: plain"


def test_sigterm_before_the_first_step_is_preempted(tmp_path):
  """SIGTERM while the run reads its data (init): Preempted, nothing written to checkpoints."""
  make = datasets.make_dataset

  def make_and_sigterm(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler is installed: this only sets its flag
    return make(*args, **kwargs)

  config = pretrain.get_config("runlocal")
  with mock.patch.object(datasets, "make_dataset", make_and_sigterm):
    with pytest.raises(Preempted, match=r"SIGTERM before step 1; nothing new to save \(no checkpoint yet; re-run"):
      trainer.run(config, str(tmp_path))
  assert not os.path.isdir(tmp_path / "checkpoints") or _steps(tmp_path) == []
  assert Preempted("x").exit_status == errors.EXIT_PREEMPTED == 75
