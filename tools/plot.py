"""Plots training curves from one or more runs' metrics.jsonl as a PNG.

  python tools/plot.py /tmp/lmstack/pretrain [other_workdir ...] --out=loss.png

Draws train/loss (and eval/loss where present) against the step, one colour
per run; a second panel shows the learning rate.
"""

import json
import os
import sys

from absl import app, flags

_OUT = flags.DEFINE_string("out", "loss.png", "Output PNG path.")


def read_metrics(workdir):
  path = workdir if workdir.endswith(".jsonl") else os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no metrics file at {path}")
  rows = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if line:
        rows.append(json.loads(line))
  return rows


def series(rows, key):
  """(steps, values) of `key`; a resumed run's repeated steps keep the last value."""
  points = {r["step"]: r[key] for r in rows if key in r}
  steps = sorted(points)
  return steps, [points[s] for s in steps]


def plot(workdirs, out):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=(3, 1))
  for i, wd in enumerate(workdirs):
    rows = read_metrics(wd)
    color = f"C{i}"
    name = os.path.basename(os.path.normpath(wd))
    ax_loss.plot(*series(rows, "train/loss"), color=color, alpha=0.8, label=f"{name} train")
    steps, values = series(rows, "eval/loss")
    if steps:
      ax_loss.plot(steps, values, "o--", color=color, label=f"{name} held-out")
    ax_lr.plot(*series(rows, "train/lr"), color=color)
  ax_loss.set_ylabel("loss (nats/token)")
  ax_loss.legend()
  ax_loss.grid(alpha=0.3)
  ax_lr.set_ylabel("learning rate")
  ax_lr.set_xlabel("step")
  ax_lr.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  return out


def main(argv):
  if len(argv) < 2:
    print("usage: python tools/plot.py WORKDIR [WORKDIR ...] --out=loss.png", file=sys.stderr)
    return 2
  try:
    print(plot(argv[1:], _OUT.value))
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  app.run(main)
