"""Exact check of the source-posterior sampler: a Gaussian prior (analytic score) in place of the
learned one, against the analytic Gaussian posterior of the linear lensing problem.

Problem: a 16 × 16 source grid of 0.12″ pixels behind an SIE + shear lens (the ``lens_sie_shear``
operator, 64 × 64 image, PSF, σ_n = 1); prior N(μ, C) with μ an exponential-profile galaxy of
total flux 400 and C = 5² exp(−d²/(2 · 0.2″²)) + 0.01 I (flux per source pixel); the truth is a
prior draw and y = A s + n. The sampler is exactly the one used with the learned prior
(:func:`sbipipe.source_posterior.sample_source_posterior`: reverse-SDE predictor–corrector with
the convolved-likelihood score); only the prior's score is analytic.

Prints, as its last line, ``mean_err=<mean over pixels of |sample mean − exact mean| / exact std>
var_ratio=<mean over pixels of sample variance / exact variance>`` (targets: mean_err < 0.1,
var_ratio in [0.9, 1.1]). With N particles the Monte-Carlo floor of mean_err is √(2/(πN))
(0.018 for N = 2000) and the scatter of var_ratio about √(2/N) per pixel.

    OMP_NUM_THREADS=1 python benchmarks/score_prior_gaussian_check.py [--particles 2000] [--steps 100]
        [--corrector-steps 10] [--snr 0.3] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from sbipipe.source_posterior import (
    ConvolvedLikelihood,
    GaussianSourcePrior,
    gaussian_linear_posterior,
    lens_matrix,
    sample_source_posterior,
)

LENS = {"theta_E": 1.1, "e1": 0.08, "e2": -0.05, "x0": 0.03, "y0": -0.02, "gamma1": 0.03, "gamma2": 0.01}


def gaussian_problem(pixels: int = 16, pixel_scale: float = 0.12, amplitude: float = 5.0, length: float = 0.2,
                     nugget: float = 0.01, flux: float = 400.0, seed: int = 1):
    """(prior, likelihood, exact mean, exact covariance, truth) of the linear-Gaussian lensing problem."""
    a, noise, _ = lens_matrix(LENS, pixels, pixel_scale)
    c = (torch.arange(pixels, dtype=torch.float64) - (pixels - 1) / 2) * pixel_scale
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)
    cov = amplitude**2 * torch.exp(-0.5 * torch.cdist(pts, pts) ** 2 / length**2) + nugget * torch.eye(pixels**2, dtype=torch.float64)
    r = (xx**2 + yy**2).sqrt().reshape(-1)
    mean = torch.exp(-1.678 * r / 0.3)
    mean = flux * mean / mean.sum()
    gen = torch.Generator().manual_seed(seed)
    truth = mean + torch.linalg.cholesky(cov) @ torch.randn(pixels**2, generator=gen, dtype=torch.float64)
    y = a @ truth + noise * torch.randn(a.shape[0], generator=gen, dtype=torch.float64)
    prior = GaussianSourcePrior(mean.reshape(pixels, pixels), cov, pixel_scale)
    like = ConvolvedLikelihood(a, y, noise, prior.data_scale)
    m, p = gaussian_linear_posterior(mean, cov, a, noise, y)
    return prior, like, m, p, truth


def check_metrics(samples: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> tuple[float, float]:
    """(mean over pixels of |sample mean − m|/√P_ii, mean over pixels of sample var / P_ii)."""
    s = samples.reshape(samples.shape[0], -1).double()
    var = cov.diagonal()
    mean_err = float(((s.mean(0) - mean).abs() / var.sqrt()).mean())
    var_ratio = float((s.var(0) / var).mean())
    return mean_err, var_ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--particles", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--corrector-steps", type=int, default=10)
    ap.add_argument("--snr", type=float, default=0.3)
    ap.add_argument("--sigma-min", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    prior, like, m, p, truth = gaussian_problem()
    sd = p.diagonal().sqrt()
    print(f"problem: 16x16 source (0.12\"), 64x64 image; {len(like.active)} source pixels seen; "
          f"exact posterior sd {sd.min():.3f}-{sd.max():.3f} (prior sd 5.0); "
          f"truth within 3 sd: {float(((truth - m).abs() < 3 * sd).double().mean()):.3f}")
    t0 = time.perf_counter()
    post = sample_source_posterior(prior, like, args.particles, steps=args.steps, corrector_steps=args.corrector_steps,
                                   snr=args.snr, sigma_min=args.sigma_min, seed=args.seed, batch_size=args.particles)
    seconds = time.perf_counter() - t0
    evals = (args.steps - 1) * (args.corrector_steps + 1) + args.corrector_steps
    print(f"sampler: {args.particles} particles, {args.steps} levels x (1 predictor + {args.corrector_steps} corrector), "
          f"snr {args.snr}, {evals} score evaluations, {seconds:.1f} s (1 thread, shared machine)")
    print(f"chi2/pixel of the posterior mean {post.chi2_mean:.3f}; Monte-Carlo floor of mean_err "
          f"{math.sqrt(2 / (math.pi * args.particles)):.3f}")
    mean_err, var_ratio = check_metrics(post.samples, m, p)
    print(f"mean_err={mean_err:.4f} var_ratio={var_ratio:.4f}")


if __name__ == "__main__":
    main()
