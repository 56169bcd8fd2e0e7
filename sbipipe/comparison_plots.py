"""Plots for model comparison: reliability diagram with the confusion matrix, and estimated against
exact log Bayes factors."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from torch import Tensor  # noqa: E402

from .atomic import atomic_path  # noqa: E402

__all__ = ["bayes_factor_plot", "calibration_plot"]


def calibration_plot(reliability: pd.DataFrame, confusion: Tensor | np.ndarray, names: Sequence[str],
                     path: str | os.PathLike, ece: float | None = None) -> None:
    """Left: top-label reliability diagram (accuracy against confidence per bin, with the bin
    counts); right: the confusion matrix (rows: true model, columns: most probable model)."""
    conf = np.asarray(confusion, dtype=float)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4.4))
    ok = reliability["count"] > 0
    centres = 0.5 * (reliability["lower"] + reliability["upper"])
    width = float(reliability["upper"].iloc[0] - reliability["lower"].iloc[0])
    ax.bar(centres[ok], reliability["accuracy"][ok], width=width * 0.9, color="C0", alpha=0.7, label="accuracy")
    ax.plot(reliability["confidence"][ok], reliability["accuracy"][ok], "o", color="C3", ms=4, label="(confidence, accuracy)")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    lo = max(0.0, 1.0 / len(names) - 0.05)
    ax.set_xlim(lo, 1)
    ax.set_ylim(lo, 1)
    ax.set_xlabel("confidence (top-label probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability" + (f" — ECE {ece:.4f} ({len(reliability)} bins)" if ece is not None else ""))
    ax.legend(loc="upper left", fontsize=8)
    share = reliability["count"] / max(int(reliability["count"].sum()), 1)
    ax2 = ax.twinx()
    ax2.step(reliability["upper"], share, where="pre", color="0.5", lw=1)
    ax2.set_ylabel("fraction of simulations", color="0.5")
    ax2.set_ylim(0, 1)
    rows = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    bx.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            bx.text(j, i, f"{int(conf[i, j])}\n{rows[i, j]:.1%}", ha="center", va="center",
                    color="white" if rows[i, j] > 0.5 else "black", fontsize=8)
    bx.set_xticks(range(len(names)), names, rotation=30, ha="right")
    bx.set_yticks(range(len(names)), names)
    bx.set_xlabel("most probable model")
    bx.set_ylabel("true model")
    bx.set_title("confusion matrix (held-out simulations)")
    fig.tight_layout()
    _save(fig, path)


def bayes_factor_plot(exact: np.ndarray, estimated: np.ndarray, path: str | os.PathLike, title: str = "",
                      labels: np.ndarray | None = None, label_names: Sequence[str] | None = None,
                      window: float = 5.0, exact_label: str = "exact ln K") -> None:
    """Scatter of estimated against exact ln K, with the line of equality and ±0.3 nats; values
    beyond 1.6 × ``window`` are drawn at the edge, the region |ln K| > ``window`` is shaded."""
    exact, estimated = np.asarray(exact, float), np.asarray(estimated, float)
    fig, ax = plt.subplots(figsize=(5.2, 5))
    lim = window * 1.6
    groups = np.zeros(len(exact), int) if labels is None else np.asarray(labels)
    for g in np.unique(groups):
        sel = groups == g
        name = label_names[g] if label_names is not None else None
        ax.plot(np.clip(exact[sel], -lim, lim), np.clip(estimated[sel], -lim, lim), ".", ms=4, alpha=0.7,
                label=f"simulated by {name}" if name else None)
    t = np.linspace(-lim, lim, 3)
    ax.plot(t, t, "k-", lw=1)
    ax.fill_between(t, t - 0.3, t + 0.3, color="0.8", alpha=0.6, label="±0.3 nats")
    ax.axvspan(-lim, -window, color="0.93")
    ax.axvspan(window, lim, color="0.93")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_xlabel(exact_label)
    ax.set_ylabel("classifier ln K")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    _save(fig, path)


def _save(fig: plt.Figure, path: str | os.PathLike) -> None:
    suffix = os.path.splitext(str(path))[1] or ".png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=suffix.lstrip("."))
    plt.close(fig)
