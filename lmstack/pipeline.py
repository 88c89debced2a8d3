"""The whole pipeline in one command: pre-train -> anneal -> SFT (LoRA) -> DPO.

  python -m lmstack.pipeline --workdir=runs/pipeline              # the default model, CPU, < 20 min
  python -m lmstack.pipeline --workdir=/tmp/pipe --runlocal       # tiny model, 4 steps a stage (the tests)
  python -m lmstack.pipeline --workdir=runs/pipeline --override=pretrain.train.steps=400 \
      --override=dpo.dpo.beta=0.2 --override=sft.peft.rank=8

Each stage is a stage config run by the one trainer in WORKDIR/<stage>, and
starts from the previous stage's final checkpoint (`init_from`, pinned to
its step directory):

  pretrain  configs/pretrain.py   here with a WSD schedule held at its peak (decay_fraction=0)
  anneal    configs/anneal.py     decays that peak to zero on the quality mixture
  sft       configs/lora.py       LoRA on the WordNet definitions
  dpo       configs/dpo.py        LoRA DPO on the WordNet preference pairs (method=lora)

`--override=STAGE.FIELD=VALUE` (repeatable) sets a field of one stage's
config, as `--config.FIELD=VALUE` does for lmstack.main; it comes after the
pipeline's own choices (`DEFAULTS`). Re-running the same command skips every
stage whose final checkpoint is at its configured step count, resumes an
interrupted stage from its newest checkpoint and goes on from there; raising
a stage's steps trains it further (the later stages, built on its old last
step, are then refused: remove them to redo them). At the end it prints each
stage's wall time and final held-out metrics and writes them to
WORKDIR/pipeline.json, with the `python -m lmstack.main` command equivalent
to each stage.
"""

import ast
import dataclasses
import importlib
import json
import time

from absl import app, flags
from etils import epath

from lmstack import console, paths
from lmstack.errors import ConfigError, LmstackError, os_error


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  config: str  # a module of configs/
  arg: str  # its get_config argument; {prev} is the previous stage's final checkpoint


STAGES = (
    Stage("pretrain", "pretrain", ""),
    Stage("anneal", "anneal", "init_from={prev}"),
    Stage("sft", "lora", "init_from={prev}"),
    Stage("dpo", "dpo", "init_from={prev},method=lora"),
)

# The pipeline's own settings, before --override. Pre-training stays at its peak
# learning rate so that the anneal has something to decay; the step counts keep
# the default run under 20 minutes on 2 CPU cores (README, "Whole pipeline").
DEFAULTS = {
    "pretrain": {"optim.schedule": "wsd", "optim.decay_fraction": 0.0},
    "sft": {"train.steps": 200, "train.eval_every": 100},
    "dpo": {"train.steps": 100, "train.eval_every": 50},
}
RUNLOCAL_DEFAULTS = {"pretrain": DEFAULTS["pretrain"]}

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run: one subdirectory per stage, pipeline.json.")
_RUNLOCAL = flags.DEFINE_bool("runlocal", False, "Every stage's runlocal config: a tiny model and a few steps.")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "STAGE.FIELD=VALUE: a field of one stage's config, e.g. "
                                      "pretrain.train.steps=400 (repeatable).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "jax.distributed.initialize(): as for lmstack.main.")
flags.mark_flag_as_required("workdir")


def parse_overrides(items):
  """["stage.a.b=v", ...] -> {stage: {"a.b": "v"}}, with one-line errors."""
  names = [s.name for s in STAGES]
  out = {name: {} for name in names}
  for item in items:
    key, sep, value = item.partition("=")
    stage, _, field = key.partition(".")
    if not sep or not field:
      raise ConfigError(f"--override={item!r}; expected STAGE.FIELD=VALUE, e.g. pretrain.train.steps=400")
    if stage not in out:
      raise ConfigError(f"--override={item!r}: unknown stage {stage!r}; expected one of {', '.join(names)}")
    out[stage][field] = value
  return out


def set_field(config, field, value):
  """config.<field> = value (a string, or a value), typed like the field it replaces."""
  node, parts = config, field.split(".")
  for i, part in enumerate(parts):
    if not hasattr(node, "keys") or part not in node:
      raise ConfigError(f"unknown config field {'.'.join(parts[:i + 1])}")
    if i < len(parts) - 1:
      node = node[part]
  current = node[parts[-1]]
  if isinstance(value, str) and not isinstance(current, str):
    if isinstance(current, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ConfigError(f"config field {field}={value!r}; expected true or false")
      value = value.lower() in ("true", "1")
    else:
      try:
        value = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        raise ConfigError(f"config field {field}={value!r} is not of type {type(current).__name__}") from None
  try:
    node[parts[-1]] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config field {field}={value!r}: {e}") from None


def stage_config(stage, prev, runlocal, overrides):
  """(config, the --config argument) of a stage that starts from `prev` (a checkpoint or "")."""
  arg = ",".join(filter(None, [stage.arg.format(prev=prev), "runlocal" if runlocal else ""]))
  try:
    config = importlib.import_module(f"configs.{stage.config}").get_config(arg)
  except ValueError as e:
    raise ConfigError(f"stage {stage.name}: configs/{stage.config}.py:{arg}: {e}") from None
  for field, value in overrides.items():
    set_field(config, field, value)
  config.lock()
  return config, f"configs/{stage.config}.py" + (f":{arg}" if arg else "")


def checkpoint_steps(workdir):
  """The complete checkpoint steps in workdir/checkpoints (Orbax's view, local or gs://)."""
  directory = epath.Path(workdir) / "checkpoints"
  if not directory.exists():
    return []
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.CheckpointManager(directory) as manager:
    return sorted(manager.all_steps())


def final_metrics(workdir):
  """The last train loss and the last held-out evaluation in workdir/metrics.jsonl (and the first, if at step 0)."""
  path = epath.Path(workdir) / "metrics.jsonl"
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
  evals = [r for r in rows if "eval/loss" in r]
  train = [r for r in rows if "train/loss" in r]
  out = {k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("eval/")}
  if train:
    out["train/loss"] = train[-1]["train/loss"]
  if evals and evals[0]["step"] == 0:  # DPO evaluates its starting model
    out.update({"start/" + k[len("eval/"):]: v for k, v in evals[0].items() if k.startswith("eval/")})
  return out


def _fmt_time(seconds):
  seconds = int(round(seconds))
  return f"{seconds // 60}:{seconds % 60:02d}"


def summary_lines(stages):
  """The table printed at the end."""
  lines = [f"{'stage':<9} {'steps':>5}  {'status':<22} {'wall':>6}  final held-out metrics"]
  for s in stages:
    f = s["final"]
    metrics = [f"loss {f['eval/loss']:.4f}"] if "eval/loss" in f else []
    for key in ("rewards/accuracies", "rewards/margins", "accuracy"):
      if f"eval/{key}" in f:
        start = f" (from {f['start/' + key]:.3f})" if f"start/{key}" in f else ""
        metrics.append(f"{key} {f['eval/' + key]:.3f}{start}")
    lines.append(f"{s['stage']:<9} {s['steps']:>5}  {s['status']:<22} {_fmt_time(s['wall_s']):>6}  "
                 + ", ".join(metrics))
  lines.append(f"total wall time {_fmt_time(sum(s['wall_s'] for s in stages))}")
  return lines


def run(workdir, runlocal=False, overrides=(), log=print):
  """Runs (or resumes, or skips) every stage; returns the summary (also WORKDIR/pipeline.json)."""
  import jax  # pylint: disable=import-outside-toplevel
  from lmstack.train import trainer  # pylint: disable=import-outside-toplevel
  root = paths.as_path(workdir)  # absolute, as init_from must be; or gs://
  per_stage = parse_overrides(overrides)
  summary_path = root / "pipeline.json"
  before = json.loads(summary_path.read_text()) if summary_path.exists() else {}
  walls = {s["stage"]: s["wall_s"] for s in before.get("stages", [])}
  stages, prev = [], ""
  for stage in STAGES:
    fields = {**(RUNLOCAL_DEFAULTS if runlocal else DEFAULTS).get(stage.name, {}), **per_stage[stage.name]}
    config, config_arg = stage_config(stage, prev, runlocal, fields)
    stage_dir = root / stage.name
    steps = config.train.steps
    done = checkpoint_steps(stage_dir)
    command = (f"python -m lmstack.main --config={config_arg} --workdir={stage_dir}"
               + "".join(f" --config.{k}={v}" for k, v in fields.items()))
    if done and _started_from(stage_dir, done[-1]) != config.init_from:
      raise LmstackError(f"stage {stage.name} in {stage_dir} started from "
                         f"{_started_from(stage_dir, done[-1]) or 'scratch'}, but the previous stage now ends at "
                         f"{prev}; remove {stage_dir} (and the stages after it) to redo it from there")
    if done and done[-1] >= steps:
      status, wall, steps = "skipped (done)", walls.get(stage.name, 0.0), done[-1]
      log(f"=== {stage.name}: done ({stage_dir}/checkpoints/{steps}); skipped")
    else:
      status = f"resumed from step {done[-1]}" if done else "trained"
      log(f"=== {stage.name}: {command}")
      tic = time.perf_counter()
      try:
        trainer.run(config, str(stage_dir))
      finally:  # a stopped stage's time counts when it resumes
        wall = walls.get(stage.name, 0.0) + time.perf_counter() - tic
        done = checkpoint_steps(stage_dir)
        if not done or done[-1] != steps:  # an error, or SIGTERM: the trainer saved and returned early
          stopped = dict(stage=stage.name, steps=steps, wall_s=round(wall, 1),
                         status=f"stopped at step {done[-1] if done else 0}")
          _write(summary_path, {**before, "stages": stages + [stopped]})
      if not done or done[-1] != steps:
        raise LmstackError(f"stage {stage.name} stopped at step {done[-1] if done else 0} of {steps}; "
                           "re-run the same command to resume it")
    stages.append(dict(stage=stage.name, steps=steps, status=status, wall_s=round(wall, 1), workdir=str(stage_dir),
                       init_from=config.init_from, command=command, final=final_metrics(stage_dir)))
    walls[stage.name] = wall
    prev = str(stage_dir / "checkpoints" / str(steps))
  out = {"workdir": str(root), "runlocal": runlocal, "overrides": list(overrides), "stages": stages}
  _write(summary_path, out)
  if jax.process_index() == 0:
    for line in summary_lines(stages):
      log(line)
  return out


def _write(path, summary):
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:
    path.write_text(json.dumps(summary, indent=1) + "\n")


def _started_from(stage_dir, step):
  """The init_from of a stage's checkpoint (its meta item, a JSON file)."""
  meta = json.loads((stage_dir / "checkpoints" / str(step) / "meta" / "metadata").read_text())
  return meta.get("config", {}).get("init_from", "")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  console.quiet_logging()
  from lmstack import distributed  # pylint: disable=import-outside-toplevel
  try:
    distributed.initialize(_DISTRIBUTED.value)
    run(_WORKDIR.value, _RUNLOCAL.value, _OVERRIDE.value, log=lambda m: print(m, flush=True))
  except LmstackError as e:  # Preempted (a SIGTERM, saved) exits 75, an error 1
    console.fail(e)
  except OSError as e:
    console.fail(os_error(e))


if __name__ == "__main__":
  app.run(main)
