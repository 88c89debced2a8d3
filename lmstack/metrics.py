"""Training metrics: console progress, a JSONL file, TensorBoard events and, when asked, Weights & Biases.

Only process 0 writes (`jax.process_index() == 0`), so a multi-host run has
one set of files. `metrics.jsonl` has one JSON object per logged step (and per
evaluation), which `tools/plot.py` turns into PNG curves. The workdir may be a
gs:// path (lmstack/paths.py): the JSONL file is then rewritten every 30 s,
and tensorboardX writes its events with google-cloud-storage (the `tpu` extra).
W&B (`train.wandb_project`) is imported only when a project is named; its run
lives in `workdir/wandb`, with an id kept in `workdir/wandb_run_id`, so a
resumed run continues the same W&B run. `train.wandb_mode=offline` writes the
run to disk with no network (`wandb sync workdir/wandb/offline-run-*` uploads
it later).
"""

import hashlib
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from lmstack import paths, sharding
from lmstack.errors import ConfigError


def _fmt_time(seconds):
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricWriter:
  """Writes scalars to the console, `workdir/metrics.jsonl` and TensorBoard."""

  def __init__(self, workdir, total_steps, tensorboard=True, stream=None, wandb=None):
    """`wandb`: None, or dict(project=, mode= online | offline | disabled, config= the run's config dict)."""
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self.stream = sys.stdout if stream is None else stream  # looked up now, so a redirect (or pytest) sees it
    self.jsonl = self.tb = self.wandb = None
    if not self.enabled:
      return
    workdir = paths.as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self.jsonl = paths.AppendFile(workdir / "metrics.jsonl")
    if tensorboard:
      from tensorboardX import SummaryWriter  # imported lazily: it is slow to import
      self.tb = SummaryWriter(str(workdir / "tb"))
    if wandb:
      self.wandb = _wandb_run(workdir, **wandb)

  def write(self, step, scalars, prefix=""):
    if not self.enabled:
      return
    scalars = {prefix + k: float(v) for k, v in scalars.items()}
    self.jsonl.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
    self.jsonl.flush()
    if self.tb is not None:
      for k, v in scalars.items():
        self.tb.add_scalar(k, v, int(step))
      self.tb.flush()
    if self.wandb is not None:
      self.wandb.log(scalars, step=int(step))

  def progress(self, step, scalars, steps_per_sec):
    """One console line: step, loss, lr, tokens/s, ETA."""
    if not self.enabled:
      return
    eta = (self.total_steps - step) / steps_per_sec if steps_per_sec > 0 else float("inf")
    parts = [f"step {step:>6d}/{self.total_steps}"]
    for key, fmt in (("loss", ".4f"), ("rewards/accuracies", ".3f"), ("rewards/margins", ".3f"), ("lr", ".2e"),
                     ("grad_norm", ".3f"), ("tokens_per_sec", ",.0f"), ("mfu", ".1%")):
      if key in scalars:
        parts.append(f"{key} {format(float(scalars[key]), fmt)}")
    parts.append(f"eta {_fmt_time(eta)}")
    print(" | ".join(parts), file=self.stream, flush=True)

  def info(self, message):
    if self.enabled:
      print(message, file=self.stream, flush=True)

  def close(self):
    if self.jsonl is not None:
      self.jsonl.close()
    if self.tb is not None:
      self.tb.close()
    if self.wandb is not None:
      self.wandb.finish()
      self.wandb = None


def _wandb_run(workdir, project, mode, config):
  """A W&B run for `workdir`: the same id on every resume (kept in workdir/wandb_run_id)."""
  try:
    import wandb  # pylint: disable=import-outside-toplevel  (optional: only when a project is named)
  except ImportError as e:
    raise ConfigError(f"train.wandb_project={project!r} needs the wandb package: pip install wandb "
                      "(or pip install -e '.[wandb]')") from e
  id_file = workdir / "wandb_run_id"
  if id_file.exists():
    run_id = id_file.read_text().strip()
  else:
    run_id = hashlib.sha256(f"{workdir}{time.time()}".encode()).hexdigest()[:12]
    id_file.write_text(run_id + "\n")
  (workdir / "wandb").mkdir(exist_ok=True)
  return wandb.init(project=project, id=run_id, resume="allow", mode=mode, config=config,
                    dir=str(workdir), name=workdir.name, settings=wandb.Settings(console="off", silent=True))


def measure_peak_flops(n=2048, dtype=jnp.bfloat16, repeats=5):
  """The run's matmul FLOP/s: bf16 inputs, f32 accumulation, measured on this
  host's devices (no cross-host traffic) and scaled by the number of hosts."""
  devices = jax.local_devices()
  mesh = sharding.make_mesh((len(devices), 1, 1), devices)
  spec = NamedSharding(mesh, P("data"))
  # Random operands: constants would let XLA fold or skip work.
  a = jax.device_put(jax.random.normal(jax.random.key(0), (len(devices) * n, n), dtype), spec)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * len(devices) * n ** 3 / best * jax.process_count()
