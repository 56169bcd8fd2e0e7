"""Rows/s into an HDF5 bank vs calling the simulator alone on the same chunks.

    python benchmarks/bank_throughput.py [--rows 1000000] [--chunk-size 100000] [--repeat 3]

The raw figure is ``simulate_chunk`` (prior draws + simulate with the chunk's generator) over the
same chunks the bank uses; the bank figure adds the finiteness check, buffering, HDF5 writes and
the commits. The printed ratio is bank time / raw time (target ≤ 1.10).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sbipipe.bank import simulate_bank, simulate_chunk
from sbipipe.registry import get_simulator


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--chunk-size", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--simulators", default="two_moons,gaussian_linear,slcp")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.rows} rows, chunks of {args.chunk_size}")
    print(f"{'simulator':<18}{'raw rows/s':>14}{'bank rows/s':>14}{'bank/raw time':>15}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.simulators.split(","):
            sim = get_simulator(name)
            chunks = range(-(-args.rows // args.chunk_size))
            raw = best_of(lambda: [simulate_chunk(sim, 0, i, args.chunk_size) for i in chunks], args.repeat)

            def bank() -> None:
                path = Path(tmp) / f"{name}.h5"
                path.unlink(missing_ok=True)
                simulate_bank(name, path, args.rows, seed=0, chunk_size=args.chunk_size)

            banked = best_of(bank, args.repeat)
            print(f"{name:<18}{args.rows / raw:>14,.0f}{args.rows / banked:>14,.0f}{banked / raw:>15.3f}")


if __name__ == "__main__":
    main()
