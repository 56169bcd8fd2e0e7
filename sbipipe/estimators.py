r"""Conditional normalising-flow posterior estimators q(θ | x) (neural posterior estimation,
Papamakarios & Murray 2016; Greenberg et al. 2019) built from zuko flows.

Parameters are mapped to an unconstrained space before the flow: per dimension, θ = lo + (hi − lo)
σ(u) on an interval, θ = lo + e^u (or hi − e^u) on a half-line, θ = u on the real line; u is then
standardised. Samples are pushed back through the same map, so they never leave the prior's
support, and densities carry the Jacobian:

    log q(θ | x) = log q_z(z | e(x)) − Σ log s_u − log |dθ/du|,   z = (u − m_u) / s_u.

:class:`ConditionalEstimator` holds that map, the standardisation and the embedding network for
every estimator (the flows here, the score and flow-matching estimators in ``score_posterior`` and
``flow_matching``); subclasses only model q_z(z | e(x)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import zuko
from torch import Tensor, nn
from torch.nn import functional as F

from .autoregressive import MAF, NSF
from .errors import SbipipeError
from .nets import auto_embedding, build_embedding, embed_observations, fit_observation_statistics, statistics_shape

__all__ = ["FLOWS", "ConditionalEstimator", "FlowPosterior", "SupportMap", "prior_bounds"]

FLOWS = {"nsf": NSF, "maf": MAF, "naf": zuko.flows.NAF}
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU}  # hidden units of the flows' networks
_EPS = 1e-6


def prior_bounds(prior: torch.distributions.Distribution, dim: int) -> tuple[Tensor, Tensor]:
    """Per-parameter lower and upper bounds of a prior's support (±inf where unbounded)."""
    support = prior.support
    base = getattr(support, "base_constraint", support)
    lo = getattr(base, "lower_bound", -math.inf)
    hi = getattr(base, "upper_bound", math.inf)
    lo = torch.as_tensor(lo, dtype=torch.float64).expand(dim).clone()
    hi = torch.as_tensor(hi, dtype=torch.float64).expand(dim).clone()
    return lo, hi


class SupportMap(nn.Module):
    """Elementwise bijection u ∈ ℝ^D → θ in the box [lo, hi] (some ends may be infinite)."""

    def __init__(self, lower: Tensor, upper: Tensor):
        super().__init__()
        self.register_buffer("lower", lower.double())
        self.register_buffer("upper", upper.double())

    def _kinds(self) -> tuple[Tensor, Tensor, Tensor]:
        lo_f, hi_f = torch.isfinite(self.lower), torch.isfinite(self.upper)
        return lo_f & hi_f, lo_f & ~hi_f, ~lo_f & hi_f

    def inverse(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """``u = T⁻¹(θ)`` and ``log |dθ/du|`` summed over dimensions."""
        t = theta.double()
        box, low, high = self._kinds()
        lo = torch.where(torch.isfinite(self.lower), self.lower, 0.0)
        hi = torch.where(torch.isfinite(self.upper), self.upper, 1.0)
        width = torch.where(box, hi - lo, 1.0)
        p = ((t - lo) / width).clamp(_EPS, 1 - _EPS)
        u_box = torch.log(p) - torch.log1p(-p)
        u_low = torch.log((t - lo).clamp_min(_EPS))
        u_high = torch.log((hi - t).clamp_min(_EPS))
        u = torch.where(box, u_box, torch.where(low, u_low, torch.where(high, u_high, t)))
        return u, self._log_jacobian(u)

    def forward(self, u: Tensor) -> Tensor:
        u = u.double()
        box, low, high = self._kinds()
        lo = torch.where(torch.isfinite(self.lower), self.lower, 0.0)
        hi = torch.where(torch.isfinite(self.upper), self.upper, 1.0)
        theta = torch.where(
            box, lo + (hi - lo) * torch.sigmoid(u), torch.where(low, lo + u.exp(), torch.where(high, hi - u.exp(), u))
        )
        return torch.maximum(torch.minimum(theta, self.upper), self.lower)

    def _log_jacobian(self, u: Tensor) -> Tensor:
        box, low, high = self._kinds()
        width = torch.where(box, self.upper - self.lower, 1.0)
        lj = torch.where(box, torch.log(width) + F.logsigmoid(u) + F.logsigmoid(-u), torch.where(low | high, u, 0.0))
        return lj.sum(-1)


class ConditionalEstimator(nn.Module):
    r"""What every posterior member shares: the support map, standardisation buffers of u and x,
    and the embedding network. Subclasses model the standardised unconstrained parameters
    z = (T⁻¹(θ) − m_u) / s_u given the context e(x), and provide ``loss``, ``log_prob`` and ``sample``."""

    def __init__(self, theta_dim: int, x_shape: Sequence[int], lower: Tensor, upper: Tensor, embedding: str = "auto"):
        super().__init__()
        self.theta_dim = int(theta_dim)
        self.x_shape = tuple(int(s) for s in x_shape)
        self.embedding_kind = auto_embedding(self.x_shape) if embedding == "auto" else embedding
        self.support = SupportMap(lower, upper)
        self.embedding = build_embedding(self.embedding_kind, self.x_shape)
        self.register_buffer("u_mean", torch.zeros(theta_dim))
        self.register_buffer("u_std", torch.ones(theta_dim))
        self.register_buffer("x_mean", torch.zeros(statistics_shape(self.embedding_kind, self.x_shape)))
        self.register_buffer("x_std", torch.ones(statistics_shape(self.embedding_kind, self.x_shape)))

    @torch.no_grad()
    def fit_standardization(self, theta: Tensor, x: Tensor) -> None:
        """Set the standardisation statistics from (a sample of) the training set."""
        u, _ = self.support.inverse(theta)
        self.u_mean.copy_(u.mean(0).float())
        self.u_std.copy_(u.std(0).clamp_min(1e-6).float())
        fit_observation_statistics(self, x)

    def context(self, x: Tensor) -> Tensor:
        """The embedding e(x) of standardised observations ``x [B, ...]``: ``[B, C]``."""
        return embed_observations(self, x)

    def standardize(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """``z`` (float32) and ``log |dz/dθ|`` (float64, ``[B]``), so log q(θ) = log q_z(z) + that."""
        u, log_jac = self.support.inverse(theta)
        z = (u.float() - self.u_mean) / self.u_std
        return z, -self.u_std.double().log().sum() - log_jac

    def unstandardize(self, z: Tensor) -> Tensor:
        """θ (float32) inside the prior's support for standardised unconstrained ``z``."""
        return self.support(z * self.u_std + self.u_mean).float()


class FlowPosterior(ConditionalEstimator):
    """One NPE member: standardisation, an embedding network and a conditional zuko flow."""

    def __init__(
        self,
        theta_dim: int,
        x_shape: Sequence[int],
        lower: Tensor,
        upper: Tensor,
        flow: str = "nsf",
        embedding: str = "auto",
        transforms: int = 5,
        hidden: int = 64,
        passes: int | None = 2,
        activation: str = "relu",
        **flow_kwargs: Any,
    ):
        if flow not in FLOWS:
            raise SbipipeError(f"unknown estimator {flow!r}; choose one of {', '.join(FLOWS)}")
        if activation not in ACTIVATIONS:
            raise SbipipeError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        super().__init__(theta_dim, x_shape, lower, upper, embedding)
        # passes=2: coupling layers, so sampling costs two network passes per transform instead of D
        self.flow = FLOWS[flow](
            theta_dim, self.embedding.out_features, transforms=transforms, hidden_features=(hidden, hidden),
            passes=min(passes or theta_dim, theta_dim), activation=ACTIVATIONS[activation], **flow_kwargs,
        )

    def loss(self, theta: Tensor, x: Tensor) -> Tensor:
        """Mean negative log density of the standardised unconstrained parameters."""
        z, _ = self.standardize(theta)
        return -self.flow(self.context(x)).log_prob(z).mean()

    def log_prob(self, theta: Tensor, x: Tensor) -> Tensor:
        """log q(θ | x) for ``theta [..., B, D]`` and ``x [B, ...]``: ``[..., B]`` (leading draw
        dimensions broadcast over the observations, which are embedded once)."""
        z, log_det = self.standardize(theta)
        return self.flow(self.context(x)).log_prob(z).double() + log_det

    def sample(self, x: Tensor, n: int) -> Tensor:
        """``n`` draws for each of ``x [M, ...]``: ``[M, n, D]``."""
        z = self.flow(self.context(x)).sample((n,))  # [n, M, D]
        return self.unstandardize(z).transpose(0, 1)

    def sample_and_log_prob(self, x: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """Draws ``[M, n, D]`` and their log q ``[M, n]`` in one pass through the flow."""
        z, lp = self.flow(self.context(x)).rsample_and_log_prob((n,))  # [n, M, D], [n, M]
        u = z * self.u_std + self.u_mean
        theta = self.support(u).float()
        lp = lp.double() - self.u_std.double().log().sum() - self.support._log_jacobian(u.double())
        return theta.transpose(0, 1), lp.transpose(0, 1)
