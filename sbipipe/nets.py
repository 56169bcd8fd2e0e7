"""Embedding networks that compress observations before the flow, chosen from the observation shape.

* ``identity`` — small vectors go to the flow as they are (standardised);
* ``mlp`` — vectors: a two-layer MLP;
* ``cnn`` — 2-D fields and images ``[H, W]`` (or ``[C, H, W]``): strided convolutions, optionally
  with circular padding for periodic fields, then global average pooling;
* ``power`` — periodic 2-D fields ``[N, N]``: the log of the azimuthally binned power spectrum
  (exact shells up to |k| = 3, then bins of integer |k| in grid units up to N/√2, so no mode is
  dropped), then an MLP. For a statistically isotropic Gaussian
  field the power spectrum is a sufficient statistic, so nothing is lost, and it costs one FFT per
  field instead of a CNN. Simulators name it as their preferred embedding (``embedding = "power"``);
* ``log-power`` — lognormal-like fields ``[N, N]`` with δ > −1: the binned log power of δ and of
  ln(1+δ), and the pixel mean of ln(1+δ), standardised, then an MLP. ln(1+δ) of a lognormal field is
  Gaussian, so its power spectrum is (up to the binning) sufficient for the lognormal likelihood,
  and the three together for the Gaussian-vs-lognormal Bayes factor (the Jacobian Σ ln(1+δ)).
  Observations are not standardised before it (ln(1+δ) needs δ itself);
* ``deepset`` — variable-size sets ``[n_max, F + 1]`` whose last column is a 0/1 mask
  (Zaheer et al. 2017): a per-element MLP, masked mean pooling plus log(count), and an MLP;
* ``kinematics`` — stellar line-of-sight kinematics ``[n, 3]`` = (R, v, mask): a DeepSet over
  (ln R, ln R/R_h, v, v²) plus the surface-density, dispersion and kurtosis profiles in bins of
  R/R_h, R_h the median radius (the dwarf galaxies' preferred embedding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import SbipipeError

__all__ = [
    "EMBEDDINGS",
    "CNNEmbedding",
    "DeepSetEmbedding",
    "IdentityEmbedding",
    "KinematicsEmbedding",
    "MLPEmbedding",
    "PowerSpectrumEmbedding",
    "SINGLE_THREAD_EMBEDDINGS",
    "auto_embedding",
    "build_embedding",
    "check_embedding",
    "embed_observations",
    "fit_observation_statistics",
    "observation_statistics",
    "statistics_shape",
]

EMBEDDINGS = ("auto", "identity", "mlp", "cnn", "cnn-circular", "power", "log-power", "deepset", "kinematics")
#: embeddings whose (small) networks train fastest on one CPU thread (measured on 2 cores)
SINGLE_THREAD_EMBEDDINGS = frozenset({"identity", "mlp", "power", "log-power", "deepset", "kinematics"})


def check_embedding(kind: str) -> str:
    """``kind`` if it names an embedding (:data:`EMBEDDINGS`), else a one-line error."""
    if kind not in EMBEDDINGS:
        raise SbipipeError(f"unknown embedding {kind!r}; choose one of {', '.join(EMBEDDINGS)}")
    return kind


class IdentityEmbedding(nn.Module):
    def __init__(self, x_shape: Sequence[int]):
        super().__init__()
        self.out_features = math.prod(x_shape)

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


class MLPEmbedding(nn.Module):
    def __init__(self, x_shape: Sequence[int], hidden: int = 128, out_features: int = 32):
        super().__init__()
        self.out_features = out_features
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(x_shape), hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, out_features),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CNNEmbedding(nn.Module):
    """Conv(3×3) blocks halving the resolution down to ≤ 8×8, global average pool, linear head."""

    def __init__(self, x_shape: Sequence[int], channels: int = 16, out_features: int = 32, circular: bool = False):
        super().__init__()
        shape = tuple(x_shape)
        self.add_channel = len(shape) == 2
        c_in, h = (1 if self.add_channel else shape[0]), min(shape[-2:])
        pad = "circular" if circular else "zeros"
        layers: list[nn.Module] = []
        c = channels
        layers += [nn.Conv2d(c_in, c, 3, padding=1, padding_mode=pad), nn.SiLU()]
        while h > 8:
            layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, padding_mode=pad), nn.SiLU()]
            c, h = 2 * c, (h + 1) // 2
        layers += [nn.Conv2d(c, c, 3, padding=1, padding_mode=pad), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(c, 2 * out_features), nn.SiLU(), nn.Linear(2 * out_features, out_features))
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:
        if self.add_channel:
            x = x.unsqueeze(1)
        return self.head(self.features(x))


class PowerSpectrumEmbedding(nn.Module):
    """log P(|k|) of ``[N, N]`` fields, then an MLP: one shell per distinct |k| ≤ 3, then integer-|k|
    bins up to the grid's corner N/√2 (k = 0 left out).

    ``log_field=True`` (the ``log-power`` embedding) adds log P of ln(1+δ) and the pixel mean of
    ln(1+δ) (δ clamped at −1 + 10⁻⁶), standardised by :meth:`fit_features` from training fields."""

    def __init__(self, x_shape: Sequence[int], hidden: int = 128, out_features: int = 32, log_field: bool = False):
        super().__init__()
        n = int(x_shape[-1])
        if len(x_shape) != 2 or x_shape[0] != n:
            raise SbipipeError(f"the power embedding needs square [N, N] fields, got {list(x_shape)}")
        ky = torch.fft.fftfreq(n) * n
        kx = torch.fft.rfftfreq(n) * n
        k2 = (ky[:, None] ** 2 + kx[None, :] ** 2).round().long().flatten()
        # one shell per distinct |k| up to |k| = 3 (where P(k) bends most across a unit bin), then
        # integer |k| bins up to the grid's corner N/√2. A binned-likelihood check on cosmo_gaussian
        # (tests/test_nets.py) shows why: dropping the corners (|k| > N/2) shifted posteriors by up to
        # 0.75σ along the Ω_m–σ_8 degeneracy, and unit bins at |k| ≤ 3 by up to 0.15σ; these stay ≤ 0.05σ.
        low = torch.unique(k2[(k2 >= 1) & (k2 <= 9)])
        shell = torch.searchsorted(low, k2)
        kmag = torch.where(k2 > 9, len(low) + k2.double().sqrt().round().long() - 3, shell)
        kmag = torch.where(k2 == 0, -1, kmag) + 1  # bin index + 1; 0 = the k = 0 mode, left out
        n_bins = int(kmag.max())
        # rfft2 halves the plane: columns 1..N/2-1 stand for two modes each (k and −k)
        weight = torch.full((n, n // 2 + 1), 2.0)
        weight[:, 0] = 1.0
        if n % 2 == 0:
            weight[:, -1] = 1.0
        onehot = torch.zeros(kmag.numel(), n_bins)
        ok = (kmag >= 1) & (kmag <= n_bins)
        onehot[torch.arange(kmag.numel())[ok], kmag[ok] - 1] = weight.flatten()[ok]
        self.register_buffer("bins", onehot / onehot.sum(0), persistent=False)  # mean over each shell
        self.register_buffer("mode_counts", onehot.sum(0), persistent=False)  # full-plane modes per shell
        self.log_field = bool(log_field)
        n_features = 2 * n_bins + 1 if self.log_field else n_bins
        if self.log_field:
            self.register_buffer("feature_mean", torch.zeros(n_features))
            self.register_buffer("feature_std", torch.ones(n_features))
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, out_features))
        self.out_features = out_features

    def _log_power(self, x: Tensor) -> Tensor:
        p = torch.fft.rfft2(x, norm="ortho").abs().square().flatten(-2)
        return torch.log(p @ self.bins + 1e-12)

    def features(self, x: Tensor) -> Tensor:
        """The summaries the MLP sees (before standardisation): ``[B, K]`` or ``[B, 2K + 1]``."""
        x = x.float()
        if not self.log_field:
            return self._log_power(x)
        y = torch.log1p(x.clamp_min(-1 + 1e-6))
        return torch.cat([self._log_power(x), self._log_power(y), y.mean((-2, -1)).unsqueeze(-1)], -1)

    @torch.no_grad()
    def fit_features(self, x: Tensor) -> None:
        """Mean and scale of :meth:`features` over training fields ``x`` (``log-power`` only)."""
        if self.log_field:
            f = torch.cat([self.features(c) for c in x.split(4096)]).double()
            self.feature_mean.copy_(f.mean(0).float())
            self.feature_std.copy_(f.std(0).clamp_min(1e-8).float())

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x)
        if self.log_field:
            f = (f - self.feature_mean) / self.feature_std
        return self.net(f)


class DeepSetEmbedding(nn.Module):
    """Permutation-invariant set embedding with a mask in the last column (Zaheer et al. 2017)."""

    def __init__(self, x_shape: Sequence[int], hidden: int = 64, out_features: int = 32):
        super().__init__()
        features = x_shape[-1] - 1
        self.phi = nn.Sequential(nn.Linear(features, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.rho = nn.Sequential(nn.Linear(hidden + 1, hidden), nn.SiLU(), nn.Linear(hidden, out_features))
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:
        values, mask = x[..., :-1], x[..., -1:]
        count = mask.sum(-2).clamp_min(1.0)
        pooled = (self.phi(values) * mask).sum(-2) / count
        return self.rho(torch.cat([pooled, count.log()], -1))


class KinematicsEmbedding(nn.Module):
    r"""Line-of-sight stellar kinematics ``[n, 3]`` = (R, v, mask) of a pressure-supported galaxy.

    Two summaries of the stars, concatenated and passed through an MLP:

    * a DeepSet (masked mean of a per-star MLP) over (ln R, ln R/R_h, v, v²), R_h the galaxy's
      median projected radius, so the heavy tail of the radii (a Plummer sphere's reaches
      10³ r_*) does not squash the other stars;
    * the binned Jeans summaries of the dispersion-based literature (e.g. Łokas 2002, MNRAS 333,
      697; Richardson & Fairbairn 2014): in ``bins`` bins of ln R/R_h (edges at training
      quantiles) the fraction of stars, ln(1 + ⟨v²⟩) and the kurtosis ⟨v⁴⟩/⟨v²⟩² — the
      surface-density, velocity-dispersion and kurtosis profiles in units of the galaxy's own
      size, which carry the mass and anisotropy information — with ln R_h and ln N.

    Observations are not standardised before it; :meth:`fit_features` standardises both summaries."""

    def __init__(self, x_shape: Sequence[int], hidden: int = 64, out_features: int = 32, bins: int = 8):
        super().__init__()
        if len(x_shape) != 2 or x_shape[-1] != 3:
            raise SbipipeError(f"the kinematics embedding needs [n, 3] star sets (R, v, mask), got {list(x_shape)}")
        self.bins = bins
        self.register_buffer("edges", torch.linspace(-2.0, 2.0, bins + 1)[1:-1])
        self.register_buffer("star_mean", torch.zeros(4))
        self.register_buffer("star_std", torch.ones(4))
        self.register_buffer("profile_mean", torch.zeros(3 * bins + 2))
        self.register_buffer("profile_std", torch.ones(3 * bins + 2))
        self.phi = nn.Sequential(nn.Linear(4, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.rho = nn.Sequential(nn.Linear(hidden + 3 * bins + 2, hidden), nn.SiLU(), nn.Linear(hidden, out_features))
        self.out_features = out_features

    @staticmethod
    def _stars(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-star (ln R, ln R/R_h, v, v²) ``[B, n, 4]`` (zero on padding rows), the mask ``[B, n]``
        and ln R_h ``[B, 1]`` (R_h: the median R over the stars, the lower middle one for even N)."""
        mask = x[..., 2]
        ln_r = torch.log(torch.where(mask > 0, x[..., 0], 1.0).clamp_min(1e-12))
        count = mask.sum(-1, keepdim=True).clamp_min(1.0)
        ordered = torch.where(mask > 0, ln_r, math.inf).sort(-1).values
        ln_rh = ordered.gather(-1, ((count - 1) // 2).long())
        v = x[..., 1]
        stars = torch.stack([ln_r, ln_r - ln_rh, v, v * v], -1) * mask.unsqueeze(-1)
        return stars, mask, ln_rh

    def _profiles(self, stars: Tensor, mask: Tensor, ln_rh: Tensor) -> Tensor:
        """Fraction of stars, ln(1 + ⟨v²⟩) and ⟨v⁴⟩/⟨v²⟩² per bin of ln R/R_h, ln R_h and ln N:
        ``[B, 3 bins + 2]``."""
        which = torch.nn.functional.one_hot(torch.bucketize(stars[..., 1].contiguous(), self.edges), self.bins)
        which = which.to(stars.dtype) * mask.unsqueeze(-1)  # [B, n, bins]
        count = which.sum(-2)
        total = mask.sum(-1, keepdim=True).clamp_min(1.0)
        v2 = stars[..., 3].unsqueeze(-1)
        m2 = (which * v2).sum(-2) / count.clamp_min(1.0)
        m4 = (which * v2 * v2).sum(-2) / count.clamp_min(1.0)
        kurtosis = torch.where(count > 1, m4 / (m2 * m2).clamp_min(1e-12), 3.0)  # 3: Gaussian, for < 2 stars
        return torch.cat([count / total, torch.log(m2 + 1.0), kurtosis, ln_rh, total.log()], -1)

    @torch.no_grad()
    def fit_features(self, x: Tensor) -> None:
        """Bin edges (quantiles of ln R/R_h over training stars) and the standardisation of both summaries."""
        stars, mask, ln_rh = self._stars(x[:20_000].double())
        real = stars[mask > 0]
        q = torch.linspace(0, 1, self.bins + 1, dtype=real.dtype)[1:-1]
        self.edges.copy_(torch.quantile(real[:1_000_000, 1], q).float())
        self.star_mean.copy_(real.mean(0).float())
        self.star_std.copy_(real.std(0).clamp_min(1e-8).float())
        prof = self._profiles(stars.float(), mask.float(), ln_rh.float()).double()
        self.profile_mean.copy_(prof.mean(0).float())
        self.profile_std.copy_(prof.std(0).clamp_min(1e-8).float())

    def forward(self, x: Tensor) -> Tensor:
        stars, mask, ln_rh = self._stars(x)
        count = mask.sum(-1, keepdim=True).clamp_min(1.0)
        pooled = (self.phi((stars - self.star_mean) / self.star_std) * mask.unsqueeze(-1)).sum(-2) / count
        profile = (self._profiles(stars, mask, ln_rh) - self.profile_mean) / self.profile_std
        return self.rho(torch.cat([pooled, profile], -1))


def auto_embedding(x_shape: Sequence[int]) -> str:
    """``identity`` for vectors up to 64 numbers, ``mlp`` for longer ones, ``deepset`` for
    ``[n, F ≤ 8]`` sets, ``cnn`` for 2-D fields and images."""
    shape = tuple(x_shape)
    if len(shape) == 1:
        return "identity" if shape[0] <= 64 else "mlp"
    if len(shape) == 2 and shape[1] <= 8 and shape[0] > shape[1]:
        return "deepset"
    if len(shape) in (2, 3):
        return "cnn"
    raise SbipipeError(f"no automatic embedding for observations of shape {list(shape)}; choose one of {EMBEDDINGS}")


def build_embedding(kind: str, x_shape: Sequence[int], **kwargs: Any) -> nn.Module:
    """An embedding network by name (see :data:`EMBEDDINGS`)."""
    if kind == "auto":
        kind = auto_embedding(x_shape)
    shape = tuple(x_shape)
    if kind == "identity":
        return IdentityEmbedding(shape)
    if kind == "mlp":
        return MLPEmbedding(shape, **kwargs)
    if kind in ("cnn", "cnn-circular"):
        if len(shape) not in (2, 3):
            raise SbipipeError(f"the cnn embedding needs [H, W] or [C, H, W] observations, got {list(shape)}")
        return CNNEmbedding(shape, circular=kind == "cnn-circular", **kwargs)
    if kind in ("power", "log-power"):
        return PowerSpectrumEmbedding(shape, log_field=kind == "log-power", **kwargs)
    if kind == "deepset":
        if len(shape) != 2:
            raise SbipipeError(f"the deepset embedding needs [n, features + mask] observations, got {list(shape)}")
        return DeepSetEmbedding(shape, **kwargs)
    if kind == "kinematics":
        return KinematicsEmbedding(shape, **kwargs)
    check_embedding(kind)  # raises: not a known name
    raise AssertionError(f"{kind} is in EMBEDDINGS but has no network")


def statistics_shape(kind: str, x_shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of the mean and scale that standardise observations before embedding ``kind``:
    per feature (vectors), per column (sets) or one number (images and fields)."""
    if kind in ("identity", "mlp"):
        return tuple(x_shape)
    if kind == "deepset":
        return (int(x_shape[-1]),)
    return ()


@torch.no_grad()
def observation_statistics(kind: str, x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and scale (float32) of training observations ``x [B, ...]`` for embedding ``kind``:
    per column over real set members for ``deepset`` (the mask column passes through), none
    (0 and 1) for ``log-power``, which needs δ itself, else as :func:`statistics_shape` says."""
    x = x.double()
    if kind == "deepset":
        mask = x[..., -1:]
        n = mask.sum((0, 1)).clamp_min(1)
        mean = (x * mask).sum((0, 1)) / n
        std = (((x - mean) ** 2 * mask).sum((0, 1)) / n).sqrt()
        mean[-1], std[-1] = 0.0, 1.0
    elif kind in ("log-power", "kinematics"):
        mean, std = torch.zeros((), dtype=x.dtype), torch.ones((), dtype=x.dtype)
    elif kind in ("identity", "mlp"):
        mean, std = x.mean(0), x.std(0)
    else:
        mean, std = x.mean(), x.std()
    return mean.float(), std.clamp_min(1e-6).float()


@torch.no_grad()
def fit_observation_statistics(owner: nn.Module, x: Tensor) -> None:
    """Set ``owner.x_mean``/``x_std`` (buffers of :func:`statistics_shape`) from training observations
    ``x``, and the embedding's own feature statistics where it has them (``fit_features``).
    ``owner`` holds ``embedding_kind``, ``embedding`` and the two buffers (an NPE member or a
    model-comparison classifier)."""
    mean, std = observation_statistics(owner.embedding_kind, x)
    owner.x_mean.copy_(mean)
    owner.x_std.copy_(std)
    if hasattr(owner.embedding, "fit_features"):
        owner.embedding.fit_features((x - owner.x_mean) / owner.x_std)


def embed_observations(owner: nn.Module, x: Tensor) -> Tensor:
    """``owner.embedding`` of standardised observations ``x [B, ...]``: ``[B, E]`` (the padding rows
    of sets stay exactly zero)."""
    z = (x - owner.x_mean) / owner.x_std
    if owner.embedding_kind == "deepset":
        z = z * z[..., -1:]
    return owner.embedding(z)
