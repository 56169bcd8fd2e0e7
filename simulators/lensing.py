r"""Galaxy-scale strong gravitational lensing: an SIE lens (± external shear) and a Sérsic source,
imaged HST-like (64 × 64 pixels of 0.05″, Gaussian PSF, Gaussian pixel noise).

Lens equation (reduced deflections, arcsec): β = θ − α_SIE(θ) − α_γ(θ), with the singular
isothermal ellipsoid of Kormann, Schneider & Bartelmann (1994) in the form of Keeton (2001),

    κ(x, y) = θ_E / (2 √(q x'² + y'²/q)),
    α_x' = θ_E √q / f · atan(f x' / ψ),   α_y' = θ_E √q / f · atanh(f y' / ψ),
    f = √(1 − q²),   ψ = √(q² x'² + y'²),

in the frame (x', y') centred on (x0, y0) and rotated by φ (major axis along x'), and the external
shear α_γ = (γ₁ x + γ₂ y, γ₂ x − γ₁ y) about the origin. Both come from the pure functions of
caustics (Stone et al. 2024, JOSS), broadcast over the batch. The ellipticity convention is
lenstronomy's (also caustics' ``angle_system="e1_e2"``):

    q = (1 − |e|) / (1 + |e|),   φ = ½ atan2(e₂, e₁),   |e| = √(e₁² + e₂²).

Source: elliptical Sérsic profile (caustics' ``brightness_sersic``, R_e measured along the major
axis), I(R) = I_e exp(−b_n [(R/R_e)^{1/n} − 1]) with b_n from Ciotti & Bertin (1999); it is
parametrised by its total flux F = 2π n q R_e² I_e e^{b_n} b_n^{−2n} Γ(2n) (see
:func:`sersic_total_flux`).

Imaging (:class:`Instrument`): pixel centres at (i − 31.5)·0.05″, x along columns and y along rows
(``imshow(img, origin="lower")`` puts +x right and +y up). Each pixel is sampled by 2 × 2 rays; the
sub-pixel fluxes (surface brightness × sub-pixel area) are convolved with a Gaussian PSF of FWHM 0.1″
(≈ HST ACS/WFC3 in F814W) sampled on the sub-pixel grid, zero-padded, and summed per pixel
(:meth:`Instrument.imaging_matrix`), so pixel values are fluxes and an unlensed source's pixels sum
to F. Noise is N(0, σ²) per pixel with σ = 1, so pixel values read as per-pixel S/N (the peak
pixel has S/N 10–120 in 90 % of prior draws). Against a 12 × 12-sampled reference (200 prior draws),
2 × 2 sampling (paltas' ``supersampling_factor=2``) errs by 0.15σ rms per pixel, and the largest
pixel error of a draw has median 1.3σ, with a tail (6.5 % of draws > 10σ, at most 28σ) from the
central cusps of compact n ≳ 4 sources; 3 × 3 (``Instrument(supersample=3)``, half the speed)
gives 0.06σ rms, median 0.5σ and at most 10σ. Redshifts z_l = 0.5, z_s = 1.5 in caustics' flat
ΛCDM (h = 0.677, Ω_m = 0.31) enter only :meth:`LensSIE.velocity_dispersion`: images depend on θ_E.

Priors follow the main-deflector priors of paltas (Wagner-Carena et al. 2022, arXiv:2203.00690),
each truncated to a physical box (see :data:`LENS_PRIORS`, :data:`SHEAR_PRIORS`, :data:`SOURCE_PRIORS`).

:func:`lensing_operator` exposes the linear, differentiable map "pixelated source → lensed,
PSF-convolved image" for given lens parameters, for source reconstruction with learned priors.

Devices (convention in :mod:`simulators`): rendering, noise and likelihood run on θ's device; the
ray grid and the PSF imaging matrix are built per (dtype, device) and cached; the priors' samplers
draw on the generator's device, their parameters copied there once (cached).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from caustics.lenses.func import reduced_deflection_angle_external_shear, reduced_deflection_angle_sie
from caustics.light.func import brightness_sersic, k_sersic
from torch import Tensor
from torch.distributions import Distribution, constraints
from torch.distributions.utils import broadcast_all

from ._device import DeviceCache, DeviceSimulator, draw_device, randn

__all__ = [
    "Instrument",
    "IndependentPrior",
    "LENS_PRIORS",
    "LensSIE",
    "LensSIEShear",
    "LensingOperator",
    "LogUniform",
    "SHEAR_PRIORS",
    "SOURCE_PRIORS",
    "TruncatedNormal",
    "e1e2_to_qphi",
    "lensing_operator",
    "ray_trace",
    "render_sersic",
    "sersic_total_flux",
]

#: Core radius (arcsec) given to the SIE so that a ray through the lens centre deflects by 0
#: instead of 0/0 = NaN; it changes deflections by ≈ θ_E·s/r < 1e-7″ for r > 0.01″.
_SIE_CORE = 1e-9


# ---------------------------------------------------------------------------------------------
# Priors: 1-D marginals with generator-native samplers, and their product.
# ---------------------------------------------------------------------------------------------


class _OnDevice:
    """Mixin for distributions whose parameters live on the CPU: :meth:`_on` gives them on the
    device of a value (the original tensors on CPU; other devices cached)."""

    def _on(self, device: torch.device, *names: str) -> tuple[Tensor, ...]:
        cache = self.__dict__.get("_device_cache")
        if cache is None:
            cache = self.__dict__["_device_cache"] = DeviceCache()
        return tuple(cache.get(name, getattr(self, name), device) for name in names)


class _BoundedMarginal(_OnDevice, Distribution):
    """A 1-D distribution on the interval [low, high]."""

    low: Tensor
    high: Tensor

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self) -> constraints.Constraint:
        return constraints.interval(self.low, self.high)


class TruncatedNormal(_BoundedMarginal):
    r"""N(loc, scale²) restricted to [low, high]: p(x) = φ(z) / (scale · Z), z = (x − loc)/scale,
    Z = Φ(b) − Φ(a), a, b = (low − loc)/scale, (high − loc)/scale.

    Sampled by inverse CDF in float64, on whichever side of the mean keeps the CDF values small, so
    intervals far in a tail (up to ~35σ) sample correctly.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    has_rsample = False

    def __init__(self, loc: Any, scale: Any, low: Any, high: Any, validate_args: bool | None = None):
        self.loc, self.scale, self.low, self.high = broadcast_all(loc, scale, low, high)
        if not bool((self.low < self.high).all()):
            raise ValueError("TruncatedNormal: low must be < high")
        a = ((self.low - self.loc) / self.scale).double()
        b = ((self.high - self.loc) / self.scale).double()
        # Work on the side of the mode with the smaller CDF values (precision of 1 − Φ).
        self._flip = (a + b) > 0
        self._a = torch.where(self._flip, -b, a)
        self._b = torch.where(self._flip, -a, b)
        self._Z = _ndtr(self._b) - _ndtr(self._a)
        self._log_Z = self._Z.log().to(self.loc.dtype)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def log_prob(self, value: Tensor) -> Tensor:
        value = torch.as_tensor(value)
        loc, scale, low, high, log_z = self._on(value.device, "loc", "scale", "low", "high", "_log_Z")
        z = (value - loc) / scale
        lp = -0.5 * z**2 - scale.log() - 0.5 * math.log(2 * math.pi) - log_z
        inside = (value >= low) & (value <= high)
        return torch.where(inside, lp, torch.full_like(lp, -math.inf))

    def cdf(self, value: Tensor) -> Tensor:
        value = torch.as_tensor(value)
        loc, scale, flip, a, big_z = self._on(value.device, "loc", "scale", "_flip", "_a", "_Z")
        z = ((value - loc) / scale).double()
        z = torch.where(flip, -z, z)
        c = (_ndtr(z) - _ndtr(a)) / big_z
        c = torch.where(flip, 1 - c, c)
        return c.clamp(0, 1).to(self.loc.dtype)

    def icdf(self, value: Tensor) -> Tensor:
        u = torch.as_tensor(value).double()
        loc, scale, low, high, flip, a, big_z = self._on(u.device, "loc", "scale", "low", "high", "_flip", "_a", "_Z")
        u = torch.where(flip, 1 - u, u)
        z = torch.special.ndtri(_ndtr(a) + u * big_z)
        z = torch.where(flip, -z, z)
        x = loc.double() + scale.double() * z
        return torch.minimum(torch.maximum(x, low.double()), high.double()).to(self.loc.dtype)

    def sample(
        self, sample_shape: torch.Size | Sequence[int] = torch.Size(), generator: torch.Generator | None = None
    ) -> Tensor:
        """Draws on the generator's device (CPU when None)."""
        shape = self._extended_shape(torch.Size(sample_shape))
        u = torch.rand(shape, generator=generator, dtype=torch.float64, device=draw_device(generator))
        return self.icdf(u)

    @property
    def mean(self) -> Tensor:
        a, b = self._a, self._b
        m = (_phi(a) - _phi(b)) / self._Z
        m = torch.where(self._flip, -m, m)
        return (self.loc.double() + self.scale.double() * m).to(self.loc.dtype)

    @property
    def variance(self) -> Tensor:
        a, b = self._a, self._b
        m = (_phi(a) - _phi(b)) / self._Z
        v = 1 + (a * _phi(a) - b * _phi(b)) / self._Z - m**2
        return (self.scale.double() ** 2 * v).to(self.loc.dtype)

    def __repr__(self) -> str:
        args = f"loc={_fmt(self.loc)}, scale={_fmt(self.scale)}, low={_fmt(self.low)}, high={_fmt(self.high)}"
        return f"TruncatedNormal({args})"


class LogUniform(_BoundedMarginal):
    r"""p(x) = 1 / (x log(high/low)) on [low, high]: log x ~ U[log low, log high]."""

    arg_constraints = {"low": constraints.positive, "high": constraints.positive}
    has_rsample = False

    def __init__(self, low: Any, high: Any, validate_args: bool | None = None):
        self.low, self.high = broadcast_all(low, high)
        if not bool((self.low < self.high).all()):
            raise ValueError("LogUniform: low must be < high")
        super().__init__(self.low.shape, validate_args=validate_args)

    def log_prob(self, value: Tensor) -> Tensor:
        value = torch.as_tensor(value)
        low, high = self._on(value.device, "low", "high")
        lp = -value.log() - (high / low).log().log()
        inside = (value >= low) & (value <= high)
        return torch.where(inside, lp, torch.full_like(lp, -math.inf))

    def cdf(self, value: Tensor) -> Tensor:
        value = torch.as_tensor(value)
        low, high = self._on(value.device, "low", "high")
        return ((value.log() - low.log()) / (high / low).log()).clamp(0, 1)

    def icdf(self, value: Tensor) -> Tensor:
        value = torch.as_tensor(value)
        low, high = self._on(value.device, "low", "high")
        lo, hi = low.double().log(), high.double().log()
        x = torch.exp(lo + value.double() * (hi - lo))
        return torch.minimum(torch.maximum(x, low.double()), high.double()).to(self.low.dtype)

    def sample(
        self, sample_shape: torch.Size | Sequence[int] = torch.Size(), generator: torch.Generator | None = None
    ) -> Tensor:
        """Draws on the generator's device (CPU when None)."""
        shape = self._extended_shape(torch.Size(sample_shape))
        return self.icdf(torch.rand(shape, generator=generator, dtype=torch.float64, device=draw_device(generator)))

    @property
    def mean(self) -> Tensor:
        return (self.high - self.low) / (self.high / self.low).log()

    @property
    def variance(self) -> Tensor:
        return (self.high**2 - self.low**2) / (2 * (self.high / self.low).log()) - self.mean**2

    def __repr__(self) -> str:
        return f"LogUniform(low={_fmt(self.low)}, high={_fmt(self.high)})"


class IndependentPrior(Distribution):
    r"""Product of bounded 1-D marginals p(θ) = Π_d p_d(θ_d), event shape [D].

    Each marginal needs ``log_prob``, ``sample(shape, generator)``, ``mean``, ``variance`` and an
    interval ``support``; the product's support is the box of those intervals (so
    ``torch.distributions.biject_to`` and :meth:`Simulator.check_theta` work per parameter).
    ``log_prob`` is −inf outside the box instead of raising.
    """

    arg_constraints: dict[str, constraints.Constraint] = {}
    has_rsample = False

    def __init__(self, marginals: Sequence[Distribution], names: Sequence[str] | None = None):
        self.marginals = list(marginals)
        d = len(self.marginals)
        self.names = list(names) if names is not None else [f"theta{i + 1}" for i in range(d)]
        bound = lambda m, side: torch.as_tensor(getattr(m.support, side), dtype=torch.float32)  # noqa: E731
        self._low = torch.stack([bound(m, "lower_bound") for m in self.marginals])
        self._high = torch.stack([bound(m, "upper_bound") for m in self.marginals])
        super().__init__(torch.Size(), torch.Size([len(self.marginals)]), validate_args=False)

    @property
    def support(self) -> constraints.Constraint:
        return constraints.independent(constraints.interval(self._low, self._high), 1)

    def log_prob(self, value: Tensor) -> Tensor:
        value = torch.as_tensor(value)
        return sum(m.log_prob(value[..., i]) for i, m in enumerate(self.marginals))

    def sample(
        self, sample_shape: torch.Size | Sequence[int] = torch.Size(), generator: torch.Generator | None = None
    ) -> Tensor:
        return torch.stack([m.sample(sample_shape, generator=generator) for m in self.marginals], dim=-1)

    @property
    def mean(self) -> Tensor:
        return torch.stack([torch.as_tensor(m.mean, dtype=torch.float32) for m in self.marginals])

    @property
    def variance(self) -> Tensor:
        return torch.stack([torch.as_tensor(m.variance, dtype=torch.float32) for m in self.marginals])

    def __repr__(self) -> str:
        inner = ", ".join(f"{n} ~ {m!r}" for n, m in zip(self.names, self.marginals))
        return f"IndependentPrior({inner})"


def _ndtr(z: Tensor) -> Tensor:
    """Φ(z), accurate in the lower tail (``torch.special.ndtr`` underflows to 0 below z ≈ −8.3)."""
    return 0.5 * torch.special.erfc(-z / math.sqrt(2))


def _phi(z: Tensor) -> Tensor:
    return torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)


def _fmt(t: Tensor) -> str:
    return f"{t.item():g}" if t.numel() == 1 else str([round(v, 6) for v in t.reshape(-1).tolist()])


class _Param(NamedTuple):
    prior: Callable[[], Distribution]
    label: str
    unit: str


#: Main-deflector priors of paltas (Wagner-Carena et al. 2022) for an SIE (γ_PEMD = 2), each
#: truncated at ±5σ (θ_E to [0.5″, 2″]: −4σ/+6σ, keeping the ring inside the 3.2″ field);
#: the truncations remove < 1e-4 of each marginal's mass and keep |e| < 0.71, i.e. q > 0.17.
LENS_PRIORS: dict[str, _Param] = {
    "theta_E": _Param(lambda: TruncatedNormal(1.1, 0.15, 0.5, 2.0), r"$\theta_\mathrm{E}$", "arcsec"),
    "e1": _Param(lambda: TruncatedNormal(0.0, 0.1, -0.5, 0.5), r"$e_1$", ""),
    "e2": _Param(lambda: TruncatedNormal(0.0, 0.1, -0.5, 0.5), r"$e_2$", ""),
    "x0": _Param(lambda: TruncatedNormal(0.0, 0.16, -0.8, 0.8), r"$x_0$", "arcsec"),
    "y0": _Param(lambda: TruncatedNormal(0.0, 0.16, -0.8, 0.8), r"$y_0$", "arcsec"),
}

#: External shear N(0, 0.05²) per component (paltas), truncated at ±5σ.
SHEAR_PRIORS: dict[str, _Param] = {
    "gamma1": _Param(lambda: TruncatedNormal(0.0, 0.05, -0.25, 0.25), r"$\gamma_1$", ""),
    "gamma2": _Param(lambda: TruncatedNormal(0.0, 0.05, -0.25, 0.25), r"$\gamma_2$", ""),
}

#: Sérsic source: centre as paltas' source centre N(0, 0.16″²), ellipticity N(0, 0.1²), half-light
#: radius TN(0.3″, 0.1″) on [0.1″, 0.8″] (resolved by 0.05″ pixels), index TN(3, 0.5) on [1, 5], total
#: flux log-uniform on [300, 3000] (pixel-value units, i.e. σ_noise: peak pixel S/N ≈ 10–120).
SOURCE_PRIORS: dict[str, _Param] = {
    "src_x": _Param(lambda: TruncatedNormal(0.0, 0.16, -0.8, 0.8), r"$x_\mathrm{s}$", "arcsec"),
    "src_y": _Param(lambda: TruncatedNormal(0.0, 0.16, -0.8, 0.8), r"$y_\mathrm{s}$", "arcsec"),
    "src_e1": _Param(lambda: TruncatedNormal(0.0, 0.1, -0.5, 0.5), r"$e_{1,\mathrm{s}}$", ""),
    "src_e2": _Param(lambda: TruncatedNormal(0.0, 0.1, -0.5, 0.5), r"$e_{2,\mathrm{s}}$", ""),
    "src_Re": _Param(lambda: TruncatedNormal(0.3, 0.1, 0.1, 0.8), r"$R_\mathrm{e}$", "arcsec"),
    "src_n": _Param(lambda: TruncatedNormal(3.0, 0.5, 1.0, 5.0), r"$n_\mathrm{s}$", ""),
    "src_flux": _Param(lambda: LogUniform(300.0, 3000.0), r"$F_\mathrm{s}$", ""),
}


# ---------------------------------------------------------------------------------------------
# Physics: conventions, ray tracing, Sérsic rendering, PSF.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instrument:
    """Detector and optics: ``pixels``² pixels of ``pixel_scale`` arcsec, a Gaussian PSF of FWHM
    ``psf_fwhm`` arcsec (0 = none), N(0, ``noise_std``²) pixel noise, ``supersample``² ray-traced
    samples per pixel."""

    pixels: int = 64
    pixel_scale: float = 0.05
    psf_fwhm: float = 0.1
    noise_std: float = 1.0
    supersample: int = 2

    @property
    def fov(self) -> float:
        """Field of view (arcsec), one side."""
        return self.pixels * self.pixel_scale

    def grid(
        self, dtype: torch.dtype = torch.float32, device: Any = None, supersample: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Sub-pixel centres ``(x, y)``, each ``[n·s, n·s]`` (rows ↔ y, columns ↔ x), arcsec."""
        s = self.supersample if supersample is None else supersample
        return _grid(self.pixels, self.pixel_scale, s, dtype, torch.device(device or "cpu"))

    def imaging_matrix(self, dtype: torch.dtype = torch.float32, device: Any = None) -> Tensor:
        r"""The separable imaging operator ``A`` [n, n·s]: PSF-convolve the sub-pixel fluxes, then sum
        each s × s block, so that the image is ``A @ F @ Aᵀ`` for sub-pixel fluxes ``F`` [n·s, n·s].

        A[i, k] = Σ_{j = i·s}^{i·s + s − 1} g(j − k), with g the Gaussian sampled at sub-pixel
        offsets, truncated at ⌈4σ⌉ and normalised to unit sum (the midpoint rule for the PSF
        integral over each sub-pixel); zero padding, so no light enters from outside the field."""
        fwhm = self.psf_fwhm / self.pixel_scale
        return _imaging_matrix(self.pixels, self.supersample, fwhm, dtype, torch.device(device or "cpu"))


@functools.lru_cache(maxsize=16)
def _grid(n: int, scale: float, s: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    m = n * s
    c = (torch.arange(m, dtype=torch.float64) - (m - 1) / 2) * (scale / s)
    y, x = torch.meshgrid(c, c, indexing="ij")
    return x.to(dtype=dtype, device=device), y.to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=16)
def _imaging_matrix(n: int, s: int, fwhm_pix: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    m = n * s
    j = torch.arange(m)
    off = j[:, None] - j[None, :]  # [sub-pixel out, sub-pixel in]
    if fwhm_pix > 0:
        sigma = fwhm_pix * s / (2 * math.sqrt(2 * math.log(2)))  # in sub-pixels
        half = max(1, math.ceil(4 * sigma))
        g = torch.exp(-0.5 * (torch.arange(-half, half + 1, dtype=torch.float64) / sigma) ** 2)
        g = g / g.sum()
        zero = torch.zeros((), dtype=torch.float64)
        conv = torch.where(off.abs() <= half, g[(off + half).clamp(0, 2 * half)], zero)
    else:
        conv = (off == 0).double()
    a = conv.reshape(n, s, m).sum(1)  # sum the s sub-pixels of each pixel
    return a.to(dtype=dtype, device=device)


def _image(sb: Tensor, instrument: Instrument) -> Tensor:
    """Sub-pixel surface brightness ``[B, n·s, n·s]`` → pixel fluxes ``[B, n, n]`` through the PSF."""
    a = instrument.imaging_matrix(sb.dtype, sb.device)
    area = (instrument.pixel_scale / instrument.supersample) ** 2
    return a @ (sb * area) @ a.T


def _safe_norm(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(√(a² + b²), mask of nonzero): gradients stay finite at a = b = 0 (double-where)."""
    r2 = a**2 + b**2
    nz = r2 > 0
    return torch.where(nz, torch.sqrt(torch.where(nz, r2, torch.ones_like(r2))), torch.zeros_like(r2)), nz


def e1e2_to_qphi(e1: Tensor, e2: Tensor) -> tuple[Tensor, Tensor]:
    r"""Ellipticity components → (axis ratio q, major-axis angle φ from +x, counter-clockwise):
    q = (1 − |e|)/(1 + |e|), φ = ½ atan2(e₂, e₁) (lenstronomy; caustics ``angle_system="e1_e2"``).
    |e| is clamped to 0.999 (q ≥ 5e-4); at e = 0, φ = 0 with finite gradients."""
    c, nz = _safe_norm(e1, e2)
    c = c.clamp(max=0.999)
    q = (1 - c) / (1 + c)
    phi = torch.where(nz, 0.5 * torch.atan2(e2, torch.where(nz, e1, torch.ones_like(e1))), torch.zeros_like(e1))
    return q, phi


def sersic_total_flux(I_e: Any, R_e: Any, n: Any, q: Any = 1.0) -> Tensor:
    r"""Total flux of the elliptical Sérsic profile, F = 2π n q R_e² I_e e^{b_n} b_n^{−2n} Γ(2n)
    (Graham & Driver 2005; R_e along the major axis), with b_n = caustics' ``k_sersic(n)``."""
    I_e, R_e, n, q = broadcast_all(I_e, R_e, n, q)
    b = k_sersic(n)
    log_f = math.log(2 * math.pi) + n.log() + q.log() + 2 * R_e.log() + b - 2 * n * b.log() + torch.lgamma(2 * n)
    return I_e * log_f.exp()


class _Lens(NamedTuple):
    theta_E: Tensor
    q: Tensor
    phi: Tensor
    x0: Tensor
    y0: Tensor
    gamma1: Tensor | None
    gamma2: Tensor | None


def _lens(theta_E: Any, e1: Any, e2: Any, x0: Any, y0: Any, gamma1: Any, gamma2: Any, like: Tensor) -> _Lens:
    as_b = lambda v: torch.as_tensor(v, dtype=like.dtype, device=like.device).reshape(-1, 1, 1)  # noqa: E731
    q, phi = e1e2_to_qphi(as_b(e1), as_b(e2))
    shear = gamma1 is not None or gamma2 is not None
    g1 = as_b(0.0 if gamma1 is None else gamma1) if shear else None
    g2 = as_b(0.0 if gamma2 is None else gamma2) if shear else None
    return _Lens(as_b(theta_E), q, phi, as_b(x0), as_b(y0), g1, g2)


def _trace(lens: _Lens, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    ax, ay = reduced_deflection_angle_sie(lens.x0, lens.y0, lens.q, lens.phi, lens.theta_E, x, y, s=_SIE_CORE)
    if lens.gamma1 is not None:
        gx, gy = reduced_deflection_angle_external_shear(0.0, 0.0, lens.gamma1, lens.gamma2, x, y)
        ax, ay = ax + gx, ay + gy
    return x - ax, y - ay


def ray_trace(
    x: Tensor,
    y: Tensor,
    theta_E: Any,
    e1: Any = 0.0,
    e2: Any = 0.0,
    x0: Any = 0.0,
    y0: Any = 0.0,
    gamma1: Any = None,
    gamma2: Any = None,
) -> tuple[Tensor, Tensor]:
    r"""Source-plane positions β = θ − α(θ) (arcsec) of image-plane positions ``x, y [...]`` for
    lens parameters of shape [B] (or scalars); returns ``[B, ...]`` each."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    lens = _lens(theta_E, e1, e2, x0, y0, gamma1, gamma2, like=x)
    pad = (-1,) + (1,) * x.ndim
    lens = _Lens(*(None if t is None else t.reshape(pad) for t in lens))
    return _trace(lens, x, y)


def _sersic(bx: Tensor, by: Tensor, src: Tensor) -> Tensor:
    """Sérsic surface brightness at ``bx, by [B, ...]`` for ``src [B, 7]`` = (x, y, e1, e2, R_e, n, F)."""
    pad = (-1,) + (1,) * (bx.ndim - 1)
    sx, sy, se1, se2, re, n, flux = (src[:, i].reshape(pad) for i in range(7))
    q, phi = e1e2_to_qphi(se1, se2)
    i_e = flux / sersic_total_flux(1.0, re, n, q)
    return brightness_sersic(sx, sy, q, phi, n, re, i_e, bx, by, k_sersic(n))


def render_sersic(
    lens_params: dict[str, Tensor],
    source_params: Tensor,
    instrument: Instrument = Instrument(),
) -> Tensor:
    r"""Noiseless image ``[B, n, n]`` (flux per pixel) of a Sérsic source ``source_params [B, 7]``
    = (src_x, src_y, src_e1, src_e2, src_Re, src_n, src_flux) behind the lens ``lens_params`` (keys
    theta_E, e1, e2, x0, y0 and optionally gamma1, gamma2; tensors [B]). θ_E = 0 images the source
    unlensed; ``Instrument(psf_fwhm=0)`` turns the PSF off. Not chunked: see :meth:`LensSIE.render`
    for large batches."""
    src = torch.as_tensor(source_params)
    dtype = src.dtype if src.is_floating_point() else torch.float32
    src = src.to(dtype)
    x, y = instrument.grid(dtype, src.device)
    lens = _lens(
        lens_params["theta_E"], lens_params.get("e1", 0.0), lens_params.get("e2", 0.0),
        lens_params.get("x0", 0.0), lens_params.get("y0", 0.0),
        lens_params.get("gamma1"), lens_params.get("gamma2"), like=src,
    )  # fmt: skip
    bx, by = _trace(lens, x, y)
    return _image(_sersic(bx, by, src), instrument)


# ---------------------------------------------------------------------------------------------
# The forward operator for pixelated sources.
# ---------------------------------------------------------------------------------------------


class LensingOperator:
    r"""Linear, differentiable map from a pixelated source to the lensed, PSF-convolved image.

    The source is ``[B, N_s, N_s]`` (rows ↔ y, columns ↔ x) of fluxes per source pixel of
    ``source_pixel_scale`` = Δ_s arcsec, centred on the optical axis: pixel (i, j) is centred at
    ((j − (N_s−1)/2)·Δ_s, (i − (N_s−1)/2)·Δ_s) and the grid spans ±N_s·Δ_s/2 (default 64 × 0.04″:
    ±1.28″, which holds the source-plane footprint of the arcs for the prior's lenses and sources).
    The surface brightness (value / Δ_s²) is interpolated bilinearly (``grid_sample``, zero outside
    the grid) at the ray-traced sub-pixel positions and imaged exactly as analytic sources are
    (sub-pixel area, PSF, sum per pixel: :meth:`Instrument.imaging_matrix`), so ``op(source)``
    reproduces :func:`render_sersic` up to the interpolation error, ∝ Δ_s²: for a 0.3″, n = 1 source
    ≤ 5 % of the peak on the default grid and ≤ 1.2 % on 128 × 0.02″. Lens batch B_l and source
    batch B broadcast (either may be 1).
    """

    def __init__(
        self, bx: Tensor, by: Tensor, instrument: Instrument, source_pixels: int, source_pixel_scale: float
    ) -> None:
        self.instrument = instrument
        self.source_pixels = int(source_pixels)
        self.source_pixel_scale = float(source_pixel_scale)
        half = self.source_pixels * self.source_pixel_scale / 2
        self._grid = torch.stack([bx / half, by / half], dim=-1)  # [B_l, m, m, 2], align_corners=False

    @property
    def extent(self) -> float:
        """Half-width (arcsec) of the source grid."""
        return self.source_pixels * self.source_pixel_scale / 2

    def source_grid(self) -> tuple[Tensor, Tensor]:
        """Source-pixel centres ``(x, y)`` ``[N_s, N_s]`` (arcsec)."""
        return _grid(self.source_pixels, self.source_pixel_scale, 1, self._grid.dtype, self._grid.device)

    def __call__(self, source: Tensor) -> Tensor:
        if source.ndim == 2:
            source = source.unsqueeze(0)
        if source.shape[-2:] != (self.source_pixels, self.source_pixels):
            n = self.source_pixels
            raise ValueError(f"expected a source [B, {n}, {n}], got {list(source.shape)}")
        grid = self._grid.to(source.dtype)
        b = max(source.shape[0], grid.shape[0])
        if grid.shape[0] not in (1, b) or source.shape[0] not in (1, b):
            raise ValueError(f"lens batch {grid.shape[0]} and source batch {source.shape[0]} do not broadcast")
        sb = F.grid_sample(
            source.unsqueeze(1).expand(b, 1, -1, -1), grid.expand(b, -1, -1, -1),
            mode="bilinear", padding_mode="zeros", align_corners=False,
        )[:, 0]  # fmt: skip
        return _image(sb / self.source_pixel_scale**2, self.instrument)


def lensing_operator(
    theta_E: Any,
    e1: Any = 0.0,
    e2: Any = 0.0,
    x0: Any = 0.0,
    y0: Any = 0.0,
    gamma1: Any = None,
    gamma2: Any = None,
    *,
    source_pixels: int = 64,
    source_pixel_scale: float = 0.04,
    instrument: Instrument = Instrument(),
    dtype: torch.dtype = torch.float32,
    device: Any = None,
) -> LensingOperator:
    r"""The operator ``source [B, N_s, N_s] → image [B, n, n]`` for the lens (parameters [B] or
    scalars; see :class:`LensingOperator` for the source-plane convention). The rays are traced
    once, here; calling the operator costs one ``grid_sample`` and the PSF convolution."""
    x, y = instrument.grid(dtype, device)
    lens = _lens(theta_E, e1, e2, x0, y0, gamma1, gamma2, like=x)
    bx, by = _trace(lens, x, y)
    return LensingOperator(bx, by, instrument, source_pixels, source_pixel_scale)


# ---------------------------------------------------------------------------------------------
# Simulators.
# ---------------------------------------------------------------------------------------------


class LensSIE(DeviceSimulator):
    r"""SIE lens + Sérsic source, 64 × 64 HST-like image: x = render(θ) + N(0, σ² I), σ = 1.

    θ = (theta_E, e1, e2, x0, y0, src_x, src_y, src_e1, src_e2, src_Re, src_n, src_flux); priors
    in :data:`LENS_PRIORS` and :data:`SOURCE_PRIORS`; log p(x | θ) = log N(x; render(θ), σ² I).
    """

    name = "lens_sie"
    version = "1"
    instrument: Instrument = Instrument()
    z_lens: float = 0.5
    z_source: float = 1.5
    #: Images rendered per vectorised step: small chunks keep the [chunk, 128, 128] intermediates
    #: in cache (3–4× faster on CPU than one batch of 1000).
    chunk_size: int = 32
    _params: dict[str, _Param] = {**LENS_PRIORS, **SOURCE_PRIORS}

    def __init__(self) -> None:
        self.parameter_names = tuple(self._params)
        self.prior = IndependentPrior([p.prior() for p in self._params.values()], self.parameter_names)
        self._index = {k: i for i, k in enumerate(self.parameter_names)}
        self._src_cols = [self._index[k] for k in SOURCE_PRIORS]

    @property
    def parameter_labels(self) -> list[str]:
        return [p.label for p in self._params.values()]

    @property
    def parameter_units(self) -> list[str]:
        return [p.unit for p in self._params.values()]

    @property
    def observation_shape(self) -> tuple[int, ...]:
        return (self.instrument.pixels, self.instrument.pixels)

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.prior.sample((n,), generator=generator).to(torch.float32)

    def lens_params(self, theta: Tensor) -> dict[str, Tensor]:
        """The lens columns of ``theta [B, D]`` by name (theta_E, e1, e2, x0, y0[, gamma1, gamma2])."""
        return {k: theta[:, self._index[k]] for k in self._params if k not in SOURCE_PRIORS}

    def render(self, theta: Tensor) -> Tensor:
        """Noiseless image ``[B, n, n]`` in θ's float dtype (float32 for other dtypes);
        differentiable in θ. Any θ is rendered, inside the prior or not (θ_E = 0: unlensed)."""
        theta = torch.as_tensor(theta)
        if not theta.is_floating_point():
            theta = theta.float()
        if theta.ndim == 1:
            theta = theta.unsqueeze(0)
        out = []
        for chunk in theta.split(self.chunk_size):
            lens = self.lens_params(chunk)
            out.append(render_sersic(lens, chunk[:, self._src_cols], self.instrument))
        if not out:
            n = self.instrument.pixels
            return theta.new_zeros(0, n, n)
        return torch.cat(out)

    def simulate(self, theta: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mu = self.render(torch.as_tensor(theta, dtype=torch.float32))
        noise = randn(mu.shape, generator=generator, device=mu.device)
        return mu + self.instrument.noise_std * noise

    def log_likelihood(self, theta: Tensor, x: Tensor) -> Tensor:
        r"""log N(x; render(θ), σ² I) = −½ Σ_pix (x − μ)²/σ² − (N_pix/2) log(2πσ²), ``[B]``;
        θ ``[B, D]`` and x ``[B, n, n]`` broadcast over B (either may be 1 or unbatched)."""
        theta = torch.as_tensor(theta)
        x = torch.as_tensor(x)
        dtype = torch.promote_types(theta.dtype, x.dtype) if theta.is_floating_point() else torch.float32
        mu = self.render(theta.to(dtype))
        x = x.to(dtype)
        if x.ndim == 2:
            x = x.unsqueeze(0)
        sigma = self.instrument.noise_std
        chi2 = ((x - mu) ** 2).sum((-2, -1), dtype=torch.float64).to(dtype) / sigma**2
        n_pix = mu.shape[-1] * mu.shape[-2]
        return -0.5 * chi2 - 0.5 * n_pix * math.log(2 * math.pi * sigma**2)

    def lensing_operator(self, theta: Tensor, **kwargs: Any) -> LensingOperator:
        """:func:`lensing_operator` for the lens columns of ``theta [B, D]`` (source columns ignored),
        on θ's device unless ``device`` is given."""
        theta = torch.as_tensor(theta, dtype=torch.float32)
        if theta.ndim == 1:
            theta = theta.unsqueeze(0)
        kwargs.setdefault("device", theta.device)
        return lensing_operator(**self.lens_params(theta), instrument=self.instrument, **kwargs)

    def velocity_dispersion(self, theta_E: Any) -> Tensor:
        r"""SIS-equivalent velocity dispersion (km/s), θ_E = 4π (σ_v/c)² D_ls/D_s, at z_l, z_s in
        caustics' flat ΛCDM."""
        per_sigma2 = _einstein_per_sigma2(self.z_lens, self.z_source)
        return (torch.as_tensor(theta_E, dtype=torch.float64) / per_sigma2).sqrt()


class LensSIEShear(LensSIE):
    r"""As :class:`LensSIE` plus external shear (γ₁, γ₂) about the origin:
    θ = (theta_E, e1, e2, x0, y0, gamma1, gamma2, src_x, src_y, src_e1, src_e2, src_Re, src_n, src_flux)."""

    name = "lens_sie_shear"
    version = "1"
    _params = {**LENS_PRIORS, **SHEAR_PRIORS, **SOURCE_PRIORS}


@functools.lru_cache(maxsize=8)
def _einstein_per_sigma2(z_l: float, z_s: float) -> float:
    """θ_E (arcsec) per (km/s)² of σ_v for an SIS."""
    from caustics.constants import c_km_s, rad_to_arcsec
    from caustics.cosmology import FlatLambdaCDM

    zl, zs = torch.tensor(z_l, dtype=torch.float64), torch.tensor(z_s, dtype=torch.float64)
    with warnings.catch_warnings():  # caustics' distance table trips a NumPy 2 DeprecationWarning
        warnings.simplefilter("ignore", DeprecationWarning)
        cosmo = FlatLambdaCDM()
        d_s = float(cosmo.angular_diameter_distance(zs))
        d_ls = float(cosmo.angular_diameter_distance_z1z2(zl, zs))
    return float(rad_to_arcsec) * 4 * math.pi * d_ls / d_s / float(c_km_s) ** 2
