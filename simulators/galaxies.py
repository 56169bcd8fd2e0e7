r"""Synthetic source galaxies: 64 × 64 images of a Sérsic bulge + exponential disc with spiral arms
and star-forming clumps, at random position, size, inclination and orientation. Pure torch, batched,
seeded. It stands in for a data set of real galaxy images (none can be downloaded here) as the
training set of the score-based source prior.

Each galaxy is drawn on a grid of ``pixels``² pixels of ``pixel_scale`` arcsec (default 64 × 0.04″,
the source grid of :func:`simulators.lensing.lensing_operator`), centred on the optical axis, with
``supersample``² samples per pixel, and its pixels hold fluxes (pixel sums = total flux F). In
the disc frame (centre (x0, y0), major axis at position angle φ, axis ratio q = cos i of a thin
disc) with deprojected radius r = √(x'² + (y'/q)²) and azimuth ϑ = atan2(y'/q, x'):

* **disc** (Sérsic n = 1, Freeman 1970): I_d ∝ exp(−b₁ r/R_d), b₁ = 1.678, R_d the half-light radius;
* **spiral arms**: I_d × [(1 − a w) + a w S/⟨S⟩], S = ((1 + cos Ψ)/2)³, Ψ = m ϑ − (m/tan p) ln(r/R_d) − ϑ₀
  (m logarithmic arms of pitch angle p, e.g. Seigar & James 1998), w = 1 − exp(−(2r/R_d)²) fades
  the arms into the bulge, a the arm strength, ⟨S⟩ = 5/16 the azimuthal mean of S;
* **bulge** (Sérsic 1963): I_b ∝ exp(−b_n [(R/R_b)^{1/n} − 1]), b_n from Ciotti & Bertin (1999)
  (b_n ≈ 2n − 1/3 + 4/(405n) + 46/(25515n²)), R_b = ρ_b R_d, rounder than the disc:
  q_b = (1 + q)/2, same position angle;
* **clumps**: K ~ Poisson(6) (at most 12) circular Gaussians of width LogUniform(0.02″, 0.07″),
  placed in the disc plane with r ~ Gamma(2, R_d/b₁) (the exponential disc's radial distribution)
  and uniform azimuth, carrying Dirichlet(1, …, 1) shares of a fraction f_c of the disc light.

Light fractions: bulge B/T, disc (1 − B/T)(1 − f_c), clumps (1 − B/T) f_c; each component is
normalised to unit sum over the sub-pixel samples (midpoint rule), so the image, the sum of each
pixel's samples, sums to F exactly (light beyond the field is dropped).

Parameters θ (12, prior in :data:`GALAXY_PRIORS`): centre x0, y0 [″]; disc axis ratio q;
position angle φ [rad]; R_d [″]; B/T; ρ_b = R_b/R_d; bulge index n_b; arm strength a; pitch angle
p [deg]; clump fraction f_c; total flux F. Latent draws inside :meth:`SyntheticGalaxies.simulate`
(from its generator): the number of arms m ∈ {1, 2, 3, 4} (probabilities 0.15, 0.6, 0.15, 0.1),
the arm phase ϑ₀, and the clumps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints
from torch.distributions.utils import broadcast_all

from sbipipe.simulator import Simulator

from ._device import draw_device
from .lensing import IndependentPrior, LogUniform, TruncatedNormal

__all__ = ["GALAXY_PRIORS", "SyntheticGalaxies", "UniformInterval", "sersic_b"]

MAX_CLUMPS = 12
CLUMP_RATE = 6.0
ARM_COUNTS = (1, 2, 3, 4)
ARM_PROBS = (0.15, 0.6, 0.15, 0.1)
B_DISC = 1.678  # b_1 of the exponential disc (Sérsic n = 1)


class UniformInterval(Distribution):
    """U(low, high) with a generator-native sampler and an interval support (for :class:`IndependentPrior`)."""

    arg_constraints = {"low": constraints.real, "high": constraints.real}
    has_rsample = False

    def __init__(self, low: Any, high: Any, validate_args: bool | None = None):
        self.low, self.high = broadcast_all(low, high)
        if not bool((self.low < self.high).all()):
            raise ValueError("UniformInterval: low must be < high")
        super().__init__(self.low.shape, validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self) -> constraints.Constraint:
        return constraints.interval(self.low, self.high)

    def log_prob(self, value: Tensor) -> Tensor:
        value = torch.as_tensor(value)
        low, high = self.low.to(value.device), self.high.to(value.device)
        lp = -(high - low).log().expand_as(value).to(value.dtype if value.is_floating_point() else torch.float32)
        return torch.where((value >= low) & (value <= high), lp, torch.full_like(lp, -math.inf))

    def sample(
        self, sample_shape: torch.Size | Sequence[int] = torch.Size(), generator: torch.Generator | None = None
    ) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        u = torch.rand(shape, generator=generator, dtype=torch.float64, device=draw_device(generator))
        return (self.low.double().to(u.device) + u * (self.high - self.low).double().to(u.device)).to(self.low.dtype)

    @property
    def mean(self) -> Tensor:
        return (self.low + self.high) / 2

    @property
    def variance(self) -> Tensor:
        return (self.high - self.low) ** 2 / 12

    def __repr__(self) -> str:
        return f"UniformInterval(low={self.low.item():g}, high={self.high.item():g})"


#: name → (prior factory, label, unit). Sizes suit the 64 × 0.04″ source grid of the lensing
#: operator (R_d = 2.5–12.5 source pixels); fluxes match the lensing simulator's source prior.
GALAXY_PRIORS: dict[str, tuple[Any, str, str]] = {
    "x0": (lambda: TruncatedNormal(0.0, 0.1, -0.3, 0.3), r"$x_0$", "arcsec"),
    "y0": (lambda: TruncatedNormal(0.0, 0.1, -0.3, 0.3), r"$y_0$", "arcsec"),
    "q": (lambda: UniformInterval(0.25, 1.0), r"$q$", ""),
    "phi": (lambda: UniformInterval(0.0, math.pi), r"$\phi$", "rad"),
    "r_disc": (lambda: LogUniform(0.1, 0.5), r"$R_\mathrm{d}$", "arcsec"),
    "bulge_fraction": (lambda: UniformInterval(0.0, 0.7), r"$B/T$", ""),
    "bulge_size": (lambda: UniformInterval(0.15, 0.5), r"$R_\mathrm{b}/R_\mathrm{d}$", ""),
    "bulge_n": (lambda: UniformInterval(1.5, 4.5), r"$n_\mathrm{b}$", ""),
    "arm_strength": (lambda: UniformInterval(0.0, 1.0), r"$a$", ""),
    "pitch": (lambda: UniformInterval(10.0, 35.0), r"$p$", "deg"),
    "clump_fraction": (lambda: UniformInterval(0.0, 0.35), r"$f_\mathrm{c}$", ""),
    "flux": (lambda: LogUniform(300.0, 3000.0), r"$F$", ""),
}


def sersic_b(n: Tensor) -> Tensor:
    r"""b_n ≈ 2n − 1/3 + 4/(405 n) + 46/(25515 n²) (Ciotti & Bertin 1999), so that R_e holds half the light."""
    return 2 * n - 1 / 3 + 4 / (405 * n) + 46 / (25515 * n**2)


class SyntheticGalaxies(Simulator):
    r"""Galaxy images ``[B, pixels, pixels]`` (flux per pixel) from the 12 parameters of
    :data:`GALAXY_PRIORS` and latent arm/clump draws (see the module docstring). Bit-identical
    for the same generator seed on CPU; all random numbers are drawn before rendering, so another
    ``chunk_size`` changes only the rounding of vectorised maths (≲ 1e-7 relative)."""

    name = "galaxy"
    version = "1"

    def __init__(self, pixels: int = 64, pixel_scale: float = 0.04, supersample: int = 2, chunk_size: int = 128):
        self.pixels, self.pixel_scale, self.supersample = int(pixels), float(pixel_scale), int(supersample)
        self.chunk_size = int(chunk_size)
        self.parameter_names = tuple(GALAXY_PRIORS)
        self.prior = IndependentPrior([p[0]() for p in GALAXY_PRIORS.values()], self.parameter_names)

    @property
    def parameter_labels(self) -> list[str]:
        return [p[1] for p in GALAXY_PRIORS.values()]

    @property
    def parameter_units(self) -> list[str]:
        return [p[2] for p in GALAXY_PRIORS.values()]

    @property
    def observation_shape(self) -> tuple[int, ...]:
        return (self.pixels, self.pixels)

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.prior.sample((n,), generator=generator).to(torch.float32)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` galaxies ``[n, pixels, pixels]``: prior draws, then :meth:`simulate`."""
        return self.simulate(self.sample_prior(n, generator), generator)

    def grid(self, dtype: torch.dtype = torch.float32, device: Any = None) -> tuple[Tensor, Tensor]:
        """Sub-pixel centres ``(x, y)`` ``[P·s, P·s]`` (arcsec; rows ↔ y, columns ↔ x)."""
        m = self.pixels * self.supersample
        c = (torch.arange(m, dtype=torch.float64) - (m - 1) / 2) * (self.pixel_scale / self.supersample)
        y, x = torch.meshgrid(c, c, indexing="ij")
        return x.to(dtype=dtype, device=device), y.to(dtype=dtype, device=device)

    def _latents(self, b: int, generator: torch.Generator | None, device: torch.device) -> dict[str, Tensor]:
        dev = draw_device(generator, device)
        kw = {"generator": generator, "device": dev}
        probs = torch.tensor(ARM_PROBS, device=dev)
        lat = {
            "arms": torch.tensor(ARM_COUNTS, device=dev)[torch.multinomial(probs.expand(b, -1), 1, generator=generator)[:, 0]],
            "arm_phase": 2 * math.pi * torch.rand(b, **kw),
            "clumps": torch.poisson(torch.full((b,), CLUMP_RATE, device=dev), generator=generator).clamp(max=MAX_CLUMPS),
            "clump_r": torch.rand(b, MAX_CLUMPS, 2, **kw),  # Gamma(2) radius = −ln(u1 u2)
            "clump_angle": 2 * math.pi * torch.rand(b, MAX_CLUMPS, **kw),
            "clump_width": torch.rand(b, MAX_CLUMPS, **kw),
            "clump_weight": torch.rand(b, MAX_CLUMPS, **kw),  # Exp(1) = −ln u, normalised: Dirichlet(1)
        }
        return {k: v.to(device) for k, v in lat.items()}

    def simulate(self, theta: Tensor, generator: torch.Generator | None = None) -> Tensor:
        theta = torch.as_tensor(theta, dtype=torch.float32)
        if theta.ndim == 1:
            theta = theta.unsqueeze(0)
        if theta.shape[0] == 0:
            return theta.new_zeros(0, self.pixels, self.pixels)
        lat = self._latents(theta.shape[0], generator, theta.device)
        out = [
            self._render(theta[i : i + self.chunk_size], {k: v[i : i + self.chunk_size] for k, v in lat.items()})
            for i in range(0, theta.shape[0], self.chunk_size)
        ]
        return torch.cat(out)

    def _render(self, theta: Tensor, lat: dict[str, Tensor]) -> Tensor:
        b = theta.shape[0]
        col = lambda i: theta[:, i].reshape(b, 1, 1)  # noqa: E731
        x0, y0, q, phi, rd, bt, rb, nb, arm_a, pitch, fc, flux = (col(i) for i in range(12))
        x, y = self.grid(theta.dtype, theta.device)
        dx, dy = x - x0, y - y0
        c, s = phi.cos(), phi.sin()
        xp, yp = dx * c + dy * s, -dx * s + dy * c  # major axis along x'
        r = (xp**2 + (yp / q) ** 2).sqrt().clamp_min(1e-4)
        azimuth = torch.atan2(yp / q, xp)

        disc = torch.exp(-B_DISC * r / rd)
        m = lat["arms"].to(theta.dtype).reshape(b, 1, 1)
        psi = m * azimuth - m / torch.tan(pitch * math.pi / 180) * torch.log(r / rd) - lat["arm_phase"].reshape(b, 1, 1)
        pattern = ((1 + torch.cos(psi)) / 2) ** 3 / (5 / 16)
        w = arm_a * (1 - torch.exp(-((2 * r / rd) ** 2)))
        disc = _unit(disc * ((1 - w) + w * pattern))

        qb = (1 + q) / 2
        rbulge = (xp**2 + (yp / qb) ** 2).sqrt()
        bn = sersic_b(nb)
        bulge = _unit(torch.exp(-bn * ((rbulge / (rb * rd)).clamp_min(1e-6) ** (1 / nb) - 1)))

        # clumps: disc-plane radius r ~ Gamma(2, R_d/b1), uniform azimuth, projected to the sky
        k = torch.arange(MAX_CLUMPS, device=theta.device)
        on = (k[None] < lat["clumps"][:, None]).to(theta.dtype)  # [b, K]
        u = lat["clump_r"].clamp_min(1e-12)
        radius = -(u[..., 0].log() + u[..., 1].log()) * rd.reshape(b, 1) / B_DISC
        ang = lat["clump_angle"]
        cxp, cyp = radius * ang.cos(), radius * ang.sin() * q.reshape(b, 1)
        cb, sb = c.reshape(b, 1), s.reshape(b, 1)
        cx = x0.reshape(b, 1) + cxp * cb - cyp * sb
        cy = y0.reshape(b, 1) + cxp * sb + cyp * cb
        width = 0.02 * (0.07 / 0.02) ** lat["clump_width"]
        weight = -lat["clump_weight"].clamp_min(1e-12).log() * on
        weight = weight / weight.sum(1, keepdim=True).clamp_min(1e-12)
        clumps = torch.zeros_like(disc)
        for j in range(MAX_CLUMPS):
            g = torch.exp(-((x - cx[:, j, None, None]) ** 2 + (y - cy[:, j, None, None]) ** 2) / (2 * width[:, j, None, None] ** 2))
            clumps = clumps + weight[:, j, None, None] * _unit(g)
        has = (lat["clumps"] > 0).to(theta.dtype).reshape(b, 1, 1)
        fc = fc * has  # no clumps drawn: their light stays in the disc

        img = flux * (bt * bulge + (1 - bt) * ((1 - fc) * disc + fc * clumps))
        s_ = self.supersample
        return img.reshape(b, self.pixels, s_, self.pixels, s_).sum((2, 4))


def _unit(img: Tensor) -> Tensor:
    """Normalise each image of ``[B, H, W]`` to unit sum."""
    return img / img.sum((-2, -1), keepdim=True).clamp_min(1e-30)
