"""Child processes, read from /proc: what a test checks was left behind."""

import os
from pathlib import Path


def engine_children() -> list[int]:
    """Live processes this one spawned with multiprocessing (engine processes; not the resource
    tracker, which leaves with its parent, nor a test's sound server)."""
    return [pid for pid, cmdline in children(os.getpid()) if b"spawn_main" in cmdline]


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def children(pid: int) -> list[tuple[int, bytes]]:
    """(pid, command line) of the live child processes of `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append((int(stat.parent.name), cmdline))
    return found
