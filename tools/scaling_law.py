"""Chinchilla scaling laws: evaluate, allocate compute, fit, and run a sweep.

  # L(N, D) and its three terms, under each published constant set
  python tools/scaling_law.py eval --n=70e9,1e9 --d=1.4e12,20e9
  # compute-optimal N and D for compute budgets (C = 6 N D), and for the compute of given (N, D)
  python tools/scaling_law.py allocate --compute=1e21,5.76e23 [--n=70e9 --d=1.4e12]
  # fit L(N, D) to measured points (a sweep's results.jsonl, or a CSV with columns n,d,loss)
  python tools/scaling_law.py fit --points=runs/sweep/results.jsonl --bootstrap=200 --plot=frontier.png
  # train a grid of small models on the embedded corpus, then fit and plot
  python tools/scaling_law.py sweep --workdir=runs/sweep --widths=32,64,96,128 --steps=50,100,200

`--constants` picks the constant sets (`hoffmann2022`, `besiroglu2024`, or
`all`). The sweep trains `configs/pretrain.py:size=tiny` with the width
changed (heads of 16 dimensions, half as many kv heads, MLP 3x the width)
for each token budget (steps x batch_size x seq_len, a cosine schedule to
that budget, 10% warmup), records the final held-out loss of each run in
`workdir/results.jsonl` (a re-run skips finished runs), fits the law with
bootstrap intervals and writes `workdir/fit.json` and `workdir/frontier.png`:
held-out loss against compute C = 6 N D, one line per model size, with the
fitted compute-optimal frontier L(N_opt(C), D_opt(C)). N counts all parameters,
embeddings included, as Hoffmann et al. do (`--count=non_embedding` drops them).
"""

import json
import math
import os
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

_CONSTANTS = flags.DEFINE_string("constants", "all", "Constant sets, comma-separated, or 'all'.")
_N = flags.DEFINE_string("n", "", "Parameter counts, comma-separated (e.g. 70e9,1e9).")
_D = flags.DEFINE_string("d", "", "Training tokens, comma-separated; pairs with --n.")
_COMPUTE = flags.DEFINE_string("compute", "", "Compute budgets in FLOPs, comma-separated (e.g. 1e21).")
_POINTS = flags.DEFINE_string("points", "", "fit: a results.jsonl (n, d, loss per line) or a CSV with n,d,loss.")
_N_FIELD = flags.DEFINE_string("n_field", "n", "fit: the results.jsonl field that is N (n, n_total, n_non_embedding).")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 200, "Bootstrap resamples for the intervals (0: none).")
_CONFIDENCE = flags.DEFINE_float("confidence", 0.95, "Central mass of each interval.")
_SEED = flags.DEFINE_integer("seed", 0, "Bootstrap seed.")
_OUT = flags.DEFINE_string("out", "", "fit: write the fit as JSON here.")
_PLOT = flags.DEFINE_string("plot", "", "fit: draw loss vs compute with the fitted frontier (PNG).")
_WORKDIR = flags.DEFINE_string("workdir", "", "sweep: directory of the runs and results.")
_WIDTHS = flags.DEFINE_string("widths", "32,64,96,128", "sweep: model widths (d_model).")
_LAYERS = flags.DEFINE_integer("layers", 2, "sweep: layers of every model.")
_STEPS = flags.DEFINE_string("steps", "50,100,200", "sweep: token budgets, as training steps.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "sweep: sequences per step.")
_SEQ = flags.DEFINE_integer("seq_len", 128, "sweep: tokens per sequence.")
_LR = flags.DEFINE_float("lr", 3e-3, "sweep: peak learning rate.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 0, "sweep: held-out batches per evaluation (0: all).")
_CONFIG_ARG = flags.DEFINE_string("config_arg", "size=tiny", "sweep: the configs/pretrain.py argument.")
_COUNT = flags.DEFINE_enum("count", "total", ["total", "non_embedding"], "Which parameters N counts.")


def _floats(text, name):
  from lmstack.errors import ConfigError
  try:
    return [float(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ConfigError(f"--{name}={text!r} is not a comma-separated list of numbers") from None


def _laws(names):
  from lmstack.analysis import scaling
  names = list(scaling.CONSTANTS) if names == "all" else [x.strip() for x in names.split(",") if x.strip()]
  return {name: scaling.get_law(name) for name in names}


def _pairs():
  from lmstack.errors import ConfigError
  n, d = _floats(_N.value, "n"), _floats(_D.value, "d")
  if len(n) != len(d):
    raise ConfigError(f"--n has {len(n)} values and --d has {len(d)}; give one D per N")
  return list(zip(n, d))


def _print_allocation(law, flops, indent="  "):
  n_opt, d_opt = law.compute_optimal(flops)
  print(f"{indent}C={flops:.3g} FLOPs -> N_opt={n_opt:.3g}  D_opt={d_opt:.3g}  D/N={d_opt / n_opt:.1f}  "
        f"L={float(law.loss(n_opt, d_opt)):.4f}")


# ---------------------------------------------------------------------------
# eval / allocate / fit


def cmd_eval():
  from lmstack.errors import ConfigError
  pairs = _pairs()
  if not pairs:
    raise ConfigError("eval needs --n and --d")
  for name, law in _laws(_CONSTANTS.value).items():
    print(f"{name}: E={law.E} A={law.A} B={law.B} alpha={law.alpha} beta={law.beta}")
    for n, d in pairs:
      model_term, data_term, e = law.terms(n, d)
      print(f"  N={n:.3g} D={d:.3g}: L={float(law.loss(n, d)):.4f} = E {e:.4f} + A/N^alpha {float(model_term):.4f}"
            f" + B/D^beta {float(data_term):.4f}   (C=6ND={6 * n * d:.3g})")
      n_opt, d_opt = law.optimal_split(n, d)
      print(f"    same compute, optimal split: N={n_opt:.3g} D={d_opt:.3g} L={float(law.loss(n_opt, d_opt)):.4f}")


def cmd_allocate():
  from lmstack.errors import ConfigError
  budgets = _floats(_COMPUTE.value, "compute")
  pairs = _pairs()
  if not budgets and not pairs:
    raise ConfigError("allocate needs --compute and/or --n with --d")
  for name, law in _laws(_CONSTANTS.value).items():
    print(f"{name}: N_opt ∝ C^{law.beta / (law.alpha + law.beta):.3f}, "
          f"D_opt ∝ C^{law.alpha / (law.alpha + law.beta):.3f}")
    for flops in budgets:
      _print_allocation(law, flops)
    for n, d in pairs:
      print(f"  given N={n:.3g} D={d:.3g} (L={float(law.loss(n, d)):.4f}):")
      _print_allocation(law, 6 * n * d, indent="    ")


def read_points(path, n_field="n"):
  """(n, d, loss, rows) from a results.jsonl (sweep) or a CSV with header n,d,loss;
  `n_field` names the column that holds N."""
  from lmstack.errors import DataError
  if not os.path.exists(path):
    raise DataError(f"points file not found: {path}")
  rows = []
  with open(path, encoding="utf-8") as f:
    if path.endswith(".jsonl"):
      rows = [json.loads(line) for line in f if line.strip()]
    else:
      lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
      header = [h.strip().lower() for h in lines[0].split(",")] if lines else []
      if not {n_field, "d", "loss"} <= set(header):
        raise DataError(f"{path}: expected a CSV header with columns {n_field},d,loss; got {header}")
      rows = [dict(zip(header, map(float, line.split(",")))) for line in lines[1:]]
  if not rows:
    raise DataError(f"{path} holds no points")
  try:
    return [r[n_field] for r in rows], [r["d"] for r in rows], [r["loss"] for r in rows], rows
  except KeyError as e:
    raise DataError(f"{path}: a point lacks the field {e}") from None


def fit_and_report(n, d, loss, out=None, plot=None, rows=None, labels=None):
  from lmstack.analysis import scaling
  t0 = time.perf_counter()
  fit = scaling.fit_law(n, d, loss, bootstrap=_BOOTSTRAP.value, confidence=_CONFIDENCE.value, seed=_SEED.value)
  seconds = time.perf_counter() - t0
  law = fit.law
  print(f"fit of {fit.num_points} points ({fit.num_starts} L-BFGS starts, {_BOOTSTRAP.value} bootstrap "
        f"resamples, {seconds:.0f} s): Huber objective {fit.objective:.3e}")
  for name in scaling.NAMES:
    lo_hi = fit.intervals.get(name)
    ci = f"  [{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]" if lo_hi else ""
    print(f"  {name:>5} = {getattr(law, name):.4g}{ci}")
  a = law.beta / (law.alpha + law.beta)
  print(f"  N_opt ∝ C^{a:.3f}, D_opt ∝ C^{1 - a:.3f}")
  flops = sorted({6.0 * x * y for x, y in zip(n, d)})
  for c in (flops[0], flops[-1]):
    _print_allocation(law, c)
  residual = [math.log(float(law.loss(x, y))) - math.log(z) for x, y, z in zip(n, d, loss)]
  print(f"  rms log-loss residual {math.sqrt(sum(r * r for r in residual) / len(residual)):.4f}")
  result = fit.as_dict()
  result["fit_seconds"] = seconds
  if out:
    with open(out, "w", encoding="utf-8") as f:
      json.dump({**result, "points": rows or [{"n": x, "d": y, "loss": z} for x, y, z in zip(n, d, loss)]}, f,
                indent=1)
    print(f"wrote {out}")
  if plot:
    print(f"wrote {plot_frontier(n, d, loss, law, plot, labels=labels)}")
  return fit


def plot_frontier(n, d, loss, law, out, labels=None):
  """Loss vs compute 6ND: points per model size, and, given a law, each size's
  fitted curve and the compute-optimal frontier."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  n, d, loss = (np.asarray(x, np.float64) for x in (n, d, loss))
  flops = 6 * n * d
  fig, ax = plt.subplots(figsize=(7.5, 5))
  sizes = sorted(set(n.tolist()))
  for i, size in enumerate(sizes):
    sel = np.flatnonzero(n == size)
    sel = sel[np.argsort(flops[sel])]
    label = (labels or {}).get(size, f"N={size:.3g}")
    ax.plot(flops[sel], loss[sel], "o", color=f"C{i}", label=label)
    if law is None:
      continue
    grid = np.geomspace(flops[sel].min() / 1.5, flops[sel].max() * 1.5, 50)
    ax.plot(grid, law.loss(size, grid / (6 * size)), "-", color=f"C{i}", alpha=0.5, lw=1)
  if law is not None:
    grid = np.geomspace(flops.min() / 2, flops.max() * 2, 100)
    n_opt, d_opt = law.compute_optimal(grid)
    ax.plot(grid, law.loss(n_opt, d_opt), "k--", label="fitted frontier L(N_opt(C), D_opt(C))")
    ax.set_title(f"E={law.E:.3g} A={law.A:.3g} B={law.B:.3g} alpha={law.alpha:.3f} beta={law.beta:.3f}",
                 fontsize=9)
  ax.set_xscale("log")
  ax.set_xlabel("compute C = 6ND (FLOPs)")
  ax.set_ylabel("held-out loss (nats/token)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def cmd_fit():
  from lmstack.errors import ConfigError
  if not _POINTS.value:
    raise ConfigError("fit needs --points")
  n, d, loss, rows = read_points(_POINTS.value, _N_FIELD.value)
  fit_and_report(n, d, loss, out=_OUT.value, plot=_PLOT.value, rows=rows)


# ---------------------------------------------------------------------------
# sweep


def sweep_config(width, steps, *, layers=2, batch_size=8, seq_len=128, lr=3e-3, config_arg="size=tiny",
                 eval_batches=0):
  """configs/pretrain.py with a model of `width` trained for `steps` steps."""
  from configs import pretrain
  from lmstack.errors import ConfigError
  if width % 16:
    raise ConfigError(f"sweep width {width} is not a multiple of 16 (heads of 16 dimensions)")
  config = pretrain.get_config(config_arg)
  heads = width // 16
  config.model.update(d_model=width, n_layers=layers, n_heads=heads, n_kv_heads=max(1, heads // 2), head_dim=0,
                      mlp_dim=3 * width, max_seq_len=max(config.model.max_seq_len, seq_len))
  config.train.update(steps=steps, batch_size=batch_size, seq_len=seq_len, log_every=max(1, steps // 2),
                      eval_every=steps, eval_batches=eval_batches, checkpoint_every=steps, keep_checkpoints=1,
                      tensorboard=False, peak_flops=0.0, report_unigram=False)
  config.optim.update(lr=lr, warmup_steps=max(1, steps // 10))
  return config


def run_sweep(workdir, widths, steps_list, *, count="total", log=print, **kw):
  """Trains every (width, steps) pair not yet in workdir/results.jsonl; returns all rows."""
  from lmstack.train import build, trainer
  os.makedirs(workdir, exist_ok=True)
  results_path = os.path.join(workdir, "results.jsonl")
  done = {}
  if os.path.exists(results_path):
    with open(results_path, encoding="utf-8") as f:
      for line in f:
        if line.strip():
          row = json.loads(line)
          done[(row["width"], row["steps"])] = row
  rows = []
  for width in widths:
    for steps in steps_list:
      if (width, steps) in done:
        rows.append(done[(width, steps)])
        continue
      config = sweep_config(width, steps, **kw)
      model_cfg = build.model_config(config)
      tokens = steps * config.train.batch_size * config.train.seq_len
      n = model_cfg.num_params(embeddings=count == "total")
      log(f"sweep: width {width} ({model_cfg.num_params():,} params, {model_cfg.num_params(False):,} "
          f"non-embedding), {steps} steps = {tokens:,} tokens")
      t0 = time.perf_counter()
      last = trainer.run(config, os.path.join(workdir, f"w{width}_s{steps}"))
      row = dict(width=width, steps=steps, n=n, n_total=model_cfg.num_params(),
                 n_non_embedding=model_cfg.num_params(False), d=tokens, flops_6nd=6.0 * n * tokens,
                 flops_model=float(model_cfg.flops_per_token(config.train.seq_len)) * tokens,
                 loss=float(last["eval/loss"]), wall_s=time.perf_counter() - t0)
      with open(results_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
      log(f"sweep: width {width}, {steps} steps: held-out loss {row['loss']:.4f} ({row['wall_s']:.0f} s)")
      rows.append(row)
  return rows


def cmd_sweep():
  from lmstack.errors import ConfigError
  if not _WORKDIR.value:
    raise ConfigError("sweep needs --workdir")
  widths = [int(x) for x in _floats(_WIDTHS.value, "widths")]
  steps = [int(x) for x in _floats(_STEPS.value, "steps")]
  t0 = time.perf_counter()
  rows = run_sweep(_WORKDIR.value, widths, steps, count=_COUNT.value, layers=_LAYERS.value,
                   batch_size=_BATCH.value, seq_len=_SEQ.value, lr=_LR.value, config_arg=_CONFIG_ARG.value,
                   eval_batches=_EVAL_BATCHES.value)
  train_s = time.perf_counter() - t0
  print(f"sweep: {len(rows)} runs ({len(widths)} widths x {len(steps)} budgets); training took {train_s:.0f} s "
        f"in this invocation ({sum(r['wall_s'] for r in rows):.0f} s of recorded run time)")
  print(" width          N          D      C=6ND    loss")
  for r in rows:
    print(f"{r['width']:>6} {r['n']:>10,} {r['d']:>10,} {r['flops_6nd']:>10.3g}  {r['loss']:.4f}")
  labels = {r["n"]: f"d_model={r['width']} (N={r['n'] / 1e6:.2f}M)" for r in rows}
  if len(rows) < 5:
    out = plot_frontier([r["n"] for r in rows], [r["d"] for r in rows], [r["loss"] for r in rows], None,
                        os.path.join(_WORKDIR.value, "frontier.png"), labels=labels)
    print(f"{len(rows)} points cannot determine the 5 constants; plotted the points only: {out}")
    return
  fit_and_report([r["n"] for r in rows], [r["d"] for r in rows], [r["loss"] for r in rows],
                 out=os.path.join(_WORKDIR.value, "fit.json"), plot=os.path.join(_WORKDIR.value, "frontier.png"),
                 rows=rows, labels=labels)


COMMANDS = {"eval": cmd_eval, "allocate": cmd_allocate, "fit": cmd_fit, "sweep": cmd_sweep}


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    print(f"usage: python tools/scaling_law.py {{{'|'.join(COMMANDS)}}} [flags]; see --help", file=sys.stderr)
    return 2
  if not flags.FLAGS["verbosity"].present:
    import logging
    for name in ("absl", "jax", "orbax"):
      logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
  from lmstack.errors import LmstackError
  try:
    COMMANDS[argv[1]]()
  except LmstackError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  app.run(main)
