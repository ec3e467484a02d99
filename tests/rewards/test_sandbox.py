"""Hostile programs against run_python: each must end within its limits and leave nothing behind."""

from __future__ import annotations

import os
import socket
import time

import pytest

from posttrain.rewards.sandbox import SandboxLimits, probe_isolation, run_python

LIMITS = SandboxLimits(wall_time_s=3.0, cpu_time_s=2, memory_bytes=512 << 20, max_output_bytes=64 << 10)


def sandbox_processes() -> list[int]:
    """Live (non-zombie) processes still running a sandboxed main.py or a launcher."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if state != "Z" and (cmdline.endswith(b"main.py\0") or b"sandbox.py\0--launch" in cmdline):
            found.append(int(entry))
    return found


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
    code = (f"for path in [{str(target)!r}, '/etc/posttrain_escape', '/tmp/posttrain_escape']:\n"
            "    try:\n        open(path, 'w').write('x')\n        print('wrote', path)\n"
            "    except OSError as err:\n        print('refused', path, err.errno)\n"
            "open('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())")
    result = run_python(code, limits=LIMITS)
    assert result.exit_code == 0, result.stderr
    assert not target.exists()
    assert not os.path.exists("/etc/posttrain_escape")
    assert result.stdout.splitlines()[-1] == "ok"  # its own directory stays writable
    if "readonly-fs" in result.isolation:
        assert not os.path.exists("/tmp/posttrain_escape")
        assert "wrote" not in result.stdout


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


def test_working_directory_is_removed_afterwards():
    result = run_python("import os\nprint(os.getcwd())", limits=LIMITS)
    workdir = result.stdout.strip()
    assert workdir.startswith("/") and "posttrain-sandbox-" in workdir
    assert not os.path.exists(workdir)
