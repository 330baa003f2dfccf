"""Output files that nothing already in their folder can redirect or clobber.

Every file a command writes is first created as ``<name>.tmp`` in the folder of its destination,
with O_EXCL and O_NOFOLLOW: the open fails rather than follow a symlink or reuse a file planted at
that name (such a link, or the temporary file of a run that was killed, is removed first: the link
itself, not what it points to). The new file is then renamed to its name: a symlink or a file
already there is replaced, never written through. A device or a pipe (``/dev/stdout``, a FIFO) is
a stream, not a file to replace: it is written as it is (a device node is never replaced).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _create_temporary(path: Path, mode: int) -> tuple[int, Path]:
    tmp = path.with_name(path.name + ".tmp")
    try:
        return os.open(tmp, _FLAGS, mode), tmp
    except FileExistsError:
        os.unlink(tmp)
        return os.open(tmp, _FLAGS, mode), tmp


def open_new(path: str | Path, mode: int = 0o666) -> int:
    """A new, empty file at `path`, open for writing: its file descriptor. `mode` is filtered by
    the umask, as for `open`; 0o600 keeps the file private."""
    path = Path(path)
    if _is_stream(path):
        return os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    fd, tmp = _create_temporary(path, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return fd


def _is_stream(path: Path) -> bool:
    try:
        kind = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(kind) and not stat.S_ISDIR(kind)


def open_new_text(path: str | Path, mode: int = 0o666):
    """`open_new` as a UTF-8 text file object."""
    return os.fdopen(open_new(path, mode), "w", encoding="utf-8")


def write_atomically(path: str | Path, text: str, mode: int = 0o666) -> None:
    """Replace the file at `path` with `text` in one step, so that a reader, or a crash, never meets
    half a file: the text is written whole to the temporary file before the rename."""
    path = Path(path)
    fd, tmp = _create_temporary(path, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
