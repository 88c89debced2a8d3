"""Will it fit? Compiles the real train step for a Cloud TPU slice on this CPU.

  pip install -e '.[tpu]'   # libtpu: the TPU compiler (no TPU needed)
  python tools/aot_compile.py --config=configs/pretrain.py:size=7b --slice=v5p-64 --batch_size=32 \\
      --seq_len=4096 --remat=full
  python tools/aot_compile.py --config=configs/pretrain.py:size=70b --slice=v5e-4   # exits 1: does not fit
  python tools/aot_compile.py --config=configs/lora.py:qlora --preset=7b --slice=v5e-4 --batch_size=4 --remat=full
  python tools/aot_compile.py --config=configs/dpo.py --preset=1b --slice=v4-8 --batch_size=8
  python tools/aot_compile.py --config=configs/pretrain.py:size=7b --slice=v5p-64 --num_slices=2 \\
      --batch_size=64 --remat=full   # two slices, the mesh's data axis over DCN

`jax.experimental.topologies` makes compile-only devices of the named slice
(v4-N and v5p-N count TensorCores, two per chip; v5e-N, v5litepod-N and v6e-N
count chips; or a topology such as v5p:4x4x12). The config is built over them
by the trainer's own path (lmstack/train/build.py, `built_for`: the same mesh,
state, shardings, loss, optimizer and donation), so the program compiled is the
one `lmstack.main` runs; its train step is lowered with abstract inputs and
compiled by libtpu. It prints per-chip memory from XLA's buffer assignment
(arguments, outputs not aliased to donated inputs, temporaries, code; their sum
is the peak) against the HBM libtpu says a program may use (`available_hbm`),
the FLOPs per step and a roofline lower bound on the step time (`roofline`). It
exits 1 when the step does not fit, 2 on a usage error (one line);
`--check_only` runs only the checks that need no compiler (config, mesh over
the slice's chips, batch split). A DPO reference copy (`dpo.reference=copy`) is
resident beside the step and counted. When the sharded state alone exceeds HBM
the step is not compiled (`--compile_anyway` compiles it). tools/aot_table.py
runs it over presets, stages and slices for the README's table.

Any config field is overridable (--config.train.grad_accum_steps=4); the flags
--preset, --batch_size, --seq_len, --remat, --mesh_shape and --rules are
shortcuts. Only one aot_compile.py runs at a time (a lock file: compiling a
70B step takes GBs of RAM and minutes); libtpu is loaded with
ALLOW_MULTIPLE_LIBTPU_LOAD=1, since no TPU is ever opened.
"""

import contextlib
import fcntl
import json
import math
import os
import re
import resource
import sys
import tempfile
import time

# Compile-only TPU devices need libtpu loaded as a plugin, not as JAX's
# backend: keep the backend on CPU and libtpu from probing for a TPU VM.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lmstack.errors import ConfigError, LmstackError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file (configs/*.py[:ARG]).", lock_config=True)
_SLICE = flags.DEFINE_string("slice", None, "v4-8, v5e-16, v5litepod-16, v5p-64, v6e-256, or a topology: v5p:4x4x12.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN; the mesh's data axis spans them.")
_PRESET = flags.DEFINE_string("preset", "", "Replace config.model with this preset (tiny, 1b, 7b, 70b, ...).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch (sequences); 0: the config's.")
_SEQ = flags.DEFINE_integer("seq_len", 0, "Sequence length; 0: the config's.")
_REMAT = flags.DEFINE_string("remat", "", "Rematerialisation: none, full, dots, dots_no_batch; empty: the config's.")
_MESH = flags.DEFINE_string("mesh_shape", "", "data,fsdp,tensor or data,fsdp,sequence,tensor (one -1) within a "
                            "slice; empty: the config's (mesh.dcn_shape spans the slices of --num_slices).")
_RULES = flags.DEFINE_string("rules", "", "Logical-axis rules preset (fsdp, fsdp_tp, dp); empty: the config's.")
_JSON = flags.DEFINE_bool("json", False, "Also print the figures as one JSON line (prefixed RESULT).")
_ANYWAY = flags.DEFINE_bool("compile_anyway", False, "Compile even when the sharded state alone exceeds HBM.")
_CHECK_ONLY = flags.DEFINE_bool("check_only", False, "Only the checks that need no compiler (the config, its mesh "
                                "over the slice's chips, the batch split); no libtpu needed. Exits 0 or 2.")
flags.mark_flags_as_required(["config", "slice"])

GiB = 2**30
# Per chip, by device_kind: HBM (GiB), peak dense bf16 FLOP/s and HBM bandwidth (bytes/s), as Google
# publishes them on the Cloud TPU pages of each generation (cloud.google.com/tpu/docs/v4, /v5e, /v5p,
# /v6e: "Peak compute per chip (bf16)", "HBM2/HBM bandwidth"). The one table of chip figures.
CHIPS = {
    "TPU v4": dict(hbm_gib=32, bf16_flops=275e12, hbm_bandwidth=1200e9),
    "TPU v5 lite": dict(hbm_gib=16, bf16_flops=197e12, hbm_bandwidth=819e9),
    "TPU v5": dict(hbm_gib=95, bf16_flops=459e12, hbm_bandwidth=2765e9),
    "TPU v6 lite": dict(hbm_gib=32, bf16_flops=918e12, hbm_bandwidth=1640e9),
}
HBM_GIB = {kind: chip["hbm_gib"] for kind, chip in CHIPS.items()}
_FAMILY = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v5litepod": "v5e", "v6e": "v6e"}
# The 2D shapes of the v5e and v6e slices, by chips (one host up to 8 chips, then 4 a host).
_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
LOCK = os.path.join(tempfile.gettempdir(), "lmstack_aot_compile.lock")
NO_LIBTPU = "libtpu is not installed: pip install -e '.[tpu]' (or set TPU_LIBRARY_PATH to libtpu.so)"


def slice_topology(name):
  """`v5p-64` -> ("v5p:2x4x4", get_topology_desc kwargs); also takes "v5p:2x4x4"."""
  m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)(?:-([0-9]+)|:([0-9]+(?:x[0-9]+)+))", name.strip().lower())
  if not m:
    raise ConfigError(f"--slice={name!r}; expected v4-N, v5p-N, v5e-N, v6e-N or a topology such as v5p:4x4x4")
  family, size, topology = _FAMILY[m[1]], m[2], m[3]
  three_d = family in ("v4", "v5p")
  if topology:
    dims = tuple(int(d) for d in topology.split("x"))
    if len(dims) != (3 if three_d else 2) or 0 in dims:
      raise ConfigError(f"--slice={name!r}: a {family} topology has {3 if three_d else 2} dimensions")
  elif three_d:  # N TensorCores = N / 2 chips, 4 to a host, grown as Google's slice shapes are
    chips = int(size) // 2
    if chips < 4 or chips & (chips - 1) or int(size) % 2:
      raise ConfigError(f"--slice={name!r}: {family}-N takes N = 8, 16, 32, ... (TensorCores); give other shapes "
                        f"as a topology, e.g. {family}:4x4x12")
    dims = [2, 2, 1]
    while math.prod(dims) < chips:
      i = max(j for j in range(3) if dims[j] == min(dims))
      dims[i] *= 2
    dims = tuple(dims)
  else:
    if int(size) not in _2D:
      raise ConfigError(f"--slice={name!r}: {family}-N takes N in {sorted(_2D)} (chips)")
    dims = _2D[int(size)]
  chips = math.prod(dims)
  if three_d:
    host = (2, 2, 1) if chips >= 4 else dims
    kwargs = dict(chip_config_name="megacore", chips_per_host_bounds=host)
  else:
    host = (dims[0], dims[1], 1) if chips <= 8 else (2, 2, 1)
    kwargs = dict(chips_per_host_bounds=host)
  return f"{family}:{'x'.join(map(str, dims))}", kwargs


def tpu_devices(slice_name, num_slices):
  """Compile-only devices of `num_slices` copies of the slice, and its topology name."""
  from jax._src import xla_bridge
  from jax.experimental import topologies
  topology, kwargs = slice_topology(slice_name)
  if xla_bridge.get_tpu_library_path() is None:
    raise ConfigError(NO_LIBTPU)
  family, dims = topology.split(":")
  chips = math.prod(int(d) for d in dims.split("x"))
  accelerator = {"v4": f"v4-{2 * chips}", "v5p": f"v5p-{2 * chips}", "v5e": f"v5litepod-{chips}"}.get(
      family, f"{family}-{chips}")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator)  # else libtpu warns at exit
  if num_slices > 1:
    kwargs["num_slices"] = num_slices
  return topologies.get_topology_desc(topology, "tpu", **kwargs).devices, topology


def per_chip_bytes(abstract, shardings):
  """Bytes one chip holds of a sharded pytree (the largest shard of each leaf)."""
  import jax
  import numpy as np
  leaves, sh = jax.tree.leaves(abstract), jax.tree.leaves(shardings)
  return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x, s in zip(leaves, sh))


def apply_flags(config):
  """The shortcut flags, written into the (locked) config."""
  from configs import common
  if _PRESET.value:
    with config.unlocked():
      old, config.model = config.model, common.model_section(_PRESET.value)
      config.model.remat = old.remat
  if _BATCH.value:
    config.train.batch_size = _BATCH.value
  if _SEQ.value:
    config.train.seq_len = _SEQ.value
  if _REMAT.value:
    config.model.remat = _REMAT.value
  if _MESH.value:
    try:
      config.mesh.shape = tuple(int(x) for x in _MESH.value.replace("(", "").replace(")", "").split(","))
    except ValueError as e:
      raise ConfigError(f"--mesh_shape={_MESH.value!r}; expected 3 or 4 integers such as 1,-1,1 or 1,-1,8,1 "
                        "(data, fsdp[, sequence], tensor)") from e
  if _RULES.value:
    config.mesh.rules = _RULES.value
  return config


def available_hbm(devices):
  """Bytes of HBM a program may use on one of `devices`, as libtpu itself reports it: the compiler refuses
  a program that needs more and says how much is available ("... exceeds available HBM (15.75G)"), which
  is less than the chip's HBM (the runtime keeps some). Asked by compiling a program that needs 1 TiB."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  sh = NamedSharding(Mesh(devices[:1], ("x",)), P())
  huge = jax.ShapeDtypeStruct((2**38,), jnp.float32, sharding=sh)  # 1 TiB
  try:
    jax.jit(lambda x: jnp.cumsum(x) * 2, out_shardings=sh).lower(huge).compile()
  except Exception as e:  # noqa: BLE001 -- the refusal is the answer
    m = re.search(r"exceeds available HBM \(([0-9.]+)([GMK])\)", str(e))
    if m:
      return float(m[1]) * {"G": GiB, "M": 2**20, "K": 2**10}[m[2]]
  return None


def compile_step(config, slice_name, num_slices=1, compile_anyway=False):
  """Compiles `config`'s train step for the slice; a dict of the figures. The step fits when its peak is
  at most what libtpu reports available (`available_hbm`), else the chip's HBM."""
  devices, topology = tpu_devices(slice_name, num_slices)
  kind = devices[0].device_kind
  if kind not in HBM_GIB:
    raise ConfigError(f"--slice={slice_name}: no HBM size known for {kind!r}")
  hbm = available_hbm(devices) or HBM_GIB[kind] * GiB
  out = compile_built(config, devices, dict(slice=slice_name, num_slices=num_slices, topology=topology), hbm,
                      compile_anyway)
  out["chip_hbm_bytes"] = HBM_GIB[kind] * GiB
  out.update(roofline(out, CHIPS[kind]))
  return out


def roofline(r, chip):
  """A lower bound on the step time: the model's FLOPs a chip (6N + attention per token, exact) at the
  chip's peak bf16 FLOP/s, or the bytes the compiled program moves through HBM (XLA's cost analysis) at
  its bandwidth, whichever takes longer. XLA counts a scanned layer's bytes once, so the HBM term is
  itself a lower bound; no collective time, no imperfect overlap: real steps are slower."""
  if not r.get("compiled"):
    return {}
  compute_s = r["model_flops_per_chip"] / chip["bf16_flops"]
  memory_s = r["xla_bytes_per_chip"] / chip["hbm_bandwidth"]
  step_s = max(compute_s, memory_s)
  return dict(roofline_compute_s=compute_s, roofline_memory_s=memory_s, roofline_step_s=step_s,
              roofline_bound="compute" if compute_s >= memory_s else "HBM",
              roofline_tokens_per_s=r["batch_size"] * r["rows"] * r["seq_len"] / step_s,
              peak_bf16_flops=chip["bf16_flops"], hbm_bandwidth=chip["hbm_bandwidth"])


def precheck(config, slice_name, num_slices=1):
  """What the trainer would refuse on the slice, without libtpu: the config's fields, its mesh over the
  slice's chips (one JAX device a chip: v4 and v5p run megacore) and the batch split over the mesh's
  batch axes. Returns the mesh shape {axis: size}; one-line ConfigErrors."""
  from lmstack.train import build, trainer
  topology, _ = slice_topology(slice_name)
  n = math.prod(int(d) for d in topology.split(":")[1].split("x")) * num_slices
  trainer.validate(config, build.model_config(config), n)
  return build.mesh_shape_for(config, n, num_slices)


def built_for(config, devices):
  """The trainer's build of `config` over `devices` (lmstack/train/build.py: checks, mesh, model, steps)."""
  from lmstack.train import build, trainer
  trainer.validate(config, build.model_config(config), len(devices))
  mesh, rules = build.mesh_for(config, devices)  # mesh.dcn_shape spans the slices, as in the trainer
  return build.build(config, mesh, rules)


def lower_step(config, devices):
  """(Built, the train step lowered over `devices`)."""
  b = built_for(config, devices)
  return b, b.lower()


def compile_built(config, devices, where, hbm, compile_anyway=False):
  """The figures of `config`'s step over `devices` (`where`: slice, num_slices, topology) against `hbm` bytes."""
  import jax
  from lmstack.data import datasets
  from lmstack.model import attention
  from lmstack.train import losses
  kind = devices[0].device_kind
  t = config.train
  b = built_for(config, devices)
  model_cfg, mesh = b.model_cfg, b.mesh
  m = b.model
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(m.abstract_state["params"]))
  n_frozen = sum(math.prod(x.shape) for x in jax.tree.leaves(m.abstract_frozen))
  state_bytes = per_chip_bytes(m.abstract_state, m.state_sh) + per_chip_bytes(m.abstract_frozen, m.frozen_sh)
  reference = 0  # resident beside the step: DPO's reference model
  if losses.is_preference(config.loss) and config.dpo.reference == "copy":
    reference = per_chip_bytes(m.abstract_state["params"], m.state_sh["params"]) + per_chip_bytes(
        m.abstract_frozen, m.frozen_sh)
  elif losses.is_preference(config.loss) and config.dpo.reference == "adapters_off":
    reference = per_chip_bytes(m.abstract_state["params"], m.state_sh["params"])  # the zeroed adapters
  rows = datasets.rows_per_example(config.data)  # a preference pair is two rows
  flops_per_token = b.flops_per_token()
  out = dict(**where, device_kind=kind, chips=len(devices),
             mesh=dict(mesh.shape), rules=config.mesh.rules, preset=config.model.get("preset", ""),
             peft=model_cfg.peft.method, loss=config.loss, remat=model_cfg.remat, batch_size=t.batch_size,
             seq_len=t.seq_len, rows=rows, grad_accum_steps=t.grad_accum_steps, params=n_params + n_frozen,
             trainable=n_params, hbm_bytes=hbm, state_bytes=state_bytes, reference_bytes=reference,
             model_flops_per_step=flops_per_token * b.tokens_per_step(),
             attention=attention.resolve(model_cfg.attention_impl, devices[0].platform))
  out["model_flops_per_chip"] = out["model_flops_per_step"] / len(devices)
  if state_bytes + reference > hbm and not compile_anyway:
    out.update(compiled=False, fits=False, peak_bytes=state_bytes + reference,
               reason="the sharded state alone exceeds HBM (not compiled; --compile_anyway compiles it)")
    return out

  t0 = time.perf_counter()
  lowered = b.lower()
  t1 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 -- libtpu refuses programs that exceed HBM
    msg = str(e)
    if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
      raise
    # "... temporaries (66.01G) exceeds available HBM (15.75G)": a lower bound on the peak
    need = re.search(r"\(([0-9.]+)G\) exceeds available HBM", msg)
    out.update(compiled=False, fits=False, lower_s=t1 - t0, compile_s=time.perf_counter() - t1,
               peak_bytes=state_bytes + reference + float(need[1]) * GiB if need else None,
               reason=" ".join(msg.split())[:400])
    return out
  t2 = time.perf_counter()
  ma = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  unaliased_out = max(ma.output_size_in_bytes - ma.alias_size_in_bytes, 0)
  peak = (ma.argument_size_in_bytes + unaliased_out + ma.temp_size_in_bytes + ma.generated_code_size_in_bytes
          + reference)
  out.update(compiled=True, lower_s=t1 - t0, compile_s=t2 - t1, argument_bytes=ma.argument_size_in_bytes,
             output_bytes=unaliased_out, temp_bytes=ma.temp_size_in_bytes, code_bytes=ma.generated_code_size_in_bytes,
             peak_bytes=peak, fits=peak <= hbm, xla_flops_per_chip=float((cost or {}).get("flops", 0.0)),
             xla_bytes_per_chip=float((cost or {}).get("bytes accessed", 0.0)),
             pallas_kernels=compiled.as_text().count("custom_call_target=\"tpu_custom_call\""))
  return out


def report(r):
  """The figures as a few readable lines."""
  g = lambda b: f"{b / GiB:,.2f} GiB" if b >= GiB / 10 else f"{b / 2**20:,.1f} MiB"
  n = lambda x: f"{x / 1e9:,.2f}B" if x >= 1e8 else f"{x / 1e6:,.2f}M"
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  slices = f" x {r['num_slices']} slices (DCN)" if r["num_slices"] > 1 else ""
  lines = [
      f"model    {r['preset'] or 'config'}: {n(r['params'])} parameters, {n(r['trainable'])} "
      f"trainable (peft {r['peft']}, loss {r['loss']}, remat {r['remat']})",
      f"slice    {r['slice']}{slices}: {r['chips']} x {r['device_kind']} chips ({r['topology']}), "
      f"{g(r.get('chip_hbm_bytes', r['hbm_bytes']))} HBM each ({g(r['hbm_bytes'])} available to a program, as "
      f"libtpu reports); mesh {mesh}, rules {r['rules']}",
      f"batch    {r['batch_size']}{' pairs x 2' if r['rows'] == 2 else ''} x {r['seq_len']} tokens (global), "
      f"grad_accum_steps {r['grad_accum_steps']}, attention {r['attention']}"
      + (f" ({r['pallas_kernels']} Pallas kernel calls in the program)" if r.get("pallas_kernels") else ""),
  ]
  if r.get("compile_s") is not None:
    lines.append(f"compile  {r['compile_s']:,.1f} s (lowering {r['lower_s']:,.1f} s); "
                 f"host peak RSS {r['host_rss_bytes'] / GiB:,.1f} GiB")
  if r["compiled"]:
    ref = f" + reference {g(r['reference_bytes'])}" if r["reference_bytes"] else ""
    lines.append(f"per chip arguments {g(r['argument_bytes'])} + outputs {g(r['output_bytes'])} + temporaries "
                 f"{g(r['temp_bytes'])} + code {g(r['code_bytes'])}{ref} = peak {g(r['peak_bytes'])} "
                 f"of {g(r['hbm_bytes'])} ({r['peak_bytes'] / r['hbm_bytes']:.0%})")
    lines.append(f"flops    {r['model_flops_per_step']:.3e} per step (model: 6N + attention), "
                 f"{r['model_flops_per_chip']:.3e} per chip; XLA counts {r['xla_flops_per_chip']:.3e} per chip "
                 "(a scanned layer once)")
    if r.get("roofline_step_s"):
      lines.append(f"roofline at least {r['roofline_step_s']:,.3f} s a step, at most "
                   f"{r['roofline_tokens_per_s']:,.0f} tokens/s ({r['roofline_bound']}-bound: model FLOPs at "
                   f"{r['peak_bf16_flops'] / 1e12:,.0f} TFLOP/s {r['roofline_compute_s']:,.3f} s, XLA's HBM bytes "
                   f"at {r['hbm_bandwidth'] / 1e9:,.0f} GB/s {r['roofline_memory_s']:,.3f} s)")
  else:
    lines.append(f"per chip state {g(r['state_bytes'])}"
                 + (f" + reference {g(r['reference_bytes'])}" if r["reference_bytes"] else "")
                 + f" of {g(r['hbm_bytes'])}" + (f", peak at least {g(r['peak_bytes'])}" if r["peak_bytes"] else "")
                 + f": {r['reason']}")
    lines.append(f"flops    {r['model_flops_per_step']:.3e} per step (model: 6N + attention)")
  lines.append("verdict  " + ("fits" if r["fits"] else "DOES NOT FIT"))
  return "\n".join(lines)


@contextlib.contextmanager
def exclusive(path=LOCK):
  """One compile at a time on this machine (RAM; libtpu)."""
  with open(path, "w") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f"waiting for another aot_compile.py to finish (lock {path})", file=sys.stderr, flush=True)
      fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    config = apply_flags(_CONFIG.value)
    mesh = precheck(config, _SLICE.value, _NUM_SLICES.value)  # a bad config fails before libtpu and the lock
    if _CHECK_ONLY.value:
      print(f"checks pass: {_SLICE.value} x {_NUM_SLICES.value}, mesh {mesh}, batch {config.train.batch_size} x "
            f"{config.train.seq_len}", flush=True)
      return
    from jax._src import xla_bridge
    if xla_bridge.get_tpu_library_path() is None:
      raise ConfigError(NO_LIBTPU)
    with exclusive():
      r = compile_step(config, _SLICE.value, _NUM_SLICES.value, _ANYWAY.value)
  except (LmstackError, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    print(f"error: {one_line(e)}", file=sys.stderr)
    sys.exit(2)
  r["host_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(report(r), flush=True)
  if _JSON.value:
    print("RESULT " + json.dumps(r), flush=True)
  sys.exit(0 if r["fits"] else 1)


def one_line(e):
  """The useful last line of an error (config_flags nests whole tracebacks)."""
  text = str(e).replace("\\n", "\n").replace("\\'", "'")
  lines = [" ".join(l.split()).strip("'\"") for l in text.splitlines() if l.strip(" '\"")]
  if isinstance(e, AttributeError) and len(lines) > 1:  # a locked ConfigDict refusing a field
    return f"unknown config field {lines[0]}; {lines[-1]}"
  return re.sub(r"^\w+Error: ", "", lines[-1]) if lines else type(e).__name__


def parse_flags(argv):
  """absl flag parsing; a bad flag or config override is one line, exit 2."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    print(f"error: {one_line(e)}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
