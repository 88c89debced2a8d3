"""Test setup: 8 fake CPU devices, so sharding runs without accelerators.

XLA_FLAGS must be set before JAX is imported anywhere, which is why it is the
first thing pytest loads.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cfg():
  from lmstack.model.transformer import PRESETS
  return PRESETS["tiny"]


@pytest.fixture(scope="session")
def base_run(tmp_path_factory):
  """A workdir of configs/pretrain.py:runlocal (4 steps), trained once per session: the checkpoint the
  fine-tuning, alignment and annealing tests start from (init_from). Read it; never train in it."""
  from configs import pretrain
  from lmstack.train import trainer
  workdir = str(tmp_path_factory.mktemp("base"))
  trainer.run(pretrain.get_config("runlocal"), workdir)
  return workdir
