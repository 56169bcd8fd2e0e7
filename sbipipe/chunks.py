"""Simulating a bank chunk by chunk on any executor: chunk files, and assembling them in order.

Chunk ``i`` of a bank with seed ``s`` is the same prior draws and simulations whichever process
makes it (``sbipipe.bank.simulate_chunk``); it is written to a small HDF5 file in a cache folder
keyed by (simulator, version, seed, chunk size, index), and appended to the bank in order by
:class:`BankAssembler`, which keeps the bank's contract: the first ``N`` finite rows of the
stream, the same bits as ``simulate_bank``, committed row counts, resumable after a kill.
"""

from __future__ import annotations

import hashlib
import os
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

from .atomic import atomic_path, check_writable
from .bank import (
    SimulationBank,
    _append,
    _create,
    _read_state,
    _State,
    _truncate_to_committed,
    _writer_lock,
    simulate_chunk,
)
from .errors import SbipipeError
from .registry import get_simulator
from .simulator import Simulator

__all__ = ["BankAssembler", "chunk_folder", "ensure_chunk", "read_chunk"]


def chunk_folder(cache: str | os.PathLike, simulator: Simulator, seed: int, chunk_size: int) -> Path:
    """``CACHE/SIM-vVERSION/seedS-sizeC`` (one folder per stream)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{simulator.name}-v{simulator.version}")
    return Path(cache) / safe / f"seed{int(seed)}-size{int(chunk_size)}"


def _digest(theta: np.ndarray, x: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(theta).tobytes())
    h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def read_chunk(path: str | os.PathLike, sha256: str | None = None) -> tuple[Tensor, Tensor] | None:
    """A chunk file's ``(theta, x)``, or ``None`` when it is missing, unreadable or not ``sha256``."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            if sha256 is not None and f.attrs.get("sha256") != sha256:
                return None
            return torch.from_numpy(f["theta"][()]), torch.from_numpy(f["x"][()])
    except (OSError, KeyError):
        return None


def ensure_chunk(simulator: str | Any, seed: int, chunk: int, chunk_size: int, cache: str | os.PathLike) -> dict[str, Any]:
    """Simulate chunk ``chunk`` into the cache unless a complete file is there already; return its
    path, SHA-256 and whether it was computed now."""
    sim = get_simulator(simulator)
    path = chunk_folder(cache, sim, seed, chunk_size) / f"chunk-{int(chunk):06d}.h5"
    try:
        with h5py.File(path, "r", locking=False) as f:
            return {"chunk": chunk, "path": str(path), "sha256": str(f.attrs["sha256"]), "computed": False}
    except (OSError, KeyError):
        pass
    theta, x = simulate_chunk(sim, seed, chunk, chunk_size)
    t, xs = theta.numpy(), x.numpy()
    digest = _digest(t, xs)
    with atomic_path(check_writable(path), durable=False) as tmp, h5py.File(tmp, "w") as f:
        f["theta"], f["x"] = t, xs
        f.attrs.update(simulator=sim.name, simulator_version=str(sim.version), seed=int(seed), chunk=int(chunk),
                       sha256=digest)
    return {"chunk": chunk, "path": str(path), "sha256": digest, "computed": True}


class BankAssembler:
    """Appends chunks, in order, to the bank at ``path`` until it holds ``n`` rows (the bank is
    created, resumed or extended exactly as ``simulate_bank`` would). Holds the bank's writer lock
    while open: ``with BankAssembler(...) as bank: bank.append(i, theta, x)``."""

    def __init__(self, simulator: str | Any, path: str | os.PathLike, n: int, seed: int | None = None,
                 chunk_size: int | None = None):
        if not isinstance(n, int) or n <= 0:
            raise SbipipeError(f"-n must be a positive number of rows, got {n}")
        if chunk_size is not None and chunk_size <= 0:
            raise SbipipeError(f"--chunk-size must be positive, got {chunk_size}")
        self.simulator = get_simulator(simulator)
        self.path = check_writable(path)
        self.n, self.seed, self.chunk_size = n, seed, chunk_size
        self._stack = ExitStack()

    def __enter__(self) -> BankAssembler:
        self._stack.enter_context(_writer_lock(self.path))
        try:
            if self.path.exists():
                self.state, self.seed, self.chunk_size = _read_state(self.path, self.simulator, self.seed, self.chunk_size)
                _truncate_to_committed(self.path)
            else:
                self.seed = 0 if self.seed is None else int(self.seed)
                self.chunk_size = self.chunk_size or 10_000
                self.state = _State(0, 0, 0, 0)
                _create(self.path, self.simulator, self.seed, self.chunk_size, self.simulator.observation_shape)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @property
    def rows(self) -> int:
        return self.state.rows

    @property
    def done(self) -> bool:
        return self.state.rows >= self.n

    def chunks_needed(self) -> list[int]:
        """Chunk indices that fill the bank if none of their rows is dropped (more follow if some are)."""
        rows_left = self.n - self.state.rows + self.state.chunk_offset
        count = max(0, -(-rows_left // self.chunk_size)) if not self.done else 0
        return list(range(self.state.next_chunk, self.state.next_chunk + count))

    def append(self, chunk: int, theta: Tensor, x: Tensor) -> int:
        """Append the finite rows of chunk ``chunk`` that the bank still needs; return its row count."""
        st = self.state
        if chunk != st.next_chunk:
            raise SbipipeError(f"chunk {chunk} given but the bank {str(self.path)!r} continues with chunk {st.next_chunk}")
        if self.done:
            return st.rows
        theta, x = theta[st.chunk_offset:], x[st.chunk_offset:]
        need = self.n - st.rows
        finite = torch.isfinite(x.reshape(len(x), -1)).all(1) & torch.isfinite(theta).all(1)
        cum = torch.cumsum(finite, 0)
        used = len(x) if int(cum[-1]) <= need else int(torch.searchsorted(cum, need)) + 1
        keep = finite[:used]
        theta, x = theta[:used][keep], x[:used][keep]
        if st.chunk_offset + used >= self.chunk_size:
            st.next_chunk, st.chunk_offset = st.next_chunk + 1, 0
        else:
            st.chunk_offset += used
        st.dropped += used - len(x)
        st.rows = _append(self.path, st, [(theta, x)])
        return st.rows

    def bank(self) -> SimulationBank:
        return SimulationBank(self.path)
