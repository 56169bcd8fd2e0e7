"""How much of the cosmo_gaussian posterior a binning of the power spectrum keeps.

The exact likelihood of the Gaussian field depends on the data through the power in each distinct
|k| shell. Pooling shells into bins and writing the likelihood in terms of the binned power only,
½ Σ_b n_b [−P̂_b/λ̄_b(θ) − ln λ̄_b(θ)] (n_b modes of the full k plane, λ̄_b their mean eigenvalue),
gives the posterior that a perfect network fed those bins could reach at best. For fields drawn from
the prior, the script prints the largest shift of the posterior mean (in posterior standard
deviations, either parameter) against the exact posterior, on a prior grid, for three binnings:

* ``integer |k| <= N/2`` — the first ``power`` embedding (drops the corners of the k plane);
* ``integer |k| to the corner`` — every mode, unit bins;
* ``embedding`` — :class:`sbipipe.nets.PowerSpectrumEmbedding` as shipped (one shell per distinct
  |k| ≤ 3, then integer bins to the corner).

    python benchmarks/power_binning_check.py [--fields 12] [--grid 301] [--seed 100]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sbipipe.nets import PowerSpectrumEmbedding  # noqa: E402
from simulators.cosmology import CosmoGaussian  # noqa: E402


def integer_bins(n: int, up_to_corner: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(bins [modes, B] averaging over each shell, full-plane mode counts [B]) for unit |k| bins."""
    ky = torch.fft.fftfreq(n) * n
    kx = torch.fft.rfftfreq(n) * n
    kmag = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2).round().long().flatten()
    top = int(kmag.max()) if up_to_corner else n // 2
    weight = torch.full((n, n // 2 + 1), 2.0)
    weight[:, 0] = 1.0
    weight[:, -1] = 1.0 if n % 2 == 0 else 2.0
    onehot = torch.zeros(kmag.numel(), top, dtype=torch.float64)
    ok = (kmag >= 1) & (kmag <= top)
    onehot[torch.arange(kmag.numel())[ok], kmag[ok] - 1] = weight.flatten()[ok].double()
    return onehot / onehot.sum(0), onehot.sum(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fields", type=int, default=12)
    ap.add_argument("--grid", type=int, default=301, help="points per parameter of the prior grid")
    ap.add_argument("--seed", type=int, default=100)
    args = ap.parse_args()
    sim = CosmoGaussian()
    emb = PowerSpectrumEmbedding(sim.observation_shape)
    binnings = {
        "integer |k| <= N/2": integer_bins(sim.n, False),
        "integer |k| to the corner": integer_bins(sim.n, True),
        "embedding": (emb.bins.double(), emb.mode_counts.double()),
    }
    axes = [torch.linspace(lo, hi, args.grid, dtype=torch.float64) for lo, hi in zip(sim.low, sim.high)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
    lam = {name: torch.cat([sim.eigenvalues(t).flatten(-2) @ bins for t in grid.split(2000)])
           for name, (bins, _) in binnings.items()}
    g = torch.Generator().manual_seed(args.seed)
    theta = sim.sample_prior(args.fields, g)
    x = sim.simulate(theta, g)
    shifts = {name: [] for name in binnings}
    for xi in x:
        exact = torch.softmax(sim.log_likelihood(grid, xi), 0)
        mean = exact @ grid
        sd = (exact @ (grid - mean) ** 2).sqrt()
        power = torch.fft.rfft2(xi.double(), norm="ortho").abs().square().flatten()
        for name, (bins, counts) in binnings.items():
            p_hat, lb = power @ bins, lam[name]
            post = torch.softmax(0.5 * (-(p_hat / lb) - lb.log()) @ counts, 0)
            shifts[name].append(float(((post @ grid - mean) / sd).abs().max()))
    print(f"cosmo_gaussian, {args.fields} fields from the prior (seed {args.seed}), {args.grid}² grid")
    print("largest |shift of the posterior mean| / posterior sd, per field:")
    for name, s in shifts.items():
        print(f"  {name:28s} max {max(s):.2f}   " + " ".join(f"{v:.2f}" for v in s))


if __name__ == "__main__":
    main()
