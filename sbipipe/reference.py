r"""Exact reference posteriors by MCMC: emcee's affine-invariant ensemble sampler (Goodman &
Weare 2010; Foreman-Mackey et al. 2013) on ``log_likelihood(θ, x) + log prior(θ)``.

* The log density is evaluated for all walkers at once (``vectorize=True``).
* Walkers start from sampling–importance–resampling of many prior draws (weights ∝ likelihood),
  jittered slightly, so every posterior mode the draws hit is populated in proportion to its mass
  (the stretch move does not move walkers between well-separated modes).
* Convergence: after burn-in the chain is extended until it is ≥ 50 integrated
  autocorrelation times τ long (Sokal's rule with a safety margin), and the acceptance fraction is
  checked to lie in [0.1, 0.8]; failures are reported in ``diagnostics["warnings"]``.
* Samples are thinned by ⌈τ/2⌉ and N are drawn without replacement from the thinned chain.
* Mirror symmetries: a simulator may declare ``sign_symmetries`` — parameter indices whose sign
  flip leaves likelihood and prior unchanged (slcp's θ3, θ4). The chain then runs on the
  half-space θ_i ≥ 0, which holds one full copy of the posterior, and each output sample gets an
  independent random sign per such index: exact, and no chain has to jump between mirror modes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import emcee
import numpy as np
import torch
from torch import Tensor

from .errors import SbipipeError
from .simulator import Simulator, has_likelihood

__all__ = ["ReferencePosterior", "log_posterior", "reference_posterior"]


@dataclass
class ReferencePosterior:
    samples: Tensor  # [N, D]
    diagnostics: dict[str, Any] = field(default_factory=dict)


def log_posterior(simulator: Simulator, theta: Tensor, x: Tensor, half_space: tuple[int, ...] = ()) -> Tensor:
    """``log L(θ; x) + log π(θ)`` for ``θ [B, D]`` and one observation ``x``; −∞ outside the prior
    (and outside θ_i ≥ 0 for ``i`` in ``half_space``)."""
    theta = theta.to(torch.float32)
    out = torch.full((theta.shape[0],), -math.inf, dtype=torch.float64)
    support = simulator.prior.support
    inside = support.check(theta) & torch.isfinite(theta).all(-1)
    if half_space:
        inside &= (theta[:, list(half_space)] >= 0).all(-1)
    if inside.any():
        t = theta[inside]
        with torch.no_grad():
            lp = simulator.prior.log_prob(t).double()
            ll = simulator.log_likelihood(t, x.expand(len(t), *x.shape)).double()
        out[inside] = torch.nan_to_num(lp + ll, nan=-math.inf)
    return out


def _initial_walkers(
    simulator: Simulator, x: Tensor, walkers: int, draws: int, rng: torch.Generator, half_space: tuple[int, ...]
) -> np.ndarray:
    theta = simulator.sample_prior(draws, rng)
    if half_space:
        theta[:, list(half_space)] = theta[:, list(half_space)].abs()
    logp = torch.cat([log_posterior(simulator, t, x, half_space) for t in theta.split(2048)])
    logl = logp - simulator.prior.log_prob(theta).double()
    if not torch.isfinite(logl).any():
        raise SbipipeError(
            f"{simulator.name}: the likelihood is zero at all {draws} prior draws; "
            "is the observation from this simulator?"
        )
    w = torch.softmax(torch.nan_to_num(logl, nan=-math.inf), 0)
    pick = torch.multinomial(w, walkers, replacement=True, generator=rng)
    start = theta[pick].double()
    # jitter so that no two walkers coincide: a small fraction of the spread of the picked draws
    top = theta[torch.topk(logl, min(64, draws)).indices].double()
    scale = top.std(0).clamp_min(1e-6) * 0.01
    for _ in range(100):
        trial = start + scale * torch.randn(start.shape, generator=rng, dtype=torch.float64)
        ok = torch.isfinite(log_posterior(simulator, trial, x, half_space))
        start[ok] = trial[ok]
        if ok.all():
            break
        scale = scale / 2
    return start.numpy()


def reference_posterior(
    simulator: Simulator,
    x: Tensor,
    n: int = 10_000,
    seed: int = 0,
    walkers: int | None = None,
    burn_in: int = 1000,
    init_draws: int = 20_000,
    max_steps: int = 100_000,
    tau_factor: float = 50.0,
    progress: bool = False,
) -> ReferencePosterior:
    """``n`` samples from p(θ | x) ∝ L(θ; x) π(θ) for one observation ``x`` (any batch dim of 1 dropped)."""
    if not has_likelihood(simulator):
        raise SbipipeError(f"{simulator.name} has no log_likelihood; exact reference posteriors need one")
    if n <= 0:
        raise SbipipeError(f"-n must be positive, got {n}")
    x = simulator.validate_observation(x)
    if x.shape[0] != 1:
        raise SbipipeError(f"reference posteriors take one observation, got a stack of {x.shape[0]}")
    x = x[0]
    d = simulator.dim
    walkers = walkers or max(32, 4 * d)
    walkers += walkers % 2
    rng = torch.Generator().manual_seed(seed)
    half_space = tuple(int(i) for i in getattr(simulator, "sign_symmetries", ()))
    t0 = time.perf_counter()
    p0 = _initial_walkers(simulator, x, walkers, init_draws, rng, half_space)

    def logp(theta: np.ndarray) -> np.ndarray:
        return log_posterior(simulator, torch.from_numpy(theta), x, half_space).numpy()

    sampler = emcee.EnsembleSampler(walkers, d, logp, vectorize=True)
    sampler.random_state = np.random.RandomState(seed).get_state()
    state = sampler.run_mcmc(p0, burn_in, progress=progress)
    sampler.reset()
    steps = max(1000, math.ceil(2 * n / walkers))
    state = sampler.run_mcmc(state, steps, progress=progress)
    tau = _tau(sampler)
    while True:
        needed = max(tau_factor * float(np.max(tau)), math.ceil(n / walkers) * max(1, math.ceil(np.max(tau) / 2)))
        if sampler.iteration >= needed or sampler.iteration >= max_steps:
            break
        extra = int(min(max_steps, math.ceil(1.2 * needed)) - sampler.iteration)
        state = sampler.run_mcmc(state, max(extra, 100), progress=progress)
        tau = _tau(sampler)
    tau_max = float(np.max(tau))
    thin = max(1, math.ceil(tau_max / 2))
    chain = sampler.get_chain(thin=thin, flat=True)
    acceptance = float(np.mean(sampler.acceptance_fraction))
    warnings = []
    if sampler.iteration < tau_factor * tau_max:
        warnings.append(f"chain is {sampler.iteration / tau_max:.0f} tau long (< {tau_factor:.0f} tau)")
    if not 0.1 <= acceptance <= 0.8:
        warnings.append(f"acceptance fraction {acceptance:.2f} outside [0.1, 0.8]")
    if len(chain) < n:
        warnings.append(f"only {len(chain)} independent-ish samples for n={n}; some repeat")
    pick = np.random.default_rng(seed)
    samples = chain[pick.choice(len(chain), size=n, replace=len(chain) < n)]
    if half_space:  # undo the restriction: each mirror image is equally probable
        cols = list(half_space)
        samples[:, cols] *= pick.choice([-1.0, 1.0], size=(n, len(cols)))
    samples = torch.from_numpy(samples).to(torch.float32)
    diagnostics = {
        "sampler": f"emcee {emcee.__version__} EnsembleSampler (stretch move)",
        "walkers": walkers,
        "burn_in": burn_in,
        "steps": int(sampler.iteration),
        "tau": [float(t) for t in tau],
        "tau_max": tau_max,
        "steps_over_tau": float(sampler.iteration / tau_max),
        "thin": thin,
        "acceptance_fraction": acceptance,
        "converged": not warnings,
        "warnings": "; ".join(warnings),
        "seconds": time.perf_counter() - t0,
        "sign_symmetries": list(half_space),
    }
    return ReferencePosterior(samples, diagnostics)


def _tau(sampler: emcee.EnsembleSampler) -> np.ndarray:
    tau = emcee.autocorr.integrated_time(sampler.get_chain(), tol=0)
    return np.where(np.isfinite(tau), tau, float(sampler.iteration))
