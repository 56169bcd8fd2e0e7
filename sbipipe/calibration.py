r"""Calibration statistics of an amortised posterior on a test set ``{(θ_i, x_i)}`` drawn from
the joint p(θ) p(x | θ), with ``L`` posterior draws ``θ_i^ℓ ~ q(θ | x_i)`` each. All functions are
batched over the test set; ``samples`` is ``[N, L, D]`` and ``theta`` is ``[N, D]``.

* SBC (Talts et al. 2018, arXiv:1804.06788): the rank ``r_id = #{ℓ : θ_id^ℓ < θ_id}`` is uniform on
  ``{0, …, L}`` for every parameter ``d`` when q is the true posterior. Uniformity is tested with
  Pearson's χ² on ``B`` equal-width rank bins; the 99% binomial band per bin is what the plots show.
* Expected coverage of highest-posterior-density regions (Hermans et al. 2022, "A trust crisis in
  simulation-based inference?", TMLR): the credibility level at which θ_i enters the HPD region is
  ``α_i = (1/L) Σ_ℓ 1[log q(θ_i^ℓ | x_i) ≥ log q(θ_i | x_i)]``, uniform when q is calibrated; the
  coverage curve is the ECDF of α and its largest distance from the diagonal is the KS statistic.
  Over-confident posteriors give coverage below the diagonal, under-confident ones above it.
* TARP (Lemos, Coogan et al. 2023, ICML, arXiv:2302.03026, algorithm 2): with a random reference
  point r_i per test pair, ``f_i = (1/L) Σ_ℓ 1[‖θ_i^ℓ − r_i‖ < ‖θ_i − r_i‖]`` (parameters z-scored);
  the expected coverage probability is ``ECP(α) = mean_i 1[f_i < α]``, the diagonal iff q is the
  posterior. Summaries: the area to curve ``ATC = ∫_{1/2}^{1} (ECP(α) − α) dα`` (> 0 under-,
  < 0 over-dispersed) and the one-sample KS test of the f_i against U(0, 1). (sbi's ``check_tarp``
  applies a two-sample KS test to the two curves instead, which has little power.)
* Posterior contraction (Schad et al. 2021, Psychol. Methods): ``1 − Var_q(θ_d | x) / Var_p(θ_d)``
  averaged over the test set; 0 means the posterior is the prior (calibrated but useless).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats
from torch import Tensor

__all__ = [
    "binomial_band",
    "contraction",
    "coverage_curve",
    "hpd_levels",
    "ks_critical",
    "rank_bins",
    "rank_uniformity",
    "sbc_ranks",
    "tarp",
]


def sbc_ranks(samples: Tensor, theta: Tensor) -> Tensor:
    """SBC ranks ``[N, D]``: how many of the L draws fall below the true value, per parameter."""
    return (samples < theta.unsqueeze(1)).sum(1)


def rank_bins(n: int) -> int:
    """Number of rank-histogram bins: about 50 test simulations per bin, between 4 and 20."""
    return int(min(20, max(4, n // 50)))


def _bin_of(ranks: Tensor, n_samples: int, bins: int) -> Tensor:
    return torch.div(ranks * bins, n_samples + 1, rounding_mode="floor").clamp_max(bins - 1)


def rank_uniformity(ranks: Tensor, n_samples: int, bins: int | None = None) -> tuple[np.ndarray, Tensor]:
    """Pearson χ² p-value per parameter for ranks uniform on ``{0..L}`` and the bin counts ``[B, D]``.

    The expected count of each bin is exact: ``N × (#rank values in the bin) / (L + 1)``."""
    n, d = ranks.shape
    bins = bins or rank_bins(n)
    counts = torch.zeros(bins, d, dtype=torch.float64)
    counts.scatter_add_(0, _bin_of(ranks, n_samples, bins).long(), torch.ones(n, d, dtype=torch.float64))
    width = torch.bincount(_bin_of(torch.arange(n_samples + 1), n_samples, bins), minlength=bins).double()
    expected = (n * width / (n_samples + 1)).unsqueeze(1)
    chi2 = ((counts - expected) ** 2 / expected).sum(0).numpy()
    return stats.chi2.sf(chi2, bins - 1), counts


def binomial_band(n: int, bins: int, level: float = 0.99) -> tuple[float, float]:
    """Central ``level`` interval of one bin's count under uniform ranks: Binomial(N, 1/B)."""
    lo, hi = stats.binom.interval(level, n, 1.0 / bins)
    return float(lo), float(hi)


def hpd_levels(log_q_samples: Tensor, log_q_true: Tensor) -> Tensor:
    """Credibility level ``α_i`` at which θ_i enters the HPD region: ``[N, L]``, ``[N]`` → ``[N]``."""
    return (log_q_samples >= log_q_true.unsqueeze(1)).double().mean(1)


def coverage_curve(levels: Tensor, grid: Tensor | None = None) -> tuple[Tensor, Tensor, float, float]:
    """``(grid, coverage(grid), largest deviation, signed mean deviation)``.

    ``coverage(c) = mean_i 1[α_i ≤ c]``; the largest deviation is the exact KS statistic of the
    α_i against U(0, 1) (sup over all c, not only the grid); the signed mean deviation
    ``∫ (coverage(c) − c) dc`` is > 0 for under-confident and < 0 for over-confident posteriors."""
    grid = torch.linspace(0, 1, 101, dtype=torch.float64) if grid is None else grid.double()
    a = torch.sort(levels.double().flatten()).values
    n = len(a)
    cov = torch.searchsorted(a, grid, right=True).double() / n
    i = torch.arange(1, n + 1, dtype=torch.float64)
    dev = float(torch.maximum(i / n - a, a - (i - 1) / n).max())
    signed = 0.5 - float(a.mean())  # ∫_0^1 (ECDF(c) − c) dc = 1/2 − mean(α)
    return grid, cov, dev, signed


def ks_critical(n: int, p: float = 0.01) -> float:
    """Asymptotic KS critical value ``c(p)/√n`` (``c(0.01) = 1.628``, ``c(0.05) = 1.358``)."""
    return math.sqrt(-0.5 * math.log(p / 2)) / math.sqrt(n)


def tarp(
    samples: Tensor,
    theta: Tensor,
    generator: torch.Generator | None = None,
    references: Tensor | None = None,
    bins: int = 100,
) -> dict[str, object]:
    """TARP expected coverage probability with its ATC and KS summaries.

    Parameters are z-scored by the test set's mean and standard deviation; by default one
    reference point per test pair is drawn uniformly over the box spanned by the test θ (as sbi
    does). Returns ``alpha [bins+1]``, ``ecp [bins+1]``, ``atc``, ``ks_pvalue`` and ``f [N]``."""
    theta = theta.double()
    mean, std = theta.mean(0), theta.std(0).clamp_min(1e-12)
    z = (theta - mean) / std
    zs = (samples.double() - mean) / std
    if references is None:
        lo, hi = z.min(0).values, z.max(0).values
        u = torch.rand(z.shape, generator=generator, dtype=torch.float64)
        ref = lo + (hi - lo) * u
    else:
        ref = (references.double() - mean) / std
    d_samples = (zs - ref.unsqueeze(1)).norm(dim=-1)  # [N, L]
    d_true = (z - ref).norm(dim=-1)  # [N]
    f = (d_samples < d_true.unsqueeze(1)).double().mean(1)
    alpha = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ecp = (f.unsqueeze(0) < alpha.unsqueeze(1)).double().mean(1)
    ecp[-1] = 1.0
    upper = alpha >= 0.5
    atc = float(torch.trapezoid((ecp - alpha)[upper], alpha[upper]))
    ks = stats.kstest(f.numpy(), "uniform")
    return {"alpha": alpha, "ecp": ecp, "atc": atc, "ks_pvalue": float(ks.pvalue), "f": f}


def contraction(samples: Tensor, prior_variance: Tensor) -> Tensor:
    """Posterior contraction per parameter, ``1 − mean_i Var_q(θ_d | x_i) / Var_p(θ_d)``."""
    return 1.0 - samples.double().var(1).mean(0) / prior_variance.double()
