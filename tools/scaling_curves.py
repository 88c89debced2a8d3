"""Throughput and memory of the train step against sequence length and model size, on this machine.

  python tools/scaling_curves.py --out=docs/scaling_cpu   # writes .png, .md and .jsonl

Each point is one `tools/bench.py` run in its own process (pre-training,
synthetic batches): tokens/s, MFU and the step's peak host memory.
  sequence length: the 34m preset at 128 ... 4096 tokens, the batch keeping
                   --tokens tokens per step;
  model size:      the presets tiny, default, 34m and 100m at --batch x 512.
"""

import json
import os
import subprocess
import sys

from absl import app, flags

_OUT = flags.DEFINE_string("out", "docs/scaling_cpu", "Output path without extension (.png, .md, .jsonl).")
_SEQS = flags.DEFINE_list("seq_lens", ["128", "256", "512", "1024", "2048", "4096"], "Sequence lengths.")
_SEQ_PRESET = flags.DEFINE_string("seq_preset", "34m", "The model of the sequence-length curve.")
_TOKENS = flags.DEFINE_integer("tokens", 4096, "Tokens per step of the sequence-length curve.")
_SIZES = flags.DEFINE_list("presets", ["tiny", "default", "34m", "100m"], "The model-size curve.")
_BATCH = flags.DEFINE_integer("batch", 8, "Batch of the model-size curve (sequences of 512).")
_STEPS = flags.DEFINE_integer("steps", 4, "Measured steps per point.")

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")


def measure(preset, batch, seq, peaks):
  cmd = [sys.executable, BENCH, f"--presets={preset}", f"--batch_size={batch}", f"--seq_len={seq}",
         f"--steps={_STEPS.value}", "--mode=pretrain", "--json"] + ([f"--peaks={peaks}"] if peaks else [])
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  rows = [json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
  if out.returncode or not rows:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
  return rows[0]


def main(argv):
  del argv
  import jax.numpy as jnp

  from lmstack.metrics import measure_peak_flops
  peaks = f"{measure_peak_flops(dtype=jnp.bfloat16)},{measure_peak_flops(dtype=jnp.float32)}"
  rows = []
  for seq in map(int, _SEQS.value):
    r = measure(_SEQ_PRESET.value, max(1, _TOKENS.value // seq), seq, peaks)
    rows.append({"curve": "seq_len", **r})
    print(f"seq {seq:>5} batch {r['batch']:>3}: {r['tokens_per_s']:>8,.0f} tokens/s, MFU {r['mfu']:.1%}, "
          f"step memory {r['step_memory_bytes'] / 2**20:,.0f} MB", flush=True)
  for preset in _SIZES.value:
    r = measure(preset, _BATCH.value, 512, peaks)
    rows.append({"curve": "size", **r})
    print(f"{preset:>8} ({r['params'] / 1e6:.1f}M): {r['tokens_per_s']:>8,.0f} tokens/s, MFU {r['mfu']:.1%}, "
          f"step memory {r['step_memory_bytes'] / 2**20:,.0f} MB", flush=True)

  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value + ".jsonl", "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  seq_rows = [r for r in rows if r["curve"] == "seq_len"]
  size_rows = [r for r in rows if r["curve"] == "size"]
  lines = [f"Pre-training step, synthetic batches, matmul peak {float(peaks.split(',')[0]) / 1e9:,.0f} GFLOP/s "
           "(bf16 in, f32 accumulation).", "",
           f"| {_SEQ_PRESET.value} seq_len | batch | tokens/s | MFU | step memory (MB) |", "|---|---|---|---|---|"]
  lines += [f"| {r['seq']} | {r['batch']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | "
            f"{r['step_memory_bytes'] / 2**20:,.0f} |" for r in seq_rows]
  lines += ["", "| preset | parameters | tokens/s (8 x 512) | MFU | step memory (MB) |", "|---|---|---|---|---|"]
  lines += [f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | "
            f"{r['step_memory_bytes'] / 2**20:,.0f} |" for r in size_rows]
  with open(_OUT.value + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, data, x, label in ((axes[0], seq_rows, "seq", "sequence length"),
                             (axes[1], size_rows, "params", "parameters")):
    xs = [r[x] for r in data]
    ax.plot(xs, [r["tokens_per_s"] for r in data], "o-", color="tab:blue")
    ax.set_xscale("log", base=2 if x == "seq" else 10)
    ax.set_xlabel(label)
    ax.set_ylabel("tokens/s", color="tab:blue")
    twin = ax.twinx()
    twin.plot(xs, [r["step_memory_bytes"] / 2**30 for r in data], "s--", color="tab:red")
    twin.set_ylabel("step memory (GiB)", color="tab:red")
  axes[0].set_title(f"{_SEQ_PRESET.value}, {_TOKENS.value} tokens per step")
  axes[1].set_title(f"presets, {_BATCH.value} x 512")
  fig.tight_layout()
  fig.savefig(_OUT.value + ".png", dpi=110)
  print(f"wrote {_OUT.value}.png, .md, .jsonl")


if __name__ == "__main__":
  app.run(main)
