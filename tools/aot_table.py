"""The README's "Will it fit?" table: every (preset, method, slice) compiled by tools/aot_compile.py.

  pip install -e '.[tpu]'
  python tools/aot_table.py                                   # 1b, 7b, 70b x full, lora, qlora, dpo x 3 slices
  python tools/aot_table.py --presets=1b --slices=v5e-16 --write_readme=false

Each cell is one `aot_compile.py --json` process (the tool's lock keeps them one at a time): the stage
config of the method (full: configs/pretrain.py:size=P; lora: configs/lora.py; qlora: configs/lora.py:qlora;
dpo: configs/dpo.py, full fine-tuning against a frozen copy) with the preset, one sequence (a DPO pair)
per chip of the preset's full context, full rematerialisation. The markdown table goes to stdout and,
with --write_readme, between the README's `<!-- aot-table:begin -->` and `<!-- aot-table:end -->` lines,
so re-running it refreshes the table; rows of cells not run now are kept (--keep=false drops them). A cell whose compile fails for another reason than memory stops
the tool (exit 1) and names the command.
"""

import sys

from absl import app, flags

import table_io  # tools/: one aot_compile.py run, and the README's marked blocks
from table_io import README

BEGIN, END = "<!-- aot-table:begin -->", "<!-- aot-table:end -->"
CONTEXT = {"1b": 2048, "7b": 4096, "70b": 4096}  # the presets' max_seq_len
METHODS = {  # method -> aot_compile.py --config and flags
    "full": lambda preset: [f"--config=configs/pretrain.py:size={preset}"],
    "lora": lambda preset: ["--config=configs/lora.py", f"--preset={preset}"],
    "qlora": lambda preset: ["--config=configs/lora.py:qlora", f"--preset={preset}"],
    "dpo": lambda preset: ["--config=configs/dpo.py", f"--preset={preset}"],
}

_PRESETS = flags.DEFINE_list("presets", ["1b", "7b", "70b"], "Model presets.")
_METHODS = flags.DEFINE_list("methods", list(METHODS), "Stages: full, lora, qlora, dpo.")
_SLICES = flags.DEFINE_list("slices", ["v5e-16", "v5p-32", "v6e-16"], "Slices (aot_compile.py --slice).")
_WRITE = flags.DEFINE_bool("write_readme", True, "Replace the table between the README's markers.")
_KEEP = flags.DEFINE_bool("keep", True, "Keep the README table's rows of cells not run now (--presets=7b then "
                          "refreshes only the 7b rows); false writes only the cells run now.")


def cell_args(preset, method, slice_name):
  """aot_compile.py's arguments for one cell."""
  chips = chips_of(slice_name)
  return [*METHODS[method](preset), f"--slice={slice_name}", f"--batch_size={chips}",
          f"--seq_len={CONTEXT[preset]}", "--remat=full", "--json"]


def chips_of(slice_name):
  """Chips of a slice name: v4-N and v5p-N count TensorCores (2 a chip), the others chips."""
  family, _, n = slice_name.partition("-")
  return int(n) // 2 if family in ("v4", "v5p") else int(n)


def gib(b):
  return f"{b / 2**30:,.2f}"


def table_row(r):
  """One markdown row of aot_compile.py's figures."""
  peak = gib(r["peak_bytes"]) if r.get("peak_bytes") else "?"
  if r["compiled"]:
    memory = f"{gib(r['argument_bytes'])} + {gib(r['temp_bytes'])} = {peak}"
    roof = (f"{r['roofline_step_s']:,.2f} s ({r['roofline_bound']}), {r['roofline_tokens_per_s'] / 1e3:,.1f}k tok/s"
            if r.get("roofline_step_s") else "")
  else:
    memory, roof = (f"at least {peak}" if r.get("peak_bytes") else "libtpu refuses (no figure)"), ""
  verdict = "fits" if r["fits"] else "DOES NOT FIT"
  rows = " pairs" if r["rows"] == 2 else ""
  method = "dpo" if r["loss"] == "dpo" else "full" if r["peft"] == "none" else r["peft"]
  return (f"| {r['preset']} | {method} | {r['slice']} | "
          f"{r['batch_size']}{rows} x {r['seq_len']} | {memory} | {gib(r['hbm_bytes'])} | {verdict} | {roof} |")


HEADER = ("| preset | method | slice | batch x tokens | per chip GiB: arguments + temporaries = peak (code aside) | "
          "available GiB | verdict | roofline step (bound), tokens/s |\n|---|---|---|---|---|---|---|---|")


def row_key(row):
  """(preset, method, slice) of a markdown table row."""
  return tuple(c.strip() for c in row.strip().strip("|").split("|")[:3])


def readme_rows(path=README):
  """The data rows of the README's table, by (preset, method, slice)."""
  _, block, _ = table_io.split_block(path, BEGIN, END)
  rows = [l for l in block.strip().splitlines() if l.startswith("|")][2:]  # past the header and rule
  return {row_key(r): r for r in rows}


def merge(new_rows, old_rows):
  """Rows in preset, method, slice order: the new ones, and the old ones of cells not run now."""
  rows = {**old_rows, **{row_key(r): r for r in new_rows}}
  order = {k: i for i, k in enumerate(CONTEXT)}, {k: i for i, k in enumerate(METHODS)}
  return [rows[k] for k in sorted(rows, key=lambda k: (order[0].get(k[0], 99), order[1].get(k[1], 99), k[2]))]


def write_readme(table, path=README):
  table_io.write_block(table, path, BEGIN, END)


def main(argv):
  del argv
  unknown = sorted(set(_METHODS.value) - set(METHODS)) + sorted(set(_PRESETS.value) - set(CONTEXT))
  if unknown:
    raise SystemExit(f"error: unknown methods or presets {unknown}; expected {sorted(METHODS)} and {sorted(CONTEXT)}")
  lines = []
  cells = [(p, m, s) for p in _PRESETS.value for m in _METHODS.value for s in _SLICES.value]
  for i, (preset, method, slice_name) in enumerate(cells, 1):
    try:
      r, seconds = table_io.run_aot(cell_args(preset, method, slice_name))
    except RuntimeError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
    lines.append(table_row(r))
    if _WRITE.value and _KEEP.value:  # each cell lands as it is measured: a stopped run keeps what it did
      write_readme("\n".join([HEADER, *merge(lines, readme_rows())]))
    print(f"[{i}/{len(cells)}] {preset} {method} {slice_name}: {'fits' if r['fits'] else 'does not fit'} "
          f"({seconds:,.0f} s)", file=sys.stderr, flush=True)
  if _WRITE.value and _KEEP.value:
    lines = merge(lines, readme_rows())
  table = "\n".join([HEADER, *lines])
  print(table)
  if _WRITE.value:
    write_readme(table)


if __name__ == "__main__":
  app.run(main)
