r"""Bayesian model comparison with classifiers: posterior model probabilities p(M_k | x).

A classifier over K ≥ 2 candidate simulators is trained on a *balanced* mixture of their
simulations. The Bayes-optimal classifier of a balanced mixture returns p(M_k | x) under equal prior
model probabilities, so its logits are the log evidences ln p(x | M_k) up to a common constant
(e.g. Radev et al. 2021, "Amortized Bayesian model comparison with evidential deep learning");
other prior model probabilities π_k enter exactly as p(M_k | x) = softmax_k(ℓ_k(x) + ln π_k).

Losses (``loss=``):

* ``ce`` — cross-entropy over the K models (any K);
* ``evidence`` — the l-POP-Exponential loss of Jeffrey & Wandelt (2024, Mach. Learn.: Sci. Technol.
  5, 015008; arXiv:2305.11241), two models only: the network output f(x) is mapped by the leaky
  parity-odd power transform ln K̂ = lPOP_α(f) = f + f|f|^{α−1} (α = 2) and trained with
  V = exp((½ − m) · ln K̂) for labels m ∈ {0, 1}; the expected loss is minimised at
  ln K̂(x) = ln p(x | M_1) − ln p(x | M_0), the log Bayes factor.

Ensembles of members trained with seeds S…S+E−1 are combined by averaging their equal-prior model
probabilities (Lakshminarayanan et al. 2017): ℓ_k(x) = ln (1/E) Σ_e p_e(M_k | x), which tempers
over-confident members.

Calibration on held-out simulations: top-label reliability table and expected calibration error
(Guo et al. 2017: ECE = Σ_b (n_b/N) |acc_b − conf_b| over equal-width confidence bins), and the
confusion matrix. Misspecification: class-conditional Gaussian (Mahalanobis) scores
min_k (s − μ_k)ᵀ Σ_k⁻¹ (s − μ_k) (Lee et al. 2018) of two descriptions s of an observation — the
classifier's embedding (averaged over members) and model-agnostic summary statistics (per-column
moments and correlations of sets; pixel moments and the binned power spectrum of images), which
also see what the classifier learnt to ignore. Each score becomes an empirical p-value against
held-out simulations of the candidates, combined as p = min(1, 2 min(p_emb, p_sum)) (Bonferroni);
an observation with p below a level (default 0.001) is flagged as unlike anything the candidates
produce, with a false-flag rate of at most that level under the candidates.

Exact references for checks: :func:`log_evidence_grid` (tensor-product Simpson quadrature of
likelihood × prior over a bounded prior, D ≤ 3) and :func:`log_evidence_importance` (defensive
importance sampling, for higher D).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .atomic import atomic_path
from .bank import SimulationBank, simulate_bank, validation_mask
from .errors import SbipipeError
from .nets import (
    SINGLE_THREAD_EMBEDDINGS,
    auto_embedding,
    build_embedding,
    check_embedding,
    embed_observations,
    fit_observation_statistics,
    statistics_shape,
)
from .registry import get_simulator
from .simulator import Simulator, check_observation, has_likelihood
from .store import package_versions, read_card, read_weights, write_model
from .training import TensorData, TrainConfig, fit, resolve_device

__all__ = [
    "LOSSES",
    "ModelClassifier",
    "ModelComparison",
    "candidates_embedding",
    "compare_observation",
    "confusion_matrix",
    "evidence_loss",
    "expected_calibration_error",
    "fit_misspecification",
    "load_comparison",
    "log_evidence_grid",
    "log_evidence_importance",
    "lpop",
    "parse_prior_probabilities",
    "random_dihedral",
    "reliability_table",
    "summary_statistics",
    "train_comparison",
]

LOSSES = ("ce", "evidence")
KIND = "comparison"
ECE_BINS = 15
DEFAULT_LEVEL = 1e-3  # misspecification p-value below which an observation is flagged
MIN_ROWS = 50
_SEED_STRIDE = 1_000_003  # model k simulates with seed + k·stride (distinct streams per model)
_CALIBRATION_SEED = 0x5EED_CA1  # offset of the held-out calibration simulations' seeds


# -- losses ----------------------------------------------------------------------------------------


def lpop(f: Tensor, alpha: float = 2.0) -> Tensor:
    r"""Leaky parity-odd power transform lPOP_α(f) = f + f|f|^{α−1} (Jeffrey & Wandelt 2024)."""
    return f + f * f.abs() ** (alpha - 1.0)


def evidence_loss(log_k: Tensor, label: Tensor, clamp: float = 50.0) -> Tensor:
    r"""Exponential loss mean exp((½ − m) ln K̂) for labels m ∈ {0, 1}; its minimiser is
    ln K̂ = ln p(x | M_1)/p(x | M_0) for balanced classes (Jeffrey & Wandelt 2024).
    ``ln K̂`` is clamped to ±``clamp`` against overflow."""
    return torch.exp((0.5 - label.to(log_k.dtype)) * log_k.clamp(-clamp, clamp)).mean()


# -- the classifier ----------------------------------------------------------------------------------

#: preferred embeddings whose summaries contain another's (log-power holds the power of δ itself)
_COVERS = {"log-power": {"power"}}


def candidates_embedding(simulators: Sequence[Any], x_shape: Sequence[int]) -> str:
    """``--embedding auto`` for a comparison: the candidates' preferred embedding (``embedding``
    attribute) when they agree, or the one whose summaries contain the others' (``power`` and
    ``log-power`` → ``log-power``: both likelihoods, and so their ratio, depend on the data through
    it); otherwise one chosen from the observation shape."""
    preferred = {getattr(s, "embedding", None) for s in simulators}
    for kind in preferred:
        if kind is not None and preferred - {kind} <= _COVERS.get(kind, set()):
            return kind
    return auto_embedding(x_shape)


def random_dihedral(x: Tensor) -> Tensor:
    """Each image of ``x [B, (C,) H, W]`` flipped along H, along W and (square images) transposed,
    each with probability ½ (the 8 symmetries of the square; torch's global RNG)."""
    b = x.shape[0]
    shape = (b,) + (1,) * (x.ndim - 1)
    x = torch.where(torch.rand(shape, device=x.device) < 0.5, x.flip(-2), x)
    x = torch.where(torch.rand(shape, device=x.device) < 0.5, x.flip(-1), x)
    if x.shape[-1] == x.shape[-2]:
        x = torch.where(torch.rand(shape, device=x.device) < 0.5, x.transpose(-1, -2), x)
    return x


class ModelClassifier(nn.Module):
    """One member: standardisation of x, an embedding network (:mod:`sbipipe.nets`) and an MLP head.

    ``loss="ce"``: K logits; ``loss="evidence"``: one output f, ln K = lPOP(f), logits (0, ln K).
    ``augment``: train on randomly flipped and transposed images (:func:`random_dihedral`) — valid
    only when every candidate's images are statistically invariant under those symmetries (e.g.
    isotropic fields); it multiplies the effective number of training simulations."""

    def __init__(self, x_shape: Sequence[int], n_models: int, loss: str = "ce", embedding: str = "auto",
                 hidden: int = 64, alpha: float = 2.0, embedding_kwargs: dict[str, Any] | None = None,
                 augment: bool = False):
        super().__init__()
        if loss not in LOSSES:
            raise SbipipeError(f"unknown comparison loss {loss!r}; choose one of {', '.join(LOSSES)}")
        if loss == "evidence" and n_models != 2:
            raise SbipipeError(f"the evidence-network loss compares exactly two models, got {n_models}; use --loss ce")
        self.x_shape = tuple(int(s) for s in x_shape)
        self.n_models, self.loss_kind, self.alpha = int(n_models), loss, float(alpha)
        self.embedding_kind = auto_embedding(self.x_shape) if embedding == "auto" else embedding
        if augment and self.embedding_kind not in ("cnn", "cnn-circular"):
            raise SbipipeError(f"--augment flips and transposes images; the {self.embedding_kind} embedding "
                               "does not take images: leave --augment out")
        self.augment = bool(augment)
        self.embedding = build_embedding(self.embedding_kind, self.x_shape, **(embedding_kwargs or {}))
        out = self.n_models if loss == "ce" else 1
        e = self.embedding.out_features
        self.head = nn.Sequential(nn.Linear(e, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                  nn.Linear(hidden, out))
        stat = statistics_shape(self.embedding_kind, self.x_shape)
        self.register_buffer("x_mean", torch.zeros(stat))
        self.register_buffer("x_std", torch.ones(stat))

    @torch.no_grad()
    def fit_standardization(self, x: Tensor) -> None:
        """Mean and scale of x (:func:`sbipipe.nets.observation_statistics`), and the embedding's
        own feature statistics where it has them."""
        fit_observation_statistics(self, x)

    def embed(self, x: Tensor) -> Tensor:
        """Embedding e(x) ``[B, E]`` of raw observations ``x [B, ...]``."""
        return embed_observations(self, x)

    def logits_from_embedding(self, e: Tensor) -> Tensor:
        out = self.head(e)
        if self.loss_kind == "ce":
            return out
        log_k = lpop(out[:, 0], self.alpha)
        return torch.stack([torch.zeros_like(log_k), log_k], -1)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, K]``: ln p(x | M_k) up to a constant per observation (equal priors)."""
        return self.logits_from_embedding(self.embed(x))

    def loss(self, x: Tensor, label: Tensor) -> Tensor:
        """Cross-entropy, or the l-POP-Exponential loss for ``loss="evidence"``."""
        if self.augment and self.training:
            x = random_dihedral(x)
        logits = self(x).float()
        if self.loss_kind == "ce":
            return F.cross_entropy(logits, label)
        return evidence_loss(logits[:, 1], label)


# -- calibration metrics -----------------------------------------------------------------------------


def reliability_table(probs: Tensor, labels: Tensor, bins: int = ECE_BINS) -> pd.DataFrame:
    """Top-label reliability diagram: per equal-width confidence bin, the count, mean confidence and
    accuracy (empty bins have NaN)."""
    probs, labels = torch.as_tensor(probs, dtype=torch.float64), torch.as_tensor(labels).long()
    conf, pred = probs.max(-1)
    idx = (conf * bins).floor().long().clamp(0, bins - 1)
    count = torch.bincount(idx, minlength=bins).double()
    conf_sum = torch.bincount(idx, conf, minlength=bins)
    hit_sum = torch.bincount(idx, (pred == labels).double(), minlength=bins)
    nonzero = count > 0
    nan = torch.full_like(count, math.nan)
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    return pd.DataFrame({
        "lower": edges[:-1].numpy(), "upper": edges[1:].numpy(), "count": count.long().numpy(),
        "confidence": torch.where(nonzero, conf_sum / count.clamp_min(1), nan).numpy(),
        "accuracy": torch.where(nonzero, hit_sum / count.clamp_min(1), nan).numpy(),
    })


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = ECE_BINS) -> float:
    r"""ECE = Σ_b (n_b / N) |acc_b − conf_b| over ``bins`` equal-width top-label confidence bins
    (Guo et al. 2017, eq. 3)."""
    t = reliability_table(probs, labels, bins)
    ok = t["count"] > 0
    return float((t["count"][ok] * (t["accuracy"][ok] - t["confidence"][ok]).abs()).sum() / t["count"].sum())


def confusion_matrix(probs: Tensor, labels: Tensor, n_models: int | None = None) -> Tensor:
    """Counts ``[K, K]``: row = true model, column = most probable model."""
    probs, labels = torch.as_tensor(probs), torch.as_tensor(labels).long()
    k = n_models or probs.shape[-1]
    return torch.bincount(labels * k + probs.argmax(-1), minlength=k * k).reshape(k, k)


def parse_prior_probabilities(prior: str | Sequence[float] | None, names: Sequence[str]) -> Tensor:
    """Prior model probabilities as a normalised float64 ``[K]`` (``None``: equal); from a list or a
    comma-separated string; every value must be positive and finite."""
    k = len(names)
    if prior is None:
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    if isinstance(prior, str):
        try:
            values = [float(v) for v in prior.replace(" ", "").split(",") if v]
        except ValueError:
            raise SbipipeError(f"--prior {prior!r}: expected {k} comma-separated numbers for {', '.join(names)}") from None
    else:
        values = [float(v) for v in prior]
    if len(values) != k:
        raise SbipipeError(f"got {len(values)} prior model probabilities for {k} models ({', '.join(names)}); give one per model")
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad:
        raise SbipipeError(f"prior model probabilities must be positive and finite, got {bad[0]:g}; "
                           "a model with prior 0 cannot be chosen: leave it out of the comparison")
    p = torch.tensor(values, dtype=torch.float64)
    return p / p.sum()


# -- the trained comparison --------------------------------------------------------------------------


class ModelComparison:
    """p(M_k | x) for K candidate models from an ensemble of :class:`ModelClassifier` members."""

    def __init__(self, members: Sequence[ModelClassifier], card: dict[str, Any],
                 ood: dict[str, Tensor] | None = None, device: torch.device | str = "cpu"):
        self.members = [m.eval() for m in members]
        self.card = card
        self.names: list[str] = [m["name"] for m in card["models"]]
        self.observation_shape = tuple(card["observation_shape"])
        self.device = torch.device(device)
        self.ood = ood or {}

    def __repr__(self) -> str:
        arch = self.card["architecture"]
        return (f"<ModelComparison of {', '.join(self.names)}: {len(self.members)} x {arch['loss']} classifier, "
                f"{arch['embedding']} embedding>")

    # -- inputs --------------------------------------------------------------------------------
    def validate(self, x: Any) -> Tensor:
        """``x`` as float32 ``[M, *observation_shape]`` (one observation or a stack), checked for
        shape and NaN/inf, and by the first model's simulator where it is installed."""
        sim = _optional_simulator(self.names[0])
        if sim is not None and tuple(sim.observation_shape) == self.observation_shape:
            return sim.validate_observation(x)
        return check_observation(x, self.observation_shape, "comparison")

    @torch.no_grad()
    def _member_outputs(self, x: Tensor, chunk: int = 2048) -> tuple[Tensor, Tensor]:
        """Per-member logits ``[E, M, K]`` and misspecification scores ``[E, M]`` (float64)."""
        logits, scores = [], []
        for m_idx, member in enumerate(self.members):
            lg, sc = [], []
            for i in range(0, len(x), chunk):
                e = member.embed(x[i : i + chunk].to(self.device))
                lg.append(member.logits_from_embedding(e).double().cpu())
                if f"ood.member{m_idx}.mean" in self.ood:
                    sc.append(_mahalanobis_min(e.double().cpu(), self.ood[f"ood.member{m_idx}.mean"],
                                               self.ood[f"ood.member{m_idx}.precision"]))
            logits.append(torch.cat(lg))
            scores.append(torch.cat(sc) if sc else torch.full((len(x),), math.nan, dtype=torch.float64))
        return torch.stack(logits), torch.stack(scores)

    # -- outputs -------------------------------------------------------------------------------
    def log_evidences(self, x: Any) -> Tensor:
        r"""ℓ_k(x) = ln (1/E) Σ_e p_e(M_k | x) at equal priors ``[M, K]`` (float64): ln p(x | M_k) up to
        a constant per observation."""
        logits, _ = self._member_outputs(self.validate(x))
        return _combine(logits)

    def probabilities(self, x: Any, prior: str | Sequence[float] | None = None) -> Tensor:
        """p(M_k | x) ``[M, K]`` for prior model probabilities ``prior`` (default equal)."""
        log_prior = parse_prior_probabilities(prior, self.names).log()
        return torch.softmax(self.log_evidences(x) + log_prior, -1)

    def log_bayes_factor(self, x: Any) -> Tensor:
        """ln K = ln p(x | M_2) − ln p(x | M_1) for two models, ``[M]`` (independent of the priors)."""
        if len(self.names) != 2:
            raise SbipipeError(f"a single log Bayes factor needs two models; this comparison has {len(self.names)}")
        ell = self.log_evidences(x)
        return ell[:, 1] - ell[:, 0]

    def misspecification_pvalue(self, x: Any) -> Tensor:
        """p-value ``[M]`` of each observation against held-out simulations of the candidates:
        min(1, 2 min(p_emb, p_sum)) of the embedding and summary-statistic scores, each
        (1 + #{reference ≥ score}) / (1 + n_reference); small = unlike every model."""
        x = self.validate(x)
        _, scores = self._member_outputs(x)
        return self._pvalue(x, scores)

    def _summary_score(self, x: Tensor) -> Tensor | None:
        if "ood.summary.mean" not in self.ood:
            return None
        s = summary_statistics(x.cpu(), self.members[0].embedding_kind)
        return _mahalanobis_min(s, self.ood["ood.summary.mean"], self.ood["ood.summary.precision"])

    def _pvalue(self, x: Tensor, member_scores: Tensor) -> Tensor:
        p = _empirical_pvalue(member_scores.mean(0), self.ood.get("ood.reference"))
        summary = self._summary_score(x)
        if summary is not None:
            p = (2.0 * torch.minimum(p, _empirical_pvalue(summary, self.ood.get("ood.summary_reference")))).clamp(max=1.0)
        return p

    def table(self, x: Any, prior: str | Sequence[float] | None = None, level: float = DEFAULT_LEVEL,
              blank_misspecified: bool = True) -> pd.DataFrame:
        """One row per observation: the probability of each model, ``log_bayes_factor`` (two models),
        the most probable model, the misspecification p-value and flag. Flagged rows get NaN
        probabilities (no confident answer for data no candidate produces) unless
        ``blank_misspecified=False``."""
        if not (0.0 <= level < 1.0):
            raise SbipipeError(f"the misspecification level must be in [0, 1), got {level:g}")
        log_prior = parse_prior_probabilities(prior, self.names).log()
        x = self.validate(x)
        logits, scores = self._member_outputs(x)
        ell = _combine(logits)
        probs = torch.softmax(ell + log_prior, -1)
        pvalue = self._pvalue(x, scores)
        flagged = pvalue < level
        out = pd.DataFrame({"observation": np.arange(len(ell))})
        blank = flagged if blank_misspecified else torch.zeros_like(flagged)
        for k, name in enumerate(self.names):
            out[name] = torch.where(blank, math.nan, probs[:, k]).numpy()
        if len(self.names) == 2:
            out["log_bayes_factor"] = torch.where(blank, math.nan, ell[:, 1] - ell[:, 0]).numpy()
        out["most_probable"] = [("" if b else self.names[int(i)]) for i, b in zip(probs.argmax(-1), blank.tolist())]
        out["misspecification_pvalue"] = pvalue.numpy()
        out["misspecified"] = flagged.numpy()
        return out


def summary_statistics(x: Tensor, kind: str, bins: int = 8) -> Tensor:
    """Model-agnostic summaries ``[B, S]`` (float64) for the misspecification test.

    Sets ``[B, n, F + 1]`` (mask last): per column log std, mean/std, skewness and kurtosis over the
    real members, per column pair the correlations of z_i z_j and of (z_i² − 1)(z_j² − 1), and
    log(count). Images ``[B, (C,) H, W]``: log std, mean/std, skewness and kurtosis of the pixels and
    the log power in ``bins`` log-spaced radial bins of |k|. Vectors: their first 64 values."""
    x = x.double()
    if kind in ("deepset", "kinematics"):
        vals, mask = x[..., :-1], x[..., -1:]
        n = mask.sum(1).clamp_min(1.0)  # [B, 1]
        mean = (vals * mask).sum(1) / n
        c = (vals - mean.unsqueeze(1)) * mask
        std = ((c**2).sum(1) / n).sqrt().clamp_min(1e-12)
        z = c / std.unsqueeze(1)
        feats = [std.log(), mean / std, (z**3).sum(1) / n, (z**4).sum(1) / n]
        f = vals.shape[-1]
        sq = (z**2 - 1.0) * mask
        for i in range(f):
            for j in range(i + 1, f):
                feats += [(z[..., i] * z[..., j]).sum(1, keepdim=True) / n, (sq[..., i] * sq[..., j]).sum(1, keepdim=True) / n]
        return torch.cat([*feats, n.log()], -1)
    if kind in ("cnn", "cnn-circular", "power", "log-power"):
        img = x.reshape(len(x), -1, *x.shape[-2:])
        flat = img.flatten(1)
        mean, std = flat.mean(1, keepdim=True), flat.std(1, keepdim=True).clamp_min(1e-12)
        z = (flat - mean) / std
        h, w = img.shape[-2:]
        ky = torch.fft.fftfreq(h, dtype=torch.float64) * h
        kx = torch.fft.rfftfreq(w, dtype=torch.float64) * w
        kmag = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2).reshape(-1)
        edges = torch.logspace(0, math.log10(min(h, w) / 2 + 1e-9), bins + 1, dtype=torch.float64)
        idx = (torch.bucketize(kmag, edges, right=True) - 1).clamp(-1, bins)
        ok = (idx >= 0) & (idx < bins)
        onehot = F.one_hot(idx.clamp(0, bins - 1), bins).double() * ok.unsqueeze(-1)
        power = (torch.fft.rfft2(img).abs() ** 2).mean(1).reshape(len(x), -1)  # channels averaged
        binned = (power @ onehot) / onehot.sum(0).clamp_min(1.0)
        return torch.cat([std.log(), mean / std, (z**3).mean(1, keepdim=True), (z**4).mean(1, keepdim=True),
                          binned.clamp_min(1e-300).log()], -1)
    return x.flatten(1)[:, :64]


def _combine(logits: Tensor) -> Tensor:
    """Members' logits ``[E, M, K]`` → ln of the mean equal-prior probabilities ``[M, K]``."""
    return torch.logsumexp(torch.log_softmax(logits, -1), 0) - math.log(logits.shape[0])


def _empirical_pvalue(score: Tensor, reference: Tensor | None) -> Tensor:
    """(1 + #{reference ≥ score}) / (1 + n) against a sorted reference (1 without one; NaN → 0)."""
    if reference is None:
        return torch.ones_like(score)
    above = len(reference) - torch.searchsorted(reference, score.contiguous(), right=False)
    p = (1.0 + above.double()) / (1.0 + len(reference))
    return torch.where(torch.isnan(score), torch.full_like(p, 1.0 / (1.0 + len(reference))), p)


def _mahalanobis_min(e: Tensor, mean: Tensor, precision: Tensor) -> Tensor:
    """min_k (e − μ_k)ᵀ P_k (e − μ_k) for ``e [M, E]``, ``mean [K, E]``, ``precision [K, E, E]``."""
    d = e.unsqueeze(1) - mean  # [M, K, E]
    return torch.einsum("mke,kef,mkf->mk", d, precision, d).min(-1).values


def _class_gaussians(e: Tensor, labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-class mean ``[K, E]`` and precision ``[K, E, E]`` of embeddings (ridge 10⁻⁶·tr/E)."""
    means, precs = [], []
    for c in range(k):
        ec = e[labels == c]
        mu = ec.mean(0)
        cov = torch.cov((ec - mu).T).reshape(e.shape[1], e.shape[1])
        ridge = 1e-6 * cov.diagonal().mean().clamp_min(1e-12)
        means.append(mu)
        precs.append(torch.linalg.inv(cov + ridge * torch.eye(e.shape[1], dtype=cov.dtype)))
    return torch.stack(means), torch.stack(precs)


def _optional_simulator(name: str) -> Simulator | None:
    try:
        return get_simulator(name)
    except SbipipeError:
        return None


# -- training ----------------------------------------------------------------------------------------


def _resolve_model(spec: Any) -> tuple[str, Simulator | None, SimulationBank | None]:
    """A bank path (an existing file or a ``.h5`` name) or a simulator (name, import path, object)."""
    if isinstance(spec, SimulationBank):
        return spec.simulator_name, _optional_simulator(spec.simulator_name), spec
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if path.is_file() or path.suffix.lower() in (".h5", ".hdf5"):
            bank = SimulationBank(path)
            sim = _optional_simulator(bank.simulator_name)
            if sim is not None and str(sim.version) != bank.simulator_version:
                raise SbipipeError(
                    f"{str(path)!r} was simulated with {bank.simulator_name} v{bank.simulator_version} but the simulator "
                    f"is now v{sim.version}; simulate a new bank")
            return bank.simulator_name, sim, bank
        sim = get_simulator(str(spec))
        return sim.name, sim, None
    sim = get_simulator(spec)
    return sim.name, sim, None


def _simulate_fresh(sim: Simulator, n: int, seed: int, chunk: int = 10_000) -> Tensor:
    """``n`` finite prior-predictive simulations (chunks of ``chunk``; non-finite rows dropped)."""
    gen = torch.Generator().manual_seed(seed)
    parts, have = [], 0
    for _ in range(1000):
        size = min(chunk, n - have)
        x = sim.simulate(sim.sample_prior(size, gen), gen).to(torch.float32)
        x = x[torch.isfinite(x.reshape(len(x), -1)).all(1)]
        parts.append(x)
        have += len(x)
        if have >= n:
            break
    else:
        raise SbipipeError(f"{sim.name}: could not draw {n} finite simulations; check the simulator")
    return torch.cat(parts)[:n]


def train_comparison(
    models: Sequence[Any],
    output: str | os.PathLike,
    n: int | None = None,
    loss: str = "ce",
    embedding: str = "auto",
    ensemble: int = 1,
    max_epochs: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    seed: int = 0,
    calibration_rows: int = 2000,
    hidden: int = 64,
    embedding_kwargs: dict[str, Any] | None = None,
    train_options: dict[str, Any] | None = None,
    augment: bool = False,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    bank_progress: Callable[[str], Callable[[int, int], None]] | None = None,
) -> ModelComparison:
    """Train a model-comparison classifier and write the model directory ``output``.

    ``models``: K ≥ 2 simulators (short names, import paths or objects; ``n`` rows each are simulated
    into ``output/banks/NAME.h5`` with seed ``seed + k·1000003``, reused on a re-run) or bank paths
    (their first ``n`` rows, default as many as the smallest holds). Classes are balanced by
    truncation to the smallest training split. ``augment``: random flips and transposes of image
    observations while training (for statistically isotropic fields). Calibration (ECE, reliability, confusion) and the
    misspecification reference use ``calibration_rows`` fresh simulations per model (the banks'
    validation splits where a simulator is not installed)."""
    from .npe import default_batch_size, default_max_epochs

    t_start = time.perf_counter()
    if len(models) < 2:
        raise SbipipeError(f"model comparison needs at least 2 candidate models, got {len(models)}; name two or more simulators or banks")
    if loss not in LOSSES:
        raise SbipipeError(f"unknown comparison loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if loss == "evidence" and len(models) != 2:
        raise SbipipeError(f"the evidence-network loss compares exactly two models, got {len(models)}; use --loss ce")
    check_embedding(embedding)
    if ensemble < 1:
        raise SbipipeError(f"--ensemble must be at least 1, got {ensemble}")
    if n is not None and n < MIN_ROWS:
        raise SbipipeError(f"-n must be at least {MIN_ROWS} simulations per model, got {n}")
    if calibration_rows < 0:
        raise SbipipeError(f"--calibration-rows must be >= 0, got {calibration_rows}")
    dev = resolve_device(device)
    resolved = [_resolve_model(m) for m in models]
    names = [r[0] for r in resolved]
    if len(set(names)) != len(names):
        dup = next(nm for nm in names if names.count(nm) > 1)
        raise SbipipeError(f"model {dup!r} is given more than once; compare different models")
    shapes = [tuple(b.x_shape) if b is not None else tuple(s.observation_shape) for _, s, b in resolved]
    if len(set(shapes)) > 1:
        listed = ", ".join(f"{nm} {list(sh)}" for nm, sh in zip(names, shapes))
        raise SbipipeError(f"the models produce observations of different shapes ({listed}); "
                           "compare models of one observation type")
    x_shape = shapes[0]
    if any(b is None for _, _, b in resolved) and n is None:
        raise SbipipeError("-n (simulations per model) is needed to simulate " +
                           ", ".join(nm for nm, _, b in resolved if b is None))
    out = Path(output)
    # -- data: banks given or simulated into output/banks --------------------------------------
    banks: list[SimulationBank] = []
    for k, (name, sim, bank) in enumerate(resolved):
        if bank is None:
            report = bank_progress(name) if bank_progress else None
            bank = simulate_bank(sim, out / "banks" / f"{name}.h5", int(n), seed=seed + k * _SEED_STRIDE, progress=report)
        banks.append(bank)
    rows = min(b.rows for b in banks) if n is None else int(n)
    for b in banks:
        if b.rows < rows:
            raise SbipipeError(f"{str(b.path)!r} holds {b.rows} rows, fewer than -n {rows}; simulate more or lower -n")
    if rows < MIN_ROWS:
        raise SbipipeError(f"the smallest bank holds {rows} rows; train on at least {MIN_ROWS} per model (simulate more)")
    val_mask = torch.from_numpy(validation_mask(np.arange(rows), 0.1))
    xs_train, xs_val = [], []
    for b in banks:
        _, x = b.read(0, rows)
        xs_train.append(x[~val_mask])
        xs_val.append(x[val_mask])
    n_train, n_val = min(len(x) for x in xs_train), min(len(x) for x in xs_val)

    def stack(parts: list[Tensor], size: int) -> tuple[Tensor, Tensor]:
        return (torch.cat([p[:size] for p in parts]),
                torch.arange(len(parts)).repeat_interleave(size))

    x_train, y_train = stack(xs_train, n_train)
    x_val, y_val = stack(xs_val, n_val)
    del xs_train, xs_val
    # -- held-out calibration simulations --------------------------------------------------------
    sims = [s for _, s, _ in resolved]
    fresh = calibration_rows > 0 and all(s is not None for s in sims)
    if fresh:
        x_cal = torch.cat([_simulate_fresh(s, calibration_rows, seed + _CALIBRATION_SEED + k * _SEED_STRIDE)
                           for k, s in enumerate(sims)])
        y_cal = torch.arange(len(sims)).repeat_interleave(calibration_rows)
        cal_source = "fresh simulations"
    else:
        x_cal, y_cal, cal_source = x_val, y_val, "validation split (also used for early stopping)"
    # -- members ---------------------------------------------------------------------------------
    kind = candidates_embedding(sims, x_shape) if embedding == "auto" else embedding
    batch_size = batch_size or default_batch_size(len(x_train))
    config = TrainConfig(
        max_epochs=max_epochs or default_max_epochs(len(x_train), batch_size), batch_size=batch_size,
        device=str(dev), seed=seed, threads=1 if kind in SINGLE_THREAD_EMBEDDINGS else None,
        **(train_options or {}),
    )
    arch = {"kind": KIND, "loss": loss, "embedding": kind, "embedding_kwargs": embedding_kwargs or {},
            "hidden": hidden, "ensemble": ensemble, "n_models": len(names), "augment": bool(augment),
            **({"lpop_alpha": 2.0} if loss == "evidence" else {})}
    train, val = TensorData(x_train, y_train), TensorData(x_val, y_val)
    fit_sample = x_train[torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))[:20_000]]
    members, histories = [], []
    for k in range(ensemble):
        torch.manual_seed(seed + k)
        member = build_classifier(x_shape, arch)
        member.fit_standardization(fit_sample)
        cfg = TrainConfig(**{**config.__dict__, "seed": seed + k})
        report = (lambda row, k=k: progress(k, row)) if progress else None
        history = fit(member, train, val, cfg, progress=report)
        members.append(member.cpu().eval())
        histories.append(history.assign(member=k))
    # -- calibration and the misspecification reference ----------------------------------------
    comparison = ModelComparison(members, {"models": [{"name": nm} for nm in names], "observation_shape": list(x_shape),
                                           "architecture": arch})
    pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed + 1))[: 20_000 * len(names)]
    logits = fit_misspecification(comparison, x_train[pick], y_train[pick], x_cal)
    ood = comparison.ood
    probs = torch.softmax(_combine(logits), -1)
    member_probs = torch.softmax(logits, -1)
    reliability = reliability_table(probs, y_cal)
    confusion = confusion_matrix(probs, y_cal, len(names))
    calibration = {
        "source": cal_source,
        "rows_per_model": int(len(y_cal) // len(names)),
        "bins": ECE_BINS,
        "ece": expected_calibration_error(probs, y_cal),
        "ece_members": [expected_calibration_error(p, y_cal) for p in member_probs],
        "accuracy": float((probs.argmax(-1) == y_cal).double().mean()),
        "log_loss": float(-torch.log(probs[torch.arange(len(y_cal)), y_cal].clamp_min(1e-300)).mean()),
        "confusion": confusion.tolist(),
    }
    history = pd.concat(histories, ignore_index=True)
    card: dict[str, Any] = {
        "kind": KIND,
        "models": [
            {"name": nm, "simulator_version": b.simulator_version, "bank": str(b.path.resolve()),
             "bank_sha256": b.content_hash()}
            for nm, b in zip(names, banks)
        ],
        "observation_shape": list(x_shape),
        "architecture": arch,
        "training": {
            "rows_per_model": rows, "train_rows_per_model": n_train, "val_rows_per_model": n_val,
            "config": {**config.__dict__}, "device": str(dev), "seed": seed,
            "seconds": round(time.perf_counter() - t_start, 3),
            "final": [{"member": k, "epochs": int(h["epoch"].max()), "best_val_loss": float(h["val_loss"].min())}
                      for k, h in enumerate(histories)],
        },
        "calibration": calibration,
        "misspecification": {
            "score": "min over models of the Mahalanobis distance² to that model's training simulations "
                     "(class-conditional Gaussians) of (a) the embedding, averaged over members, and (b) summary "
                     "statistics; p = min(1, 2 min(p_a, p_b)) against held-out simulations",
            "reference_rows": int(len(ood["ood.reference"])),
            "default_level": DEFAULT_LEVEL,
        },
        "packages": package_versions(),
    }
    tensors = {f"member{k}.{nm}": t for k, m in enumerate(members) for nm, t in m.state_dict().items()}
    tensors.update({k: v.double() for k, v in ood.items()})
    write_model(out, tensors, card)
    for name, frame in (("history.csv", history), ("calibration.csv", reliability),
                        ("confusion.csv", pd.DataFrame(confusion.numpy(), index=names, columns=names))):
        with atomic_path(out / name) as tmp:
            frame.to_csv(tmp, index=name == "confusion.csv", index_label="true\\predicted" if name == "confusion.csv" else None)
    from .comparison_plots import calibration_plot

    calibration_plot(reliability, confusion, names, out / "calibration.png", ece=calibration["ece"])
    return ModelComparison(members, {"format": "sbipipe.model/1", **card}, ood)


def fit_misspecification(comparison: ModelComparison, x_train: Tensor, y_train: Tensor, x_ref: Tensor) -> Tensor:
    """Fit the misspecification test of ``comparison`` in place: class-conditional Gaussians of the
    members' embeddings and of the summary statistics on training simulations ``x_train`` with
    labels ``y_train``, and the sorted reference scores of held-out simulations ``x_ref`` (a
    balanced mixture of the candidates). Returns the members' logits on ``x_ref`` ``[E, M, K]``."""
    k = len(comparison.names)
    ood: dict[str, Tensor] = {}
    for m_idx, member in enumerate(comparison.members):
        with torch.no_grad():
            e = torch.cat([member.embed(x_train[i : i + 2048].to(comparison.device)).double().cpu()
                           for i in range(0, len(x_train), 2048)])
        ood[f"ood.member{m_idx}.mean"], ood[f"ood.member{m_idx}.precision"] = _class_gaussians(e, y_train, k)
    s_train = summary_statistics(x_train, comparison.members[0].embedding_kind)
    ood["ood.summary.mean"], ood["ood.summary.precision"] = _class_gaussians(s_train, y_train, k)
    comparison.ood = ood
    logits, scores = comparison._member_outputs(x_ref)
    ood["ood.reference"] = scores.mean(0).sort().values
    ood["ood.summary_reference"] = comparison._summary_score(x_ref).sort().values
    return logits


def build_classifier(x_shape: Sequence[int], arch: dict[str, Any]) -> ModelClassifier:
    return ModelClassifier(x_shape, arch["n_models"], loss=arch["loss"], embedding=arch["embedding"],
                           hidden=arch.get("hidden", 64), alpha=arch.get("lpop_alpha", 2.0),
                           embedding_kwargs=arch.get("embedding_kwargs") or {}, augment=arch.get("augment", False))


def load_comparison(directory: str | os.PathLike, device: str = "cpu") -> ModelComparison:
    """Load a model-comparison directory written by :func:`train_comparison`."""
    card = read_card(directory)
    if card.get("kind") != KIND:
        raise SbipipeError(f"{str(directory)!r} holds a {card.get('architecture', {}).get('kind', 'different')} model, "
                           "not a model comparison; train one with `sbipipe compare train`")
    for m in card["models"]:
        sim = _optional_simulator(m["name"])
        if sim is not None and str(sim.version) != str(m["simulator_version"]):
            raise SbipipeError(f"this comparison was trained on {m['name']} v{m['simulator_version']}, but the simulator "
                               f"is now v{sim.version}; retrain it")
    weights = read_weights(directory)
    members = []
    for k in range(int(card["architecture"]["ensemble"])):
        member = build_classifier(card["observation_shape"], card["architecture"])
        prefix = f"member{k}."
        try:
            member.load_state_dict({key[len(prefix):]: v for key, v in weights.items() if key.startswith(prefix)})
        except RuntimeError as exc:
            raise SbipipeError(f"{str(directory)!r}: the weights do not match the card's architecture "
                               f"({str(exc).splitlines()[0][:120]}); retrain the model") from None
        members.append(member)
    dev = resolve_device(device)
    ood = {k: v for k, v in weights.items() if k.startswith("ood.")}
    return ModelComparison([m.to(dev) for m in members], card, ood, dev)


def compare_observation(model: str | os.PathLike | ModelComparison, observation: str | os.PathLike,
                        output: str | os.PathLike, prior: str | Sequence[float] | None = None,
                        level: float = DEFAULT_LEVEL, device: str = "cpu") -> tuple[ModelComparison, pd.DataFrame]:
    """Posterior model probabilities of an observation file (one observation or a stack) written
    to the CSV ``output`` (atomically): :meth:`ModelComparison.table`, one row per observation.
    ``model``: a model-comparison directory or a loaded :class:`ModelComparison`. Returns both.
    ``sbipipe compare run`` and the ``compare`` flow call this."""
    from .atomic import check_writable
    from .observations import load_observation

    comp = model if isinstance(model, ModelComparison) else load_comparison(model, device=device)
    check_writable(output)
    sim = _optional_simulator(comp.names[0])
    sim = sim if sim is not None and tuple(sim.observation_shape) == comp.observation_shape else None
    x = load_observation(observation, sim, comp.observation_shape, "comparison")
    table = comp.table(x, prior=prior, level=level)
    with atomic_path(output) as tmp:
        table.to_csv(tmp, index=False)
    return comp, table


# -- exact evidences for checks ----------------------------------------------------------------------


def _box(simulator: Simulator) -> tuple[Tensor, Tensor]:
    from .estimators import prior_bounds

    lo, hi = prior_bounds(simulator.prior, simulator.dim)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise SbipipeError(f"{simulator.name}: evidence quadrature needs a bounded prior; use log_evidence_importance")
    return lo, hi


def _log_prior(simulator: Simulator, theta: Tensor, closed: bool = False) -> Tensor:
    """log π(θ) (float64) with −inf outside the support, never raising. ``closed``: points on the
    upper edge of a box prior (whose support is half-open) count as inside, for quadrature nodes."""
    t = theta.float()
    if closed:
        lo, hi = (b.float() for b in _box(simulator))
        t = torch.where(t >= hi, torch.nextafter(hi, lo).expand_as(t), t)
    inside = simulator.prior.support.check(t)
    inside = inside if inside.ndim == 1 else inside.all(-1)
    safe = torch.where(inside.unsqueeze(-1), t, simulator.sample_prior(1, torch.Generator().manual_seed(0)).float())
    lp = simulator.prior.log_prob(safe).double()
    return torch.where(inside, lp, torch.full_like(lp, -math.inf))


def _log_lik(simulator: Simulator, theta: Tensor, x: Tensor, chunk: int = 20_000) -> Tensor:
    return torch.cat([simulator.log_likelihood(theta[i : i + chunk], x).double().reshape(-1)
                      for i in range(0, len(theta), chunk)])


def _simpson(n: int, a: float, b: float) -> Tensor:
    w = torch.ones(n, dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return w * (b - a) / (n - 1) / 3.0


def _grid_integral(simulator: Simulator, x: Tensor, lo: Tensor, hi: Tensor, points: int) -> tuple[Tensor, Tensor]:
    """log ∫_box L π dθ by tensor-product Simpson, and the log integrand on the grid ``[points^D]``."""
    axes = [torch.linspace(float(a), float(b), points, dtype=torch.float64) for a, b in zip(lo, hi)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(axes))
    log_f = _log_lik(simulator, grid, x) + _log_prior(simulator, grid, closed=True)
    log_w = sum(torch.log(_simpson(points, float(a), float(b))).reshape([-1 if i == j else 1 for j in range(len(axes))])
                for i, (a, b) in enumerate(zip(lo, hi))).reshape(-1)
    return torch.logsumexp(log_f + log_w, 0), log_f


def log_evidence_grid(simulator: Any, x: Any, points: int = 201, coarse: int = 81,
                      drop: float = 40.0) -> tuple[Tensor, Tensor]:
    r"""ln p(x | M) = ln ∫ p(x | θ) π(θ) dθ for each observation of ``x`` by tensor-product Simpson
    quadrature on a bounded prior (D ≤ 3). A ``coarse`` grid over the prior finds where the integrand
    is within ``drop`` nats of its maximum; a ``points`` grid covers that box (one coarse step wider,
    clipped to the prior). Returns ``(log_z [M], error [M])``, the error being the difference to the
    same rule on half the points."""
    sim = get_simulator(simulator)
    if not has_likelihood(sim):
        raise SbipipeError(f"{sim.name} has no exact log_likelihood; evidence quadrature needs one")
    if sim.dim > 3:
        raise SbipipeError(f"{sim.name} has {sim.dim} parameters; grid quadrature is for D <= 3 (use log_evidence_importance)")
    if points % 2 == 0 or coarse % 2 == 0 or (points // 2) % 2:
        raise SbipipeError("points and coarse must be odd, and points // 2 even (Simpson on the full and half grid)")
    x = sim.validate_observation(x)
    lo, hi = _box(sim)
    log_z, err = [], []
    for obs in x:
        _, log_f = _grid_integral(sim, obs, lo, hi, coarse)
        if not torch.isfinite(log_f).any():
            log_z.append(torch.tensor(-math.inf, dtype=torch.float64))
            err.append(torch.tensor(0.0, dtype=torch.float64))
            continue
        axes = [torch.linspace(float(a), float(b), coarse, dtype=torch.float64) for a, b in zip(lo, hi)]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(axes))
        keep = grid[log_f > log_f.max() - drop]
        step = (hi - lo) / (coarse - 1)
        a, b = torch.maximum(keep.min(0).values - step, lo), torch.minimum(keep.max(0).values + step, hi)
        fine, _ = _grid_integral(sim, obs, a, b, points)
        half, _ = _grid_integral(sim, obs, a, b, points // 2 + 1)
        log_z.append(fine)
        err.append((fine - half).abs())
    return torch.stack(log_z), torch.stack(err)


def log_evidence_importance(simulator: Any, x: Any, n: int = 50_000, seed: int = 0,
                            inflate: float = 2.0) -> tuple[Tensor, Tensor]:
    r"""ln p(x | M) for each observation by defensive importance sampling (Hesterberg 1995):
    ``n`` prior draws locate the posterior; ``n`` more are drawn from q = ½ π + ½ N(μ, inflate·Σ)
    (μ, Σ the likelihood-weighted moments of the first stage) and Ẑ = mean π L / q. Returns
    ``(log_z [M], standard_error [M])`` with the delta-method error std(w) / (√n mean(w))."""
    sim = get_simulator(simulator)
    if not has_likelihood(sim):
        raise SbipipeError(f"{sim.name} has no exact log_likelihood; evidence estimation needs one")
    x = sim.validate_observation(x)
    gen = torch.Generator().manual_seed(seed)
    log_z, se = [], []
    d = sim.dim
    for obs in x:
        th = sim.sample_prior(n, gen).double()
        ll = _log_lik(sim, th, obs)
        w = torch.softmax(ll, 0)
        mu = (w[:, None] * th).sum(0)
        cov = ((th - mu).T * w) @ (th - mu) + 1e-9 * torch.eye(d, dtype=torch.float64)
        chol = torch.linalg.cholesky(inflate * cov)
        half = n // 2
        th_g = mu + torch.randn(n - half, d, generator=gen, dtype=torch.float64) @ chol.T
        th_p = sim.sample_prior(half, gen).double()
        th2 = torch.cat([th_p, th_g])
        mvn = torch.distributions.MultivariateNormal(mu, scale_tril=chol)
        lp = _log_prior(sim, th2)
        log_q = torch.logaddexp(lp, mvn.log_prob(th2)) - math.log(2.0)
        inside = torch.isfinite(lp)
        log_w = torch.full((n,), -math.inf, dtype=torch.float64)
        log_w[inside] = _log_lik(sim, th2[inside], obs) + lp[inside] - log_q[inside]
        m = log_w.max()
        wt = torch.exp(log_w - m)
        mean = wt.mean()
        log_z.append(m + torch.log(mean))
        se.append(wt.std() / (math.sqrt(n) * mean))
    return torch.stack(log_z), torch.stack(se)
