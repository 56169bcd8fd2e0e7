"""Atomic file writes: write to a temporary name in the same folder, fsync, then rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import SbipipeError

__all__ = ["atomic_path", "atomic_write_text", "check_writable"]


def check_writable(path: str | os.PathLike) -> Path:
    """Return ``path`` as a Path after checking that its folder exists (creating it) and is writable."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SbipipeError(f"cannot create the output folder {str(folder)!r}: {exc.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise SbipipeError(f"cannot write to {str(path)!r}: folder {str(folder)!r} is not writable")
    if path.is_dir():
        raise SbipipeError(f"cannot write to {str(path)!r}: it is a folder; give a file name")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically,
    on error it is removed and ``path`` is left as it was. ``durable`` fsyncs before the rename
    (survives power loss); without it the write still survives the process being killed."""
    path = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
