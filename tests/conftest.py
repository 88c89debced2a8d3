"""Test setup: 8 fake CPU devices, so sharding runs without accelerators.

XLA_FLAGS must be set before JAX is imported anywhere, which is why it is the
first thing pytest loads.
"""

import os
import shutil
import tempfile

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # pytest-xdist workers inherit it
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, shared by pytest-xdist workers and every subprocess the tests
# start: the end-to-end tests run the same small programs in many processes (a run, its kill, its resume), and
# compiling them again is most of their time. Keyed by the program, so a changed program compiles afresh.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lmstack-test-jax-cache-")
  os.environ["LMSTACK_TEST_OWNS_JAX_CACHE"] = "1"
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402


def pytest_sessionfinish(session):
  if os.environ.get("LMSTACK_TEST_OWNS_JAX_CACHE") and "PYTEST_XDIST_WORKER" not in os.environ:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


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
