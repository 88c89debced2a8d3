"""Runs untrusted Python (model-generated code) in a contained subprocess.

  from lmstack.synth import sandbox
  res = sandbox.run_python("print(sum(range(10)))", timeout_s=5, memory_mb=512)
  res.status, res.reason    # "ok" | "error" | "timeout" | "crash", and one line why
  res.stdout, res.stderr    # capped at max_output_bytes each
  sandbox.probe()           # which layers hold on this machine, e.g.
                            # {"network": "namespace", "pids": "namespace",
                            #  "filesystem": "landlock", "user": "nobody", ...}

Every call runs a fresh `python -I -S` (no environment variables, no user or
site packages unless `site_packages`, no current directory on sys.path) in a
throw-away working directory that is deleted afterwards, with an environment of
PATH, LANG, HOME and TMPDIR (both the working directory) only, stdin from
/dev/null and stdout/stderr into unlinked files. Layers, each tried and
reported in `Result.isolation`:

  limits      setrlimit on the program's process: RLIMIT_AS (memory_mb),
              RLIMIT_CPU (SIGXCPU, then SIGKILL a second later), RLIMIT_NPROC
              (max_processes: the fork-bomb guard), RLIMIT_FSIZE (file_size_mb,
              stdout/stderr included), RLIMIT_NOFILE, RLIMIT_CORE 0.
  wall clock  the caller kills the whole process group at timeout_s.
  pids        a new PID namespace: the program runs under a small init that is
              PID 1 there, so every process it starts, daemonised or not, dies
              with it. Without one the init is a child subreaper that kills the
              orphans it adopts when the program ends (not after a timeout).
  network     a new network namespace (only a loopback that is down); also IPC.
              As root directly, otherwise inside a new user namespace.
  filesystem  Landlock (Linux >= 5.13): creating, writing, truncating,
              renaming and deleting files is allowed only beneath the working
              directory (and writing to /dev/null). With Landlock ABI >= 4 TCP
              bind/connect are denied too; with ABI >= 6 the program cannot
              signal processes or reach abstract unix sockets outside it.
  user        no_new_privs. Run as root, the program drops to nobody (65534) so
              that RLIMIT_NPROC binds (root is exempt) and no root capability
              (setns out of the namespaces, mount, ptrace, kill) is left; it
              keeps only CAP_DAC_READ_SEARCH, read access everywhere, so that a
              Python installed under /root still imports. Otherwise all
              capabilities (those of the new user namespace) are dropped.
  guards      Python audit hook (best effort, `guards=True`): refuses sockets,
              importing ctypes (unless site_packages), audited ctypes calls,
              fork/exec/subprocess, gc introspection, signals to other
              processes, and opening for writing, creating, renaming or deleting
              paths outside the working directory (TMPDIR and HOME point there).

What holds on a Linux >= 6.7 machine with unprivileged user namespaces (or as
root): everything above (tests/test_sandbox.py checks each attack with the
Python guards off). Where a layer is missing (a container that forbids user
namespaces, an old kernel, macOS) its entry says so and the Python guards are
all that is left of it; audit hooks are not a security boundary (e.g.
importlib.util.module_from_spec loads _ctypes without an "import" event, and
ctypes.memmove is not audited), so treat a machine without the kernel layers
as unprotected against a determined program.

Even with every layer a program can still: read any file its user can read
(as root: every file; it cannot send it out, but it can print it into the
output the caller keeps); use up to memory_mb per process (RLIMIT_AS is per
process, so about max_processes x memory_mb in all) and one core per process
until the limits hit; fill its working directory up to file_size_mb per file;
forge its own report of how it ended: the exit status and signal come from the
init, out of the program's reach, but `finished` and the exception name come
from the program's own interpreter, so `ok` + `finished` means "reached its
last line" for honest code, not proof against code that targets this harness;
and exploit kernel bugs. As root, RLIMIT_NPROC counts every process of user
nobody, so concurrent sandboxes share max_processes. Not used: cgroups (a
total memory and process budget), seccomp, a VM such as gVisor.
"""

import dataclasses
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import time

NOBODY = 65534
_CLONE_NEWNET, _CLONE_NEWPID, _CLONE_NEWUSER, _CLONE_NEWIPC = 0x40000000, 0x20000000, 0x10000000, 0x08000000
_PR_SET_PDEATHSIG, _PR_SET_KEEPCAPS, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 8, 36, 38
_CAP_DAC_READ_SEARCH = 2


@dataclasses.dataclass
class Result:
  """How a sandboxed program ended.

  status: "ok" (exit code 0), "error" (an uncaught exception or a non-zero
  exit), "timeout" (wall-clock or CPU limit) or "crash" (killed by a signal,
  or a MemoryError at the memory limit). `finished` is True when the program
  ran to its last line (no exception, no sys.exit/os._exit before it).
  """
  status: str
  reason: str
  returncode: int | None
  finished: bool
  stdout: str
  stderr: str
  seconds: float
  isolation: dict


def run_python(source, *, timeout_s=10.0, memory_mb=1024, cpu_s=None, max_processes=64, file_size_mb=16,
               max_open_files=64, max_output_bytes=65536, guards=True, namespaces=True, landlock=True,
               site_packages=False, files=None):
  """Runs `source` (Python text) as a program in the sandbox; returns a Result.

  `files` ({relative name: text}) are written into the working directory
  first. `cpu_s` defaults to timeout_s. `guards`, `namespaces` and `landlock`
  switch layers off (the tests do, to prove each kernel layer holds alone).
  `site_packages` puts them on sys.path (and lets the guarded program import
  ctypes, which numpy needs). Never raises for anything the program does.
  """
  cpu_s = max(1, int(-(-(cpu_s or timeout_s) // 1)))
  workdir = tempfile.mkdtemp(prefix="lmstack-sandbox-")
  t0 = time.monotonic()
  try:
    for name, text in {**(files or {}), "program.py": source}.items():
      path = os.path.join(workdir, name)
      if os.path.commonpath([workdir, os.path.abspath(path)]) != workdir:
        raise ValueError(f"sandbox file {name!r} is outside the working directory")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    drop_to = NOBODY if os.geteuid() == 0 else None
    if drop_to is not None:
      for d, _, names in os.walk(workdir):
        for p in [d] + [os.path.join(d, n) for n in names]:
          os.chown(p, drop_to, drop_to)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
         tempfile.TemporaryFile() as status, tempfile.TemporaryFile() as report:
      cfg = dict(workdir=workdir, memory_mb=memory_mb, cpu_s=cpu_s, max_processes=max_processes,
                 file_size_mb=file_size_mb, max_open_files=max_open_files, guards=guards, namespaces=namespaces,
                 landlock=landlock, site_packages=site_packages, drop_to=drop_to, status_fd=status.fileno(),
                 report_fd=report.fileno())
      argv = [sys.executable, "-I"] + ([] if site_packages else ["-S"]) + [os.path.abspath(__file__), json.dumps(cfg)]
      env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
      timed_out, boot_rc = _run_and_kill(argv, workdir, env, out, err, (status.fileno(), report.fileno()), timeout_s)
      seconds = time.monotonic() - t0
      texts = [_read_capped(f, max_output_bytes) for f in (out, err, status, report)]
    return _classify(timed_out, boot_rc, *texts, seconds=seconds, timeout_s=timeout_s, cpu_s=cpu_s,
                     memory_mb=memory_mb)
  finally:
    _rmtree(workdir)


def _run_and_kill(argv, workdir, env, out, err, fds, timeout_s):
  """Starts the boot process in its own session; at exit or timeout kills its
  process group. Returns (timed_out, returncode)."""
  import subprocess
  proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                          pass_fds=fds, start_new_session=True, close_fds=True)
  deadline, pause, timed_out = time.monotonic() + timeout_s, 0.001, False
  while True:  # wait without reaping, so that the group id cannot be reused before killpg
    if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
      break
    if time.monotonic() >= deadline:
      timed_out = True
      break
    time.sleep(pause)
    pause = min(pause * 2, 0.02)
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  return timed_out, proc.wait()


def _read_capped(f, limit):
  f.flush()
  size = f.seek(0, os.SEEK_END)
  f.seek(0)
  if size <= limit:
    data = f.read()
  else:
    head = f.read(limit // 2)
    f.seek(size - limit // 2)
    data = head + f"\n[... {size - limit} bytes cut ...]\n".encode() + f.read()
  return data.decode("utf-8", "replace")


def _rmtree(path):
  def make_writable(func, p, _):
    try:
      os.chmod(os.path.dirname(p), 0o700)
      os.chmod(p, 0o700)
      func(p)
    except OSError:
      pass
  shutil.rmtree(path, onerror=make_writable)


def _signal_name(n):
  try:
    return signal.Signals(n).name
  except ValueError:
    return f"signal {n}"


def _classify(timed_out, boot_rc, stdout, stderr, status, report, *, seconds, timeout_s, cpu_s, memory_mb):
  """The Result from the init's status line and the program's report."""
  def result(st, reason, rc=None, finished=False):
    return Result(st, reason, rc, finished, stdout, stderr, round(seconds, 3), isolation)

  isolation, end, setup_error, rep = {}, None, None, {}
  for line in status.splitlines():
    kind, _, value = line.partition(" ")
    if kind == "isolation":
      isolation.update(json.loads(value))
    elif kind in ("exit", "signal"):
      end = (kind, int(value))
    elif kind == "setup":
      setup_error = value
  try:
    rep = json.loads(report.splitlines()[-1]) if report.strip() else {}
    rep = rep if isinstance(rep, dict) else {}
  except ValueError:
    pass
  if timed_out:
    return result("timeout", f"wall-clock limit of {timeout_s:g} s")
  if setup_error:
    return result("crash", f"sandbox setup failed: {setup_error}")
  if end is None:  # the boot or init died before reporting
    if boot_rc < 0:
      return result("crash", f"sandbox killed by {_signal_name(-boot_rc)}", boot_rc)
    return result("crash", f"sandbox ended without a status (exit code {boot_rc}): {stderr.strip()[-200:]}",
                  boot_rc)
  kind, value = end
  if kind == "signal":
    if value == signal.SIGXCPU:
      return result("timeout", f"CPU limit of {cpu_s} s (SIGXCPU)", -value)
    hint = " (a resource limit or the OOM killer)" if value == signal.SIGKILL else ""
    return result("crash", f"killed by {_signal_name(value)}{hint}", -value)
  if "exception" in rep:
    reason = f"{rep['exception']}: {rep.get('message', '')}".strip().rstrip(":")
    if rep["exception"] == "MemoryError":
      return result("crash", f"MemoryError (memory limit {memory_mb} MB)", value)
    return result("error", reason, value)
  if value != 0:
    return result("error", f"exit code {value}", value)
  if rep.get("finished"):
    return result("ok", "exit 0", 0, finished=True)
  if "exit" in rep:
    return result("ok", f"sys.exit({rep['exit']}) before the last line", 0)
  return result("ok", "exit 0 before the last line (os._exit?)", 0)


_PROBE = None


def probe():
  """The isolation layers that hold here (a dict); runs one tiny program."""
  global _PROBE
  if _PROBE is None:
    res = run_python("pass", timeout_s=30)
    _PROBE = dict(res.isolation, status=res.status)
  return dict(_PROBE)


# ---------------------------------------------------------------------------
# Inside the sandbox. Everything below runs in the child processes:
#   boot (this file as a script; unshares namespaces, then forks)
#     init (PID 1 of the new PID namespace; reaps; writes the status line)
#       program (limits, Landlock, privileges, guards; then the program)


def _libc():
  import ctypes
  libc = ctypes.CDLL(None, use_errno=True)
  libc.syscall.restype = ctypes.c_long
  return libc


def _errno_text():
  import ctypes
  return os.strerror(ctypes.get_errno())


def _unshare(cfg, iso):
  """New network, PID and IPC namespaces (in a new user namespace unless root)."""
  if not cfg["namespaces"] or not sys.platform.startswith("linux"):
    iso.update(network="none", pids="none")
    return
  libc, root = _libc(), os.geteuid() == 0
  uid, gid = os.geteuid(), os.getegid()
  base = 0 if root else _CLONE_NEWUSER
  for flags, got in ((_CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC, ("namespace", "namespace")),
                     (_CLONE_NEWNET, ("namespace", "none"))):
    if libc.unshare(base | flags) == 0:
      if not root:  # map our own ids, or files we create would be unowned (EOVERFLOW)
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
          with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
      iso.update(network=got[0], pids=got[1])
      return
    iso["namespace_error"] = _errno_text()
  iso.update(network="none", pids="none")


def _set_limits(cfg):
  mb = 1 << 20
  limits = [(resource.RLIMIT_AS, cfg["memory_mb"] * mb), (resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1)),
            (resource.RLIMIT_NPROC, cfg["max_processes"]), (resource.RLIMIT_FSIZE, cfg["file_size_mb"] * mb),
            (resource.RLIMIT_NOFILE, cfg["max_open_files"]), (resource.RLIMIT_CORE, 0)]
  for which, value in limits:
    soft, hard = value if isinstance(value, tuple) else (value, value)
    old_soft, old_hard = resource.getrlimit(which)
    if old_hard != resource.RLIM_INFINITY:  # cannot raise a hard limit unless root; never loosen
      soft, hard = min(soft, old_hard), min(hard, old_hard)
    resource.setrlimit(which, (soft, hard))


def _landlock(workdir):
  """Restricts writes to `workdir`; returns a description of what holds."""
  import ctypes
  import struct
  libc = _libc()
  abi = libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
  if abi < 1:
    return f"none (Landlock unavailable: {_errno_text()})"
  write = 1 << 1 | 0b1111111 << 6 | 1 << 4 | 1 << 5  # WRITE_FILE, MAKE_*, REMOVE_DIR, REMOVE_FILE
  write |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)  # REFER, TRUNCATE
  attr = struct.pack("=QQQ", write, 0b11, 0b11)  # fs; net: bind + connect TCP; scoped: abstract unix, signal
  attr = attr[:8 if abi < 4 else 16 if abi < 6 else 24]
  buf = ctypes.create_string_buffer(attr, len(attr))
  ruleset = libc.syscall(444, buf, len(attr), 0)
  if ruleset < 0:
    return f"none (landlock_create_ruleset: {_errno_text()})"
  file_rights = 1 << 1 | (1 << 14 if abi >= 3 else 0)
  for path, rights in ((workdir, write), ("/dev/null", file_rights)):
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    rule = ctypes.create_string_buffer(struct.pack("=Qi", rights, fd), 12)
    ok = libc.syscall(445, ruleset, 1, rule, 0) == 0  # LANDLOCK_RULE_PATH_BENEATH
    os.close(fd)
    if not ok:
      return f"none (landlock_add_rule {path}: {_errno_text()})"
  if libc.syscall(446, ruleset, 0) != 0:
    return f"none (landlock_restrict_self: {_errno_text()})"
  os.close(ruleset)
  extra = (", TCP denied" if abi >= 4 else "") + (", signals scoped" if abi >= 6 else "")
  return f"landlock ABI {abi} (writes only in the working directory{extra})"


def _set_caps(mask):
  """Keeps only the capabilities in `mask` (effective and permitted)."""
  import ctypes
  header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
  data = (ctypes.c_uint32 * 6)(mask & 0xFFFFFFFF, mask & 0xFFFFFFFF, 0, mask >> 32, mask >> 32, 0)
  if _libc().capset(header, data) != 0:
    raise OSError(f"capset: {_errno_text()}")


def _drop_privileges(cfg):
  libc = _libc()
  if not sys.platform.startswith("linux"):
    return "unchanged"
  libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
  if cfg["drop_to"] is None:
    try:
      _set_caps(0)
    except OSError:
      pass
    return f"uid {os.getuid()}, no capabilities, no_new_privs"
  uid = cfg["drop_to"]
  libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0)
  os.setgroups([])
  os.setresgid(uid, uid, uid)
  os.setresuid(uid, uid, uid)
  _set_caps(1 << _CAP_DAC_READ_SEARCH)
  return f"nobody (uid {uid}), CAP_DAC_READ_SEARCH only, no_new_privs"


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_DENIED_PREFIXES = ("socket.", "ctypes.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
                    "os.system", "os.startfile", "gc.get_", "sys.addaudithook")
# event -> indices of the path arguments it writes (None: the dir_fd index)
_PATH_EVENTS = {"os.remove": ((0,), 1), "os.rmdir": ((0,), 1), "os.mkdir": ((0,), 2), "os.rename": ((0, 1), 2),
                "os.symlink": ((1,), 2), "os.link": ((0, 1), 2), "os.truncate": ((0,), None),
                "os.chmod": ((0,), 2), "os.chown": ((0,), 3), "os.utime": ((0,), 3), "shutil.rmtree": ((0,), 1),
                "os.mkfifo": ((0,), 2), "os.mknod": ((0,), 3)}


def _install_guards(workdir, allow_ctypes_import):
  """A Python audit hook that refuses what the program should not need.

  ctypes can bypass any audit hook (e.g. ctypes.memmove is not audited), so it
  cannot be imported at all unless `allow_ctypes_import` (site packages: numpy
  imports it); its audited calls (dlopen, dlsym, string_at, ...) stay refused.
  """
  denied_imports = ("_posixsubprocess",) + (() if allow_ctypes_import else ("ctypes", "_ctypes"))
  root = os.path.realpath(workdir)
  allowed = (root, "/dev/null")
  realpath, fsdecode, join, getpid = os.path.realpath, os.fsdecode, os.path.join, os.getpid

  def inside(path, dir_fd=None):
    if isinstance(path, int):  # an open descriptor: checked when it was opened
      return True
    path = fsdecode(path)
    if isinstance(dir_fd, int) and dir_fd >= 0 and not path.startswith("/"):  # -1: no dir_fd
      path = join(realpath(f"/proc/self/fd/{dir_fd}"), path)
    path = realpath(path)
    return any(path == a or path.startswith(a + "/") for a in allowed)

  def hook(event, args):
    if event.startswith(_DENIED_PREFIXES):
      raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args[0] in denied_imports:  # _posixsubprocess.fork_exec is not audited
      raise PermissionError(f"sandbox: import {args[0]} is not allowed")
    if event == "os.killpg" or event == "os.kill" and args[0] != getpid():
      raise PermissionError(f"sandbox: {event} of another process is not allowed")
    if event == "open":
      path, _, flags = args
      if flags is not None and flags & _WRITE_FLAGS and not inside(path):
        raise PermissionError(f"sandbox: writing {fsdecode(path)!r} outside the working directory is not allowed")
    elif event in _PATH_EVENTS:
      indices, fd_index = _PATH_EVENTS[event]
      dir_fd = args[fd_index] if fd_index is not None and fd_index < len(args) else None
      for i in indices:
        if not inside(args[i], dir_fd):
          raise PermissionError(f"sandbox: {event} of {fsdecode(args[i])!r} outside the working directory "
                                "is not allowed")

  if allow_ctypes_import:
    import ctypes  # noqa: F401 - now, while its import-time dlopen is allowed
  else:
    for name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")]:
      del sys.modules[name]
  sys.addaudithook(hook)


def _program(cfg, status_fd):
  """In the program's process: confine it, then run program.py."""
  try:
    _set_limits(cfg)
    on_linux = sys.platform.startswith("linux")
    iso = {"filesystem": _landlock(cfg["workdir"]) if cfg["landlock"] and on_linux else "none",
           "user": _drop_privileges(cfg), "guards": "audit hook" if cfg["guards"] else "none"}
    if on_linux:
      _libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid, which clears it
    with open("program.py", encoding="utf-8") as f:
      source = f.read()
    report = os.fdopen(cfg["report_fd"], "w")
  except Exception as e:  # noqa: BLE001 - a failure of the confinement itself
    _write_status(status_fd, f"setup {type(e).__name__}: {e}")
    os._exit(70)
  _write_status(status_fd, "isolation " + json.dumps(iso))
  os.close(status_fd)  # the program cannot forge how it ended
  sys.dont_write_bytecode = True
  sys.argv = ["program.py"]
  if cfg["guards"]:
    _install_guards(cfg["workdir"], cfg["site_packages"])
  _exec_program(source, report)


def _exec_program(source, report):
  """Runs the program as __main__; exceptions and sys.exit propagate, so the
  interpreter ends as it would for `python program.py` (traceback, atexit)."""
  import types
  main = types.ModuleType("__main__")
  main.__file__ = "program.py"
  sys.modules["__main__"] = main
  try:
    exec(compile(source, "program.py", "exec"), main.__dict__)  # noqa: S102 - the point of a sandbox
  except SystemExit as e:
    _report(report, {"exit": repr(e.code)})
    raise
  except BaseException as e:  # noqa: BLE001 - reported, then re-raised
    try:
      message = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    except Exception:  # noqa: BLE001 - a hostile __str__
      message = ""
    _report(report, {"exception": type(e).__name__, "message": message})
    raise
  _report(report, {"finished": True})


def _report(report, obj):
  try:
    report.write(json.dumps(obj) + "\n")
    report.flush()
  except (OSError, ValueError):
    pass


def _write_status(fd, text):
  os.write(fd, (text + "\n").encode())


def _boot(cfg):
  """boot -> init -> program; the init writes "exit N" or "signal N"."""
  status_fd = cfg["status_fd"]
  iso = {}
  try:
    _unshare(cfg, iso)
    pid = os.fork()
  except Exception as e:  # noqa: BLE001 - reported as a crash of the sandbox
    _write_status(status_fd, f"setup {type(e).__name__}: {e}")
    os._exit(70)
  if pid:  # boot: wait for init and pass its exit code on
    _, st = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(st) if os.WIFEXITED(st) else 71)
  # init
  if sys.platform.startswith("linux"):
    libc = _libc()
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getpid() != 1:  # no PID namespace: collect orphans ourselves
      libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
  _write_status(status_fd, "isolation " + json.dumps(iso))
  try:
    child = os.fork()
  except OSError as e:
    _write_status(status_fd, f"setup fork: {e}")
    os._exit(70)
  if child == 0:
    _program(cfg, status_fd)
    sys.exit(0)  # through the interpreter's normal shutdown: flushes, atexit
  end = "setup lost the program's process"
  while True:  # reap everything; note how the program ended
    try:
      pid, st = os.waitpid(-1, 0)
    except ChildProcessError:
      break
    if pid == child:
      end = f"signal {os.WTERMSIG(st)}" if os.WIFSIGNALED(st) else f"exit {os.WEXITSTATUS(st)}"
      break
  if os.getpid() != 1:  # kill the orphans re-parented to us; in a PID namespace the kernel does it
    _kill_children()
  _write_status(status_fd, end)
  os._exit(0)


def _kill_children():
  me = str(os.getpid())
  for _ in range(100):
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
      try:
        with open(f"/proc/{entry}/stat") as f:
          if f.read().rsplit(")", 1)[1].split()[1] == me:
            os.kill(int(entry), signal.SIGKILL)
      except (OSError, IndexError, ValueError):
        continue
    try:
      os.waitpid(-1, 0)
    except ChildProcessError:
      return


if __name__ == "__main__":
  _boot(json.loads(sys.argv[1]))
