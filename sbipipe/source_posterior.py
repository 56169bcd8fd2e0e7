r"""Strong-lensing source reconstruction with a score-based prior.

* **Prior.** A diffusion model (:mod:`sbipipe.diffusion`: EDM-preconditioned U-Net, EMA weights)
  of 64 × 64 source-galaxy images, trained on the synthetic galaxies of
  :mod:`simulators.galaxies` (no real images can be downloaded here). It works on z = s / c, the
  source s (flux per source pixel) divided by a data scale c chosen so that the training pixels
  have standard deviation σ_d = 0.5 (EDM's default), and learns D(z; σ) ≈ E[z₀ | z_σ = z] for
  z_σ = z₀ + σ ε; its score is ∇ log p_σ(z) = (D − z)/σ².
* **Likelihood of noised states.** The observation is y = A s + n, n ~ N(0, Σ), A the linear
  lensing operator of :func:`simulators.lensing.lensing_operator` (ray tracing, bilinear
  interpolation, PSF, pixel integration; its matrix is built once per lens by pushing the unit
  source pixels through it). p(y | z_σ) is intractable; we use the *convolved-likelihood
  approximation* (Remy et al. 2023, A&A 672, A51; Adam et al. 2022, arXiv:2211.03812):
  z₀ | z_σ ≈ N(z_σ, σ² I) (a flat prior on the scale σ), so

      p(y | z_σ) ≈ N(y; A' z_σ, Σ + σ² A' A'ᵀ),   A' = c A,
      ∇_z log p(y | z_σ) = A'_wᵀ (I + σ² A'_w A'_wᵀ)⁻¹ (y_w − A'_w z) = V (I + σ² Λ)⁻¹ Vᵀ (b − G z),

  with the whitened A'_w = Σ^{-1/2} A', y_w = Σ^{-1/2} y, b = A'_wᵀ y_w, G = A'_wᵀ A'_w = V Λ Vᵀ
  (one eigendecomposition per lens, restricted to the source pixels the image sees: the others
  get no likelihood term). It is exact at σ = 0, and biased at σ comparable to the posterior
  width (for a Gaussian prior N(μ, C) the exact p(y | z_σ) has mean A m_σ(z) and covariance
  Σ + σ² A C (C + σ² I)⁻¹ Aᵀ, which the approximation replaces by z and σ² I).
* **Sampler.** Predictor–corrector sampling of the reverse SDE (Song et al. 2021) with the
  posterior score = prior score + likelihood score (:func:`sbipipe.diffusion.pc_sample`). Because
  the approximation is exact only as σ → 0, the Langevin corrector steps matter: they pull each
  level towards p_σ(z) p̃(y | z), and the final level is the exact posterior up to
  σ_min² and the Langevin discretisation. With a Gaussian prior (analytic score) and enough
  corrector steps the samples reproduce the analytic posterior of the linear problem
  (``benchmarks/score_prior_gaussian_check.py``; without correctors they do not).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np
import torch
from torch import Tensor

from .atomic import atomic_path
from .diffusion import Denoiser, ScoreModel, UNet, karras_sigmas, ode_sample, pc_sample
from .errors import SbipipeError
from .store import package_versions, read_card, read_weights, write_model
from .training import TensorData, TrainConfig, fit, resolve_device

__all__ = [
    "GALAXY_SIMULATOR",
    "LENS_PARAMETERS",
    "LENS_SIMULATOR",
    "ConvolvedLikelihood",
    "GaussianSourcePrior",
    "ScorePrior",
    "SourcePosterior",
    "SourcePrior",
    "gaussian_linear_posterior",
    "lens_matrix",
    "load_source_prior",
    "operator_matrix",
    "parse_lens",
    "plot_source_posterior",
    "psnr",
    "reconstruct_source",
    "sample_source_posterior",
    "train_source_prior",
    "write_source_posterior",
]

GALAXY_SIMULATOR = "simulators.galaxies:SyntheticGalaxies"
LENS_SIMULATOR = "lens_sie_shear"
LENS_PARAMETERS = ("theta_E", "e1", "e2", "x0", "y0", "gamma1", "gamma2")
KIND = "source_prior"
SIGMA_DATA = 0.5


# ---------------------------------------------------------------------------------------------
# Priors: the learned one and an analytic Gaussian with the same interface.
# ---------------------------------------------------------------------------------------------


class ScorePrior(Protocol):
    """What the sampler needs of a prior on z = source / ``data_scale`` (images ``[B, P, P]``)."""

    pixels: int
    pixel_scale: float
    data_scale: float

    def score(self, z: Tensor, sigma: float) -> Tensor: ...

    def start(self, n: int, sigma: float, generator: torch.Generator | None) -> Tensor: ...

    @property
    def sigma_max(self) -> float: ...


class SourcePrior:
    """A trained score-based prior of source images (EMA weights of a :class:`ScoreModel`)."""

    def __init__(self, denoiser: Denoiser, data_scale: float, pixels: int, pixel_scale: float,
                 card: dict[str, Any] | None = None):
        self.denoiser = denoiser.eval().requires_grad_(False)
        self.data_scale, self.pixels, self.pixel_scale = float(data_scale), int(pixels), float(pixel_scale)
        self.card = card or {}

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def sigma_max(self) -> float:
        """Noise level at which the prior is forgotten: ≈ the largest distance between images
        (Song & Ermon 2020, technique 1), 80 for σ_d = 0.5 on 64 × 64 (EDM's σ_max)."""
        return 2.5 * self.denoiser.sigma_data * self.pixels

    def score(self, z: Tensor, sigma: float) -> Tensor:
        """∇ log p_σ(z) = (D(z; σ) − z)/σ² for ``z [B, P, P]``."""
        with torch.no_grad():
            return (self.denoiser(z.unsqueeze(1), sigma)[:, 0] - z) / sigma**2

    def start(self, n: int, sigma: float, generator: torch.Generator | None) -> Tensor:
        return sigma * _randn((n, self.pixels, self.pixels), generator, self.device)

    def sample(self, n: int, steps: int = 40, seed: int = 0, sigma_min: float = 0.002) -> Tensor:
        """``n`` prior draws (flux per pixel ``[n, P, P]``) by the probability-flow ODE (Heun)."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        sig = karras_sigmas(steps, sigma_min, self.sigma_max)
        x = self.start(n, float(sig[0]), gen).unsqueeze(1)
        return ode_sample(self.denoiser, x, sig)[:, 0] * self.data_scale


class GaussianSourcePrior:
    r"""s ~ N(μ, C) on the source grid, with the exact score of the noised prior,
    ∇ log p_σ(z) = −(C + σ² I)⁻¹ (z − μ) (C = Q diag(d) Qᵀ; ``data_scale`` 1 unless given)."""

    def __init__(self, mean: Tensor, cov: Tensor, pixel_scale: float, data_scale: float = 1.0,
                 dtype: torch.dtype = torch.float32):
        n = mean.numel()
        self.pixels = int(round(math.sqrt(n)))
        if self.pixels**2 != n or cov.shape != (n, n):
            raise SbipipeError(f"GaussianSourcePrior needs a square image mean and a [{n}, {n}] covariance, got {list(cov.shape)}")
        self.pixel_scale, self.data_scale, self.dtype = float(pixel_scale), float(data_scale), dtype
        self.mean64 = mean.reshape(-1).double() / data_scale
        self.cov64 = cov.double() / data_scale**2
        d, q = torch.linalg.eigh(self.cov64)
        self._d, self._q = d.clamp_min(0).to(dtype), q.to(dtype)
        self._mean = self.mean64.to(dtype)

    @property
    def sigma_max(self) -> float:
        return 3.0 * float(self._d.max().sqrt())

    def score(self, z: Tensor, sigma: float) -> Tensor:
        r = (z.reshape(z.shape[0], -1) - self._mean) @ self._q
        return (-(r / (self._d + sigma**2)) @ self._q.T).reshape(z.shape)

    def start(self, n: int, sigma: float, generator: torch.Generator | None) -> Tensor:
        noise = _randn((n, self.pixels, self.pixels), generator, torch.device("cpu"), self.dtype)
        return self._mean.reshape(self.pixels, self.pixels) + sigma * noise


def gaussian_linear_posterior(mean: Tensor, cov: Tensor, matrix: Tensor, noise_std: float | Tensor,
                              observation: Tensor) -> tuple[Tensor, Tensor]:
    r"""Exact posterior N(m, P) of s ~ N(μ, C), y = A s + n, n ~ N(0, Σ), in float64:
    K = C Aᵀ (Σ + A C Aᵀ)⁻¹, m = μ + K (y − A μ), P = C − K A C (Rasmussen & Williams 2006, eq. A.6)."""
    a, c, mu = matrix.double(), cov.double(), mean.reshape(-1).double()
    y = observation.reshape(-1).double()
    var = torch.as_tensor(noise_std, dtype=torch.float64) ** 2 * torch.ones(a.shape[0], dtype=torch.float64)
    s = torch.diag(var) + a @ c @ a.T
    k = torch.linalg.solve(s, a @ c).T
    m = mu + k @ (y - a @ mu)
    p = c - k @ a @ c
    return m, 0.5 * (p + p.T)


# ---------------------------------------------------------------------------------------------
# The operator and the convolved likelihood.
# ---------------------------------------------------------------------------------------------


def operator_matrix(op: Callable[[Tensor], Tensor], pixels: int, chunk: int = 256,
                    dtype: torch.dtype = torch.float64) -> Tensor:
    """Dense matrix ``[M, P²]`` of a linear map ``source [B, P, P] → image [B, ...]`` (column j = the
    image of unit flux in source pixel j, row-major)."""
    n = pixels * pixels
    cols = []
    for i in range(0, n, chunk):
        k = min(chunk, n - i)
        e = torch.zeros(k, n, dtype=dtype)
        e[torch.arange(k), torch.arange(i, i + k)] = 1
        cols.append(op(e.reshape(k, pixels, pixels)).reshape(k, -1).to(dtype))
    return torch.cat(cols).T.contiguous()


def parse_lens(spec: str | Mapping[str, Any]) -> dict[str, float]:
    """Lens parameters from ``"theta_E=1.1,e1=0.05,..."``, a mapping, or a JSON file (an
    ``OBS.truth.json`` of ``sbipipe observe lens_sie[_shear]``, or ``{"theta_E": ..., ...}``).
    θ_E is required; the others default to 0."""
    import json

    if isinstance(spec, Mapping):
        raw = dict(spec)
    elif spec.strip().endswith(".json"):
        path = Path(spec)
        if not path.is_file():
            raise SbipipeError(f"lens file {spec!r} does not exist; give a JSON file or theta_E=...,e1=...")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SbipipeError(f"lens file {spec!r} is not valid JSON ({exc})") from None
        if isinstance(data, dict) and "parameter_names" in data and "theta" in data:
            raw = {k: v for k, v in zip(data["parameter_names"], data["theta"]) if k in LENS_PARAMETERS}
        elif isinstance(data, dict):
            raw = data
        else:
            raise SbipipeError(f"lens file {spec!r} must hold an object of lens parameters {list(LENS_PARAMETERS)}")
    else:
        raw = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, eq, value = part.partition("=")
            if not eq:
                raise SbipipeError(f"bad lens parameter {part!r}; expected name=value, e.g. theta_E=1.1,e1=0.05")
            raw[key.strip()] = value.strip()
    unknown = sorted(set(raw) - set(LENS_PARAMETERS))
    if unknown:
        raise SbipipeError(f"unknown lens parameter(s) {unknown}; expected some of {list(LENS_PARAMETERS)}")
    if "theta_E" not in raw:
        raise SbipipeError(f"the lens needs theta_E (arcsec); got {sorted(raw)}")
    out = {}
    for k in LENS_PARAMETERS:
        try:
            out[k] = float(raw.get(k, 0.0))
        except (TypeError, ValueError):
            raise SbipipeError(f"lens parameter {k} = {raw[k]!r} is not a number") from None
        if not math.isfinite(out[k]):
            raise SbipipeError(f"lens parameter {k} = {out[k]} is not finite")
    return out


def lens_matrix(lens: Mapping[str, float], pixels: int, pixel_scale: float) -> tuple[Tensor, float, tuple[int, int]]:
    """(dense operator ``[M, P²]`` float64, noise σ, image shape) of the SIE + shear lens of the
    ``lens_sie_shear`` simulator for a source grid of ``pixels``² pixels of ``pixel_scale``″."""
    from .registry import get_simulator

    sim = get_simulator(LENS_SIMULATOR)
    theta = torch.zeros(1, sim.dim)
    for k, v in parse_lens(lens).items():
        theta[0, list(sim.parameter_names).index(k)] = v
    op = sim.lensing_operator(theta, source_pixels=pixels, source_pixel_scale=pixel_scale, dtype=torch.float64,
                              device="cpu")
    inst = sim.instrument
    return operator_matrix(op, pixels), float(inst.noise_std), (inst.pixels, inst.pixels)


class ConvolvedLikelihood:
    r"""log N(y; A' z, Σ + σ² A' A'ᵀ), A' = ``data_scale`` · A, Σ = diag(noise_std²): the
    convolved-likelihood approximation of p(y | z_σ) (module docstring), with its score
    V (I + σ² Λ)⁻¹ Vᵀ (b − G z) from one eigendecomposition of G = A'_wᵀ A'_w (float64) over the
    source pixels the image sees."""

    def __init__(self, matrix: Tensor, observation: Tensor, noise_std: float | Tensor, data_scale: float = 1.0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        a = matrix.double()
        y = observation.reshape(-1).double()
        if y.numel() != a.shape[0]:
            raise SbipipeError(f"observation has {y.numel()} pixels but the operator maps to {a.shape[0]}")
        std = torch.as_tensor(noise_std, dtype=torch.float64).reshape(-1).expand(a.shape[0])
        if not bool((std > 0).all()):
            raise SbipipeError("noise standard deviations must be positive")
        self.n_pixels, self.n_source = a.shape
        self.pixels = int(round(math.sqrt(self.n_source)))
        self.data_scale = float(data_scale)
        self.observation = y
        self.noise_std = std
        aw = a * self.data_scale / std[:, None]
        self.active = (aw != 0).any(0).nonzero()[:, 0]
        aw = aw[:, self.active]
        yw = y / std
        lam, v = torch.linalg.eigh(aw.T @ aw)
        self.eigenvalues = lam.clamp_min(0)
        dev = torch.device(device)
        self._aw = aw.to(dtype=dtype, device=dev)
        self._yw = yw.to(dtype=dtype, device=dev)
        self._v = v.to(dtype=dtype, device=dev)
        self._lam = self.eigenvalues.to(dtype=dtype, device=dev)
        self._beta = (v.T @ (aw.T @ yw)).to(dtype=dtype, device=dev)
        self._idx = self.active.to(dev)

    def score(self, z: Tensor, sigma: float) -> Tensor:
        """∇_z log N(y; A' z, Σ + σ² A'A'ᵀ) for ``z [B, P, P]``."""
        flat = z.reshape(z.shape[0], -1)
        u = flat[:, self._idx] @ self._v
        r = (self._beta - self._lam * u) / (1 + sigma**2 * self._lam)
        out = torch.zeros_like(flat)
        out[:, self._idx] = r @ self._v.T
        return out.reshape(z.shape)

    def residual(self, z: Tensor) -> Tensor:
        """Whitened residuals (y − A' z)/σ_n ``[B, M]``."""
        flat = z.reshape(z.shape[0], -1)[:, self._idx].to(self._aw.dtype)
        return self._yw - flat @ self._aw.T

    def chi2_per_pixel(self, z: Tensor) -> Tensor:
        """χ²/pixel = ‖(y − A' z)/σ_n‖² / M, ``[B]``."""
        return self.residual(z).square().sum(1) / self.n_pixels


# ---------------------------------------------------------------------------------------------
# Posterior sampling.
# ---------------------------------------------------------------------------------------------


@dataclass
class SourcePosterior:
    """Posterior source samples (flux per source pixel) and their summaries."""

    samples: Tensor  # [n, P, P]
    chi2_per_pixel: Tensor  # [n]
    chi2_mean: float  # χ²/pixel of the posterior mean
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> Tensor:
        return self.samples.mean(0)

    @property
    def std(self) -> Tensor:
        return self.samples.std(0)


def sample_source_posterior(
    prior: ScorePrior,
    likelihood: ConvolvedLikelihood,
    n: int,
    steps: int = 100,
    corrector_steps: int = 3,
    snr: float = 0.3,
    sigma_min: float = 0.002,
    sigma_max: float | None = None,
    seed: int = 0,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> SourcePosterior:
    r"""``n`` posterior samples of the source by predictor–corrector sampling with the score
    ∇ log p_σ(z) + ∇ log p̃(y | z_σ) (the convolved likelihood), ``steps`` noise levels from
    ``sigma_max`` (default: the prior's) down to ``sigma_min`` on the schedule of Karras et al.
    (ρ = 7), ``corrector_steps`` Langevin steps per level with signal-to-noise ratio ``snr``.
    Particles run in batches of ``batch_size``; batch k uses the seed ``seed + k``."""
    if n < 1 or steps < 2 or corrector_steps < 0:
        raise SbipipeError(f"need n ≥ 1, steps ≥ 2 and corrector_steps ≥ 0; got {n}, {steps}, {corrector_steps}")
    if likelihood.n_source != prior.pixels**2 or abs(likelihood.data_scale - prior.data_scale) > 1e-9 * prior.data_scale:
        raise SbipipeError(
            f"the likelihood is built for {likelihood.n_source} source pixels at data scale {likelihood.data_scale:g}, "
            f"the prior has {prior.pixels}² pixels at {prior.data_scale:g}; build it with the prior's grid and scale"
        )
    s_max = float(sigma_max or prior.sigma_max)
    sigmas = karras_sigmas(steps, sigma_min, s_max)
    out = []
    batches = math.ceil(n / batch_size)
    for k in range(batches):
        m = min(batch_size, n - k * batch_size)
        gen = torch.Generator().manual_seed(seed + k)
        z = prior.start(m, s_max, gen)
        z = z.to(likelihood._v.dtype)

        def score(x: Tensor, s: float) -> Tensor:
            return prior.score(x, s) + likelihood.score(x, s)

        report = None if progress is None else (lambda i, t, k=k: progress(k * t + i, batches * t))
        out.append(pc_sample(score, z, sigmas, gen, corrector_steps, snr, progress=report))
    z = torch.cat(out)
    chi2 = likelihood.chi2_per_pixel(z).double().cpu()
    chi2_mean = float(likelihood.chi2_per_pixel(z.mean(0, keepdim=True))[0])
    settings = {"steps": steps, "corrector_steps": corrector_steps, "snr": snr, "sigma_min": sigma_min,
                "sigma_max": s_max, "seed": seed, "batch_size": batch_size}
    return SourcePosterior((z * prior.data_scale).float().cpu(), chi2.float(), chi2_mean, settings)


def psnr(estimate: Tensor, truth: Tensor) -> float:
    """Peak signal-to-noise ratio 10 log₁₀(max(truth)² / mean((estimate − truth)²)) in dB."""
    mse = float((estimate.double() - truth.double()).square().mean())
    return 10 * math.log10(float(truth.double().max()) ** 2 / max(mse, 1e-300))


def write_source_posterior(path: str | os.PathLike, result: SourcePosterior, observation: Tensor,
                           attrs: Mapping[str, Any] | None = None) -> None:
    """HDF5: ``samples [n, P, P]``, ``mean``, ``std`` (flux per source pixel), ``chi2_per_pixel [n]``,
    ``observation [M, M]``; attributes: the sampler settings, ``chi2_mean`` and ``attrs``."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("samples", data=result.samples.numpy().astype(np.float32), compression="gzip")
        f.create_dataset("mean", data=result.mean.numpy().astype(np.float32))
        f.create_dataset("std", data=result.std.numpy().astype(np.float32))
        f.create_dataset("chi2_per_pixel", data=result.chi2_per_pixel.numpy().astype(np.float64))
        f.create_dataset("observation", data=observation.detach().cpu().numpy().astype(np.float32))
        f.attrs["kind"] = "source_posterior"
        f.attrs["chi2_mean"] = result.chi2_mean
        for key, value in {**result.settings, **(attrs or {})}.items():
            f.attrs[key] = value


def plot_source_posterior(path: str | os.PathLike, observation: Tensor, result: SourcePosterior, matrix: Tensor,
                          pixel_scale: float, noise_std: float) -> Path:
    """PNG of five panels: the observation, the posterior mean, std and first sample of the source
    (arcsec axes), and the residual (y − A·mean)/σ_n of the mean (colour range ±3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    observation = observation.detach().cpu()
    model = (matrix.float() @ result.mean.reshape(-1).float()).reshape(observation.shape)
    half = result.mean.shape[-1] * pixel_scale / 2
    panels = [("observation", observation, None), ("posterior mean", result.mean, half),
              ("posterior std", result.std, half), ("sample 1", result.samples[0], half),
              ("residual / sigma", (observation - model) / noise_std, None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    for ax, (title, img, h) in zip(axes, panels):
        kw = {"extent": (-h, h, -h, h)} if h else {}
        if title.startswith("residual"):
            im = ax.imshow(img.numpy(), origin="lower", cmap="RdBu_r", vmin=-3, vmax=3, **kw)
        else:
            im = ax.imshow(torch.as_tensor(img).numpy(), origin="lower", cmap="magma", **kw)
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return Path(path)


def reconstruct_source(
    prior: str | os.PathLike,
    lens: str | Mapping[str, Any],
    observation: str | os.PathLike,
    output: str | os.PathLike,
    n: int = 16,
    steps: int = 100,
    corrector_steps: int = 3,
    snr: float = 0.3,
    noise_std: float = 1.0,
    seed: int = 0,
    device: str = "cpu",
    plot: str | os.PathLike | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """``sbipipe source-posterior`` as a function (the CLI and the ``source-posterior`` flow call it):
    load the prior (on ``device``), build the lens operator from ``lens`` (see :func:`parse_lens`),
    read one observation, draw ``n`` posterior samples, write ``output`` (:func:`write_source_posterior`)
    and, with ``plot``, the PNG of :func:`plot_source_posterior`. Returns a JSON-able summary."""
    from .atomic import check_writable
    from .observations import load_observation

    if n < 1:
        raise SbipipeError(f"-n must be at least 1, got {n}")
    if noise_std <= 0:
        raise SbipipeError(f"--noise-std must be positive, got {noise_std}")
    t0 = time.perf_counter()
    check_writable(output)
    lens_params = parse_lens(lens)
    src_prior = load_source_prior(prior, device=device)
    matrix, _, shape = lens_matrix(lens_params, src_prior.pixels, src_prior.pixel_scale)
    x = load_observation(observation, shape=shape, name="lensed image")
    if len(x) != 1:
        raise SbipipeError(f"{str(observation)!r} holds {len(x)} images; give one observation")
    like = ConvolvedLikelihood(matrix, x[0], noise_std, src_prior.data_scale, device=src_prior.device)
    post = sample_source_posterior(src_prior, like, n, steps=steps, corrector_steps=corrector_steps, snr=snr,
                                   seed=seed, progress=progress)
    attrs = {"prior": str(prior), "observation": str(observation), "noise_std": noise_std,
             "pixel_scale": src_prior.pixel_scale, **{f"lens_{k}": v for k, v in lens_params.items()}}
    write_source_posterior(output, post, x[0], attrs)
    if plot is not None:
        plot_source_posterior(plot, x[0], post, matrix, src_prior.pixel_scale, noise_std)
    chi2, flux = post.chi2_per_pixel.double(), post.samples.double().sum((1, 2))
    return {
        "output": str(output), "plot": None if plot is None else str(plot), "lens": lens_params, "n": n,
        "pixels": src_prior.pixels, "pixel_scale": src_prior.pixel_scale, "device": str(src_prior.device),
        "chi2_mean": post.chi2_mean, "chi2_samples": {"mean": float(chi2.mean()), "min": float(chi2.min()),
                                                      "max": float(chi2.max())},
        "flux": {"mean": float(flux.mean()), "std": float(flux.std()) if n > 1 else 0.0},
        "settings": post.settings, "seconds": round(time.perf_counter() - t0, 2),
    }


# ---------------------------------------------------------------------------------------------
# Training and loading the prior.
# ---------------------------------------------------------------------------------------------


def _galaxies(pixels: int, pixel_scale: float) -> Any:
    from .registry import load_object

    return load_object(GALAXY_SIMULATOR)(pixels=pixels, pixel_scale=pixel_scale)


def train_source_prior(
    output: str | os.PathLike,
    images: int = 6000,
    epochs: int = 4,
    batch_size: int = 16,
    lr: float = 1e-3,
    channels: Sequence[int] = (16, 32, 32, 64),
    blocks: int = 1,
    ema_decay: float = 0.995,
    val_fraction: float = 0.1,
    pixels: int = 64,
    pixel_scale: float = 0.04,
    seed: int = 0,
    device: str = "auto",
    resume: bool = False,
    threads: int | None = 1,
    progress: Callable[[dict[str, float]], None] | None = None,
) -> SourcePrior:
    """Draw ``images`` synthetic galaxies (seed ``seed``), train a score model on them with the
    one training loop (EMA, cosine learning-rate decay, checkpoint per epoch; ``resume`` continues),
    and write the model directory ``output`` (EMA weights + card)."""
    if images < 20 or not 0 < val_fraction < 1:
        raise SbipipeError(f"need at least 20 images and 0 < val_fraction < 1; got {images}, {val_fraction}")
    dev = resolve_device(device)
    out = Path(output)
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sim = _galaxies(pixels, pixel_scale)
    gen = torch.Generator().manual_seed(seed)
    x = sim.sample(images, gen)
    n_val = max(1, int(round(images * val_fraction)))
    train_x, val_x = x[:-n_val], x[-n_val:]
    data_scale = float(train_x.double().std()) / SIGMA_DATA
    z_train, z_val = (t.unsqueeze(1) / data_scale for t in (train_x, val_x))
    seconds_data = time.perf_counter() - t0
    torch.manual_seed(seed)
    net = UNet(1, 1, tuple(channels), blocks)
    model = ScoreModel(net, sigma_data=SIGMA_DATA, ema_decay=ema_decay)
    config = TrainConfig(max_epochs=epochs, batch_size=batch_size, lr=lr, patience=epochs + 1, seed=seed,
                         device=str(dev), threads=threads)
    history = fit(model, TensorData(z_train), TensorData(z_val), config, checkpoint=ckpt_dir / "prior.pt",
                  resume=resume, progress=progress)
    seconds = time.perf_counter() - t0
    card: dict[str, Any] = {
        "architecture": {"kind": KIND, "unet": net.config, "sigma_data": SIGMA_DATA, "preconditioning": "edm"},
        "source": {"pixels": pixels, "pixel_scale": pixel_scale, "data_scale": data_scale,
                   "units": "flux per source pixel (noise sigma of the image = 1)"},
        "training": {
            "galaxies": GALAXY_SIMULATOR, "galaxies_version": str(sim.version), "images": images,
            "validation_images": n_val, "seed": seed, "config": {**config.__dict__}, "ema_decay": ema_decay,
            "device": str(dev), "seconds": round(seconds, 1), "seconds_data": round(seconds_data, 1),
            "epochs": int(history["epoch"].max()), "best_val_loss": float(history["val_loss"].min()),
            "final_train_loss": float(history["train_loss"].iloc[-1]),
        },
        "packages": package_versions(),
    }
    model = model.cpu()
    write_model(out, {f"net.{k}": v for k, v in model.ema.net.state_dict().items()}, card,
                history=history, checkpoints=ckpt_dir)
    return SourcePrior(model.ema, data_scale, pixels, pixel_scale, {"format": "sbipipe.model/1", **card})


def load_source_prior(directory: str | os.PathLike, device: str = "cpu") -> SourcePrior:
    """A :class:`SourcePrior` from a model directory written by :func:`train_source_prior`."""
    card = read_card(directory)
    arch = card.get("architecture", {})
    if arch.get("kind") != KIND:
        raise SbipipeError(
            f"{str(directory)!r} holds a {arch.get('kind', 'unknown')!r} model, not a source prior; "
            "train one with `sbipipe source-prior train`"
        )
    weights = read_weights(directory)
    try:
        net = UNet(**arch["unet"])
        net.load_state_dict({k[4:]: v for k, v in weights.items() if k.startswith("net.")})
        src = card["source"]
        prior = SourcePrior(Denoiser(net, float(arch["sigma_data"])), float(src["data_scale"]), int(src["pixels"]),
                            float(src["pixel_scale"]), card)
    except (KeyError, TypeError, RuntimeError) as exc:
        raise SbipipeError(
            f"{str(directory)!r}: the card and weights do not match ({type(exc).__name__}); retrain the prior"
        ) from None
    prior.denoiser.to(resolve_device(device))
    return prior


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
           dtype: torch.dtype = torch.float32) -> Tensor:
    src = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, dtype=dtype, device=src).to(device)
