"""An inbox folder of observation files, safe under overlapping readers.

``FOLDER/*.npy|csv|h5`` are waiting; a reader claims one by taking an exclusive lock on
``FOLDER/.locks/NAME.lock`` and renaming the file into ``FOLDER/processing/``; it releases the lock
after moving the file to ``done/`` (with ``NAME.result.json`` beside it) or ``failed/`` (with
``NAME.error.txt``). Renames are atomic, so a file is claimed at most once; a file left in
``processing/`` by a reader that died (its lock is free) is claimed again by the next reader, so
none is lost. Locks are ``flock`` locks: one host, or a file system that supports them.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .atomic import atomic_write_text

__all__ = ["SUFFIXES", "Claim", "claims", "finish"]

SUFFIXES = (".npy", ".csv", ".h5", ".hdf5")
_SUBFOLDERS = ("processing", "done", "failed", ".locks")


@dataclass
class Claim:
    """A file this reader holds: ``path`` is its place in ``processing/``."""

    folder: Path
    name: str
    path: Path
    recovered: bool
    _lock: TextIO


def _try_lock(lock_path: Path) -> TextIO | None:
    """An exclusive lock on ``lock_path`` (re-checked to be the file at that path), or ``None``."""
    fh = open(lock_path, "a")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fh.fileno()).st_ino != os.stat(lock_path).st_ino:
            raise BlockingIOError  # replaced while we waited
    except (BlockingIOError, FileNotFoundError):
        fh.close()
        return None
    return fh


def _candidates(folder: Path) -> list[str]:
    waiting = [p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES
               and not p.name.startswith(".")]
    stale = [p.name for p in (folder / "processing").iterdir() if p.is_file()]
    return sorted(set(stale)) + sorted(set(waiting) - set(stale))


def claims(folder: str | os.PathLike) -> Iterator[Claim]:
    """Claim waiting files one at a time (each is yielded while its lock is held; call
    :func:`finish` on it before asking for the next)."""
    folder = Path(folder)
    for sub in _SUBFOLDERS:
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for name in _candidates(folder):
        lock = _try_lock(folder / ".locks" / f"{name}.lock")
        if lock is None:
            continue  # another reader holds it
        target = folder / "processing" / name
        recovered = target.exists()  # its reader died: the lock was free
        if not recovered:
            try:
                os.rename(folder / name, target)
            except FileNotFoundError:  # taken and finished by another reader meanwhile
                lock.close()
                continue
        claim = Claim(folder, name, target, recovered, lock)
        try:
            yield claim
        finally:
            if not lock.closed:  # not finished (the consumer stopped): leave it for the next reader
                lock.close()


def _free_name(folder: Path, name: str) -> str:
    if not (folder / name).exists():
        return name
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}.{stamp}{dot}{suffix}" if dot else f"{name}.{stamp}"


def finish(claim: Claim, result: dict[str, Any] | None = None, error: str | None = None) -> Path:
    """Move a claimed file to ``done/`` (``result`` beside it as JSON) or, with ``error``, to
    ``failed/`` (the message beside it); release its lock. Returns the file's new path."""
    dest = claim.folder / ("failed" if error is not None else "done")
    name = _free_name(dest, claim.name)
    if error is not None:
        atomic_write_text(dest / f"{name}.error.txt", error.rstrip() + "\n")
    else:
        atomic_write_text(dest / f"{name}.result.json", json.dumps(result or {}, indent=2, default=str) + "\n")
    os.replace(claim.path, dest / name)
    (claim.folder / ".locks" / f"{claim.name}.lock").unlink(missing_ok=True)  # holders re-check the inode
    claim._lock.close()
    return dest / name
