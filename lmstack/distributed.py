"""Multi-host runs: when to start JAX's distributed runtime, and what the processes must agree on.

  python -m lmstack.main --config=... --workdir=gs://bucket/run                  # --distributed=auto
  JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python -m lmstack.main ...

`initialize(mode)` calls `jax.distributed.initialize()` before JAX touches a
device: always under `on`, never under `off`, and under `auto` only when the
environment names a cluster (`cluster_reason`): a Cloud TPU VM, a multi-slice
TPU job (MEGASCALE_*), a TPU pod on GKE (TPU_WORKER_HOSTNAMES with more than
one host), SLURM or Open MPI with more than one task, or an explicit
JAX_COORDINATOR_ADDRESS (then JAX_NUM_PROCESSES and JAX_PROCESS_ID give the
rest). A plain CPU or single-GPU run stays one process.

With several processes every process runs the same program on its own data
shard, and three host-side decisions must be the same everywhere or the
collectives deadlock: how many held-out batches to evaluate (`same_count`),
whether to stop after this step (`any_process`), and what goes into the
checkpoint's `data` item, which Orbax writes from process 0 only
(`gather_json`, `data_state_to_save`, `restore_data_state`).
"""

import glob
import importlib.util
import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from lmstack.errors import CheckpointError, ConfigError, DataError

MODES = ("auto", "on", "off")


def _count(env, name):
  try:
    return int(env.get(name) or 1)
  except ValueError:
    return 1


def cluster_reason(env, tpu_host=False):
  """Why `env` (a dict like os.environ) looks like one process of several; "" when it does not.

  `tpu_host`: this machine has TPU chips and libtpu (`on_tpu_host`); JAX then
  finds the other workers itself (GCE metadata), single-host VMs included.
  """
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS is set"
  if env.get("MEGASCALE_COORDINATOR_ADDRESS") or _count(env, "MEGASCALE_NUM_SLICES") > 1:
    return "multi-slice TPU (MEGASCALE_*)"
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return "TPU pod (TPU_WORKER_HOSTNAMES)"
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
  if all(k in env for k in slurm) and _count(env, "SLURM_NTASKS") > 1:
    return "SLURM job with SLURM_NTASKS > 1"
  if "OMPI_MCA_orte_hnp_uri" in env and _count(env, "OMPI_COMM_WORLD_SIZE") > 1:
    return "Open MPI job with OMPI_COMM_WORLD_SIZE > 1"
  platforms = env.get("JAX_PLATFORMS", "")
  if tpu_host and (not platforms or "tpu" in platforms):  # JAX_PLATFORMS=cpu on a TPU VM: one process
    return "Cloud TPU VM"
  return ""


def on_tpu_host():
  """TPU chips (/dev/accel*, /dev/vfio/N) and libtpu: a Cloud TPU VM, not a CPU with libtpu for AOT."""
  chips = glob.glob("/dev/accel*") or [p for p in glob.glob("/dev/vfio/*") if os.path.basename(p).isdigit()]
  return bool(chips) and importlib.util.find_spec("libtpu") is not None


def initialize(mode="auto", env=None):
  """`jax.distributed.initialize()` if `mode` (auto | on | off) says so; returns why, or ""."""
  env = os.environ if env is None else env
  if mode not in MODES:
    raise ConfigError(f"--distributed={mode!r}; expected one of {', '.join(MODES)}")
  reason = {"on": "--distributed=on", "off": ""}.get(mode)
  if reason is None:
    reason = cluster_reason(env, on_tpu_host())
  if not reason:
    return ""
  kwargs = {}
  for arg, name in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
    if env.get(name):
      kwargs[arg] = int(env[name])
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError, TypeError) as e:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ConfigError(f"jax.distributed.initialize() failed ({reason}): {first}; "
                      "--distributed=off runs a single process") from e
  return reason


def any_process(flag):
  """True on every process if `flag` is true on any (e.g. SIGTERM reached only some workers)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.max(multihost_utils.process_allgather(np.int32(bool(flag)))))


def gather_json(value):
  """Every process's JSON-serialisable `value`, a list by process index."""
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size)))
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(buf))
  return [json.loads(bytes(row[:n])) for row, n in zip(rows, sizes)]


def data_state_to_save(state):
  """The checkpoint's `data` item: this process's iterator state, or every process's."""
  states = gather_json(state)
  return state if len(states) == 1 else {"process_states": states}


def restore_data_state(saved):
  """This process's iterator state from a checkpoint's `data` item."""
  n = jax.process_count()
  states = saved.get("process_states") if isinstance(saved, dict) else None
  saved_by = len(states) if states is not None else 1
  if saved_by != n:
    raise CheckpointError(f"the checkpoint's data iterator state is from {saved_by} process(es), this run has {n}; "
                          "each process reads its own data shard, so resume with the same number of hosts")
  return saved if states is None else states[jax.process_index()]


def same_count(batches):
  """`batches` (an iterable of dicts of arrays) padded with all-zero batches to the most any process has.

  Every process must run the evaluation step equally often; a zero batch has
  segment ids and loss masks 0, so it adds no weight to any loss.
  """
  if jax.process_count() == 1:
    yield from batches
    return
  local = list(batches)
  most = int(np.max(multihost_utils.process_allgather(np.int32(len(local)))))
  if not local and most:
    raise DataError(f"process {jax.process_index()} has no held-out batch; the eval split has too few documents "
                    f"for {jax.process_count()} processes")
  yield from local
  for _ in range(most - len(local)):
    yield {k: np.zeros_like(v) for k, v in local[0].items()}
