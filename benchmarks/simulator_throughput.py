"""Simulations per second of the science simulators (batch of 1000, best of --repeat).

    python benchmarks/simulator_throughput.py [--batch 1000] [--repeat 5]

Targets on 2 CPU cores: ≥ 2,000 64×64 fields/s, ≥ 1,000 64×64 lensing images/s, ≥ 2,000 dwarf
galaxies of 100 stars/s. For the fields the ratio to a bare batched FFT of the same size (one
``irfft2`` of [B, 64, 33]) is printed: the floor any FFT-based field generator pays.
"""

from __future__ import annotations

import argparse
import time

import torch

from sbipipe.registry import get_simulator

TARGETS = {"cosmo_gaussian": 2000, "cosmo_lognormal": 2000, "lens_sie": 1000, "lens_sie_shear": 1000,
           "dwarf": 2000, "dwarf_cored": 2000, "dwarf_cusp": 2000}


def best_seconds(fn, repeat: int) -> float:
    fn()  # warm-up (caches, allocator)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    b = args.batch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {b}, CPU")
    spectrum = torch.randn(b, 64, 33, dtype=torch.complex64)
    fft = best_seconds(lambda: torch.fft.irfft2(spectrum, s=(64, 64)), args.repeat)
    print(f"{'bare irfft2 64x64 (floor)':<28}{b / fft:>12,.0f} /s")
    print(f"{'simulator':<28}{'samples/s':>12}{'target':>10}{'vs FFT floor':>14}")
    for name, target in TARGETS.items():
        sim = get_simulator(name)
        gen = torch.Generator().manual_seed(0)
        theta = sim.sample_prior(b, gen)
        sec = best_seconds(lambda: sim.simulate(theta, gen), args.repeat)
        ratio = f"{sec / fft:>13.1f}x" if name.startswith("cosmo") else ""
        verdict = "ok" if b / sec >= target else "BELOW"
        print(f"{name:<28}{b / sec:>12,.0f}{target:>8,} {verdict:<3}{ratio}")


if __name__ == "__main__":
    main()
