r"""Posterior predictive check of one observation (Gelman, Meng & Stern 1996, Stat. Sin. 6, 733).

Replicated data ``x^ℓ ~ p(x | θ^ℓ)`` are simulated from posterior draws ``θ^ℓ ~ q(θ | x_o)`` and
compared with the observation through a summary ``s(x)``: the simulator's own ``summary(x)`` when
it defines one (e.g. the binned power spectrum of the cosmology fields), otherwise the flattened
observation. With ``μ`` and ``σ`` the mean and standard deviation of ``s`` over the replications,
the discrepancy is the RMS z-score

    T(x) = sqrt( mean_j ((s_j(x) − μ_j) / σ_j)² ),

and the posterior predictive p-value is ``p = (1 + #{ℓ : T(x^ℓ) ≥ T(x_o)}) / (L + 1)``. A small p
means the observation is unlike what the model (at its posterior) produces: a misspecified model,
a wrong observation, or a posterior in the wrong place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["posterior_predictive_check", "predictive_summary"]


def predictive_summary(simulator: Any, x: Tensor) -> Tensor:
    """``s(x)`` ``[B, K]``: the simulator's ``summary`` if it has one, else the flattened data."""
    s = simulator.summary(x) if callable(getattr(simulator, "summary", None)) else x
    return s.reshape(len(x), -1).double()


def posterior_predictive_check(
    simulator: Any, theta: Tensor, x_obs: Tensor, generator: torch.Generator | None = None
) -> dict[str, float]:
    """Discrepancy of ``x_obs`` and its p-value against data simulated at the draws ``theta [L, D]``."""
    x_rep = simulator.simulate(theta, generator)
    keep = torch.isfinite(x_rep.reshape(len(x_rep), -1)).all(1)
    s_rep = predictive_summary(simulator, x_rep[keep])
    s_obs = predictive_summary(simulator, x_obs.unsqueeze(0).to(x_rep.dtype))
    mu, sd = s_rep.mean(0), s_rep.std(0)
    live = sd > 1e-12 * (1 + mu.abs())  # components that never vary carry no information
    z_rep = (s_rep[:, live] - mu[live]) / sd[live]
    z_obs = (s_obs[:, live] - mu[live]) / sd[live]
    t_rep = z_rep.pow(2).mean(1).sqrt()
    t_obs = float(z_obs.pow(2).mean().sqrt())
    n = len(t_rep)
    p = (1 + int((t_rep >= t_obs).sum())) / (n + 1)
    return {"distance": t_obs, "p_value": p, "replications": n, "median_replicated_distance": float(t_rep.median())}
