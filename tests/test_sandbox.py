"""The code-execution sandbox contains what generated code might do, and the
HumanEval harness on top of it passes the canonical solutions.

Each attack runs with the Python guards off where the kernel layers are meant
to hold alone (skipped, with the reason, where this machine lacks a layer), and
with the guards on.
"""

import os
import subprocess
import sys
import time

import pytest

from lmstack.synth import sandbox, verify

FORK_BOMB = """
import os, time
while True:
  try:
    os.fork()
  except OSError:
    time.sleep(30)
"""


@pytest.fixture(scope="module")
def layers():
  return sandbox.probe()


def _need(layers, key, prefix):
  if not str(layers.get(key, "none")).startswith(prefix):
    pytest.skip(f"sandbox layer {key} is {layers.get(key)!r} on this machine")


def _sandbox_processes():
  """Live processes started by a sandbox (the boot's argv names its directory)."""
  found = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        if b"lmstack-sandbox-" in f.read():
          found.append(int(pid))
    except OSError:
      continue
  return found


def test_ok_error_and_output():
  res = sandbox.run_python("print(6 * 7)")
  assert (res.status, res.finished, res.stdout) == ("ok", True, "42\n")
  res = sandbox.run_python("def f():\n  raise ValueError('bad input')\nf()")
  assert (res.status, res.reason) == ("error", "ValueError: bad input")
  assert "Traceback" in res.stderr and "program.py" in res.stderr
  res = sandbox.run_python("import os; os._exit(0)")
  assert (res.status, res.finished) == ("ok", False)
  res = sandbox.run_python("print(open('data/in.txt').read())", files={"data/in.txt": "given"})
  assert res.stdout == "given\n"


@pytest.mark.parametrize("guards", [False, True])
def test_infinite_loop_times_out(guards):
  t0 = time.monotonic()
  res = sandbox.run_python("while True:\n  pass", timeout_s=1, guards=guards)
  assert res.status == "timeout" and "wall-clock" in res.reason
  assert time.monotonic() - t0 < 5


def test_cpu_limit():
  res = sandbox.run_python("while True:\n  pass", timeout_s=10, cpu_s=1)
  assert (res.status, res.reason) == ("timeout", "CPU limit of 1 s (SIGXCPU)")


@pytest.mark.parametrize("guards", [False, True])
def test_huge_allocation_is_a_memory_error(guards):
  res = sandbox.run_python("x = bytearray(64 * 2**30)", memory_mb=512, guards=guards)
  assert (res.status, res.reason) == ("crash", "MemoryError (memory limit 512 MB)")
  res = sandbox.run_python("x = []\nwhile True:\n  x.append(bytearray(2**24))", memory_mb=256, guards=guards)
  assert res.status == "crash" and "MemoryError" in res.reason


def test_fork_bomb_is_contained(layers):
  if layers.get("pids") != "namespace" and not (os.geteuid() != 0 or layers.get("user", "").startswith("nobody")):
    pytest.skip("no PID namespace and no RLIMIT_NPROC that binds")
  t0 = time.monotonic()
  res = sandbox.run_python(FORK_BOMB, timeout_s=2, max_processes=32, guards=False)
  assert res.status == "timeout" and time.monotonic() - t0 < 10
  time.sleep(0.2)
  assert _sandbox_processes() == []
  assert subprocess.run(["true"]).returncode == 0  # this process can still fork
  counted = sandbox.run_python(
      "import os, time\nn = 0\nwhile True:\n  try:\n    pid = os.fork()\n  except OSError:\n    break\n"
      "  if pid == 0:\n    time.sleep(30)\n    os._exit(0)\n  n += 1\nprint(n)", max_processes=16, guards=False)
  assert counted.status == "ok" and int(counted.stdout) < 16
  guarded = sandbox.run_python("import os\nwhile True:\n  os.fork()", timeout_s=2)
  assert guarded.status == "error" and "os.fork is not allowed" in guarded.reason


def test_daemonised_children_die_with_the_program(layers):
  _need(layers, "pids", "namespace")
  res = sandbox.run_python("import os, time\nif os.fork() == 0:\n  os.setsid()\n  time.sleep(60)\nprint('left')",
                           guards=False)
  assert res.status == "ok"
  time.sleep(0.2)
  assert _sandbox_processes() == []


@pytest.mark.parametrize("guards", [False, True])
def test_writes_outside_the_sandbox_are_blocked(tmp_path, layers, guards):
  if not guards:
    _need(layers, "filesystem", "landlock")
  os.chmod(tmp_path, 0o777)  # even a world-writable directory
  outside = [tmp_path / "outside.txt", f"/tmp/lmstack-sandbox-test-{os.getpid()}.txt"]
  for target in outside:
    for code in (f"open({str(target)!r}, 'w').write('pwned')",
                 f"import os; os.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY))",
                 f"import shutil; shutil.copy('program.py', {str(target)!r})"):
      res = sandbox.run_python(code, guards=guards)
      assert res.status == "error" and "PermissionError" in res.reason, (code, res.reason)
      assert not os.path.exists(target)
  (tmp_path / "keep.txt").write_text("data")
  res = sandbox.run_python(f"import os; os.remove({str(tmp_path / 'keep.txt')!r})", guards=guards)
  assert res.status == "error" and (tmp_path / "keep.txt").exists()
  if not guards:  # a shell the program starts is held too
    res = sandbox.run_python(f"import subprocess; subprocess.run(['sh', '-c', 'echo x > {outside[1]}'])",
                             guards=False)
    assert res.status == "ok" and not os.path.exists(outside[1])


def test_writes_inside_work_and_the_directory_is_deleted():
  res = sandbox.run_python("import os\nos.mkdir('d')\nopen('d/f.txt', 'w').write('x')\nos.rename('d/f.txt', 'g.txt')\n"
                           "print(os.getcwd())\nprint(sorted(os.listdir('.')))")
  assert res.status == "ok", res.reason
  cwd, listing = res.stdout.splitlines()
  assert listing == "['d', 'g.txt', 'program.py']"
  assert not os.path.exists(cwd)


def test_network_is_blocked(layers):
  res = sandbox.run_python("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=3)")
  assert res.status == "error" and "socket" in res.reason and "not allowed" in res.reason
  _need(layers, "network", "namespace")
  res = sandbox.run_python("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=3)", guards=False,
                           landlock=False)  # the namespace alone
  assert res.status == "error" and "Network is unreachable" in res.reason
  res = sandbox.run_python("import socket\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen()\n"
                           "socket.create_connection(s.getsockname(), timeout=3)", guards=False, landlock=False)
  assert res.status == "error"  # the loopback is down too


def test_crashes_are_reported():
  res = sandbox.run_python("import os\nos.abort()")
  assert (res.status, res.reason) == ("crash", "killed by SIGABRT")
  res = sandbox.run_python("import ctypes\nctypes.string_at(0)", guards=False)
  assert (res.status, res.reason) == ("crash", "killed by SIGSEGV")
  res = sandbox.run_python("import ctypes\nctypes.string_at(0)")  # guarded: ctypes is refused
  assert res.status == "error" and "ctypes" in res.reason


def test_other_processes_are_out_of_reach(layers):
  res = sandbox.run_python(f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)", guards=False)
  assert res.status == "error"  # another PID namespace, another user, or Landlock's signal scope
  res = sandbox.run_python("import os\nos.kill(os.getppid(), 9)\nprint('alive')", guards=False)
  assert res.status in ("ok", "error")


def test_output_is_capped():
  res = sandbox.run_python("import sys\nfor _ in range(400):\n  sys.stdout.write('x' * 65536)",
                           max_output_bytes=1000, file_size_mb=4)
  assert res.status == "error" and "File too large" in res.reason
  assert len(res.stdout) < 1100 and "bytes cut" in res.stdout


def test_humaneval_canonical_solutions_pass_and_corrupted_ones_fail():
  problems = list(verify.load_problems().values())
  sample = problems[::14]  # 12 of 164
  results = dict(verify.check_many([(p, p["canonical_solution"]) for p in sample], workers=2))
  assert {v.status for v in results.values()} == {"passed"}, results
  p = problems[0]
  assert verify.check_completion(p, p["canonical_solution"].replace("<", ">=")).status == "failed"
  assert verify.check_completion(p, "    import sys; sys.exit(0)\n").status == "failed"
  assert verify.check_completion(p, "    while True: pass\n", timeout_s=1).status == "timeout"


@pytest.mark.slow
def test_all_humaneval_canonical_solutions_pass():
  problems = list(verify.load_problems().values())
  results = dict(verify.check_many([(p, p["canonical_solution"]) for p in problems]))
  failed = {problems[i]["task_id"]: v.reason for i, v in results.items() if v.status != "passed"}
  assert len(results) == 164 and not failed


def test_extract_code():
  assert verify.extract_code("    return 1\n\ndef other():\n  pass\nprint(3)", "f") == "    return 1\n"
  fenced = "Sure:\n```python\ndef f(x):\n    return x\n```\nThat's it."
  assert verify.extract_code(fenced, "f") == "def f(x):\n    return x\n"
  p = {"prompt": "def f(x):\n    \"\"\"Identity.\"\"\"\n", "test": "def check(c):\n    assert c(3) == 3\n",
       "entry_point": "f"}
  assert verify.check_completion(p, verify.extract_code(fenced, "f")).status == "passed"


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
