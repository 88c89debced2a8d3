"""Local learning coefficient (LLC) of checkpoints, tracked across runs and stages.

  # every checkpoint of a pre-training run, then of its anneal and fine-tuning stages
  python tools/llc.py --ckpt=runs/pretrain --ckpt=runs/anneal --ckpt=runs/sft --out=llc.json --plot=llc.png
  # one checkpoint, more chains and draws
  python tools/llc.py --ckpt=runs/pretrain/checkpoints/200 --chains=8 --draws=500

Each `--ckpt` is a training workdir (all its checkpoints, or `--steps`), its
checkpoints/ directory or one step directory, given in stage order. Every
checkpoint is measured on the same fixed data set: `--num_batches` batches of
`--batch_size` x `--seq_len` tokens of the `--split` split, built from the data
config and tokenizer stored in the first checkpoint (or `--data_ckpt`, with
`--data_override=field=value` to change a field, e.g. train_files), so values
are comparable across stages. n is the number of scored tokens in it.

SGLD (lmstack/analysis/llc.py) runs `--chains` chains of `--burnin` + `--draws`
steps localised at each checkpoint: step size `--step_size`, localisation
`--gamma`, inverse temperature `--nbeta` (0: n / log n). The sampler is
jit-compiled once with the training shardings (`--mesh_shape`, `--rules`) and
reused for every checkpoint of the same shape. It prints lambda_hat per
checkpoint and writes the per-checkpoint loss traces to `--out` (JSON); `--plot`
draws lambda_hat against the step (stages laid end to end: a stage's step 0 is
the previous stage's last step) and the traces n*beta*(L_t - L(w*)), which
should rise through the burn-in and then level off. `drift` is how much the
trace still moved between the two halves of the draws (in LLC units): near 0
when the chains have levelled off. A negative lambda_hat with a negative drift
means the checkpoint is not at a local minimum at this temperature (early in
training the chains keep descending): raise gamma or lower nbeta to compare such
checkpoints, and keep the settings fixed across a trace.
"""

import json
import os
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

_CKPT = flags.DEFINE_multi_string("ckpt", [], "Workdir, checkpoints dir or step dir (repeatable, stage order).")
_STEPS = flags.DEFINE_string("steps", "all", "Which checkpoints of each workdir: all, latest, or a list (100,200).")
_STEP_SIZE = flags.DEFINE_float("step_size", 1e-5, "SGLD step size epsilon.")
_GAMMA = flags.DEFINE_float("gamma", 1000.0, "Localisation strength gamma.")
_NBETA = flags.DEFINE_float("nbeta", 0.0, "Inverse temperature n*beta (0: n / log n).")
_CHAINS = flags.DEFINE_integer("chains", 4, "Chains per checkpoint.")
_DRAWS = flags.DEFINE_integer("draws", 200, "Draws per chain after the burn-in.")
_BURNIN = flags.DEFINE_integer("burnin", 50, "Burn-in steps per chain.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampler seed (the same for every checkpoint).")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 8, "Batches in the fixed LLC data set.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per batch (one SGLD minibatch).")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "eval"], "Which split the data set comes from.")
_DATA_CKPT = flags.DEFINE_string("data_ckpt", "", "Checkpoint whose data config defines the data (default: first).")
_DATA_OVERRIDE = flags.DEFINE_multi_string("data_override", [], "field=value changes to that data config.")
_MESH = flags.DEFINE_string("mesh_shape", "1,-1,1", "Mesh (data, fsdp, tensor); -1 takes the rest.")
_RULES = flags.DEFINE_string("rules", "fsdp", "Logical-axis rule preset.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Matmul input dtype while sampling.")
_LOSS = flags.DEFINE_string("loss", "next_token", "Loss (a name in lmstack.train.losses.LOSSES).")
_OUT = flags.DEFINE_string("out", "", "Write results and traces as JSON.")
_PLOT = flags.DEFINE_string("plot", "", "Draw the LLC trace and the loss traces (PNG).")


def list_checkpoints(paths, steps="all"):
  """[(stage name, checkpoint dir, step)] in the given order, steps ascending."""
  import orbax.checkpoint as ocp

  from lmstack import checkpoint as ckpt_lib
  from lmstack.errors import ConfigError
  out = []
  for path in paths:
    directory, latest = ckpt_lib.resolve_step_dir(path)
    # A stage is named by its workdir (the parent of checkpoints/) or its params checkpoint directory.
    stage = os.path.basename(os.path.dirname(directory) if os.path.basename(directory) == "checkpoints"
                             else directory)
    if os.path.basename(os.path.normpath(path)).isdigit():
      chosen = [latest]
    else:
      available = sorted(ocp.CheckpointManager(directory).all_steps())
      if steps == "all":
        chosen = available
      elif steps == "latest":
        chosen = [latest]
      else:
        try:
          wanted = [int(s) for s in steps.split(",") if s.strip()]
        except ValueError:
          raise ConfigError(f"--steps={steps!r}: expected all, latest or a comma-separated list of steps") from None
        chosen = [s for s in available if s in wanted]
        if not chosen:
          raise ConfigError(f"{directory} has none of steps {wanted}; it has {available}")
    out.extend((stage, directory, s) for s in chosen)
  return out


def measure(checkpoints, estimator, log=print):
  """Runs the estimator on every checkpoint; returns one record each."""
  records, offset, prev_stage, stage_last = [], 0, None, 0
  for stage, directory, step in checkpoints:
    if prev_stage is not None and stage != prev_stage:
      offset += stage_last
    prev_stage, stage_last = stage, step
    t0 = time.perf_counter()
    result = estimator(os.path.join(directory, str(step)))
    seconds = time.perf_counter() - t0
    rec = {"stage": stage, "path": os.path.join(directory, str(step)), "step": step, "global_step": offset + step,
           "seconds": seconds, **result.as_dict()}
    records.append(rec)
    log(f"{stage} step {step:>6d}: llc {result.llc_mean:9.3f} ± {result.llc_std:7.3f} (chains "
        f"{', '.join(f'{x:.2f}' for x in result.llc_per_chain)}) | drift {result.drift:+.1f} | "
        f"L(w*) {result.init_loss:.4f} | {seconds:.1f} s")
  return records


def plot(records, out):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  fig, (ax_llc, ax_trace) = plt.subplots(1, 2, figsize=(12, 4.5))
  stages = list(dict.fromkeys(r["stage"] for r in records))
  for i, stage in enumerate(stages):
    rows = [r for r in records if r["stage"] == stage]
    x = [r["global_step"] for r in rows]
    ax_llc.errorbar(x, [r["llc_mean"] for r in rows], yerr=[r["llc_std"] for r in rows], fmt="o-", color=f"C{i}",
                    capsize=3, label=stage)
    if i:
      ax_llc.axvline(x[0] - rows[0]["step"], color="gray", ls=":", lw=1)
  ax_llc.set_xlabel("step (stages end to end)")
  ax_llc.set_ylabel("local learning coefficient")
  ax_llc.grid(alpha=0.3)
  ax_llc.legend(fontsize=8)
  cmap = plt.get_cmap("viridis")
  for j, r in enumerate(records):
    trace = np.asarray(r["loss_trace"]).mean(axis=0)
    ax_trace.plot(r["nbeta"] * (trace - r["init_loss"]), color=cmap(j / max(1, len(records) - 1)), lw=1,
                  label=f"{r['stage']} {r['step']}" if len(records) <= 12 else None)
  if records:
    ax_trace.axvline(records[0]["sgld"]["num_burnin"], color="gray", ls=":", lw=1)
  ax_trace.set_xlabel("SGLD step (dotted: end of burn-in)")
  ax_trace.set_ylabel("n·beta·(L_t - L(w*)), mean over chains")
  ax_trace.grid(alpha=0.3)
  if len(records) <= 12:
    ax_trace.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
    return 2
  if not flags.FLAGS["verbosity"].present:
    import logging
    for name in ("absl", "jax", "orbax"):
      logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
  from lmstack.analysis import llc
  from lmstack.errors import ConfigError, LmstackError
  try:
    if not _CKPT.value:
      raise ConfigError("give at least one --ckpt")
    overrides = {}
    for item in _DATA_OVERRIDE.value:
      key, sep, value = item.partition("=")
      if not sep:
        raise ConfigError(f"--data_override={item!r}: expected field=value")
      overrides[key] = value
    try:
      mesh_shape = tuple(int(x) for x in _MESH.value.strip("()").split(","))
    except ValueError:
      raise ConfigError(f"--mesh_shape={_MESH.value!r}: expected three integers, e.g. 1,-1,1") from None
    config = llc.SGLDConfig(step_size=_STEP_SIZE.value, gamma=_GAMMA.value, nbeta=_NBETA.value,
                            num_chains=_CHAINS.value, num_draws=_DRAWS.value, num_burnin=_BURNIN.value,
                            seed=_SEED.value)
    config.check()
    checkpoints = list_checkpoints(_CKPT.value, _STEPS.value)
    t0 = time.perf_counter()
    data = llc.checkpoint_data(_DATA_CKPT.value or os.path.join(checkpoints[0][1], str(checkpoints[0][2])),
                               seq_len=_SEQ.value, batch_size=_BATCH.value, num_batches=_NUM_BATCHES.value,
                               split=_SPLIT.value, data_overrides=overrides)
    estimator = llc.CheckpointLLC(data, config, mesh_shape=mesh_shape, rules=_RULES.value, dtype=_DTYPE.value,
                                  loss=_LOSS.value)
    nbeta = config.nbeta or llc.default_nbeta(data.n)
    print(f"LLC of {len(checkpoints)} checkpoint(s) on {data.description} (n={data.n:,.0f}, n*beta={nbeta:.1f}); "
          f"SGLD step {config.step_size:g}, gamma {config.gamma:g}, {config.num_chains} chains x "
          f"({config.num_burnin} + {config.num_draws}) steps")
    records = measure(checkpoints, estimator)
    seconds = time.perf_counter() - t0
  except LmstackError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"done in {seconds:.0f} s")
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump({"data": data.description, "n": data.n, "nbeta": nbeta, "seconds": seconds,
                 "sgld": records[0]["sgld"] if records else {}, "checkpoints": records}, f)
    print(f"wrote {_OUT.value}")
  if _PLOT.value:
    print(f"wrote {plot(records, _PLOT.value)}")
  return 0


if __name__ == "__main__":
  app.run(main)
