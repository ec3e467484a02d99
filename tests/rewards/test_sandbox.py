"""Hostile programs against run_python: each must end within its limits and leave nothing behind."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest
from tests.rewards.live_sandboxes import sandbox_processes

import posttrain.rewards.sandbox
from posttrain.rewards.sandbox import Program, SandboxLimits, probe_isolation, run_linked, run_python

LIMITS = SandboxLimits(wall_time_s=3.0, cpu_time_s=2, memory_bytes=512 << 20, max_output_bytes=64 << 10)


def assert_no_processes_left(before: list[int]) -> None:
    """SIGKILLed processes take a moment to die under load; other sessions' sandboxes are ignored."""
    deadline = time.monotonic() + 3
    left = [pid for pid in sandbox_processes() if pid not in before]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [pid for pid in sandbox_processes() if pid not in before]
    assert left == []


def test_reports_isolation_layers():
    layers = probe_isolation()
    # Either the kernel namespaces or, where they are refused, the in-process network guard.
    assert "netns" in layers or "audit-network-guard" in layers
    if os.geteuid() == 0:
        assert "uid" in layers


def test_correct_program_reads_stdin_and_exits_zero():
    result = run_python("import sys\nprint(sum(map(int, sys.stdin.read().split())))", stdin="2 3 4",
                        limits=LIMITS)
    assert result.ok
    assert result.stdout == "9\n"


def test_infinite_loop_is_killed_at_the_wall_time():
    before, started = sandbox_processes(), time.monotonic()
    result = run_python("while True: pass", limits=LIMITS)
    assert result.timed_out or result.killed_by_signal is not None
    assert result.exit_code is None
    assert time.monotonic() - started < LIMITS.wall_time_s + 2
    assert_no_processes_left(before)


def test_fork_bomb_is_contained_and_cleaned_up():
    before, started = sandbox_processes(), time.monotonic()
    result = run_python("import os\nwhile True:\n    os.fork()", limits=LIMITS)
    assert not result.ok
    assert time.monotonic() - started < LIMITS.wall_time_s + 2
    # the process limit stopped it (fork failed with EAGAIN) or the deadline killed the group
    assert "BlockingIOError" in result.stderr or result.timed_out
    assert_no_processes_left(before)


def test_process_that_leaves_the_group_is_still_killed():
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')"
    before = sandbox_processes()
    result = run_python(code, limits=LIMITS)
    assert result.stdout == "parent done\n"
    assert_no_processes_left(before)


@pytest.mark.parametrize("code", ["x = bytearray(10**10)", "x = []\nwhile True:\n    x.append(' ' * 10**6)"])
def test_memory_bombs_hit_the_address_space_limit(code):
    result = run_python(code, limits=LIMITS)
    assert result.exit_code != 0
    assert result.memory_exceeded or result.killed_by_signal is not None


def test_huge_output_is_cut_and_the_run_killed():
    result = run_python("print('a' * 10**8)", limits=LIMITS)
    assert result.output_truncated
    assert len(result.stdout.encode()) == LIMITS.max_output_bytes
    assert not result.ok


def test_writes_outside_the_working_directory_do_not_land(tmp_path):
    os.chmod(tmp_path, 0o777)  # writable by anyone, so only the sandbox stands in the way
    target = tmp_path / "escaped.txt"
    marker = f"/tmp/posttrain_escape_{uuid.uuid4().hex}"
    code = (f"for path in [{str(target)!r}, '/etc/posttrain_escape', {marker!r}]:\n"
            "    try:\n        open(path, 'w').write('x')\n        print('wrote', path)\n"
            "    except OSError as err:\n        print('refused', path, err.errno)\n"
            "open('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())")
    result = run_python(code, limits=LIMITS)
    assert result.exit_code == 0, result.stderr
    assert not target.exists()
    assert not os.path.exists("/etc/posttrain_escape")
    assert not os.path.exists(marker)  # the sandbox's /tmp is its own
    assert result.stdout.splitlines()[-1] == "ok"  # its own directory stays writable
    if "private-root" in result.isolation:
        assert f"refused {target}" in result.stdout  # the test's directory does not exist in there


def test_environment_secrets_are_not_inherited(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_TEST_SECRET", "hunter2")
    result = run_python("import os\nprint(sorted(os.environ))\nprint(os.environ.get('POSTTRAIN_TEST_SECRET'))",
                        limits=LIMITS)
    assert result.ok
    assert "hunter2" not in result.stdout
    assert result.stdout.splitlines()[1] == "None"


def test_no_connection_reaches_a_local_listener():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    code = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "    print('connected')\nexcept OSError as err:\n    print('refused', err)")
    try:
        result = run_python(code, limits=LIMITS)
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()
    assert "connected" not in result.stdout


def test_killing_the_parent_leaves_the_caller_alive():
    result = run_python("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('still here')",
                        limits=LIMITS)
    # this test process is still running and got a status back; the sandbox still works afterwards
    assert not result.timed_out
    assert run_python("print(2 + 2)", limits=LIMITS).stdout == "4\n"


def test_working_directory_is_private_and_nothing_is_left_on_the_host(monkeypatch):
    made = []

    def mkdtemp(**kwargs):
        made.append(real_mkdtemp(**kwargs))
        return made[-1]

    real_mkdtemp = posttrain.rewards.sandbox.tempfile.mkdtemp
    monkeypatch.setattr(posttrain.rewards.sandbox.tempfile, "mkdtemp", mkdtemp)
    result = run_python("import os\nopen('f', 'w').write('x')\nprint(os.getcwd(), os.listdir('.'))", limits=LIMITS)
    assert result.ok, result.stderr
    if "private-root" in result.isolation:
        assert result.stdout.split()[0] == "/sandbox"
    assert made and not any(os.path.exists(d) for d in made)


# ---------------------------------------------------------------------------------------------
# Confinement (issue #21 item 3)


def test_host_processes_are_not_visible():
    # a process whose command line holds a token, as a trainer started with --token on its command line would
    token = f"posttrain-token-{uuid.uuid4().hex}"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", token])
    code = ("import os\nseen = []\nfor pid in os.listdir('/proc'):\n    try:\n"
            "        seen.append(open(f'/proc/{pid}/cmdline', 'rb').read())\n    except OSError:\n        pass\n"
            "print(os.getpid(), b'\\n'.join(seen))")
    try:
        result = run_python(code, limits=LIMITS)
    finally:
        other.kill()
        other.wait()
    assert result.ok, result.stderr
    assert token not in result.stdout
    if "pidns" in result.isolation:
        assert result.stdout.split()[0] == "1"  # the init of its own PID namespace


def test_host_unix_sockets_are_unreachable():
    # in a directory anyone may traverse, as /run or /tmp: before, the read-only view still let connect() through
    directory = tempfile.mkdtemp(prefix="posttrain-test-")
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "host.sock")
    abstract = f"\0posttrain-test-{uuid.uuid4().hex}"
    listeners = []
    for address in (path, abstract):
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(address)
        listener.listen(1)
        listener.settimeout(0.5)
        listeners.append(listener)
    os.chmod(path, 0o777)
    code = (f"import socket\nfor address in [{path!r}, {abstract!r}]:\n    s = socket.socket(socket.AF_UNIX)\n"
            "    try:\n        s.connect(address)\n        print('connected', repr(address))\n"
            "    except OSError as err:\n        print('refused', repr(address), err.errno)")
    try:
        result = run_python(code, limits=LIMITS)
        for listener in listeners:
            with pytest.raises(TimeoutError):
                listener.accept()
    finally:
        for listener in listeners:
            listener.close()
        shutil.rmtree(directory)
    assert result.ok, result.stderr
    assert "connected" not in result.stdout


def test_disk_writes_are_capped_in_total_and_in_files():
    # before, 40 files of 16 MiB (the per-file limit) took 640 MiB in 0.3 s
    limits = SandboxLimits(wall_time_s=10.0, cpu_time_s=5, max_file_bytes=4 << 20, max_disk_bytes=8 << 20,
                           max_disk_files=50)
    code = ("import os\ntotal = files = 0\nfor i in range(40):\n    try:\n"
            "        with open(f'big{i}', 'wb') as f:\n            files += 1\n"
            "            for _ in range(4):\n                total += f.write(b'x' * (1 << 20))\n"
            "    except OSError:\n        pass\nprint(total)\n"
            "for i in range(40):\n    os.remove(f'big{i}') if os.path.exists(f'big{i}') else None\n"
            "made = 0\ntry:\n    while made < 10000:\n"
            "        open(f'/tmp/empty{made}', 'w').close()\n        made += 1\n"
            "except OSError as err:\n    print(made, err.errno)")
    result = run_python(code, limits=limits)
    assert result.ok, result.stderr
    written, made = int(result.stdout.split()[0]), int(result.stdout.split()[1])
    assert written <= limits.max_disk_bytes
    assert made <= limits.max_disk_files


def test_a_lone_surrogate_in_the_code_or_stdin_does_not_raise():
    # UnicodeEncodeError before; now the bytes go through as they are, and the program meets them
    assert run_python("print('\ud800')", limits=LIMITS).exit_code == 1  # not UTF-8: Python refuses the file
    result = run_python("print(len(input()))", stdin="\udc80 and \ud800", limits=LIMITS)
    assert result.ok and result.stdout == "11\n"  # each surrogate arrives as 3 undecodable bytes: 3 + 5 + 3

def test_only_system_and_interpreter_directories_are_visible(tmp_path):
    paths = [str(tmp_path), os.getcwd(), os.path.expanduser("~"), "/var", "/run", "/home", "/mnt", "/opt"]
    code = f"import os\nprint([p for p in {paths!r} if os.path.exists(p)])\nprint(sorted(os.listdir('/')))"
    result = run_python(code, limits=LIMITS)
    assert result.ok, result.stderr
    if "mountns" not in result.isolation:
        pytest.skip("no mount namespace here: the filesystem is only read-only")
    visible = [p for p in eval(result.stdout.splitlines()[0]) if not sys.base_prefix.startswith(p)]
    assert visible == []
    assert set(eval(result.stdout.splitlines()[1])) <= {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32",
                                                       "proc", "sandbox", "sbin", "tmp", "usr", "root"}


def test_a_cancel_event_kills_the_run():
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    before = sandbox_processes()
    result = run_python("while True: pass", limits=SandboxLimits(wall_time_s=60.0, cpu_time_s=60), cancel=cancel)
    assert result.cancelled and not result.ok
    assert not result.timed_out
    assert_no_processes_left(before)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_nothing_outlives_a_killed_caller():
    # a trainer that dies (SIGKILL) mid-run takes its sandboxes with it; before, they ran to their own limits
    before = sandbox_processes()
    caller = subprocess.Popen([sys.executable, "-c",
                               "from posttrain.rewards.sandbox import run_python, SandboxLimits\n"
                               "run_python('while True: pass', limits=SandboxLimits(wall_time_s=60, cpu_time_s=60))"])
    deadline = time.monotonic() + 30
    started: list[int] = []
    while len(started) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # the launcher and the looping program are up
        started = [p for p in sandbox_processes() if p not in before]
    assert len(started) == 2
    caller.send_signal(signal.SIGKILL)
    caller.wait()
    deadline = time.monotonic() + 5
    while any(alive(p) for p in started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in started)


def test_linked_programs_talk_only_through_their_channel():
    first = Program("import os\nos.write(4, b'ping')\nprint(os.read(3, 4).decode(), os.getuid())")
    second = Program("import os\nprint(os.read(3, 4).decode(), os.getuid(), os.listdir('/proc'))\n"
                     "os.write(4, b'pong')\nwhile True: pass")
    before, started = sandbox_processes(), time.monotonic()
    a, b = run_linked(first, second, limits=SandboxLimits(wall_time_s=60.0, cpu_time_s=60))
    assert a.ok and a.stdout.split()[0] == "pong"
    assert b.stdout.split()[0] == "ping"
    assert b.killed_by_signal == signal.SIGKILL  # the first one's exit ends the run
    assert time.monotonic() - started < 30  # not the 60 s of the second one's loop
    if "uid" in a.isolation:
        assert a.stdout.split()[1] != b.stdout.split()[1]
    assert_no_processes_left(before)


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall numbers of x86_64")
def test_the_callers_session_keyring_is_out_of_reach():
    # the session keyring survives the uid change: before, the program read this key back
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    keyctl, add_key, join_session, read, session = 250, 248, 1, 11, -3
    if libc.syscall(keyctl, join_session, None) < 0:  # a fresh keyring for this test process: nothing left behind
        pytest.skip("no keyrings here")
    secret = f"posttrain-key-{uuid.uuid4().hex}".encode()
    assert libc.syscall(add_key, b"user", b"posttrain-test", secret, len(secret), session) > 0
    # the program lists its session keyring (KEYCTL_READ of -3) and reads every key in it
    code = (f"import ctypes\nlibc = ctypes.CDLL(None)\nbuf = ctypes.create_string_buffer(4096)\n"
            f"n = libc.syscall({keyctl}, {read}, {session}, buf, 4096)\n"
            "for i in range(0, max(n, 0), 4):\n    key = int.from_bytes(buf.raw[i:i + 4], 'little')\n"
            f"    m = libc.syscall({keyctl}, {read}, key, buf, 4096)\n    print(buf.raw[:max(m, 0)])")
    result = run_python(code, limits=LIMITS)
    assert result.ok, result.stderr
    assert secret.decode() not in result.stdout
