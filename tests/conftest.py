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
