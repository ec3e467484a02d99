"""The launcher of one sandboxed run: `python -I -S sandbox_launcher.py <config json>`.

`posttrain.rewards.sandbox` starts this file in a new session, once per program. It confines itself
(network and PID namespaces, as a normal user inside a new user namespace), forks, and the child,
PID 1 of the new PID namespace, enters a mount namespace of its own whose root is a fresh,
size- and inode-capped tmpfs holding only read-only binds of the system and interpreter
directories, a minimal /dev, a procfs of the new PID namespace, a writable /tmp and the working
directory /sandbox. It then drops to the run's uid (when the parent is root), sets the resource
limits and execs `python -I -S -u main.py`. The launcher waits for it and exits the same way.

Status goes to the parent on `status_fd`, one JSON line per writer (the launcher, then the child
before it execs): {"isolation": [...]} or {"error": "..."}; the program never holds that fd.

Standard library only and few imports: this file starts once per sandboxed program.
"""

import json
import os
import resource
import signal
import sys

LAUNCHER_FAILED_EXIT = 125
"""Exit code of a launcher that could not set up the sandbox (not the program's fault)."""

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
SYS_KEYCTL = {"x86_64": 250, "aarch64": 219, "riscv64": 219, "ppc64le": 311, "s390x": 280}
KEYCTL_JOIN_SESSION_KEYRING = 1
# statvfs flag -> mount flag that a read-only remount must keep (the kernel refuses to drop locked ones)
KEPT_MOUNT_FLAGS = (
    (os.ST_NOSUID, MS_NOSUID),
    (os.ST_NODEV, MS_NODEV),
    (os.ST_NOEXEC, MS_NOEXEC),
    (os.ST_NOATIME, MS_NOATIME),
    (os.ST_NODIRATIME, MS_NODIRATIME),
    (os.ST_RELATIME, MS_RELATIME),
)
DEVICES = ("null", "zero", "full", "random", "urandom")
PROGRAM_FDS = (3, 4)
"""Where a linked program finds its channel to the other one: it reads fd 3 and writes fd 4."""

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


def launch(config: dict) -> None:
    status_fd = config["status_fd"]
    try:
        libc = _libc()
        # Dies with the thread that started it, so a killed trainer leaves no sandbox behind.
        _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != config["parent_pid"]:
            os._exit(LAUNCHER_FAILED_EXIT)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        isolation = _unshare_namespaces(libc, root=os.geteuid() == 0)
        # Without a PID namespace, orphans (a setsid() grandchild) re-parent here and are killed at the end.
        _check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")
        pid = os.fork()
    except Exception as err:
        _write_status(status_fd, {"error": f"{type(err).__name__}: {err}"})
        os._exit(LAUNCHER_FAILED_EXIT)
    if pid == 0:
        _start_program(config, isolation, libc)
    _write_status(status_fd, {"isolation": isolation})
    os.close(status_fd)
    _exit_like_child(pid, kill_orphans="pidns" not in isolation)


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        import ctypes

        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _write_status(fd: int, status: dict) -> None:
    os.write(fd, json.dumps(status).encode() + b"\n")


def _unshare_namespaces(libc, *, root: bool) -> list[str]:
    """New network and PID namespaces (and a user namespace as a normal user); [] when refused."""
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWNET | CLONE_NEWPID | (0 if root else CLONE_NEWUSER)) != 0:
        return ["audit-network-guard"]
    if not root:
        # Map the caller to uid 0 inside, so files it creates belong to the caller outside.
        _write_file("/proc/self/setgroups", "deny")
        _write_file("/proc/self/uid_map", f"0 {uid} 1")
        _write_file("/proc/self/gid_map", f"0 {gid} 1")
        return ["netns", "pidns", "userns"]
    return ["netns", "pidns"]


def _write_file(path: str, text: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(text)


def _start_program(config: dict, isolation: list[str], libc) -> None:
    """In the forked child (PID 1 of the new PID namespace when there is one): confine, drop, limit, exec."""
    status_fd = config["status_fd"]
    try:
        os.umask(0o022)
        status_fd = _move_above(status_fd, 10)
        link = [_move_above(fd, 10) for fd in config["link_fds"]]
        uid = config["uid"]
        if "pidns" in isolation:
            layers = _enter_private_root(libc, config)
            cwd = "/sandbox"
        else:
            layers, cwd = [], os.path.join(config["host_dir"], "sandbox")
            if uid is not None and _first_untraversable_ancestor(config["python_prefix"]) is not None:
                # The interpreter under /root is out of an unprivileged uid's reach without a mount
                # namespace: run as root with the other limits rather than not at all (docs/sandbox.md).
                uid = None
                layers.append("root-no-uid-drop")
        os.chdir(cwd)
        # The session keyring is inherited across uid changes: start a fresh, empty one.
        keyctl = SYS_KEYCTL.get(os.uname().machine)
        if keyctl is not None and libc.syscall(keyctl, KEYCTL_JOIN_SESSION_KEYRING, None) >= 0:
            layers.append("own-keyring")
        if uid is not None:
            _drop_to_uid(uid)
            layers.append("uid")
        _set_limits(config["limits"], own_uid_namespace="pidns" in isolation or uid is not None)
        _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
        for fd, target in zip(link, PROGRAM_FDS):
            os.dup2(fd, target)
            os.close(fd)
        argv = [config["python"], "-I", "-S", "-u"]
        argv += ["-c", NETWORK_GUARD, "main.py"] if "netns" not in isolation else ["main.py"]
        env = dict(config["env"], HOME=cwd)
        _write_status(status_fd, {"isolation": layers})
        os.close(status_fd)
        status_fd = 2
        os.execve(config["python"], argv, env)
    except BaseException as err:
        _write_status(status_fd, {"error": f"cannot start the program: {type(err).__name__}: {err}"})
        os._exit(LAUNCHER_FAILED_EXIT)


def _move_above(fd: int, low: int) -> int:
    # The parent's fd numbers are arbitrary: move them clear of 0-4 before dup2 onto 3 and 4.
    import fcntl

    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, low)
    os.close(fd)
    return moved


def _enter_private_root(libc, config: dict) -> list[str]:
    """A mount namespace whose root is a capped tmpfs holding only what Python needs; pivot into it."""
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE, what="make mounts private")
    root, limits = os.path.join(config["host_dir"], "root"), config["limits"]
    size = f"size={limits['max_disk_bytes']},mode=0755"
    _mount(libc, "tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, size, what="mount the private root")
    for path, link in config["exposed"]:
        if link is not None:
            os.symlink(link, root + path)
        else:
            _bind_readonly(libc, path, root + path)
    _make_dev(libc, root)
    layers = ["mountns", "private-root", "disk-limit"]
    os.mkdir(root + "/proc", 0o555)
    if libc.mount(b"proc", (root + "/proc").encode(), b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, None) == 0:
        layers.append("private-proc")  # else /proc stays an empty directory: no procfs at all
    for name, mode in (("tmp", 0o1777), ("sandbox", 0o700)):
        os.mkdir(os.path.join(root, name))
        os.chmod(os.path.join(root, name), mode)
    main = root + "/sandbox/main.py"
    open(main, "w").close()
    _bind_readonly(libc, os.path.join(config["host_dir"], "sandbox", "main.py"), main)
    if config["uid"] is not None:
        os.chown(root + "/sandbox", config["uid"], config["uid"])
    # Now that the skeleton's own inodes (directories, mount points) exist, cap what the program may add.
    stats = os.statvfs(root)
    inodes = f"{size},nr_inodes={stats.f_files - stats.f_ffree + limits['max_disk_files']}"
    _mount(libc, None, root, None, MS_REMOUNT | MS_NOSUID | MS_NODEV, inodes, what="cap the private root's inodes")
    _pivot_root(libc, root)
    return layers


def _mount(libc, source, target, fstype, flags, data=None, *, what: str) -> None:
    encode = lambda s: None if s is None else s.encode()
    _check(libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)), what)


def _bind_readonly(libc, source: str, target: str) -> None:
    if os.path.isdir(source):
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        open(target, "a").close()
    _mount(libc, source, target, None, MS_BIND | MS_REC, what=f"bind {source}")
    kept = sum(ms for st, ms in KEPT_MOUNT_FLAGS if os.statvfs(target).f_flag & st)
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | kept
    _mount(libc, source, target, None, flags, what=f"make {source} read-only")


def _make_dev(libc, root: str) -> None:
    dev = root + "/dev"
    os.mkdir(dev, 0o755)
    for name in DEVICES:
        open(f"{dev}/{name}", "w").close()
        _mount(libc, f"/dev/{name}", f"{dev}/{name}", None, MS_BIND, what=f"bind /dev/{name}")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(dev + "/shm")
    os.chmod(dev + "/shm", 0o1777)


def _pivot_root(libc, root: str) -> None:
    """Make `root` the root and detach the host's tree (runc's pivot_root(".", ".") idiom)."""
    old = os.open("/", os.O_DIRECTORY | os.O_RDONLY)
    os.chdir(root)
    _check(libc.syscall(SYS_PIVOT_ROOT[os.uname().machine], b".", b"."), "pivot_root")
    os.fchdir(old)
    os.close(old)
    _check(libc.umount2(b".", MNT_DETACH), "detach the host's root")
    os.chdir("/")


def _first_untraversable_ancestor(path: str) -> str | None:
    parts = path.strip("/").split("/")
    for depth in range(1, len(parts) + 1):
        ancestor = "/" + "/".join(parts[:depth])
        if not os.stat(ancestor).st_mode & 0o001:
            return ancestor
    return None


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


def _kill_orphans() -> None:
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


def _exit_like_child(pid: int, *, kill_orphans: bool) -> None:
    """Wait for the program and end this launcher the same way, so the parent sees its status.
    In a PID namespace the kernel kills the rest when the program (its init) ends."""
    _, status = os.waitpid(pid, 0)
    if kill_orphans:
        _kill_orphans()
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig != signal.SIGKILL:
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    launch(json.loads(sys.argv[1]))
