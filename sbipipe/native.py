"""Compiled kernels: the rational-quadratic spline as one C loop over the points
(``spline_kernel.c``), built with the system's C compiler on first use and cached.

On CPU a small flow's training step is mostly per-operation overhead, and the spline's ~90
elementwise operations per call were half of an slcp NSF step; the C loop does the same
arithmetic in one call. Nothing here is required: without a compiler (or with
``SBIPIPE_NATIVE=0``) :mod:`sbipipe.spline` runs its torch operations instead, with the same values.
The shared library is compiled into ``$SBIPIPE_CACHE`` (default ``~/.cache/sbipipe``), named by a
hash of the source and the compiler command, and written atomically; it is loaded with ctypes (no
Python extension module, no pickling).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

__all__ = ["spline_library"]

SOURCE = Path(__file__).with_name("spline_kernel.c")
FLAGS = ("-O2", "-shared", "-fPIC", "-fno-fast-math", "-ffp-contract=off")
_log = logging.getLogger(__name__)


def _cache_dir() -> Path:
    root = os.environ.get("SBIPIPE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sbipipe")
    return Path(root)


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler, *FLAGS, platform.machine(), sys.platform)).encode()).hexdigest()
    target = _cache_dir() / f"spline-{key[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)  # atomic: a concurrent build writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("SBIPIPE_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        _log.info("no C compiler found; the spline runs as torch operations")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as exc:
        _log.warning("could not build the compiled spline (%s); running it as torch operations", exc)
        return None
    p, i, d = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    for suffix in ("f32", "f64"):
        getattr(lib, f"spline_forward_{suffix}").argtypes = [p, p, p, i, i, i, d, p, p]
        getattr(lib, f"spline_backward_{suffix}").argtypes = [p, p, p, p, p, i, i, i, d, p, p, p]
        getattr(lib, f"spline_inverse_{suffix}").argtypes = [p, p, p, i, i, i, d, p]
    return lib


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


@functools.lru_cache(maxsize=None)
def spline_library(dtype: torch.dtype) -> tuple[ctypes._CFuncPtr, ...] | None:
    """The compiled ``(forward, backward, inverse)`` for CPU tensors of ``dtype``, or None where
    there is none (another dtype, no compiler, ``SBIPIPE_NATIVE=0``)."""
    suffix = _SUFFIX.get(dtype)
    lib = _library() if suffix else None
    if lib is None:
        return None
    return tuple(getattr(lib, f"spline_{name}_{suffix}") for name in ("forward", "backward", "inverse"))
