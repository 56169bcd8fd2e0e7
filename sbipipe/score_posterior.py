r"""Neural posterior score estimation (NPSE: Geffner et al. 2023; Sharrock et al. 2024): a
conditional score network trained by denoising score matching on a diffusion of the standardised
unconstrained parameters z (see :class:`~sbipipe.estimators.ConditionalEstimator`), following the
SDE framework of Song et al. (2021).

Forward SDEs, t ∈ [t_min, 1], z_t | z_0 ~ N(α_t z_0, σ_t² I):

* ``vp`` (variance preserving, Song et al. 2021 eq. 11): dz = −½β(t) z dt + √β(t) dw,
  β(t) = β_min + t (β_max − β_min), α_t = exp(−½∫₀ᵗβ), σ_t² = 1 − α_t²; base N(0, I).
* ``ve`` (variance exploding, eq. 9): dz = √(dσ_t²/dt) dw, σ_t = σ_min (σ_max/σ_min)^t,
  α_t = 1; base N(0, σ_max² I).

The network predicts the noise, ε̂(z_t, t | e(x)), so that s(z_t, t) = −ε̂ / σ_t approximates
∇ log p_t(z_t | x); with the weighting λ(t) = σ_t² the denoising score-matching loss
(Vincent 2011; Song et al. 2021 eq. 7) is E_{t ~ U(t_min, 1), ε} ‖ε̂(α_t z_0 + σ_t ε, t) − ε‖².
ε̂ = σ_t z_t / (α_t² + σ_t²) + net(z_t / √(α_t² + σ_t²), τ_t, e(x)): the first term is exact when
z_0 ~ N(0, I) (the standardised prior), so the network learns the posterior's departure from it
(this halved the width error of a short training on gaussian_linear). Defaults: VP, a 64-wide
residual network of 3 FiLM blocks, 16 RK4 steps.

Sampling integrates the probability-flow ODE (Song et al. 2021 eq. 13)

    dz/dt = f(z, t) − ½ g(t)² s(z, t)

from t = 1 to t_min (RK4 on a grid uniform in log(σ_t/α_t), dense where the noise is small), or,
with ``sampler="sde"``, the reverse-time SDE dz = [f − g² s] dt + g dw̄ by Euler–Maruyama. Densities
come from the same ODE and the instantaneous change of variables with the exact divergence
(:class:`~sbipipe.flow_matching.ContinuousPosterior`), treating q(z_{t_min}) as q(z_0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor

from .errors import SbipipeError
from .flow_matching import ContinuousPosterior

__all__ = ["SDES", "ScorePosterior"]

SDES = ("vp", "ve")
SAMPLERS = ("ode", "sde")


class ScorePosterior(ContinuousPosterior):
    """One NPSE member (see the module docstring): data at ``t_min``, Gaussian base at t = 1."""

    t_base = 1.0

    def __init__(self, theta_dim: int, x_shape: Sequence[int], lower: Tensor, upper: Tensor, embedding: str = "auto",
                 hidden: int = 64, blocks: int = 3, steps: int = 16, sde: str = "vp", beta_min: float = 0.1,
                 beta_max: float = 20.0, sigma_min: float = 1e-3, sigma_max: float = 10.0, t_min: float = 1e-5,
                 sampler: str = "ode", sde_steps: int = 500, **kwargs: Any):
        if kwargs:
            raise SbipipeError(f"unknown option(s) for the score estimator: {', '.join(kwargs)}")
        if sde not in SDES:
            raise SbipipeError(f"unknown SDE {sde!r} for the score estimator; choose one of {', '.join(SDES)}")
        if sampler not in SAMPLERS:
            raise SbipipeError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not (0 < beta_min < beta_max and 0 < sigma_min < sigma_max and 0 <= t_min < 1):
            raise SbipipeError("score needs 0 < beta_min < beta_max, 0 < sigma_min < sigma_max and 0 <= t_min < 1")
        super().__init__(theta_dim, x_shape, lower, upper, embedding, hidden=hidden, blocks=blocks, steps=steps)
        self.sde = sde
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        # VE already has noise σ_min at t = 0; VP needs t_min > 0 to keep σ_t away from 0
        self.t_data = float(t_min) if sde == "vp" else 0.0
        self.sampler, self.sde_steps = sampler, int(sde_steps)  # may be changed after loading

    # -- the SDE ------------------------------------------------------------------------------
    def _integral_beta(self, t: Tensor) -> Tensor:
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean scale α_t and noise scale σ_t of z_t | z_0."""
        if self.sde == "vp":
            b = self._integral_beta(t)
            return torch.exp(-0.5 * b), torch.sqrt(-torch.expm1(-b))
        return torch.ones_like(t), self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def drift_diffusion(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """f(z, t) = a_t z (returns a_t) and g(t)² of the forward SDE."""
        if self.sde == "vp":
            beta = self.beta_min + t * (self.beta_max - self.beta_min)
            return -0.5 * beta, beta
        sigma = self.alpha_sigma(t)[1]
        return torch.zeros_like(t), 2 * sigma**2 * math.log(self.sigma_max / self.sigma_min)

    def base_scale(self) -> float:
        return 1.0 if self.sde == "vp" else self.sigma_max

    def log_snr_range(self) -> tuple[float, float]:
        """λ = log(σ_t/α_t) at t = 1 and at t_data."""
        alpha, sigma = self.alpha_sigma(torch.tensor([self.t_base, self.t_data], dtype=torch.float64))
        lam = (sigma / alpha).log()
        return float(lam[0]), float(lam[1])

    def time_of(self, lam: Tensor) -> Tensor:
        """The time t at which log(σ_t/α_t) = λ."""
        if self.sde == "ve":
            return (lam - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min)
        b = torch.nn.functional.softplus(2 * lam)  # ∫β = log(1 + e^{2λ}); solve the quadratic for t
        a = 0.5 * (self.beta_max - self.beta_min)
        return 2 * b / (self.beta_min + torch.sqrt(self.beta_min**2 + 4 * a * b))

    def grid(self, steps: int) -> list[float]:
        """Times from 1 to t_data, uniform in λ = log(σ_t/α_t) (geometric in σ for VE)."""
        t = self.time_of(torch.linspace(*self.log_snr_range(), steps + 1, dtype=torch.float64))
        t[0], t[-1] = self.t_base, self.t_data
        return t.tolist()

    # -- the network --------------------------------------------------------------------------
    def _times(self, t: float | Tensor, z: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device)
        return t.reshape(1) if t.ndim == 0 else t

    def noise(self, z: Tensor, t: float | Tensor, c: Tensor) -> Tensor:
        """ε̂(z_t, t | c); the input is scaled by 1/√(α_t² + σ_t²) and the time feature is
        (log σ_t − log σ(t_min)) / (log σ(1) − log σ(t_min)) ∈ [0, 1]."""
        t = self._times(t, z)
        alpha, sigma = self.alpha_sigma(t)
        ends = torch.tensor([self.t_data, self.t_base], dtype=z.dtype, device=z.device)
        lo, hi = self.alpha_sigma(ends)[1].log()
        tau = (sigma.log() - lo) / (hi - lo)
        var = alpha**2 + sigma**2
        # the network learns the residual to the exact ε̂ for z_0 ~ N(0, I) (the standardised prior)
        return sigma * z / var + self.net(z / torch.sqrt(var), tau, c)

    def score(self, z: Tensor, t: float | Tensor, c: Tensor) -> Tensor:
        """s(z_t, t | c) ≈ ∇_z log p_t(z_t | x)."""
        return -self.noise(z, t, c) / self.alpha_sigma(self._times(t, z))[1]

    def velocity(self, z: Tensor, t: float | Tensor, c: Tensor) -> Tensor:
        """Probability-flow drift f − ½ g² s."""
        t = self._times(t, z)
        a, g2 = self.drift_diffusion(t)
        return a * z - 0.5 * g2 * self.score(z, t, c)

    def loss(self, theta: Tensor, x: Tensor) -> Tensor:
        """Denoising score matching with λ(t) = σ_t² (noise prediction)."""
        z0, c, g = self._loss_inputs(theta, x)
        t = self.t_data + (1 - self.t_data) * torch.rand(len(z0), 1, generator=g, device=z0.device)
        eps = torch.randn(z0.shape, generator=g, device=z0.device)
        alpha, sigma = self.alpha_sigma(t)
        return (self.noise(alpha * z0 + sigma * eps, t, c) - eps).pow(2).mean()

    def _integrate(self, z: Tensor, c: Tensor) -> Tensor:
        if self.sampler == "ode":
            return super()._integrate(z, c)
        grid = self.grid(self.sde_steps)
        for t0, t1 in pairwise(grid):  # Euler–Maruyama of the reverse SDE, dt = t1 − t0 < 0
            t = self._times(t0, z)
            a, g2 = self.drift_diffusion(t)
            dt = t1 - t0
            z = z + (a * z - g2 * self.score(z, t, c)) * dt + torch.sqrt(g2 * -dt) * torch.randn_like(z)
        return z
