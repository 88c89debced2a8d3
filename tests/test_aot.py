"""tools/aot_compile.py: the train step compiled for a TPU slice on this CPU, its memory and its verdict.

  pip install -e '.[tpu]' && python -m pytest -q tests/test_aot.py

Skipped without libtpu (the `tpu` extra, or TPU_LIBRARY_PATH naming libtpu.so).
Each case is its own process; the tool holds a lock file, so only one loads
libtpu and compiles at a time.
"""

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "aot_compile.py")
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None or os.path.isfile(os.environ.get("TPU_LIBRARY_PATH", ""))
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (pip install -e '.[tpu]')")


def aot(*args):
  """(return code, the JSON figures or None, stdout + stderr) of one run of the tool."""
  out = subprocess.run([sys.executable, TOOL, "--json", *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=600, check=False)
  rows = [json.loads(l[len("RESULT "):]) for l in out.stdout.splitlines() if l.startswith("RESULT ")]
  return out.returncode, rows[0] if rows else None, out.stdout + out.stderr


def test_slice_names_map_to_topologies():
  code = ("import aot_compile as a; print([a.slice_topology(n)[0] for n in "
          "('v4-8', 'v4-32', 'v5p-64', 'v5p-128', 'v5e-4', 'v5litepod-16', 'v6e-8', 'v6e-256', 'v5p:4x4x12')])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(TOOL))
  assert out.stdout.strip() == str(["v4:2x2x1", "v4:2x2x4", "v5p:2x4x4", "v5p:4x4x4", "v5e:2x2", "v5e:4x4",
                                    "v6e:2x4", "v6e:16x16", "v5p:4x4x12"])


@needs_libtpu
def test_tiny_fits_a_v5e_4():
  rc, r, log = aot("--config=configs/pretrain.py:size=tiny", "--slice=v5e-4", "--batch_size=8", "--seq_len=128")
  assert rc == 0, log
  assert r["compiled"] and r["fits"] and r["chips"] == 4 and r["device_kind"] == "TPU v5 lite"
  assert r["mesh"] == {"data": 1, "fsdp": 4, "sequence": 1, "tensor": 1}
  for key in ("argument_bytes", "temp_bytes", "code_bytes", "peak_bytes", "xla_flops_per_chip"):
    assert r[key] > 0, key
  # The threshold is what libtpu says a program may use: below the chip's 16 GiB (the runtime keeps some).
  assert r["peak_bytes"] < r["hbm_bytes"] < r["chip_hbm_bytes"] == 16 * 2**30 and r["hbm_bytes"] > 15 * 2**30
  # The state (params + two Adam moments, float32) is split 4 ways and is among the step's arguments.
  assert r["argument_bytes"] >= r["state_bytes"] >= 3 * 4 * r["params"] / 4
  assert "verdict  fits" in log
  assert r["attention"] == "materialize" and r["pallas_kernels"] == 0  # auto on TPU, until splash is its default


@needs_libtpu
def test_the_splash_kernel_compiles_for_tpu():
  # attention_impl=splash: libtpu compiles the Pallas kernels (forward, dq, dk/dv) into the step, at 512 tokens
  # (kernel blocks of 512). With jax 0.10.2, libtpu 0.0.52 fails this at 256 tokens and more with an internal
  # error ("async-update instruction should have 1 operands"); 0.0.42.1, the version jax[tpu] pins, compiles it.
  rc, r, log = aot("--config=configs/pretrain.py:size=tiny", "--slice=v5e-4", "--batch_size=8", "--seq_len=512",
                   "--config.model.max_seq_len=512", "--config.model.attention_impl=splash")
  assert rc == 0, log
  assert r["attention"] == "splash" and r["pallas_kernels"] >= 3, r
  assert "attention splash (" in log


@needs_libtpu
def test_what_does_not_fit_exits_1():
  # The sharded state alone: 70B x 12 bytes over 4 chips is ~190 GiB a chip, so no compile is needed.
  rc, r, log = aot("--config=configs/pretrain.py:size=70b", "--slice=v5e-4", "--batch_size=4", "--seq_len=4096")
  assert rc == 1 and not r["fits"] and r["peak_bytes"] > 10 * r["hbm_bytes"], log
  # Temporaries: libtpu refuses the program (logits of 32768 x 128 tokens need ~66 GiB).
  rc, r, log = aot("--config=configs/pretrain.py:size=tiny", "--slice=v5e-4", "--batch_size=32768",
                   "--seq_len=128")
  assert rc == 1 and not r["fits"] and r["peak_bytes"] > r["hbm_bytes"], log
  assert "DOES NOT FIT" in log


def test_user_errors_are_one_line_with_status_2():
  rc, _, log = aot("--config=configs/pretrain.py:size=tiny", "--slice=v5e-3")
  assert rc == 2 and log.strip().splitlines() == ["error: --slice='v5e-3': v5e-N takes N in "
                                                  "[1, 4, 8, 16, 32, 64, 128, 256] (chips)"]


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed")
def test_without_libtpu_it_says_how_to_get_it():
  # A valid config (the config is checked first, without libtpu: --check_only).
  rc, _, log = aot("--config=configs/pretrain.py:size=tiny", "--slice=v5e-4", "--seq_len=128")
  assert rc == 2 and log.strip() == ("error: libtpu is not installed: pip install -e '.[tpu]' "
                                     "(or set TPU_LIBRARY_PATH to libtpu.so)")


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/lora.py", "configs/dpo.py"])
def test_fine_tuning_stages_compile(config):
  rc, r, log = aot(f"--config={config}", "--preset=tiny", "--slice=v4-8", "--batch_size=8", "--seq_len=128")
  assert rc == 0 and r["fits"], log
  if "lora" in config:
    assert r["peft"] == "lora" and r["trainable"] < r["params"] / 4  # adapters only
  else:  # a frozen copy of the starting model gives the reference log-probabilities
    assert r["loss"] == "dpo" and r["rows"] == 2 and r["reference_bytes"] > 0


def _section(title):
  """The README's `## title` section."""
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    text = f.read()
  start = text.index(f"\n## {title}")
  end = text.find("\n## ", start + 1)
  return text[start:end if end > 0 else None]


def _commands(section):
  """The shell commands in the section's ```bash blocks, continuation lines joined, comments dropped."""
  blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
  lines = " ".join(blocks).replace("\\\n", " ").splitlines()
  return [shlex.split(line.split("  #")[0].strip()) for line in lines if line.strip()]


def documented_launches():
  """(what, aot_compile.py arguments) for every documented launch and AOT command that names a config."""
  out, slices = [], {}
  for argv in _commands(_section("Cloud TPU")):
    if argv[:1] != ["./launch_tpu.sh"] or argv[1] not in ("all", "run"):
      continue
    own, extra = (argv[2:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv[2:], [])
    flags = dict(a[2:].split("=", 1) for a in own if a.startswith("--") and "=" in a)
    slices.setdefault(flags["name"], flags.get("accelerator_type"))
    accel = flags.get("accelerator_type") or slices[flags["name"]]
    out.append((" ".join(argv), [f"--config={flags['config']}", f"--slice={accel}",
                                 f"--num_slices={flags.get('num_slices', 1)}", *extra]))
  for argv in _commands(_section("Will it fit? (AOT)")):
    if argv[:2] == ["python", "tools/aot_compile.py"]:
      out.append((" ".join(argv), argv[2:]))
  return out


def test_the_readme_documents_launches():
  what = [w for w, _ in documented_launches()]
  assert sum(w.startswith("./launch_tpu.sh") for w in what) >= 2 and sum("aot_compile" in w for w in what) >= 4


@pytest.mark.slow
@pytest.mark.parametrize("what,args", documented_launches(), ids=lambda x: x if isinstance(x, str) else "")
def test_documented_launches_pass_the_pre_compile_checks(what, args):
  # The checks the trainer makes before it builds anything (config, mesh over the slice's chips, batch
  # split), without libtpu: a documented launch never stops on them after the slice is paid for.
  out = subprocess.run([sys.executable, TOOL, *args, "--check_only"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, check=False)
  assert out.returncode == 0, f"{what}\n{out.stdout}{out.stderr}"
  assert out.stdout.startswith("checks pass:"), out.stdout


def _table_tool():
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  import aot_table  # pylint: disable=import-outside-toplevel
  return aot_table


def test_the_table_tool_compiles_one_sequence_a_chip_and_rewrites_only_its_block(tmp_path):
  t = _table_tool()
  assert t.cell_args("7b", "dpo", "v5p-32") == ["--config=configs/dpo.py", "--preset=7b", "--slice=v5p-32",
                                                 "--batch_size=16", "--seq_len=4096", "--remat=full", "--json"]
  assert t.cell_args("1b", "qlora", "v5e-16")[:3] == ["--config=configs/lora.py:qlora", "--preset=1b",
                                                      "--slice=v5e-16"]
  row = t.table_row(dict(preset="7b", peft="lora", loss="next_token", slice="v5e-4", batch_size=4, rows=1,
                         seq_len=4096, compiled=True, fits=True, argument_bytes=3.59 * 2**30,
                         temp_bytes=5.18 * 2**30, peak_bytes=8.85 * 2**30, hbm_bytes=15.75 * 2**30,
                         roofline_step_s=0.5, roofline_bound="compute", roofline_tokens_per_s=32768.0))
  assert row == ("| 7b | lora | v5e-4 | 4 x 4096 | 3.59 + 5.18 = 8.85 | 15.75 | fits | 0.50 s (compute), "
                 "32.8k tok/s |")
  readme = tmp_path / "README.md"
  readme.write_text(f"intro\n{t.BEGIN}\nold table\n{t.END}\noutro\n", encoding="utf-8")
  for _ in range(2):  # re-runnable: the block is replaced, the rest kept
    t.write_readme("| new |", str(readme))
  assert readme.read_text(encoding="utf-8") == f"intro\n{t.BEGIN}\n| new |\n{t.END}\noutro\n"


def test_the_table_tool_keeps_the_rows_of_cells_it_did_not_run(tmp_path):
  t = _table_tool()
  readme = tmp_path / "README.md"
  old = ["| 1b | full | v5e-16 | old |", "| 1b | dpo | v5e-16 | old |", "| 7b | full | v5e-16 | old |"]
  readme.write_text(f"{t.BEGIN}\n{t.HEADER}\n" + "\n".join(old) + f"\n{t.END}\n", encoding="utf-8")
  rows = t.readme_rows(str(readme))
  assert list(rows) == [("1b", "full", "v5e-16"), ("1b", "dpo", "v5e-16"), ("7b", "full", "v5e-16")]
  # Re-running 7b full and adding 1b lora: the 7b row is replaced, 1b lora goes between full and dpo.
  merged = t.merge(["| 7b | full | v5e-16 | new |", "| 1b | lora | v6e-16 | new |"], rows)
  assert merged == ["| 1b | full | v5e-16 | old |", "| 1b | lora | v6e-16 | new |", "| 1b | dpo | v5e-16 | old |",
                    "| 7b | full | v5e-16 | new |"]


def test_the_readme_table_is_the_tools():
  # Every row between the markers has the tool's columns: it was written by tools/aot_table.py.
  t = _table_tool()
  text = _section("Will it fit? (AOT)")
  block = text.split(t.BEGIN, 1)[1].split(t.END, 1)[0].strip().splitlines()
  assert block[:2] == t.HEADER.splitlines() and len(block) > 2
  assert all(line.count("|") == t.HEADER.splitlines()[0].count("|") for line in block)
