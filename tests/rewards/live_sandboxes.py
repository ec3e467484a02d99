"""The sandboxes a test started that are still alive (the code reward's tests check that none outlives its call)."""

import os


def sandbox_processes() -> list[int]:
    """Live launchers and sandboxed programs descended from this test process; other sessions' don't count."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, parent = f.read().rsplit(")", 1)[1].split()[:2]
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        table[int(entry)] = (state, int(parent), cmdline)

    def ours(pid: int) -> bool:
        for _ in range(64):
            pid = table.get(pid, ("", 0, b""))[1]
            if pid == os.getpid():
                return True
            if pid <= 1:
                return False
        return False

    sandboxed = (b"main.py\0", b"sandbox_launcher.py\0")
    return [pid for pid, (state, _, cmdline) in table.items()
            if state != "Z" and any(s in cmdline for s in sandboxed) and ours(pid)]
