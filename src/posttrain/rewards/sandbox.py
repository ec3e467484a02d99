"""Run untrusted, model-written Python in a separate, confined process.

    run_python(code, stdin=..., limits=SandboxLimits(...)) -> SandboxResult

The parent writes `code` to `main.py` in a fresh temporary directory and starts this very file as a
launcher (`python -I -S sandbox.py --launch <config>`, standard library only). The launcher sets up
the confinement, forks, and the child execs `python -I -S -u main.py`. The layers, strongest first
(see docs/sandbox.md for what each one does and does not stop):

- kernel namespaces (unshare): a new network namespace (no interfaces but a down loopback), a new
  PID namespace whose init is the program (when it exits or is killed, every process it started dies
  with it), and a new mount namespace in which every mount is read-only except the temporary
  directory. As a normal user these sit inside a new user namespace.
- an unprivileged, per-run uid when the parent is root (root ignores RLIMIT_NPROC and may write
  anywhere), so the process limit holds and other runs' processes cannot be signalled.
- resource limits: CPU seconds, address space, file size, open files, processes, no core files.
- the parent: a scrubbed environment, a wall-time deadline after which the whole process group is
  SIGKILLed, and at most `max_output_bytes` read from each of stdout and stderr.

When the kernel refuses namespaces the launcher falls back to an in-process audit hook that
refuses sockets; `SandboxResult.isolation` and `probe_isolation()` say which layers were in force.

This module imports only the standard library at the top so that it can run as the launcher.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache

LAUNCHER_FAILED_EXIT = 125
"""Exit code of a launcher that could not set up the sandbox (not the program's fault)."""

MINIMAL_ENV_PATH = "/usr/local/bin:/usr/bin:/bin"
UNPRIVILEGED_UID_RANGE = (1_500_000_000, 2_000_000_000)
"""Per-run uids are drawn from here when the parent is root: far above any real account's uid."""


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up; the program never ran."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits on one run. Every default is sized for short verifier programs on a laptop CPU."""

    wall_time_s: float = 10.0
    """Seconds from start until the whole process group is SIGKILLed."""
    cpu_time_s: int = 10
    """RLIMIT_CPU per process, in CPU seconds (SIGXCPU, then SIGKILL one second later)."""
    memory_bytes: int = 1 << 30
    """RLIMIT_AS per process: address space, so Python raises MemoryError on a large allocation."""
    max_output_bytes: int = 1 << 20
    """Bytes kept from each of stdout and stderr; one more byte kills the run."""
    max_file_bytes: int = 16 << 20
    """RLIMIT_FSIZE: the largest file the program may write (in its temporary directory)."""
    max_processes: int = 16
    """RLIMIT_NPROC for the run's own uid (or user namespace): bounds fork bombs."""
    max_open_files: int = 64
    """RLIMIT_NOFILE."""


@dataclass(frozen=True)
class SandboxResult:
    """What one run did. `stdout`/`stderr` are decoded as UTF-8 with replacement characters."""

    exit_code: int | None
    """The program's exit status; None when a signal ended it."""
    stdout: str
    stderr: str
    output_truncated: bool
    """A stream passed `max_output_bytes`; the run was killed and the stream cut there."""
    timed_out: bool
    """The wall-time deadline passed and the run was killed."""
    killed_by_signal: int | None
    """The signal that ended the program (SIGKILL after a timeout, SIGXCPU or SIGKILL at the CPU limit)."""
    memory_exceeded: bool
    """Heuristic: the program died with a MemoryError (the address-space limit); the program can fake it."""
    wall_time_s: float
    isolation: tuple[str, ...]
    """The confinement layers that were in force, e.g. ("netns", "pidns", "readonly-fs", "uid")."""

    @property
    def ok(self) -> bool:
        """Exited with status 0, within every limit."""
        return self.exit_code == 0 and not (self.timed_out or self.output_truncated)


def run_python(code: str, *, stdin: str = "", limits: SandboxLimits) -> SandboxResult:
    """Run `code` as `python -I -S -u main.py` inside the sandbox and return what happened.

    Never raises for anything the program does; raises SandboxError when the sandbox cannot start.
    """
    workdir = tempfile.mkdtemp(prefix="posttrain-sandbox-")
    try:
        uid = _pick_unprivileged_uid() if os.geteuid() == 0 else None
        _prepare_workdir(workdir, code, uid)
        return _run_launcher(workdir, stdin.encode(), limits, uid)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


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
# Parent side


def _pick_unprivileged_uid() -> int:
    # A fresh uid per run keeps RLIMIT_NPROC per run and stops runs from signalling each other.
    return random.randrange(*UNPRIVILEGED_UID_RANGE)


def _prepare_workdir(workdir: str, code: str, uid: int | None) -> None:
    os.chmod(workdir, 0o700)
    main = os.path.join(workdir, "main.py")
    with open(main, "w", encoding="utf-8") as f:
        f.write(code)
    os.chmod(main, 0o644)
    if uid is not None:
        os.chown(workdir, uid, uid)


def _minimal_env(workdir: str) -> dict[str, str]:
    # Nothing is inherited: API keys and tokens in the trainer's environment must not leak.
    return {"PATH": MINIMAL_ENV_PATH, "LANG": "C.UTF-8", "HOME": workdir}


def _run_launcher(workdir: str, stdin: bytes, limits: SandboxLimits, uid: int | None) -> SandboxResult:
    status_r, status_w = os.pipe()
    config = {
        "limits": dataclasses.asdict(limits),
        "uid": uid,
        "workdir": workdir,
        "python": os.path.realpath(sys.executable),
        "python_prefix": os.path.realpath(sys.base_prefix),
        "status_fd": status_w,
        "env": _minimal_env(workdir),
    }
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), "--launch", json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=_minimal_env(workdir),
            start_new_session=True,
            pass_fds=(status_w,),
            close_fds=True,
        )
    finally:
        os.close(status_w)
    try:
        streams = _pump(proc, stdin, limits, deadline=start + limits.wall_time_s)
    finally:
        _kill_everything(proc, uid)
    wall = time.monotonic() - start
    status = _read_status(status_r)
    return _build_result(proc.returncode, streams, status, wall)


@dataclass
class _Streams:
    stdout: bytearray = dataclasses.field(default_factory=bytearray)
    stderr: bytearray = dataclasses.field(default_factory=bytearray)
    truncated: bool = False
    timed_out: bool = False


def _pump(proc: subprocess.Popen, stdin: bytes, limits: SandboxLimits, deadline: float) -> _Streams:
    """Feed stdin and read stdout/stderr until both close, a limit trips, or the deadline passes."""
    streams = _Streams()
    sel = selectors.DefaultSelector()
    assert proc.stdin and proc.stdout and proc.stderr
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        os.set_blocking(pipe.fileno(), False)
    sel.register(proc.stdout, selectors.EVENT_READ, streams.stdout)
    sel.register(proc.stderr, selectors.EVENT_READ, streams.stderr)
    pending = memoryview(stdin)
    if pending:
        sel.register(proc.stdin, selectors.EVENT_WRITE, None)
    else:
        proc.stdin.close()
    while sel.get_map():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            streams.timed_out = True
            break
        for key, _ in sel.select(timeout=min(remaining, 0.5)):
            if key.fileobj is proc.stdin:
                pending = _write_some(sel, proc, pending)
                continue
            chunk = _read_some(key.fd)
            if chunk is None:
                continue
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            buf: bytearray = key.data
            buf += chunk
            if len(buf) > limits.max_output_bytes:
                del buf[limits.max_output_bytes :]
                streams.truncated = True
        if streams.truncated:
            break
    sel.close()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        pipe.close()
    return streams


def _write_some(sel: selectors.BaseSelector, proc: subprocess.Popen, pending: memoryview) -> memoryview:
    assert proc.stdin
    try:
        written = os.write(proc.stdin.fileno(), pending[:65536])
    except (BrokenPipeError, BlockingIOError) as err:
        written = len(pending) if isinstance(err, BrokenPipeError) else 0
    pending = pending[written:]
    if not pending:
        sel.unregister(proc.stdin)
        proc.stdin.close()
    return pending


def _read_some(fd: int) -> bytes | None:
    """Up to 64 KiB; b"" at end of stream; None on a spurious wake-up (no data yet)."""
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None


def _kill_everything(proc: subprocess.Popen, uid: int | None) -> None:
    """SIGKILL the launcher's process group and, as root, every process of the run's uid."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if uid is not None:
        # Catches processes that left the process group with setsid() when no PID namespace holds them.
        _kill_processes_of_uid(uid)
    proc.wait()


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
    with os.fdopen(status_r, "rb") as f:
        raw = f.read()
    return json.loads(raw) if raw else {}


def _build_result(returncode: int, streams: _Streams, status: dict, wall: float) -> SandboxResult:
    if "error" in status:
        raise SandboxError(f"sandbox launcher: {status['error']}")
    stderr = streams.stderr.decode("utf-8", errors="replace")
    signal_number = -returncode if returncode < 0 else None
    return SandboxResult(
        exit_code=None if signal_number else returncode,
        stdout=streams.stdout.decode("utf-8", errors="replace"),
        stderr=stderr,
        output_truncated=streams.truncated,
        timed_out=streams.timed_out,
        killed_by_signal=signal_number,
        memory_exceeded="MemoryError" in stderr[-2000:],
        wall_time_s=wall,
        isolation=tuple(status.get("isolation", ())),
    )


# ---------------------------------------------------------------------------------------------
# Launcher side: runs as `python -I -S sandbox.py --launch <config>` in the new session.

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = (
    1024,
    2048,
    4096,
    16384,
    1 << 18,
    1 << 21,
)
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
# statvfs flag -> mount flag that a read-only remount must keep (the kernel refuses to drop locked ones)
KEPT_MOUNT_FLAGS = (
    (os.ST_NOSUID, MS_NOSUID),
    (os.ST_NODEV, MS_NODEV),
    (os.ST_NOEXEC, MS_NOEXEC),
    (os.ST_NOATIME, MS_NOATIME),
    (os.ST_NODIRATIME, MS_NODIRATIME),
    (os.ST_RELATIME, MS_RELATIME),
)

NETWORK_GUARD = """
import runpy, sys
def _refuse_network(event, args):
    if event.startswith(("socket.", "ctypes.")):
        raise PermissionError(f"sandbox: {event} is disabled (no network)")
sys.addaudithook(_refuse_network)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
"""Fallback when no network namespace can be made: an audit hook (which Python code cannot remove)
refuses every socket operation and ctypes, through which a program could call libc directly."""


def _launch(config: dict) -> None:
    status_fd = config["status_fd"]
    try:
        isolation = _confine(config)
        libc = _libc()  # loaded now: after the uid drop the standard library may be out of reach
        # Orphans (a setsid() grandchild) re-parent to the launcher, which kills them at the end;
        # this matters when no PID namespace does it.
        _check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1), "prctl(PR_SET_CHILD_SUBREAPER)")
        pid = os.fork()
    except Exception as err:
        _write_status(status_fd, {"error": f"{type(err).__name__}: {err}"})
        os._exit(LAUNCHER_FAILED_EXIT)
    if pid == 0:
        os.close(status_fd)
        _exec_program(config, isolation, libc)
    _write_status(status_fd, {"isolation": isolation})
    os.close(status_fd)
    _exit_like_child(pid)


def _write_status(fd: int, status: dict) -> None:
    os.write(fd, json.dumps(status).encode())


def _confine(config: dict) -> list[str]:
    """Enter namespaces and make the filesystem read-only; return the layers that took effect."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    isolation: list[str] = []
    root = os.geteuid() == 0
    if _unshare_namespaces(root):
        isolation += ["netns", "pidns", "mountns"]
        _make_filesystem_readonly(config)
        isolation.append("readonly-fs")
    else:
        isolation.append("audit-network-guard")
    if config["uid"] is not None and not _can_drop_uid(isolation, config["python_prefix"]):
        # Without a mount namespace an unprivileged uid cannot reach an interpreter under /root: run
        # as root with the other limits rather than not at all (docs/sandbox.md, "Fallbacks").
        config["uid"] = None
        isolation.append("root-no-uid-drop")
    if config["uid"] is not None:
        isolation.append("uid")
    return isolation


def _can_drop_uid(isolation: list[str], prefix: str) -> bool:
    return "mountns" in isolation or _first_untraversable_ancestor(prefix) is None


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        import ctypes

        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def _unshare_namespaces(root: bool) -> bool:
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS | (0 if root else CLONE_NEWUSER)
    if _libc().unshare(flags) != 0:
        return False
    if not root:
        # Map the caller to uid 0 inside, so files it creates belong to the caller outside.
        _write_file("/proc/self/setgroups", "deny")
        _write_file("/proc/self/uid_map", f"0 {uid} 1")
        _write_file("/proc/self/gid_map", f"0 {gid} 1")
    return True


def _write_file(path: str, text: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(text)


def _make_filesystem_readonly(config: dict) -> None:
    libc, workdir = _libc(), config["workdir"]
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
    for mount_point in _mount_points():
        _remount_readonly(libc, mount_point)  # best effort: some mounts are locked by the kernel
    if config["uid"] is not None:
        _expose_interpreter(libc, config["python_prefix"])
    path = workdir.encode()
    _check(libc.mount(path, path, None, MS_BIND, None), f"bind {workdir}")
    _check(
        libc.mount(path, path, None, MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV, None),
        f"make {workdir} writable",
    )
    os.chdir(workdir)  # the old cwd still points at the read-only mount underneath


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        fields = [line.split() for line in f]
    # Field 5 is the mount point with spaces etc. escaped as \ooo.
    return [f[4].encode().decode("unicode_escape") for f in fields if len(f) > 4]


def _remount_readonly(libc, mount_point: str) -> bool:
    try:
        current = os.statvfs(mount_point).f_flag
    except OSError:
        return False
    kept = sum(ms for st, ms in KEPT_MOUNT_FLAGS if current & st)
    path = mount_point.encode()
    return libc.mount(path, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | kept, None) == 0


def _expose_interpreter(libc, prefix: str) -> None:
    """Let an unprivileged uid reach an interpreter installed under a private directory.

    On this project's machines Python lives under /root (mode 0700). The first ancestor that others
    cannot traverse is covered with an empty read-only tmpfs holding only the interpreter's prefix,
    bind-mounted back; the rest of that directory (a home with credentials) disappears from view.
    """
    blocked = _first_untraversable_ancestor(prefix)
    if blocked is None:
        return
    keep = os.open(prefix, os.O_PATH)
    _check(
        libc.mount(b"tmpfs", blocked.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755"),
        f"cover {blocked}",
    )
    os.makedirs(prefix, mode=0o755, exist_ok=True)
    target = prefix.encode()
    _check(
        libc.mount(f"/proc/self/fd/{keep}".encode(), target, None, MS_BIND | MS_REC, None), f"bind {prefix}"
    )
    os.close(keep)
    _remount_readonly(libc, prefix)
    _remount_readonly(libc, blocked)


def _first_untraversable_ancestor(path: str) -> str | None:
    parts = path.strip("/").split("/")
    for depth in range(1, len(parts) + 1):
        ancestor = "/" + "/".join(parts[:depth])
        if not os.stat(ancestor).st_mode & 0o001:
            return ancestor
    return None


def _exec_program(config: dict, isolation: list[str], libc) -> None:
    """In the forked child (PID 1 of the new PID namespace when there is one): drop, limit, exec."""
    try:
        if config["uid"] is not None:
            _drop_to_uid(config["uid"])
        _set_limits(config["limits"], own_uid_namespace="pidns" in isolation or config["uid"] is not None)
        _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL), "prctl(PR_SET_PDEATHSIG)")
        argv = [config["python"], "-I", "-S", "-u"]
        argv += ["-c", NETWORK_GUARD, "main.py"] if "netns" not in isolation else ["main.py"]
        os.execve(config["python"], argv, config["env"])
    except BaseException as err:
        os.write(2, f"sandbox launcher: cannot start the program: {err}\n".encode())
        os._exit(LAUNCHER_FAILED_EXIT)


def _drop_to_uid(uid: int) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def _set_limits(limits: dict, *, own_uid_namespace: bool) -> None:
    cpu = limits["cpu_time_s"]
    nproc = limits["max_processes"]
    if not own_uid_namespace:
        # RLIMIT_NPROC counts every process of the user, so leave room for the ones already running.
        nproc += _count_processes_of_uid(os.getuid())
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["max_file_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["max_open_files"],) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


def _count_processes_of_uid(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                count += os.stat(f"/proc/{entry}").st_uid == uid
            except OSError:
                continue
    return count


def _kill_descendants() -> None:
    """SIGKILL and reap every process left under this (subreaper) launcher."""
    me = str(os.getpid())
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/status", encoding="ascii", errors="replace") as f:
                parent = next((line.split()[1] for line in f if line.startswith("PPid:")), None)
            if parent == me:
                os.kill(int(entry), signal.SIGKILL)
                os.waitpid(int(entry), 0)
        except (OSError, ValueError, ChildProcessError):
            continue


def _exit_like_child(pid: int) -> None:
    """Wait for the program and end this launcher the same way, so the parent sees its status."""
    _, status = os.waitpid(pid, 0)
    _kill_descendants()
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL) if sig != signal.SIGKILL else None
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.WEXITSTATUS(status))


if __name__ == "__main__" and sys.argv[1:2] == ["--launch"]:
    _launch(json.loads(sys.argv[2]))
