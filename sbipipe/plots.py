"""Plots people would rather look at than read: corner plots of posterior samples, SBC rank
histograms with their binomial band, expected-coverage and TARP curves."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from torch import Tensor  # noqa: E402

from .atomic import atomic_path  # noqa: E402

__all__ = ["corner_plot", "coverage_plot", "rank_histograms", "tarp_plot"]


def corner_plot(
    samples: Sequence[Tensor] | Tensor,
    labels: Sequence[str],
    path: str | os.PathLike,
    names: Sequence[str] | None = None,
    truth: Sequence[float] | None = None,
    bins: int = 40,
) -> None:
    """Histograms on the diagonal and 2-D histograms below it, for one or more sample sets
    ``[N, D]`` (overlaid in different colours); ``truth`` is marked with lines."""
    sets = [samples] if isinstance(samples, Tensor) else list(samples)
    sets = [s.detach().cpu().double().numpy() for s in sets]
    d = sets[0].shape[1]
    lo = np.min([np.quantile(s, 0.001, axis=0) for s in sets], axis=0)
    hi = np.max([np.quantile(s, 0.999, axis=0) for s in sets], axis=0)
    if truth is not None:
        lo, hi = np.minimum(lo, truth), np.maximum(hi, truth)
    pad = 0.05 * (hi - lo + 1e-12)
    lo, hi = lo - pad, hi + pad
    colours = ["C0", "C1", "C2", "C3"]
    size = min(2.2 * d, 16)
    fig, axes = plt.subplots(d, d, figsize=(size, size), squeeze=False)
    for i in range(d):
        for j in range(d):
            ax = axes[i, j]
            if j > i:
                ax.axis("off")
                continue
            for k, s in enumerate(sets):
                c = colours[k % len(colours)]
                if i == j:
                    ax.hist(s[:, i], bins=bins, range=(lo[i], hi[i]), histtype="step", density=True, color=c)
                else:
                    h, xe, ye = np.histogram2d(s[:, j], s[:, i], bins=bins, range=[[lo[j], hi[j]], [lo[i], hi[i]]])
                    ax.contour(0.5 * (xe[1:] + xe[:-1]), 0.5 * (ye[1:] + ye[:-1]), h.T, levels=_levels(h), colors=c,
                               linewidths=0.8)
            if truth is not None:
                ax.axvline(truth[j], color="k", lw=0.7)
                if i != j:
                    ax.axhline(truth[i], color="k", lw=0.7)
            ax.set_xlim(lo[j], hi[j])
            if i != j:
                ax.set_ylim(lo[i], hi[i])
            else:
                ax.set_yticks([])
            if i == d - 1:
                ax.set_xlabel(labels[j])
            else:
                ax.set_xticklabels([])
            if j == 0 and i > 0:
                ax.set_ylabel(labels[i])
            elif j > 0:
                ax.set_yticklabels([])
    if names:
        handles = [plt.Line2D([], [], color=colours[k % len(colours)]) for k in range(len(sets))]
        fig.legend(handles, names, loc="upper right")
    fig.tight_layout()
    _save(fig, path)


def rank_histograms(
    counts: np.ndarray, labels: Sequence[str], band: tuple[float, float], path: str | os.PathLike,
    pvalues: Sequence[float] | None = None,
) -> None:
    """SBC rank histograms ``counts [B, D]`` with the grey binomial band of uniform ranks."""
    counts = np.asarray(counts)
    bins, d = counts.shape
    cols = min(d, 4)
    rows = -(-d // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.4 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= d:
            ax.axis("off")
            continue
        ax.axhspan(band[0], band[1], color="0.85", lw=0)
        ax.axhline(counts[:, k].sum() / bins, color="0.5", lw=0.7)
        ax.bar(np.arange(bins), counts[:, k], width=1.0, color="C0", alpha=0.8)
        title = labels[k] + (f"  (p = {pvalues[k]:.2g})" if pvalues is not None else "")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_xlabel("rank")
    fig.tight_layout()
    _save(fig, path)


def coverage_plot(levels: np.ndarray, coverage: np.ndarray, band: float, path: str | os.PathLike) -> None:
    """Expected coverage of HPD regions against credibility level, with a ±``band`` strip."""
    levels, coverage = np.asarray(levels), np.asarray(coverage)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.fill_between(levels, np.clip(levels - band, 0, 1), np.clip(levels + band, 0, 1), color="0.88", lw=0)
    ax.plot([0, 1], [0, 1], color="0.4", lw=0.8, ls="--")
    ax.plot(levels, coverage, color="C0")
    ax.set_xlabel("credibility level")
    ax.set_ylabel("expected coverage")
    ax.text(0.03, 0.93, "under-confident", fontsize=8, color="0.4")
    ax.text(0.55, 0.05, "over-confident", fontsize=8, color="0.4")
    fig.tight_layout()
    _save(fig, path)


def tarp_plot(alpha: np.ndarray, ecp: np.ndarray, path: str | os.PathLike, atc: float | None = None) -> None:
    """TARP expected coverage probability against credibility level."""
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], color="0.4", lw=0.8, ls="--")
    ax.plot(np.asarray(alpha), np.asarray(ecp), color="C1")
    ax.set_xlabel("credibility level α")
    ax.set_ylabel("expected coverage probability")
    if atc is not None:
        ax.set_title(f"TARP (ATC = {atc:+.3f})", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _save(fig: plt.Figure, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def _levels(h: np.ndarray) -> list[float]:
    """Counts enclosing 39 % and 86 % of the mass (the 1σ and 2σ regions of a 2-D Gaussian)."""
    flat = np.sort(h.ravel())[::-1]
    cum = np.cumsum(flat) / max(flat.sum(), 1)
    levels = sorted({float(flat[min(np.searchsorted(cum, q), len(flat) - 1)]) for q in (0.86, 0.39)})
    return [lv for lv in levels if lv > 0] or [float(flat.max()) * 0.5]
