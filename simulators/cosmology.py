r"""Projected (2D) cosmological density fields with an exact likelihood.

* Linear matter power spectrum ``P(k) = A k^{n_s} T(k)²`` in (Mpc/h)³ with ``k`` in h/Mpc, where
  ``T`` is the Eisenstein & Hu (1998, ApJ 496, 605) no-wiggle ("zero-baryon" shape with
  baryon suppression) transfer function, their eqs. 26–31, and ``A`` is fixed by σ_8:
  ``σ²(R) = (1/2π²) ∫ k³ P(k) W²(kR) d ln k`` with ``W(x) = 3(sin x − x cos x)/x³``,
  ``R = 8`` Mpc/h, by a fixed Simpson rule in ln k (batched over parameters).
* A slab of depth ``L_z`` projects to ``P_2D(k) = P(k) / L_z`` in (Mpc/h)².
* The field lives on an ``N × N`` grid of side ``L`` (pixel area ``A_pix = (L/N)²``); it is a
  zero-mean stationary Gaussian with circulant covariance ``C = F⁻¹ diag(λ) F`` whose eigenvalues
  are ``λ_k = P_2D(|k|) / A_pix`` (``λ_0 = 0``). With the unnormalised DFT
  ``δ̂_k = Σ_x δ_x e^{−ik·x}`` this means ``⟨|δ̂_k|²⟩ = N² λ_k``, i.e. the estimator
  ``P̂(k) = |δ̂_k|² A_pix / N²`` is unbiased for ``P_2D(k)`` and the pixel variance is
  ``σ² = Σ_k λ_k / N² = Σ_k P_2D(k) / L²``.
* Simulation: ``δ = irfft2(√λ · rfft2(w))`` with white noise ``w ~ N(0, I)`` in real space, i.e.
  exactly ``δ = C^{1/2} w`` (every Hermitian/Nyquist constraint is inherited from ``w``).

``cosmo_gaussian`` observes ``δ``. ``cosmo_lognormal`` observes ``δ = e^g / ⟨e^g⟩ − 1`` with ``g``
the Gaussian field above and ``⟨·⟩`` the mean over the field's pixels (the mean density is
estimated from the field itself, as in a survey); ``⟨e^g⟩ ≈ e^{σ_g²/2}`` so this is the usual
``e^{g − σ_g²/2} − 1`` up to the per-field normalisation. Both observations have zero mean.

Likelihood (both simulators). The k = 0 mode carries no information (the observation has zero
mean by construction), so the densities are with respect to Lebesgue measure on the zero-mean
hyperplane ``{Σ x = 0}`` (orthonormal coordinates), dimension ``N² − 1``:

    log p(δ | θ) = −½ Σ_{k ≠ 0} [ |δ̂_k|² / (N² λ_k) + log(2π λ_k) ],

the sum over the full k plane (in rfft2 layout the columns k_y = 0 and, for even N, k_y = N/2
count once, the others twice). For the lognormal field, ``g = P⊥ log(1 + δ)`` (``P⊥`` removes the
mean) is a bijection of the hyperplane onto itself with log-Jacobian ``−Σ log(1 + δ)`` (matrix
determinant lemma; ``Σ δ = 0``), so ``log p(δ | θ) = log p_G(P⊥ log(1 + δ) | θ) − Σ log(1 + δ)``.
With ``mean_density="ensemble"`` the lognormal field is instead ``e^{g − σ_g²/2} − 1`` exactly as
written in most papers; its mean is then not zero and ``⟨log(1 + δ)⟩ = −σ_g²/2`` pins σ_g²(θ)
exactly, so no proper density exists: ``log_likelihood`` then returns the (exact) likelihood of
the statistic ``P⊥ log(1 + δ)`` plus the same Jacobian term, which ignores that one number.

Devices (convention in :mod:`simulators`): the functions and simulators run on the device of
their inputs; the ln k quadrature rule and the simulators' k-grid tables are copied there once
and cached per device.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor
from torch.distributions import Independent, Uniform

from ._device import DeviceCache, DeviceSimulator, draw_device, randn

__all__ = [
    "CosmoGaussian",
    "CosmoLognormal",
    "binned_power",
    "eh98_nowiggle_transfer",
    "linear_power",
    "sigma_r",
    "tophat_window",
]

OMEGA_B = 0.049
HUBBLE = 0.6711
N_S = 0.9624
T_CMB = 2.7255
_LOG_K_RANGE = (math.log(1e-4), math.log(20.0))  # h/Mpc, for the σ_R quadrature
_N_QUAD = 257  # odd: composite Simpson; relative error of σ_8 ~1e-6 over the prior


def _as64(v: Tensor | float) -> Tensor:
    return torch.as_tensor(v, dtype=torch.float64)


def eh98_nowiggle_transfer(
    k: Tensor | float,
    omega_m: Tensor | float,
    omega_b: float = OMEGA_B,
    h: float = HUBBLE,
    t_cmb: float = T_CMB,
) -> Tensor:
    r"""Eisenstein & Hu (1998) no-wiggle transfer function ``T(k)``, ``k`` in h/Mpc (eqs. 26–31).

    ``s = 44.5 ln(9.83/ω_m) / √(1 + 10 ω_b^{3/4})`` Mpc,
    ``α_Γ = 1 − 0.328 ln(431 ω_m) f_b + 0.38 ln(22.3 ω_m) f_b²``,
    ``Γ = Ω_m h [α_Γ + (1 − α_Γ) / (1 + (0.43 k h s)⁴)]``, ``q = k Θ²_{2.7} / Γ``,
    ``T = L₀ / (L₀ + C₀ q²)``, ``L₀ = ln(2e + 1.8 q)``, ``C₀ = 14.2 + 731 / (1 + 62.5 q)``,
    with ``ω = Ω h²``, ``f_b = Ω_b/Ω_m``. Broadcasts ``k`` against ``omega_m``; float64.
    """
    k, omega_m = _as64(k), _as64(omega_m)
    wm, wb, fb = omega_m * h**2, omega_b * h**2, omega_b / omega_m
    s = 44.5 * torch.log(9.83 / wm) / math.sqrt(1.0 + 10.0 * wb**0.75)
    alpha = 1.0 - 0.328 * torch.log(431.0 * wm) * fb + 0.38 * torch.log(22.3 * wm) * fb**2
    ks2 = (0.43 * h * s * k) ** 2
    gamma = omega_m * h * (alpha + (1.0 - alpha) / (1.0 + ks2 * ks2))
    q = k * (t_cmb / 2.7) ** 2 / gamma
    l0 = torch.log(2.0 * math.e + 1.8 * q)
    c0 = 14.2 + 731.0 / (1.0 + 62.5 * q)
    return l0 / (l0 + c0 * q**2)


def tophat_window(x: Tensor) -> Tensor:
    r"""Fourier transform of a 3D top hat, ``W(x) = 3 (sin x − x cos x) / x³`` (series for small x)."""
    small = x.abs() < 1e-3
    xs = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1.0 - x**2 / 10.0, 3.0 * (torch.sin(xs) - xs * torch.cos(xs)) / xs**3)


def _simpson_weights(n: int, dx: float) -> Tensor:
    w = torch.ones(n, dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return w * dx / 3.0


_LNK = torch.linspace(*_LOG_K_RANGE, _N_QUAD, dtype=torch.float64)
_QW = _simpson_weights(_N_QUAD, (_LOG_K_RANGE[1] - _LOG_K_RANGE[0]) / (_N_QUAD - 1))
_QUAD_CACHE = DeviceCache()


def _quadrature(device: torch.device) -> tuple[Tensor, Tensor]:
    """The ln k nodes and Simpson weights of the σ_R rule on ``device`` (the CPU originals on CPU)."""
    return _QUAD_CACHE.get("lnk", _LNK, device), _QUAD_CACHE.get("qw", _QW, device)


def sigma_r(
    omega_m: Tensor | float,
    radius: float = 8.0,
    amplitude: Tensor | float = 1.0,
    omega_b: float = OMEGA_B,
    h: float = HUBBLE,
    n_s: float = N_S,
    t_cmb: float = T_CMB,
) -> Tensor:
    r"""``σ(R)`` of ``P(k) = amplitude · k^{n_s} T(k)²`` for top hats of radius ``R`` Mpc/h:
    ``σ² = (1/2π²) ∫ k³ P W²(kR) d ln k`` by Simpson's rule on 257 points in ln k ∈ [10⁻⁴, 20]
    (relative error ~10⁻⁶ at R = 8, ≲ 10⁻⁵ for 2 ≤ R ≤ 32). ``omega_m`` of any shape ``S``
    gives ``S``; float64."""
    omega_m = _as64(omega_m)
    lnk, qw = _quadrature(omega_m.device)
    k = torch.exp(lnk)
    weight = qw * k ** (3.0 + n_s) * tophat_window(k * radius) ** 2 / (2.0 * math.pi**2)
    t = eh98_nowiggle_transfer(k, omega_m.unsqueeze(-1), omega_b, h, t_cmb)
    return torch.sqrt((t**2 * weight).sum(-1) * _as64(amplitude))


def linear_power(
    k: Tensor | float,
    omega_m: Tensor | float,
    sigma_8: Tensor | float,
    omega_b: float = OMEGA_B,
    h: float = HUBBLE,
    n_s: float = N_S,
    t_cmb: float = T_CMB,
) -> Tensor:
    r"""Linear matter power spectrum ``P(k)`` in (Mpc/h)³ at z = 0, ``k`` in h/Mpc:
    ``P = (σ_8 / σ_8^{(A=1)})² k^{n_s} T(k)²``. ``omega_m`` and ``sigma_8`` broadcast together to
    a shape ``S`` which then broadcasts against ``k`` (pass ``omega_m[:, None]`` and ``k [K]`` for
    ``[B, K]``); float64."""
    omega_m, sigma_8, k = _as64(omega_m), _as64(sigma_8), _as64(k)
    omega_m, sigma_8 = torch.broadcast_tensors(omega_m, sigma_8)
    amp = (sigma_8 / sigma_r(omega_m, 8.0, 1.0, omega_b, h, n_s, t_cmb)) ** 2
    return amp * k**n_s * eh98_nowiggle_transfer(k, omega_m, omega_b, h, t_cmb) ** 2


def binned_power(field: Tensor, box: float, edges: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    r"""Binned power spectrum of real fields ``[..., N, N]`` on a box of side ``box``:
    ``P̂(k) = |δ̂_k|² A_pix / N²`` averaged over the modes with ``edges[i] ≤ |k| < edges[i+1]``
    (full k plane, k = 0 excluded; default edges: ``N/2`` linear bins of width ``2π/box``).
    Returns ``(k_mean [n_bins], P [..., n_bins], counts [n_bins])`` (float64)."""
    n, dev = field.shape[-1], field.device
    kx = torch.fft.fftfreq(n, d=box / n, dtype=torch.float64, device=dev) * 2 * math.pi
    kmag = torch.sqrt(kx[:, None] ** 2 + kx[None, :] ** 2)
    if edges is None:
        edges = (torch.arange(n // 2 + 1, dtype=torch.float64, device=dev) + 0.5) * (2 * math.pi / box)
    edges = torch.as_tensor(edges, dtype=torch.float64, device=dev)
    p = torch.fft.fft2(field.to(torch.float64)).abs() ** 2 * (box / n) ** 2 / n**2
    idx = torch.bucketize(kmag, edges, right=True) - 1  # bin i: edges[i] <= k < edges[i+1]
    nb = len(edges) - 1
    ok = (idx >= 0) & (idx < nb) & (kmag > 0)
    onehot = torch.nn.functional.one_hot(idx.clamp(0, nb - 1), nb).to(torch.float64) * ok[..., None]
    counts = onehot.sum((0, 1))
    kmean = (onehot * kmag[..., None]).sum((0, 1)) / counts
    pb = torch.einsum("...ij,ijb->...b", p, onehot) / counts
    return kmean, pb, counts


class _CosmoField(DeviceSimulator):
    """Shared grid, prior, spectrum and Gaussian likelihood of the projected-field simulators."""

    version = "1"
    parameter_names = ("Omega_m", "sigma_8")
    #: preferred NPE embedding: the binned power spectrum, sufficient for the Gaussian field
    embedding = "power"
    low = (0.1, 0.6)
    high = (0.5, 1.0)

    def __init__(
        self,
        n: int = 64,
        box: float = 250.0,
        slab_depth: float = 100.0,
        omega_b: float = OMEGA_B,
        h: float = HUBBLE,
        n_s: float = N_S,
        t_cmb: float = T_CMB,
    ) -> None:
        self.n, self.box, self.slab_depth = int(n), float(box), float(slab_depth)
        self.omega_b, self.h, self.n_s, self.t_cmb = float(omega_b), float(h), float(n_s), float(t_cmb)
        self.prior = Independent(Uniform(torch.tensor(self.low), torch.tensor(self.high)), 1)
        self.pixel_area = (self.box / self.n) ** 2
        # |k| on the rfft2 half plane [N, N//2+1], in h/Mpc
        kx = torch.fft.fftfreq(self.n, d=self.box / self.n, dtype=torch.float64) * 2 * math.pi
        ky = torch.fft.rfftfreq(self.n, d=self.box / self.n, dtype=torch.float64) * 2 * math.pi
        kmag = torch.sqrt(kx[:, None] ** 2 + ky[None, :] ** 2)
        # λ depends on |k| only: evaluate on the U distinct |k| (sorted, k = 0 first) and gather
        kuniq, self._kinv = torch.unique(kmag.reshape(-1), return_inverse=True)
        self._kuniq = kuniq.clone()
        self._kuniq[0] = 1.0  # placeholder for k = 0, whose eigenvalue is set to 0
        self._kns = self._kuniq**self.n_s
        # multiplicity of each rfft2 mode in the full k plane (columns k_y = 0 and, for even N,
        # k_y = N/2 are their own mirror images), summed per distinct |k|; k = 0 is excluded
        mult = torch.full((self.n, self.n // 2 + 1), 2.0, dtype=torch.float64)
        mult[:, 0] = 1.0
        if self.n % 2 == 0:
            mult[:, -1] = 1.0
        mult[0, 0] = 0.0
        self._mult = mult
        self._mult_u = torch.zeros(len(kuniq), dtype=torch.float64).index_add_(0, self._kinv, mult.reshape(-1))
        self._fallback = torch.tensor([0.3, 0.8], dtype=torch.float64)  # stands in for non-physical θ

    def _on(self, name: str, device: torch.device) -> Tensor:
        """The precomputed table ``self.<name>`` on ``device`` (cached; the original on CPU)."""
        return self._device_cache.get(name, getattr(self, name), device)

    @property
    def parameter_labels(self) -> list[str]:
        return ["Ω_m", "σ_8"]

    @property
    def observation_shape(self) -> tuple[int, ...]:
        return (self.n, self.n)

    def summary(self, x: Tensor) -> Tensor:
        """The binned power spectrum ``[B, N/2]`` (for posterior predictive checks)."""
        return binned_power(x, self.box)[1]

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        dev = draw_device(generator)
        low, high = torch.tensor(self.low, device=dev), torch.tensor(self.high, device=dev)
        return low + (high - low) * torch.rand(n, 2, generator=generator, device=dev)

    def _eigen_unique(self, theta: Tensor) -> Tensor:
        """``λ`` on the distinct |k| of the grid, ``[B, U]`` float64, ``λ_0 = 0``."""
        theta = _as64(theta)
        om, s8 = theta[..., 0], theta[..., 1]
        norm = (s8 / sigma_r(om, 8.0, 1.0, self.omega_b, self.h, self.n_s, self.t_cmb)) ** 2
        dev = theta.device
        t = eh98_nowiggle_transfer(self._on("_kuniq", dev), om.unsqueeze(-1), self.omega_b, self.h, self.t_cmb)
        lam = (norm / (self.slab_depth * self.pixel_area)).unsqueeze(-1) * self._on("_kns", dev) * t**2
        lam[..., 0] = 0.0
        return lam

    def eigenvalues(self, theta: Tensor) -> Tensor:
        r"""``λ_k = P_2D(|k|) / A_pix`` on the rfft2 half plane, ``[B, N, N//2+1]`` float64, λ_0 = 0."""
        lam = self._eigen_unique(theta)
        return lam[..., self._on("_kinv", lam.device)].reshape(*lam.shape[:-1], self.n, self.n // 2 + 1)

    def power_2d(self, theta: Tensor) -> Tensor:
        r"""The projected spectrum ``P_2D(|k|)`` in (Mpc/h)² on the rfft2 half plane ``[B, N, N//2+1]``."""
        return self.eigenvalues(theta) * self.pixel_area

    def pixel_variance(self, theta: Tensor) -> Tensor:
        r"""``σ² = Σ_k λ_k / N²`` (full k plane): the exact per-pixel variance of the Gaussian field, ``[B]``."""
        lam = self._eigen_unique(theta)
        return (lam * self._on("_mult_u", lam.device)).sum(-1) / self.n**2

    def _gaussian_field(self, theta: Tensor, generator: torch.Generator | None) -> Tensor:
        theta = self.check_theta(theta)
        dev = theta.device
        amp = self._eigen_unique(theta).sqrt().to(torch.float32)[..., self._on("_kinv", dev)]
        amp = amp.reshape(theta.shape[0], self.n, self.n // 2 + 1)
        w = randn(theta.shape[0], self.n, self.n, generator=generator, device=dev)
        return torch.fft.irfft2(amp * torch.fft.rfft2(w), s=(self.n, self.n))

    def _gaussian_log_likelihood(self, theta: Tensor, g: Tensor) -> Tensor:
        """Zero-mean-hyperplane Gaussian log density of real fields ``g [B or 1, N, N]`` (float64):
        the per-mode sums are collected per distinct |k| first, so the cost per θ is O(U).
        Non-physical θ (Ω_m ≤ 0, σ_8 ≤ 0 or not finite) give ``−inf``."""
        theta = _as64(theta)
        ok = torch.isfinite(theta).all(-1) & (theta[..., 0] > 0) & (theta[..., 1] > 0)
        dev = theta.device
        theta = torch.where(ok.unsqueeze(-1), theta, self._on("_fallback", dev))
        lam = self._eigen_unique(theta)[..., 1:]  # [B, U-1]
        power = torch.fft.rfft2(g.to(torch.float64)).abs().square() * self._on("_mult", g.device)
        flat = power.reshape(power.shape[0], -1)
        mult_u = self._on("_mult_u", dev)
        s = torch.zeros(flat.shape[0], len(mult_u), dtype=torch.float64, device=flat.device)
        s = s.index_add_(1, self._on("_kinv", flat.device), flat)
        quad = (s[..., 1:] / lam).sum(-1) / self.n**2
        logdet = (mult_u[1:] * torch.log(2 * math.pi * lam)).sum(-1)
        ll = -0.5 * (quad + logdet)
        return torch.where(ok, ll, torch.full_like(ll, -math.inf))

    @staticmethod
    def _broadcast_x(theta: Tensor, x: Tensor) -> Tensor:
        x = torch.as_tensor(x)
        return x.unsqueeze(0) if x.ndim == 2 else x


class CosmoGaussian(_CosmoField):
    r"""Gaussian projected density field ``δ = C^{1/2} w`` with ``C = F⁻¹ diag(P_2D/A_pix) F``;
    θ = (Ω_m, σ_8) ~ U[0.1, 0.5] × U[0.6, 1.0]; observation ``[N, N]`` float32."""

    name = "cosmo_gaussian"

    def simulate(self, theta: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self._gaussian_field(theta, generator)

    def log_likelihood(self, theta: Tensor, x: Tensor) -> Tensor:
        r"""``−½ Σ_{k≠0} [|δ̂_k|²/(N² λ_k) + log 2πλ_k]``, a density on ``{Σ x = 0}``; ``x [B, N, N]``
        or one ``[N, N]`` broadcast against ``theta [B, 2]``. Returns ``[B]`` float64."""
        return self._gaussian_log_likelihood(theta, self._broadcast_x(theta, x))


class CosmoLognormal(_CosmoField):
    r"""Lognormal projected density field ``δ = e^g / ⟨e^g⟩_pixels − 1`` with ``g`` the Gaussian
    field of :class:`CosmoGaussian` (``mean_density="ensemble"``: ``δ = e^{g − σ_g²/2} − 1``, see the
    module docstring); observation ``[N, N]`` float32."""

    name = "cosmo_lognormal"
    #: ln(1+δ) is the Gaussian field, so its power spectrum is the sufficient statistic
    embedding = "log-power"

    def __init__(self, *args: float, mean_density: Literal["field", "ensemble"] = "field", **kwargs: float) -> None:
        super().__init__(*args, **kwargs)
        if mean_density not in ("field", "ensemble"):
            raise ValueError(f"mean_density must be 'field' or 'ensemble', got {mean_density!r}")
        self.mean_density = mean_density

    def simulate(self, theta: Tensor, generator: torch.Generator | None = None) -> Tensor:
        theta = self.check_theta(theta)
        g = self._gaussian_field(theta, generator)
        if self.mean_density == "field":
            shift = torch.logsumexp(g.reshape(g.shape[0], -1), -1) - math.log(self.n**2)
        else:
            shift = 0.5 * self.pixel_variance(theta).to(torch.float32)
        return torch.expm1(g - shift[:, None, None])

    def log_likelihood(self, theta: Tensor, x: Tensor) -> Tensor:
        r"""``log p_G(P⊥ log(1+δ)) − Σ log(1+δ)``, a density on ``{Σ x = 0}``; ``x [B, N, N]`` or one
        ``[N, N]`` broadcast against ``theta [B, 2]``; ``−inf`` where some ``δ ≤ −1``. ``[B]`` float64."""
        x = self._broadcast_x(theta, x).to(torch.float64)
        ok = (x > -1).all(-1).all(-1)
        logx = torch.log1p(torch.where(x > -1, x, torch.zeros_like(x)))  # mean = k=0 mode: dropped
        ll = self._gaussian_log_likelihood(theta, logx) - logx.sum((-2, -1))
        return torch.where(ok, ll, torch.full_like(ll, -math.inf))
