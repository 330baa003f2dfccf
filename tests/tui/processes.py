"""Child processes, read from /proc: what a test checks was left behind."""

import os
from pathlib import Path


def engine_children() -> list[int]:
    """Live (non-zombie) processes this one spawned with multiprocessing (engine processes; not
    the resource tracker, which leaves with its parent, nor a test's sound server)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
