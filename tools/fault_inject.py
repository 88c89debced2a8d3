"""Fault injection: kill -9 a training run at random moments, again and again, and check that it ends bit for bit
where an uninterrupted run does.

  python tools/fault_inject.py --config=configs/pretrain.py:runlocal --kills=5 --seed=1 --workdir=/tmp/fi \
      -- --config.train.steps=30 --config.train.checkpoint_every=1
  python tools/fault_inject.py --config=configs/pretrain.py:runlocal --kills=3 --processes=2 --workdir=/tmp/fi2 \
      -- --config.train.steps=20 --config.train.checkpoint_every=1

The stage command (`python -m lmstack.main --config=CONFIG --workdir=DIR`, then every flag after `--`, e.g.
`--config.train.steps=30`; `--config.*` flags before it are taken too) runs once uninterrupted in
`WORKDIR/straight`, then in `WORKDIR/killed`, where it is sent SIGKILL `--kills` times and started again
after each kill until it finishes. Kills alternate between two kinds of moment: `save`, during an
asynchronous checkpoint save (once a logged step is reached, as soon as Orbax's
`checkpoints/<step>.orbax-checkpoint-tmp` appears, plus a random part of the uninterrupted run's median
save time) and `step`, a random part of `--max-delay` seconds after a logged step. The logged steps at which
the kills come are drawn (`--seed`) from those the uninterrupted run logged, so a fast machine does not finish
before the last kill.

Then every logged `train/*` and `eval/*` metric of `metrics.jsonl` is compared per step with the
uninterrupted run's (a step logged again after a resume: its last value; a recomputed value that differs from
the first time it was logged counts as a difference too), and every array of the final checkpoint's `state`
item, bit for bit, and its `data` item (the data iterator). Wall-clock metrics (tokens_per_sec, mfu, anything
named after time) are excluded by name, and listed; `--exclude=REGEX,...` excludes more.

`--processes=N` (N > 1) runs every start as N JAX processes on this machine (CPU, `--devices-per-process`
fake devices each, coordinated through JAX_COORDINATOR_ADDRESS on a free local port, `--distributed=on`); a
kill kills all of them, as the loss of the host would, and all are started again.

Printed: a line per run and kill, a table of the kills, a summary (also `WORKDIR/fault_inject.json`).
The runs' console output is in `WORKDIR/logs/`. Exit status 0 when everything matched bit for bit, 1 when
something differed, a checkpoint was lost (a restart resumed from an older step than the newest complete one)
or a run failed (an exit status other than the kill's), 2 for a usage error.
"""

import argparse
import json
import os
import random
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
# pylint: disable=g-import-not-at-top
from lmstack import console

EXIT_DIFFERENT, EXIT_USAGE = 1, 2
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a step being saved: `<step><suffix>`
# Metrics that legitimately differ between two runs: a name component about time or speed.
WALL_CLOCK = re.compile(r"(?:^|[/_])(?:tokens_per_sec|steps_per_sec|per_sec|sec|secs|seconds|mfu|time|elapsed|"
                        r"duration|wall|throughput|eta)(?:$|[/_])")
POLL_S = 0.005
SHOWN_DIFFERENCES = 10


class UsageError(Exception):
  """A mistake in the tool's own arguments: `error: ...` and exit status 2."""

  exit_status = EXIT_USAGE


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    console.fail(UsageError(message))


# ---------------------------------------------------------------------------
# Arguments


def parse_args(argv):
  """(args, the flags for the stage command)."""
  if "--" in argv:
    cut = argv.index("--")
    argv, passed = argv[:cut], argv[cut + 1:]
  else:
    passed = []
  parser = _Parser(description=__doc__.split("\n", maxsplit=1)[0])
  parser.add_argument("--config", required=True, help="the stage config, e.g. configs/pretrain.py:runlocal")
  parser.add_argument("--workdir", required=True, help="where the two runs go (straight/, killed/)")
  parser.add_argument("--kills", type=int, default=5, help="how many times to kill the run")
  parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
  parser.add_argument("--processes", type=int, default=1, help="JAX processes per start (a host each)")
  parser.add_argument("--devices-per-process", type=int, default=4, help="fake CPU devices per process when "
                      "--processes > 1")
  parser.add_argument("--max-delay", type=float, default=0.3, help="a `step` kill comes up to this many seconds "
                      "after its logged step")
  parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one start may take")
  parser.add_argument("--exclude", default="", help="more metric names to leave out, comma-separated regexes")
  args, unknown = parser.parse_known_args(argv)
  stray = [a for a in unknown if not a.startswith("--config.")]
  if stray:
    raise UsageError(f"unknown arguments {' '.join(stray)} (flags for the stage command go after `--`)")
  check_args(args, unknown + passed)
  return args, unknown + passed


def check_args(args, passed):
  config_file = args.config.split(":", 1)[0]
  if not os.path.isfile(config_file):
    raise UsageError(f"--config={args.config}: no such file {config_file}")
  for name, low in (("kills", 0), ("processes", 1), ("devices_per_process", 1)):
    if getattr(args, name) < low:
      raise UsageError(f"--{name.replace('_', '-')}={getattr(args, name)}; expected at least {low}")
  if args.max_delay < 0 or args.timeout <= 0:
    raise UsageError("--max-delay must be >= 0 and --timeout > 0")
  owned = [a for a in passed if re.match(r"--(config|workdir|distributed)(=|$)", a)]
  if owned:
    raise UsageError(f"{owned[0]}: the tool sets --config, --workdir and --distributed itself")
  try:
    args.exclude_re = [re.compile(p) for p in filter(None, args.exclude.split(","))]
  except re.error as e:
    raise UsageError(f"--exclude={args.exclude!r} is not a list of regular expressions: {e}") from None
  for sub in ("straight", "killed"):
    path = os.path.join(args.workdir, sub)
    if os.path.isdir(path) and os.listdir(path):
      raise UsageError(f"{path} is not empty (a previous run?); choose a new --workdir or delete it")


# ---------------------------------------------------------------------------
# Starting and watching runs


def stage_command(args, workdir, passed):
  cmd = [sys.executable, "-m", "lmstack.main", f"--config={args.config}", f"--workdir={workdir}", *passed]
  return cmd + (["--distributed=on"] if args.processes > 1 else [])


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_envs(n, devices):
  """The environment of each of `n` processes: the tool's own for one; CPU devices and a coordinator for more."""
  if n == 1:
    return [dict(os.environ)]
  xla = re.sub(r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", "")).split()
  base = {**os.environ, "XLA_FLAGS": " ".join(xla + [f"--xla_force_host_platform_device_count={devices}"]),
          "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"localhost:{_free_port()}",
          "JAX_NUM_PROCESSES": str(n)}
  return [{**base, "JAX_PROCESS_ID": str(i)} for i in range(n)]


def start(cmd, args, log_dir, name):
  """Starts one run (all its processes); each process's console output goes to `log_dir/name-p<i>.log`."""
  procs = []
  for i, env in enumerate(process_envs(args.processes, args.devices_per_process)):
    with open(os.path.join(log_dir, f"{name}-p{i}.log"), "w", encoding="utf-8") as log:
      procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def kill(procs):
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGKILL)
  for p in procs:
    p.wait()


def tmp_dirs(ckpt_dir):
  """{name: (inode, mtime)} of the unfinished saves (`<step>.orbax-checkpoint-tmp`) in `ckpt_dir`."""
  out = {}
  try:
    names = os.listdir(ckpt_dir)
  except OSError:
    return out
  for name in names:
    if name.endswith(TMP_SUFFIX):
      try:
        st = os.stat(os.path.join(ckpt_dir, name))
      except OSError:  # renamed into place just now
        continue
      out[name] = (st.st_ino, st.st_mtime_ns)
  return out


def complete_steps(ckpt_dir):
  """The steps Orbax has renamed into place."""
  try:
    return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  except OSError:
    return []


class Watch:
  """What one start of a run has shown so far, polled: its new metric rows and its saves.

  A `.orbax-checkpoint-tmp` directory left by an earlier (killed) start is not a save of this one, unless
  it changes.
  """

  def __init__(self, workdir):
    self.metrics = os.path.join(workdir, "metrics.jsonl")
    self.ckpt_dir = os.path.join(workdir, "checkpoints")
    self.offset = os.path.getsize(self.metrics) if os.path.exists(self.metrics) else 0
    self.rows = []
    self.stale = tmp_dirs(self.ckpt_dir)
    self.saving = {}  # this start's unfinished saves: name -> when first seen
    self.save_seconds = []  # how long each finished save of this start took

  def poll(self):
    try:
      with open(self.metrics, "rb") as f:
        f.seek(self.offset)
        chunk = f.read()
    except OSError:
      chunk = b""
    complete = chunk[:chunk.rfind(b"\n") + 1]  # a line being written waits for the next poll
    self.offset += len(complete)
    for line in complete.splitlines():
      try:
        self.rows.append(json.loads(line))
      except ValueError:
        pass
    now = time.monotonic()
    current = {k for k, v in tmp_dirs(self.ckpt_dir).items() if self.stale.get(k) != v}
    for name in current - self.saving.keys():
      self.saving[name] = now
    for name in set(self.saving) - current:
      self.save_seconds.append(now - self.saving.pop(name))

  def last_step(self):
    """The newest step this start logged a train metric for, or None."""
    steps = [r["step"] for r in self.rows if any(k.startswith("train/") for k in r)]
    return max(steps) if steps else None


def supervise(procs, watch, timeout, until=None):
  """Polls `watch` until every process has exited or `until(watch)` is true; returns False on timeout."""
  deadline = time.monotonic() + timeout
  while any(p.poll() is None for p in procs):
    watch.poll()
    if until is not None and until(watch):
      return True
    if time.monotonic() > deadline:
      kill(procs)
      return False
    time.sleep(POLL_S)
  watch.poll()
  return True


def _log_text(log_dir, name, process=0):
  try:
    with open(os.path.join(log_dir, f"{name}-p{process}.log"), encoding="utf-8", errors="replace") as f:
      return f.read()
  except OSError:
    return ""


def failure_line(procs, log_dir, name, killed=False):
  """One line for a start whose process exited badly (`killed`: SIGKILL was the tool's), or ""."""
  for i, p in enumerate(procs):
    if p.returncode != 0 and not (killed and p.returncode == -signal.SIGKILL):
      lines = [l for l in _log_text(log_dir, name, i).splitlines() if l.strip()]
      errors = [l for l in lines if l.startswith("error:")]
      last = (errors or lines or ["(no output)"])[-1]
      return f"{name} process {i} exited with status {p.returncode}: {last} (log: {log_dir}/{name}-p{i}.log)"
  return ""


def resumed_from(text):
  """(step the start resumed from, 0 for a fresh start; number of damaged checkpoints it skipped)."""
  steps = re.findall(r"^resumed from .*/(\d+)$", text, re.M)
  return (int(steps[-1]) if steps else 0), len(re.findall(r"^warning: skipped checkpoint", text, re.M))


# ---------------------------------------------------------------------------
# The two runs


def run_straight(args, passed, workdir, log_dir):
  """The uninterrupted run; returns (its Watch, the failure line or "")."""
  print(f"straight: {' '.join(stage_command(args, workdir, passed)[1:])}", flush=True)
  tic = time.monotonic()
  watch = Watch(workdir)
  procs = start(stage_command(args, workdir, passed), args, log_dir, "straight")
  if not supervise(procs, watch, args.timeout):
    return watch, f"straight run took more than --timeout={args.timeout:g} s"
  failed = failure_line(procs, log_dir, "straight")
  saves = (f", saves take {statistics.median(watch.save_seconds):.2f} s (median of {len(watch.save_seconds)})"
           if watch.save_seconds else "")
  print(f"straight: {'failed' if failed else 'done'} at step {watch.last_step()} in {time.monotonic() - tic:.1f} s"
        f"{saves}", flush=True)
  return watch, failed


def kill_plan(args, logged_steps, save_seconds):
  """Per kill: (kind, logged step to wait for, delay in seconds), drawn from `--seed`."""
  rng = random.Random(args.seed)
  candidates = sorted(set(logged_steps))[:-1] or sorted(set(logged_steps))  # before the last logged step
  if args.kills <= len(candidates):
    targets = sorted(rng.sample(candidates, args.kills))
  else:  # more kills than logged steps: some steps twice (a restart's first logged step)
    targets = sorted(rng.choices(candidates, k=args.kills))
  save_s = statistics.median(save_seconds) if save_seconds else 0.05
  plan = []
  for i, target in enumerate(targets):
    kind = "save" if i % 2 == 0 else "step"
    plan.append((kind, target, rng.uniform(0, save_s / 2) if kind == "save" else rng.uniform(0, args.max_delay)))
  return plan


def _moment(kind, target, state):
  """An `until` for supervise: the logged step `target`, then (kind "save") a save of this start."""
  def reached(watch):
    last = watch.last_step()
    if last is None or last < target:
      return False
    if kind == "save" and not watch.saving:
      return False
    if "at" not in state:
      state["at"] = time.monotonic()
    return time.monotonic() >= state["at"] + state["delay"]
  return reached


def run_killed(args, passed, workdir, log_dir, plan):
  """Runs, kills and restarts; returns (per-kill rows, figures, failure lines)."""
  cmd = stage_command(args, workdir, passed)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  table, failures = [], []
  fig = dict(kills=0, kills_mid_save=0, restarts=0, steps_recomputed=0, checkpoints_lost=0,
             checkpoints_skipped=0)
  for attempt in range(len(plan) + 1):
    name = f"killed-{attempt}"
    watch = Watch(workdir)
    procs = start(cmd, args, log_dir, name)
    if attempt < len(plan):
      kind, target, delay = plan[attempt]
      ok = supervise(procs, watch, args.timeout, _moment(kind, target, {"delay": delay}))
      kill(procs)
      watch.poll()
    else:
      ok = supervise(procs, watch, args.timeout)
    if attempt:
      resumed, skipped = resumed_from(_log_text(log_dir, name))
      prev = table[-1]
      prev["resumed_from"] = resumed
      fig["restarts"] += 1
      fig["checkpoints_lost"] += resumed != prev["newest_checkpoint"]
      fig["checkpoints_skipped"] += skipped
      fig["steps_recomputed"] += max(0, (prev["last_logged_step"] or resumed) - resumed)
      print(f"restart {attempt}: resumed from step {resumed}" + (f" (skipped {skipped} damaged checkpoints)"
                                                                 if skipped else ""), flush=True)
    if not ok:
      failures.append(f"{name} took more than --timeout={args.timeout:g} s")
      break
    failed = failure_line(procs, log_dir, name, killed=attempt < len(plan))
    if failed:
      failures.append(failed)
      break
    if not any(p.returncode == -signal.SIGKILL for p in procs):  # it finished before (or without) the kill
      break
    fig["kills"] += 1
    in_flight = sorted(int(n[:-len(TMP_SUFFIX)]) for n in watch.saving)
    fig["kills_mid_save"] += bool(in_flight)
    complete = complete_steps(ckpt_dir)
    row = dict(kind=kind, last_logged_step=watch.last_step(), newest_checkpoint=complete[-1] if complete else 0,
               save_in_flight=in_flight[-1] if in_flight else None, resumed_from=None)
    table.append(row)
    print(f"kill {fig['kills']}/{len(plan)} ({kind}): SIGKILL after logged step {row['last_logged_step']}, "
          f"newest complete checkpoint {row['newest_checkpoint']}, "
          f"save in flight: {row['save_in_flight'] if in_flight else 'none'}", flush=True)
  if fig["kills"] < len(plan) and not failures:
    print(f"note: the run finished after {fig['kills']} of {len(plan)} kills", flush=True)
  return table, fig, failures


# ---------------------------------------------------------------------------
# The comparison


def read_rows(workdir):
  """(rows of `workdir/metrics.jsonl` in order, number of unreadable lines: a line cut by a kill)."""
  rows, bad = [], 0
  try:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      lines = f.read().splitlines()
  except OSError:
    return [], 0
  for line in lines:
    try:
      rows.append(json.loads(line))
    except ValueError:
      bad += 1
  return rows, bad


def _metric_keys(row):
  return [k for k in row if k.startswith(("train/", "eval/"))]


def excluded(key, extra=()):
  return bool(WALL_CLOCK.search(key)) or any(p.search(key) for p in extra)


def _same(a, b):
  """Bit for bit (NaN equals NaN, 0.0 differs from -0.0)."""
  if isinstance(a, float) and isinstance(b, float):
    return struct.pack("<d", a) == struct.pack("<d", b)
  return type(a) is type(b) and a == b


def compare_metrics(straight_dir, killed_dir, extra_exclude=()):
  """Every (step, train/* or eval/* key) of the straight run against the killed run's last value of it.

  Returns a dict: excluded (the keys left out), compared, differing (a list of (step, key, straight,
  killed); killed is None when missing), recomputed_differing ((step, key, first, last) where a step
  logged again after a resume changed), extra_steps (steps only the killed run logged: a resumed run logs
  its first step), unreadable_lines.
  """
  straight_rows, bad_straight = read_rows(straight_dir)
  killed_rows, bad_killed = read_rows(killed_dir)
  skip = sorted({k for r in straight_rows + killed_rows for k in _metric_keys(r) if excluded(k, extra_exclude)})
  shown = (["time"] if any("time" in r for r in straight_rows + killed_rows) else []) + skip  # "time": when logged
  want, first, last = {}, {}, {}
  for r in straight_rows:
    for k in _metric_keys(r):
      if k not in skip:
        want[(r["step"], k)] = r[k]
  for r in killed_rows:
    for k in _metric_keys(r):
      if k not in skip:
        first.setdefault((r["step"], k), r[k])
        last[(r["step"], k)] = r[k]
  differing = [(s, k, v, last.get((s, k))) for (s, k), v in sorted(want.items())
               if (s, k) not in last or not _same(v, last[(s, k)])]
  straight_steps = {s for s, _ in want}
  differing += [(s, k, None, v) for (s, k), v in sorted(last.items()) if s in straight_steps and (s, k) not in want]
  recomputed = [(s, k, first[(s, k)], v) for (s, k), v in sorted(last.items()) if not _same(first[(s, k)], v)]
  return dict(excluded=shown, compared=len(want), differing=differing, recomputed_differing=recomputed,
              extra_steps=sorted({s for s, _ in last} - straight_steps),
              unreadable_lines=bad_straight + bad_killed)


def final_checkpoint(workdir):
  """(step, {path: numpy array} of the newest checkpoint's `state` item, its `data` item), read on the host."""
  import logging
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  logging.getLogger("absl").setLevel(logging.ERROR)
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return None, {}, None
  handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
              "meta": ocp.JsonCheckpointHandler()}
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_handlers=handlers) as manager:
    step = manager.latest_step()
    if step is None:
      return None, {}, None
    tree = manager.item_metadata(step)["state"]
    tree = getattr(tree, "tree", tree)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args), data=ocp.args.JsonRestore()))
  arrays = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(out["state"])}
  return step, arrays, out["data"]


def _same_array(a, b):
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def compare_state(straight_dir, killed_dir):
  """The final checkpoints' state arrays, bit for bit, and data iterator states.

  Returns a dict: steps (straight, killed), compared, differing (array paths that differ or are missing
  from one), data_state_same.
  """
  step_a, a, data_a = final_checkpoint(straight_dir)
  step_b, b, data_b = final_checkpoint(killed_dir)
  differing = sorted(p for p in a.keys() | b.keys() if p not in a or p not in b or not _same_array(a[p], b[p]))
  return dict(steps=[step_a, step_b], compared=len(a), differing=differing,
              data_state_same=data_a == data_b and step_a is not None)


def compare(straight_dir, killed_dir, extra_exclude=()):
  """The metrics and the final state of two workdirs; returns (a report dict, its list of problems)."""
  metrics = compare_metrics(straight_dir, killed_dir, extra_exclude)
  state = compare_state(straight_dir, killed_dir)
  problems = []
  if not metrics["compared"]:
    problems.append(f"{straight_dir} logged no train/ or eval/ metric")
  for s, k, v, got in metrics["differing"][:SHOWN_DIFFERENCES]:
    problems.append(f"step {s} {k}: straight {v!r}, killed {got!r}")
  for s, k, v, got in metrics["recomputed_differing"][:SHOWN_DIFFERENCES]:
    problems.append(f"step {s} {k} logged again after a resume changed: {v!r} then {got!r}")
  if state["steps"][0] is None or state["steps"][0] != state["steps"][1]:
    problems.append(f"final checkpoints: straight step {state['steps'][0]}, killed step {state['steps'][1]}")
  for p in state["differing"][:SHOWN_DIFFERENCES]:
    problems.append(f"final state array {p} differs")
  if not state["data_state_same"]:
    problems.append("the final checkpoints' data iterator states differ")
  return dict(metrics=metrics, state=state), problems


# ---------------------------------------------------------------------------
# Output


def _show(value):
  return "-" if value is None else str(value)


def print_table(table):
  print("kill | moment | last logged step | newest checkpoint | save in flight | resumed from")
  for i, row in enumerate(table, 1):
    print(f"{i:4d} | {row['kind']:>6} | {_show(row['last_logged_step']):>16} | {row['newest_checkpoint']:17d} | "
          f"{_show(row['save_in_flight']):>14} | {_show(row['resumed_from']):>12}")


def summary(fig, report, plan):
  m, s = report["metrics"], report["state"]
  return dict(kills=fig["kills"], kills_planned=len(plan), kills_mid_save=fig["kills_mid_save"],
              restarts=fig["restarts"], steps_recomputed=fig["steps_recomputed"],
              checkpoints_lost=fig["checkpoints_lost"], checkpoints_skipped=fig["checkpoints_skipped"],
              metrics_compared=m["compared"], metrics_differing=len(m["differing"]),
              recomputed_differing=len(m["recomputed_differing"]), arrays_compared=s["compared"],
              arrays_differing=len(s["differing"]), data_state_same=s["data_state_same"])


def main(argv=None):
  try:
    args, stage_flags = parse_args(sys.argv[1:] if argv is None else argv)
  except UsageError as e:
    console.fail(e)
  straight, killed = (os.path.join(args.workdir, d) for d in ("straight", "killed"))
  log_dir = os.path.join(args.workdir, "logs")
  os.makedirs(log_dir, exist_ok=True)
  watch, failed = run_straight(args, stage_flags, straight, log_dir)
  logged = [r["step"] for r in watch.rows if any(k.startswith("train/") for k in r)]
  if failed or not logged:
    console.fail(failed or f"the uninterrupted run logged no train/ metric ({straight}/metrics.jsonl)")
  plan = kill_plan(args, logged, watch.save_seconds)
  print(f"killed: {args.kills} kills at logged steps {[t for _, t, _ in plan]} (seed {args.seed})", flush=True)
  table, fig, failures = run_killed(args, stage_flags, killed, log_dir, plan)
  print_table(table)
  report, problems = compare(straight, killed, args.exclude_re)
  if fig["checkpoints_lost"]:
    problems.append(f"{fig['checkpoints_lost']} restart(s) resumed from an older step than the newest complete "
                    "checkpoint")
  problems = failures + problems
  figures = summary(fig, report, plan)
  print(f"excluded (wall-clock): {', '.join(report['metrics']['excluded']) or 'none'}")
  print(" | ".join(f"{k} {v}" for k, v in figures.items()))
  for p in problems:
    print(f"difference: {p}" if p not in failures else f"failed: {p}")
  ok = not problems
  result = dict(passed=ok, config=args.config, flags=stage_flags, seed=args.seed, processes=args.processes,
                **figures, excluded_keys=report["metrics"]["excluded"],
                extra_steps_logged=report["metrics"]["extra_steps"],
                unreadable_metric_lines=report["metrics"]["unreadable_lines"],
                final_steps=report["state"]["steps"], table=table, problems=problems)
  with open(os.path.join(args.workdir, "fault_inject.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  print(f"{'bit for bit: passed' if ok else 'FAILED'}; wrote {os.path.join(args.workdir, 'fault_inject.json')}")
  sys.exit(0 if ok else EXIT_DIFFERENT)


if __name__ == "__main__":
  main()
