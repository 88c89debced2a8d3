"""Long context: a training step's memory against its length, flash against materialised attention.

  python tools/long_context.py                                  # 34m on this CPU at 2k/8k/32k, batch 1
  python tools/long_context.py --tpu                            # and the 7b step at 32k on a v5p-64 (libtpu)
  python tools/long_context.py --tpu --readme                   # the table into the README

CPU rows: the 34m pre-training step (configs/pretrain.py:size=34m, one row of T tokens, max_seq_len T) is
built by lmstack/train/build.py and compiled, not run; the figures are XLA's buffer assignment for it:
arguments (parameters, Adam moments, the batch) and temporaries (activations kept for the backward pass,
the attention scores or blocks, gradients). `materialize` keeps each query block's float32 scores over its
keys; with blocks of 128 its compile time grows with (T / 128)^2, so at T >= 8k it uses blocks of T / 16
(the same T x T / 2 scores). `flash` keeps O(T). TPU rows (`--tpu`, libtpu installed): tools/aot_compile.py
compiles the 7b step at 32k tokens for a v5p-64 with the splash kernel and with the materialising kernel, one
sequence a chip, full rematerialisation; a program libtpu refuses is reported with libtpu's figure.
The table goes between the README's `<!-- long-context:begin -->` and `<!-- long-context:end -->` lines.
"""

import os
import sys

from absl import app, flags

import table_io  # tools/: one aot_compile.py run, and the README's marked blocks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # lmstack/, configs/

_SEQS = flags.DEFINE_list("seqs", ["2048", "8192", "32768"], "CPU sequence lengths.")
_TPU = flags.DEFINE_bool("tpu", False, "Also compile the 7b step at 32k for a v5p-64 (needs libtpu).")
# Not --write_readme: that is aot_table.py's, and absl refuses one flag name from two modules in a process.
_WRITE = flags.DEFINE_bool("readme", False, "Write the table between the README's markers.")

BEGIN, END = "<!-- long-context:begin -->", "<!-- long-context:end -->"
GiB = 2**30


def cpu_step_bytes(seq, impl, size="34m"):
  """(arguments, temporaries) bytes of the compiled pre-training step of preset `size` at one row of `seq`
  tokens on this machine's first device."""
  import jax
  from configs import pretrain
  from lmstack.train import build
  config = pretrain.get_config(f"size={size}")
  block = 128 if impl == "flash" or seq < 8192 else seq // 16
  with config.unlocked():
    config.model.update(max_seq_len=seq, attention_impl=impl, attention_block=block)
    config.train.update(batch_size=1, seq_len=seq)
    config.mesh.update(shape=(1, 1, 1))
  mesh, rules = build.mesh_for(config, jax.devices()[:1])
  ma = build.build(config, mesh, rules).lower().compile().memory_analysis()
  return ma.argument_size_in_bytes, ma.temp_size_in_bytes


def tpu_row(impl):
  """aot_compile.py's figures for the 7b step at 32k on a v5p-64 with `impl`."""
  args = ["--config=configs/pretrain.py:size=7b", "--slice=v5p-64", "--batch_size=32", "--seq_len=32768",
          "--remat=full", "--config.model.max_seq_len=32768", f"--config.model.attention_impl={impl}", "--json"]
  try:
    return table_io.run_aot(args)[0]
  except RuntimeError as e:
    raise SystemExit(f"error: {e}") from e


def main(argv):
  del argv
  import jax
  lines = ["| step | tokens | attention | arguments GiB | temporaries GiB | verdict |", "|---|---|---|---|---|---|"]
  kind = jax.devices()[0].device_kind
  for seq in map(int, _SEQS.value):
    for impl in ("flash", "materialize"):
      arg, temp = cpu_step_bytes(seq, impl)
      lines.append(f"| 34m, batch 1, {kind} | {seq:,} | {impl} | {arg / GiB:,.2f} | {temp / GiB:,.2f} | compiled, not run |")
      print(lines[-1], file=sys.stderr, flush=True)
  if _TPU.value:
    for impl in ("splash", "materialize"):
      r = tpu_row(impl)
      temp = f"{r['temp_bytes'] / GiB:,.2f}" if r["compiled"] else f"refused: at least {r['peak_bytes'] / GiB:,.2f} peak"
      arg = f"{r['argument_bytes'] / GiB:,.2f}" if r["compiled"] else f"{r['state_bytes'] / GiB:,.2f} (state)"
      verdict = ("fits" if r["fits"] else "does not fit") + f" ({r['hbm_bytes'] / GiB:,.2f} available)"
      lines.append(f"| 7b, v5p-64, 1 a chip, remat full | 32,768 | {impl} | {arg} | {temp} | {verdict} |")
      print(lines[-1], file=sys.stderr, flush=True)
  table = "\n".join(lines)
  print(table)
  if _WRITE.value:
    table_io.write_block(table, table_io.README, BEGIN, END)


if __name__ == "__main__":
  app.run(main)
