"""Run untrusted, model-written Python in a separate, confined process.

    run_python(code, stdin=..., limits=SandboxLimits(...)) -> SandboxResult
    run_linked(Program(a), Program(b), limits=...) -> (SandboxResult, SandboxResult)

Each program is written to `main.py` in a fresh temporary directory and started by
`sandbox_launcher.py` (`python -I -S`, standard library only), which confines itself and execs
`python -I -S -u main.py`. The layers, strongest first (docs/sandbox.md says what each one does and
does not stop):

- kernel namespaces: a new network namespace (no interfaces but a down loopback); a new PID
  namespace whose init is the program (when it exits or is killed, everything it started dies with
  it) with a procfs of its own; a new mount namespace whose root is a fresh tmpfs capped in bytes
  and inodes, holding read-only binds of the system and interpreter directories, a minimal /dev, a
  writable /tmp and working directory: no other host path, so no host file, unix socket or process
  is reachable. As a normal user these sit inside a new user namespace.
- an unprivileged, per-program uid when the parent is root (root ignores RLIMIT_NPROC), so the
  process limit holds and programs cannot signal or trace each other.
- resource limits: CPU seconds, address space, file size, open files, processes, no core files.
- the parent: a scrubbed environment, a wall-time deadline (and an optional cancel event) after
  which everything is SIGKILLed, and at most `max_output_bytes` read from each of stdout and stderr.
  The launcher dies with the thread that started it, so nothing outlives a killed trainer.

`run_linked` starts two programs at once, each in its own sandbox, joined only by two pipes: each
reads what the other writes. The code reward uses it to keep the tests out of the process that runs
the model's code (posttrain.rewards.code).

When the kernel refuses namespaces the launcher falls back to an in-process audit hook that
refuses sockets; `SandboxResult.isolation` and `probe_isolation()` say which layers were in force.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from posttrain.rewards.sandbox_launcher import LAUNCHER_FAILED_EXIT

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_launcher.py")
MINIMAL_ENV_PATH = "/usr/local/bin:/usr/bin:/bin"
UNPRIVILEGED_UID_RANGE = (1_500_000_000, 2_000_000_000)
"""Per-program uids are drawn from here when the parent is root: far above any real account's uid."""
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
"""Host paths a sandboxed program sees (read-only), besides the interpreter's own prefix."""
POLL_S = 0.05
"""How often a run checks its cancel event."""

__all__ = ["LAUNCHER_FAILED_EXIT", "Program", "SandboxError", "SandboxLimits", "SandboxResult", "probe_isolation",
           "run_linked", "run_python"]


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up; the program never ran."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits on one program. Every default is sized for short verifier programs on a laptop CPU."""

    wall_time_s: float = 10.0
    """Seconds from start until everything the run started is SIGKILLed."""
    cpu_time_s: int = 10
    """RLIMIT_CPU per process, in CPU seconds (SIGXCPU, then SIGKILL one second later)."""
    memory_bytes: int = 1 << 30
    """RLIMIT_AS per process: address space, so Python raises MemoryError on a large allocation."""
    max_output_bytes: int = 1 << 20
    """Bytes kept from each of stdout and stderr; one more byte kills the run."""
    max_file_bytes: int = 16 << 20
    """RLIMIT_FSIZE: the largest file the program may write."""
    max_disk_bytes: int = 64 << 20
    """Total bytes the program may store: its working directory, /tmp and /dev/shm share one tmpfs of
    this size (ENOSPC past it). The pages are memory, on top of `memory_bytes`."""
    max_disk_files: int = 1024
    """Files and directories the program may create on that tmpfs (its inode cap)."""
    max_processes: int = 16
    """RLIMIT_NPROC for the run's own uid (or user namespace): bounds fork bombs."""
    max_open_files: int = 64
    """RLIMIT_NOFILE."""


@dataclass(frozen=True)
class Program:
    """One program of a run: Python source, run as main.py, and what it reads on stdin."""

    code: str
    stdin: str = ""


@dataclass(frozen=True)
class SandboxResult:
    """What one program did. `stdout`/`stderr` are decoded as UTF-8 with replacement characters."""

    exit_code: int | None
    """The program's exit status; None when a signal ended it."""
    stdout: str
    stderr: str
    output_truncated: bool
    """A stream of the run passed `max_output_bytes`; the run was killed and the stream cut there."""
    timed_out: bool
    """The wall-time deadline passed and the run was killed."""
    killed_by_signal: int | None
    """The signal that ended the program (SIGKILL after a timeout, SIGXCPU or SIGKILL at the CPU limit)."""
    memory_exceeded: bool
    """Heuristic: the program died with a MemoryError (the address-space limit); the program can fake it."""
    wall_time_s: float
    isolation: tuple[str, ...]
    """The confinement layers that were in force, e.g. ("netns", "pidns", "mountns", "private-root", ...)."""
    cancelled: bool = False
    """The caller's cancel event was set and the run was killed."""

    @property
    def ok(self) -> bool:
        """Exited with status 0, within every limit."""
        return self.exit_code == 0 and not (self.timed_out or self.output_truncated or self.cancelled)


def run_python(
    code: str, *, stdin: str = "", limits: SandboxLimits, cancel: threading.Event | None = None
) -> SandboxResult:
    """Run `code` as `python -I -S -u main.py` inside the sandbox and return what happened.

    cancel: when set (polled every 50 ms), the run is killed and reported `cancelled`.
    Never raises for anything the program does; raises SandboxError when the sandbox cannot start.
    """
    return _run([Program(code, stdin)], limits, cancel, linked=False)[0]


def run_linked(
    first: Program, second: Program, *, limits: SandboxLimits, cancel: threading.Event | None = None
) -> tuple[SandboxResult, SandboxResult]:
    """Run two programs at once, each in its own sandbox (namespaces, uid, root filesystem), joined by
    two pipes: each reads on its fd 3 what the other writes on its fd 4.

    The run ends when `first` exits (then `second` is killed), at the wall-time deadline, or on
    `cancel`. Each program gets `limits`; the deadline is shared. Raises only SandboxError.
    """
    results = _run([first, second], limits, cancel, linked=True)
    return results[0], results[1]


@cache
def probe_isolation() -> tuple[str, ...]:
    """The confinement layers a run gets on this machine (cached; costs one sandboxed run)."""
    result = run_python("pass", limits=SandboxLimits(wall_time_s=30.0))
    if result.exit_code != 0:
        raise SandboxError(
            f"sandbox probe: a trivial program failed (exit {result.exit_code}): {result.stderr[-500:]}"
        )
    return result.isolation


# ---------------------------------------------------------------------------------------------
# One launcher per program


@dataclass
class _Streams:
    stdout: bytearray = dataclasses.field(default_factory=bytearray)
    stderr: bytearray = dataclasses.field(default_factory=bytearray)


@dataclass
class _Launch:
    proc: subprocess.Popen
    uid: int | None
    status_r: int
    stdin: memoryview
    streams: _Streams = dataclasses.field(default_factory=_Streams)
    open_streams: int = 2
    status: dict = dataclasses.field(default_factory=dict)


@dataclass
class _Ending:
    truncated: bool = False
    timed_out: bool = False
    cancelled: bool = False


def _run(programs: Sequence[Program], limits: SandboxLimits, cancel: threading.Event | None,
         *, linked: bool) -> list[SandboxResult]:
    uids = _pick_uids(len(programs)) if os.geteuid() == 0 else [None] * len(programs)
    dirs: list[str] = []
    launches: list[_Launch] = []
    links = _make_links() if linked else [[] for _ in programs]
    start = time.monotonic()
    try:
        for program, uid, link in zip(programs, uids, links):
            dirs.append(tempfile.mkdtemp(prefix="posttrain-sandbox-"))
            _prepare_dir(dirs[-1], program.code, uid)
            launches.append(_start_launcher(dirs[-1], program.stdin, uid, link, limits))
        _close_all(fd for link in links for fd in link)
        links = []
        ending = _pump(launches, limits, deadline=start + limits.wall_time_s, cancel=cancel, linked=linked)
    finally:
        _close_all(fd for link in links for fd in link)
        for launch in launches:
            _kill_everything(launch)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
    wall = time.monotonic() - start
    return [_build_result(launch, ending, wall) for launch in launches]


def _pick_uids(n: int) -> list[int]:
    # A fresh uid per program keeps RLIMIT_NPROC per program and stops programs from signalling each other.
    uids: list[int] = []
    while len(uids) < n:
        uid = random.randrange(*UNPRIVILEGED_UID_RANGE)
        if uid not in uids:
            uids.append(uid)
    return uids


def _make_links() -> list[list[int]]:
    """[first's (read, write), second's (read, write)]: what one writes, the other reads."""
    a_read, b_write = os.pipe()  # second -> first
    b_read, a_write = os.pipe()  # first -> second
    return [[a_read, a_write], [b_read, b_write]]


def _close_all(fds) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _prepare_dir(host_dir: str, code: str, uid: int | None) -> None:
    """host_dir/sandbox/main.py, and host_dir/root: the mount point of the private root."""
    os.chmod(host_dir, 0o755)
    workdir = os.path.join(host_dir, "sandbox")
    os.mkdir(workdir, 0o700)
    os.mkdir(os.path.join(host_dir, "root"), 0o755)
    main = os.path.join(workdir, "main.py")
    # surrogatepass: a lone surrogate is written as is, and Python then refuses the file (SyntaxError).
    with open(main, "wb") as f:
        f.write(code.encode("utf-8", errors="surrogatepass"))
    os.chmod(main, 0o644)
    if uid is not None:
        os.chown(workdir, uid, uid)


def _minimal_env() -> dict[str, str]:
    # Nothing is inherited: API keys and tokens in the trainer's environment must not leak.
    return {"PATH": MINIMAL_ENV_PATH, "LANG": "C.UTF-8"}


@cache
def _exposed_paths() -> tuple[tuple[str, str | None], ...]:
    """(path, symlink target or None for a read-only bind) for the private root, parents first."""
    exposed: list[tuple[str, str | None]] = []
    for path in SYSTEM_PATHS:
        if os.path.islink(path):
            exposed.append((path, os.readlink(path)))
        elif os.path.isdir(path):
            exposed.append((path, None))
    binds = [p for p, link in exposed if link is None]
    interpreter = os.path.dirname(os.path.realpath(sys.executable))
    for path in (os.path.realpath(sys.base_prefix), interpreter):
        if not any(path == b or path.startswith(b + "/") for b in binds):
            exposed.append((path, None))
            binds.append(path)
    return tuple(exposed)


def _start_launcher(host_dir: str, stdin: str, uid: int | None, link: list[int], limits: SandboxLimits) -> _Launch:
    status_r, status_w = os.pipe()
    config = {
        "limits": dataclasses.asdict(limits),
        "uid": uid,
        "host_dir": host_dir,
        "python": os.path.realpath(sys.executable),
        "python_prefix": os.path.realpath(sys.base_prefix),
        "exposed": _exposed_paths(),
        "status_fd": status_w,
        "link_fds": link,
        "parent_pid": os.getpid(),
        "env": _minimal_env(),
    }
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", LAUNCHER, json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=host_dir,
            env=_minimal_env(),
            start_new_session=True,
            pass_fds=(status_w, *link),
            close_fds=True,
        )
    except BaseException:
        os.close(status_r)
        raise
    finally:
        os.close(status_w)
    return _Launch(proc, uid, status_r, memoryview(stdin.encode("utf-8", errors="surrogatepass")))


def _pump(launches: list[_Launch], limits: SandboxLimits, *, deadline: float, cancel: threading.Event | None,
          linked: bool) -> _Ending:
    """Feed stdin, read stdout/stderr until they close, a limit trips, the deadline passes or `cancel` is set.
    Linked: the run also ends when the first program has closed its streams (it exited)."""
    ending = _Ending()
    sel = selectors.DefaultSelector()
    for launch in launches:
        proc = launch.proc
        assert proc.stdin and proc.stdout and proc.stderr
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            os.set_blocking(pipe.fileno(), False)
        sel.register(proc.stdout, selectors.EVENT_READ, (launch, launch.streams.stdout))
        sel.register(proc.stderr, selectors.EVENT_READ, (launch, launch.streams.stderr))
        if launch.stdin:
            sel.register(proc.stdin, selectors.EVENT_WRITE, (launch, None))
        else:
            proc.stdin.close()
    poll = POLL_S if cancel is not None else 0.5
    while any(launch.open_streams for launch in launches):
        if linked and not launches[0].open_streams:
            break
        if cancel is not None and cancel.is_set():
            ending.cancelled = True
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            ending.timed_out = True
            break
        for key, _ in sel.select(timeout=min(remaining, poll)):
            launch, buf = key.data
            if buf is None:
                _write_some(sel, launch)
                continue
            chunk = _read_some(key.fd)
            if chunk is None:
                continue
            if not chunk:
                sel.unregister(key.fileobj)
                launch.open_streams -= 1
                continue
            buf += chunk
            if len(buf) > limits.max_output_bytes:
                del buf[limits.max_output_bytes :]
                ending.truncated = True
        if ending.truncated:
            break
    sel.close()
    for launch in launches:
        proc = launch.proc
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                pipe.close()
    return ending


def _write_some(sel: selectors.BaseSelector, launch: _Launch) -> None:
    stdin = launch.proc.stdin
    assert stdin
    try:
        written = os.write(stdin.fileno(), launch.stdin[:65536])
    except (BrokenPipeError, BlockingIOError) as err:
        written = len(launch.stdin) if isinstance(err, BrokenPipeError) else 0
    launch.stdin = launch.stdin[written:]
    if not launch.stdin:
        sel.unregister(stdin)
        stdin.close()


def _read_some(fd: int) -> bytes | None:
    """Up to 64 KiB; b"" at end of stream; None on a spurious wake-up (no data yet)."""
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None


def _kill_everything(launch: _Launch) -> None:
    """SIGKILL the launcher's process group, reap it and read its status; without a PID namespace, as
    root, also every process of the program's uid."""
    proc = launch.proc
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    launch.status = _read_status(launch.status_r)
    if launch.uid is not None and "pidns" not in launch.status["isolation"]:
        # Catches processes that left the process group with setsid() when no PID namespace holds them.
        _kill_processes_of_uid(launch.uid)


def _kill_processes_of_uid(uid: int) -> None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", encoding="ascii", errors="replace") as f:
                owner = next((line.split()[1] for line in f if line.startswith("Uid:")), None)
            if owner == str(uid):
                os.kill(int(entry), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def _read_status(status_r: int) -> dict:
    """The launcher's and the child's status lines, merged."""
    with os.fdopen(status_r, "rb") as f:
        raw = f.read()
    merged: dict = {"isolation": []}
    for line in raw.splitlines():
        status = json.loads(line)
        merged["isolation"] += status.get("isolation", [])
        if "error" in status:
            merged["error"] = status["error"]
    return merged


def _build_result(launch: _Launch, ending: _Ending, wall: float) -> SandboxResult:
    status = launch.status
    if "error" in status:
        raise SandboxError(f"sandbox launcher: {status['error']}")
    returncode = launch.proc.returncode
    stderr = launch.streams.stderr.decode("utf-8", errors="replace")
    signal_number = -returncode if returncode < 0 else None
    return SandboxResult(
        exit_code=None if signal_number else returncode,
        stdout=launch.streams.stdout.decode("utf-8", errors="replace"),
        stderr=stderr,
        output_truncated=ending.truncated,
        timed_out=ending.timed_out,
        killed_by_signal=signal_number,
        memory_exceeded="MemoryError" in stderr[-2000:],
        wall_time_s=wall,
        isolation=tuple(status.get("isolation", ())),
        cancelled=ending.cancelled,
    )
