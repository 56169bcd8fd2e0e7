r"""Simulation banks: HDF5 files of ``theta [N, D]`` and ``x [N, ...]`` drawn from a simulator.

A bank is the first ``N`` finite rows of a reproducible stream: chunk ``i`` holds ``chunk_size``
prior draws and simulations made with a generator seeded from ``(seed, i)``; non-finite
simulations are dropped (and counted). The same command therefore gives the same data, an
interrupted run resumes where it stopped, and ``-n`` larger than the bank extends it.

Crash safety: the writer keeps the file closed while it simulates and appends finished chunks
in short open–write–flush–close bursts; the committed row count (attribute ``rows``) is
updated only after the data are flushed, and readers never look past it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import astuple, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

from .atomic import atomic_path, check_writable
from .errors import SbipipeError
from .registry import get_simulator
from .simulator import Simulator, describe_distribution

__all__ = ["SimulationBank", "chunk_generator", "simulate_bank", "simulate_chunk", "validation_mask"]

FORMAT = "sbipipe.bank/1"
_FLUSH_SECONDS = 1.0  # write buffered chunks at least this often (bounds the work lost to a crash)
_FLUSH_BYTES = 256 * 2**20
_MASK64 = 2**64 - 1


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def chunk_generator(seed: int, chunk: int) -> torch.Generator:
    """A generator for chunk ``chunk`` of a bank with seed ``seed`` (splitmix64 of both)."""
    return torch.Generator().manual_seed(_splitmix64(_splitmix64(int(seed) & _MASK64) ^ int(chunk)) >> 1)


def simulate_chunk(simulator: Simulator, seed: int, chunk: int, size: int) -> tuple[Tensor, Tensor]:
    """Prior draws and simulations of one chunk: ``theta [size, D]``, ``x [size, ...]``."""
    gen = chunk_generator(seed, chunk)
    theta = simulator.sample_prior(size, gen).to(torch.float32)
    x = simulator.simulate(theta, gen)
    if not torch.is_tensor(x) or x.shape[0] != size:
        raise SbipipeError(
            f"{simulator.name}: simulate returned {type(x).__name__} of shape "
            f"{list(getattr(x, 'shape', []))}; expected a tensor [{size}, ...]"
        )
    return theta, x.to(torch.float32)


def validation_mask(rows: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Whether each row index is in the validation split: a splitmix64 hash of the index.

    Membership depends on the index alone, so extending a bank keeps every row's split."""
    z = rows.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


@dataclass
class _State:
    rows: int
    next_chunk: int
    chunk_offset: int  # draws of ``next_chunk`` already consumed
    dropped: int


class SimulationBank:
    """Read access to a bank. Only the committed rows are visible.

    >>> bank = SimulationBank("bank.h5")
    >>> theta, x = bank.load(split="train")
    >>> for theta, x in bank.batches(512, split="train", seed=epoch): ...
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise SbipipeError(f"bank {str(self.path)!r} does not exist; create it with `sbipipe simulate`")
        try:
            with self._open() as f:
                missing = [k for k in ("theta", "x") if k not in f] + [
                    k for k in ("simulator", "simulator_version", "parameter_names", "rows") if k not in f.attrs
                ]
                if missing:
                    raise SbipipeError(
                        f"{str(self.path)!r} is not an sbipipe simulation bank (missing {', '.join(missing)}); "
                        "create banks with `sbipipe simulate`"
                    )
                self.attrs: dict[str, Any] = {k: _plain(v) for k, v in f.attrs.items()}
                self.theta_shape = tuple(f["theta"].shape[1:])
                self.x_shape = tuple(f["x"].shape[1:])
                stored = min(f["theta"].shape[0], f["x"].shape[0])
        except OSError as exc:
            raise SbipipeError(
                f"cannot read {str(self.path)!r} as HDF5 ({_short(exc)}); the file is corrupt or not a bank"
            ) from None
        self.rows = _committed(self.attrs).rows
        if self.rows > stored:
            raise SbipipeError(f"{str(self.path)!r} is corrupt: {self.rows} rows committed but {stored} stored")

    def _open(self) -> h5py.File:
        return h5py.File(self.path, "r", locking=False)

    # -- metadata ----------------------------------------------------------------------------
    @property
    def simulator_name(self) -> str:
        return str(self.attrs["simulator"])

    @property
    def simulator_version(self) -> str:
        return str(self.attrs["simulator_version"])

    @property
    def parameter_names(self) -> list[str]:
        return [str(p) for p in self.attrs["parameter_names"]]

    def __len__(self) -> int:
        return self.rows

    def __repr__(self) -> str:
        return f"<SimulationBank {str(self.path)!r}: {self.rows} rows of {self.simulator_name} v{self.simulator_version}>"

    # -- data --------------------------------------------------------------------------------
    def read(self, start: int = 0, stop: int | None = None) -> tuple[Tensor, Tensor]:
        """Rows ``[start, stop)`` as float32 tensors."""
        stop = self.rows if stop is None else min(stop, self.rows)
        with self._open() as f:
            return torch.from_numpy(f["theta"][start:stop]), torch.from_numpy(f["x"][start:stop])

    def split_indices(self, split: str | None, val_fraction: float = 0.1) -> np.ndarray:
        """Row indices of ``split`` (``"train"``, ``"val"`` or ``None`` for all)."""
        rows = np.arange(self.rows)
        if split is None:
            return rows
        if split not in ("train", "val"):
            raise SbipipeError(f"unknown split {split!r}; expected 'train' or 'val'")
        val = validation_mask(rows, val_fraction)
        return rows[val] if split == "val" else rows[~val]

    def parameters(self, split: str | None = None, val_fraction: float = 0.1) -> Tensor:
        """θ of the whole bank (or one split), without reading the observations."""
        with self._open() as f:
            theta = torch.from_numpy(f["theta"][:])
        return theta if split is None else theta[torch.from_numpy(self.split_indices(split, val_fraction))]

    def load(self, split: str | None = None, val_fraction: float = 0.1) -> tuple[Tensor, Tensor]:
        """The whole bank (or one split) in memory."""
        theta, x = self.read()
        if split is None:
            return theta, x
        idx = torch.from_numpy(self.split_indices(split, val_fraction))
        return theta[idx], x[idx]

    def batches(
        self,
        batch_size: int,
        split: str | None = "train",
        val_fraction: float = 0.1,
        shuffle: bool = True,
        seed: int = 0,
        block_rows: int = 4096,
        buffer_blocks: int = 16,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Stream shuffled batches of one split without loading the whole file.

        Contiguous blocks of ``block_rows`` are visited in a random order; ``buffer_blocks`` of
        them at a time are shuffled together. Every row of the split appears once per pass;
        memory stays at ``block_rows * buffer_blocks`` rows."""
        rng = np.random.default_rng(seed)
        n_blocks = math.ceil(self.rows / block_rows)
        order = rng.permutation(n_blocks) if shuffle else np.arange(n_blocks)
        carry_t: Tensor | None = None
        carry_x: Tensor | None = None
        with self._open() as f:
            for start in range(0, n_blocks, buffer_blocks):
                blocks = np.sort(order[start : start + buffer_blocks])
                parts_t, parts_x = [], []
                for b in blocks:
                    lo, hi = int(b) * block_rows, min((int(b) + 1) * block_rows, self.rows)
                    keep = np.ones(hi - lo, bool)
                    if split is not None:
                        val = validation_mask(np.arange(lo, hi), val_fraction)
                        keep = val if split == "val" else ~val
                    parts_t.append(torch.from_numpy(f["theta"][lo:hi][keep]))
                    parts_x.append(torch.from_numpy(f["x"][lo:hi][keep]))
                theta, x = torch.cat(parts_t), torch.cat(parts_x)
                if carry_t is not None:
                    theta, x = torch.cat([carry_t, theta]), torch.cat([carry_x, x])
                if shuffle:
                    perm = torch.from_numpy(rng.permutation(len(theta)))
                    theta, x = theta[perm], x[perm]
                full = len(theta) // batch_size * batch_size
                for i in range(0, full, batch_size):
                    yield theta[i : i + batch_size], x[i : i + batch_size]
                carry_t, carry_x = theta[full:], x[full:]
        if carry_t is not None and len(carry_t):
            yield carry_t, carry_x

    def content_hash(self) -> str:
        """SHA-256 of the committed rows' bytes and the simulator identity (a cache key)."""
        h = hashlib.sha256(f"{self.simulator_name}|{self.simulator_version}|{self.rows}".encode())
        step = 65536
        with self._open() as f:
            for lo in range(0, self.rows, step):
                hi = min(lo + step, self.rows)
                h.update(np.ascontiguousarray(f["theta"][lo:hi]).tobytes())
                h.update(np.ascontiguousarray(f["x"][lo:hi]).tobytes())
        return h.hexdigest()

    def summary(self) -> dict[str, Any]:
        """Rows, shapes, provenance and per-parameter min/mean/max (streamed in blocks)."""
        d = self.theta_shape[0]
        lo, hi, total = np.full(d, np.inf), np.full(d, -np.inf), np.zeros(d)
        with self._open() as f:
            for s in range(0, self.rows, 65536):
                t = f["theta"][s : min(s + 65536, self.rows)].astype(np.float64)
                lo, hi, total = np.minimum(lo, t.min(0)), np.maximum(hi, t.max(0)), total + t.sum(0)
        n = max(self.rows, 1)
        return {
            "path": str(self.path),
            "rows": self.rows,
            "theta_shape": list(self.theta_shape),
            "x_shape": list(self.x_shape),
            "simulator": self.simulator_name,
            "simulator_version": self.simulator_version,
            "seed": self.attrs.get("seed"),
            "dropped": int(self.attrs.get("dropped", 0)),
            "prior": self.attrs.get("prior", ""),
            "created": self.attrs.get("created", ""),
            "updated": self.attrs.get("updated", ""),
            "parameters": [
                {"name": name, "min": float(lo[i]), "mean": float(total[i] / n), "max": float(hi[i])}
                for i, name in enumerate(self.parameter_names)
            ],
        }


# -- writing -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _writer_lock(path: Path) -> Iterator[None]:
    lock_path = path.with_name(path.name + ".lock")
    try:
        fh = open(lock_path, "w")
    except OSError as exc:
        raise SbipipeError(f"cannot write beside {str(path)!r}: {exc.strerror}; choose a writable folder") from None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SbipipeError(f"another process is writing {str(path)!r}; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_path)


def _create(path: Path, simulator: Simulator, seed: int, chunk_size: int, x_shape: tuple[int, ...]) -> None:
    from . import __version__

    d = simulator.dim
    rows_per_chunk = max(1, (1 << 20) // max(4 * math.prod(x_shape), 1))  # ~1 MiB HDF5 chunks
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("theta", (0, d), maxshape=(None, d), dtype="f4", chunks=(max(1, (1 << 20) // (4 * d)), d))
        f.create_dataset(
            "x", (0, *x_shape), maxshape=(None, *x_shape), dtype="f4", chunks=(rows_per_chunk, *x_shape)
        )
        a = f.attrs
        a["format"] = FORMAT
        a["simulator"] = simulator.name
        a["simulator_version"] = str(simulator.version)
        a["parameter_names"] = list(simulator.parameter_names)
        a["prior"] = describe_distribution(simulator.prior)
        a["seed"] = int(seed)
        a["chunk_size"] = int(chunk_size)
        a["sbipipe_version"] = __version__
        a["torch_version"] = str(torch.__version__)
        a["created"] = a["updated"] = _now()
        a["rows"] = a["next_chunk"] = a["chunk_offset"] = a["dropped"] = 0
        a["commit"] = np.zeros(4, dtype=np.int64)


def _read_state(path: Path, simulator: Simulator, seed: int | None, chunk_size: int | None) -> tuple[_State, int, int]:
    bank = SimulationBank(path)  # validates format
    a = bank.attrs
    if bank.simulator_name != simulator.name or bank.simulator_version != str(simulator.version):
        raise SbipipeError(
            f"{str(path)!r} holds {bank.simulator_name} v{bank.simulator_version}; refusing to append "
            f"{simulator.name} v{simulator.version}: write to a new file"
        )
    stored_seed, stored_chunk = int(a.get("seed", 0)), int(a.get("chunk_size", 0))
    if seed is not None and seed != stored_seed:
        raise SbipipeError(f"{str(path)!r} was made with --seed {stored_seed}, not {seed}; use the same seed or a new file")
    if chunk_size is not None and chunk_size != stored_chunk:
        raise SbipipeError(
            f"{str(path)!r} was made with --chunk-size {stored_chunk}, not {chunk_size}; "
            "omit --chunk-size or use the same value"
        )
    if bank.theta_shape != (simulator.dim,):
        raise SbipipeError(f"{str(path)!r} stores theta of shape {list(bank.theta_shape)}, expected [{simulator.dim}]")
    return _committed(a), stored_seed, stored_chunk


def _committed(attrs: Any) -> _State:
    """The writer state of the last completed append: the single ``commit`` attribute
    ``[rows, next_chunk, chunk_offset, dropped]``, written in one call so that a writer killed
    mid-commit cannot leave the row count and the chunk position disagreeing (the separate
    attributes mirror it for readers; banks written before it existed fall back to them)."""
    if "commit" in attrs:
        return _State(*(int(v) for v in attrs["commit"]))
    return _State(int(attrs["rows"]), int(attrs.get("next_chunk", 0)), int(attrs.get("chunk_offset", 0)),
                  int(attrs.get("dropped", 0)))


def _append(path: Path, state: _State, pieces: list[tuple[Tensor, Tensor]]) -> int:
    """Append ``pieces`` of (theta, x), flush, then commit the new row count and writer state."""
    with h5py.File(path, "a") as f:
        t_ds, x_ds = f["theta"], f["x"]
        theta = (torch.cat([t for t, _ in pieces]) if len(pieces) > 1 else pieces[0][0]).numpy()
        x = (torch.cat([x for _, x in pieces]) if len(pieces) > 1 else pieces[0][1]).numpy()
        old = _committed(f.attrs).rows
        new = old + len(theta)
        t_ds.resize(new, axis=0)
        x_ds.resize(new, axis=0)
        t_ds[old:new] = theta
        x_ds[old:new] = x
        f.flush()  # data on disk before the row count that makes it visible
        f.attrs["commit"] = np.array([new, state.next_chunk, state.chunk_offset, state.dropped], dtype=np.int64)
        f.attrs["rows"] = new
        f.attrs["next_chunk"] = state.next_chunk
        f.attrs["chunk_offset"] = state.chunk_offset
        f.attrs["dropped"] = state.dropped
        f.attrs["updated"] = _now()
        f.flush()
    return new


def _truncate_to_committed(path: Path) -> None:
    with h5py.File(path, "a") as f:
        st = _committed(f.attrs)
        for key, value in zip(("rows", "next_chunk", "chunk_offset", "dropped"), astuple(st)):
            if "commit" in f.attrs and int(f.attrs.get(key, -1)) != value:
                f.attrs[key] = value  # mirrors left behind by a writer killed mid-commit
        rows = st.rows
        for name in ("theta", "x"):
            if f[name].shape[0] != rows:
                f[name].resize(rows, axis=0)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker_chunk(spec: Any, seed: int, chunk: int, size: int) -> tuple[Tensor, Tensor]:
    return simulate_chunk(get_simulator(spec), seed, chunk, size)


def simulate_bank(
    simulator: str | Any,
    path: str | os.PathLike,
    n: int,
    seed: int | None = None,
    chunk_size: int | None = None,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> SimulationBank:
    """Create, resume or extend the bank at ``path`` until it holds ``n`` rows.

    ``simulator`` is a registry name, an import path or an object; with ``workers > 1`` chunks
    are simulated in that many processes (the result is the same bits). ``progress(rows, n)``
    is called after every committed write."""
    if not isinstance(n, int) or n <= 0:
        raise SbipipeError(f"-n must be a positive number of rows, got {n}")
    if workers < 1:
        raise SbipipeError(f"--workers must be at least 1, got {workers}")
    if chunk_size is not None and chunk_size <= 0:
        raise SbipipeError(f"--chunk-size must be positive, got {chunk_size}")
    sim = get_simulator(simulator)
    path = check_writable(path)
    with _writer_lock(path):
        if path.exists():
            state, seed, chunk_size = _read_state(path, sim, seed, chunk_size)
            try:
                _truncate_to_committed(path)  # drop rows of a write that was cut off
            except OSError as exc:
                raise SbipipeError(f"cannot open {str(path)!r} for appending: {_short(exc)}") from None
        else:
            seed = 0 if seed is None else int(seed)
            chunk_size = chunk_size or 10_000
            state = _State(0, 0, 0, 0)
            _create(path, sim, seed, chunk_size, sim.observation_shape)
        if progress:
            progress(state.rows, n)
        if state.rows >= n:
            return SimulationBank(path)
        _fill(sim, simulator if isinstance(simulator, str) else sim, path, state, n, seed, chunk_size, workers, progress)
    return SimulationBank(path)


def _fill(
    sim: Simulator,
    spec: Any,
    path: Path,
    state: _State,
    n: int,
    seed: int,
    chunk_size: int,
    workers: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    chunks = _chunk_results(sim, spec, state.next_chunk, seed, chunk_size, workers)
    pieces: list[tuple[Tensor, Tensor]] = []
    buffered, nbytes, last_write = 0, 0, time.monotonic()
    try:
        while state.rows + buffered < n:
            theta, x = next(chunks)
            theta, x = theta[state.chunk_offset :], x[state.chunk_offset :]
            need = n - state.rows - buffered
            if bool(torch.isfinite(x.sum() + theta.sum())):  # one pass; any NaN/inf makes the sum non-finite
                used = kept = min(len(x), need)
                theta, x = theta[:used], x[:used]
            else:  # drop non-finite rows; consume draws until ``need`` finite rows are found
                finite = torch.isfinite(x.reshape(len(x), -1)).all(1) & torch.isfinite(theta).all(1)
                cum = torch.cumsum(finite, 0)
                used = len(x) if int(cum[-1]) <= need else int(torch.searchsorted(cum, need)) + 1
                theta, x = theta[:used][finite[:used]], x[:used][finite[:used]]
                kept = len(x)
            if state.chunk_offset + used >= chunk_size:
                state.next_chunk, state.chunk_offset = state.next_chunk + 1, 0
            else:
                state.chunk_offset += used
            state.dropped += used - kept
            pieces.append((theta, x))
            buffered += kept
            nbytes += x.numel() * 4
            if state.rows + buffered >= n or nbytes >= _FLUSH_BYTES or time.monotonic() - last_write >= _FLUSH_SECONDS:
                state.rows = _append(path, state, pieces)
                pieces, buffered, nbytes, last_write = [], 0, 0, time.monotonic()
                if progress:
                    progress(state.rows, n)
    finally:
        chunks.close()


def _chunk_results(
    sim: Simulator, spec: Any, first: int, seed: int, size: int, workers: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Chunks ``first, first + 1, ...`` in order, simulated here or in a pool of processes.

    (A simulating thread beside the writer was measured slower: h5py holds the GIL while it
    writes, and the thread's torch kernels compete with the writer for the two cores.)"""
    if workers == 1:
        chunk = first
        while True:
            yield simulate_chunk(sim, seed, chunk, size)
            chunk += 1
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init, initargs=(threads,)) as pool:
        pending: list[Future] = []
        chunk = first
        try:
            while True:
                while len(pending) < 2 * workers:
                    pending.append(pool.submit(_worker_chunk, spec, seed, chunk, size))
                    chunk += 1
                yield pending.pop(0).result()
        finally:
            for fut in pending:
                fut.cancel()


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
