"""Validate a posterior on a held-out test bank and decide whether it may answer observations.

``validate_model(MODEL_DIR, TEST_BANK, REPORT_DIR)`` writes ``metrics.csv`` (one row per metric and
parameter), ``summary.json`` (the gate decision, thresholds, failing checks, posterior contraction)
and PNG plots, and records the verdict in the model card. The statistics are in
:mod:`sbipipe.calibration` (SBC, HPD expected coverage, TARP), :mod:`sbipipe.c2st` and
:mod:`sbipipe.ppc`. The gate (:class:`Gate`) passes a model when every check holds:

* SBC: the χ² uniformity p-value of every parameter's ranks exceeds ``sbc_p / D`` (Bonferroni);
* coverage: the largest deviation of the HPD expected-coverage curve from the diagonal is at most
  ``coverage_max`` (0.05), widened to the 99% KS band ``1.63/√N`` when the test set is too small
  for 0.05 to be resolvable (N < 1060), so that noise alone does not fail a calibrated model;
* TARP: the KS p-value of the TARP credibility values exceeds ``tarp_p``;
* C2ST (only with reference posteriors): the mean accuracy over the references is at most
  ``c2st_max``.

Posterior predictive checks of given observations and the posterior contraction are reported,
not gated: they describe the observation and the information content, not the calibration.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .atomic import atomic_path, atomic_write_text
from .bank import SimulationBank
from .calibration import (
    binomial_band,
    contraction,
    coverage_curve,
    hpd_levels,
    ks_critical,
    rank_bins,
    rank_uniformity,
    sbc_ranks,
    tarp,
)
from .errors import SbipipeError
from .observations import load_model_observation, read_truth
from .registry import find_simulator

__all__ = ["Gate", "PosteriorLike", "calibration_checks", "validate_model"]

MIN_TEST_SIMULATIONS = 100
CHUNK_DRAWS = 2**18  # posterior draws held in memory at once (observations × samples)


class PosteriorLike(Protocol):
    """What validation needs: batched sampling and densities (``sbipipe.posterior.Posterior``)."""

    parameter_names: list[str]

    def sample(self, x: Any, n: int, seed: int | None = None) -> Tensor: ...  # [M, n, D] for x [M, ...]

    def log_prob(self, theta: Any, x: Any) -> Tensor: ...  # [M, L] for theta [M, L, D], x [M, ...]


@dataclass(frozen=True)
class Gate:
    """Thresholds of the pass/fail decision (see the module docstring)."""

    sbc_p: float = 0.01
    coverage_max: float = 0.05
    tarp_p: float = 0.01
    c2st_max: float = 0.65

    def coverage_threshold(self, n: int) -> float:
        return max(self.coverage_max, ks_critical(n, 0.01))


def _unnormalized(posterior: PosteriorLike) -> dict[str, bool]:
    """HPD levels rank densities within an observation, so a truncated posterior may skip
    estimating its normalising constant A(x) (see :mod:`sbipipe.posterior`)."""
    return {"normalize": False} if getattr(posterior, "truncated", False) else {}


def _draws(posterior: PosteriorLike, x: Tensor, n_samples: int, seed: int,
           progress: Any = None) -> tuple[Tensor, Tensor]:
    """Posterior draws ``[N, L, D]``, their log densities ``[N, L]``, in chunks of observations."""
    chunk = max(1, CHUNK_DRAWS // n_samples)
    kw = _unnormalized(posterior)
    samples, logq = [], []
    for k, start in enumerate(range(0, len(x), chunk)):
        xs = x[start:start + chunk]
        if hasattr(posterior, "sample_and_log_prob"):
            s, lq = posterior.sample_and_log_prob(xs, n_samples, seed=seed + k, **kw)
        else:
            s = posterior.sample(xs, n_samples, seed=seed + k)
            lq = posterior.log_prob(s, xs, **kw)
        samples.append(s)
        logq.append(lq)
        if progress:
            progress(min(start + chunk, len(x)), len(x))
    return torch.cat(samples), torch.cat(logq)


def calibration_checks(
    posterior: PosteriorLike,
    theta: Tensor,
    x: Tensor,
    n_samples: int = 1000,
    seed: int = 0,
    gate: Gate = Gate(),
    prior_variance: Tensor | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """SBC, HPD expected coverage, TARP and contraction of ``posterior`` on test pairs ``(θ, x)``.

    Returns the metric rows, the failing checks and the arrays the plots need."""
    n, d = theta.shape
    names = list(posterior.parameter_names)
    samples, logq = _draws(posterior, x, n_samples, seed, progress)
    kw = _unnormalized(posterior)
    logq_true = torch.cat([posterior.log_prob(theta[i:i + 4096].unsqueeze(1), x[i:i + 4096], **kw)
                           for i in range(0, n, 4096)]).reshape(n)
    if not torch.isfinite(samples).all() or torch.isnan(logq).any():
        raise SbipipeError("the posterior produced non-finite samples or densities; the model is broken, retrain it")

    ranks = sbc_ranks(samples, theta)
    bins = rank_bins(n)
    sbc_p, counts = rank_uniformity(ranks, n_samples, bins)
    levels = hpd_levels(logq, logq_true)
    grid, cov, dev, signed = coverage_curve(levels)
    t = tarp(samples, theta, generator=torch.Generator().manual_seed(seed))
    var = theta.double().var(0) if prior_variance is None else prior_variance
    shrink = contraction(samples, var)

    cov_thr = gate.coverage_threshold(n)
    rows = [_row("sbc", names[j], sbc_p[j], gate.sbc_p / d, sbc_p[j] > gate.sbc_p / d) for j in range(d)]
    rows.append(_row("coverage", "all", dev, cov_thr, dev <= cov_thr))
    rows.append(_row("coverage_bias", "all", signed, None, None))
    for c in (0.5, 0.68, 0.95):
        rows.append(_row(f"coverage_{int(round(c * 100))}", "all", float((levels <= c).double().mean()), None, None))
    rows.append(_row("tarp", "all", t["ks_pvalue"], gate.tarp_p, t["ks_pvalue"] > gate.tarp_p))
    rows.append(_row("tarp_atc", "all", t["atc"], None, None))
    rows += [_row("contraction", names[j], float(shrink[j]), None, None) for j in range(d)]
    failing = [f"sbc[{names[j]}] p={sbc_p[j]:.2g} <= {gate.sbc_p / d:.2g}" for j in range(d) if not sbc_p[j] > gate.sbc_p / d]
    if dev > cov_thr:
        kind = "under-confident" if signed > 0 else "over-confident"
        failing.append(f"coverage deviation {dev:.3f} > {cov_thr:.3f} ({kind})")
    if not t["ks_pvalue"] > gate.tarp_p:
        failing.append(f"tarp KS p={t['ks_pvalue']:.2g} <= {gate.tarp_p}")
    return {
        "rows": rows,
        "failing": failing,
        "contraction": {names[j]: float(shrink[j]) for j in range(d)},
        "rank_counts": counts.numpy(),
        "rank_band": binomial_band(n, bins),
        "sbc_pvalues": [float(p) for p in sbc_p],
        "coverage": (grid.numpy(), cov.numpy(), cov_thr),
        "tarp": (t["alpha"].numpy(), t["ecp"].numpy(), t["atc"]),
    }


def _row(metric: str, parameter: str, value: float, threshold: float | None, passed: bool | None,
         observation: str = "") -> dict[str, Any]:
    return {"metric": metric, "parameter": parameter, "observation": observation, "value": float(value),
            "threshold": "" if threshold is None else float(threshold),
            "passed": "" if passed is None else bool(passed)}


def validate_model(
    model_dir: str | os.PathLike,
    test_bank: str | os.PathLike,
    report_dir: str | os.PathLike,
    references: tuple[str | os.PathLike, ...] | list = (),
    observations: tuple[str | os.PathLike, ...] | list = (),
    n_sims: int = 1000,
    n_samples: int = 1000,
    seed: int = 0,
    gate: Gate = Gate(),
    device: str = "cpu",
    progress: Any = None,
) -> dict[str, Any]:
    """Run the validation suite, write the report and record the verdict in the model card."""
    from .plots import corner_plot, coverage_plot, rank_histograms, tarp_plot
    from .posterior import load_posterior
    from .store import update_card

    t0 = time.perf_counter()
    if n_sims < MIN_TEST_SIMULATIONS or n_samples < 10:
        raise SbipipeError(f"validation needs --n-sims >= {MIN_TEST_SIMULATIONS} and --n-samples >= 10, "
                           f"got {n_sims} and {n_samples}")
    posterior = load_posterior(model_dir, device=device)
    card = posterior.card
    bank = SimulationBank(test_bank)
    if bank.simulator_name != posterior.simulator_name or bank.simulator_version != posterior.simulator_version:
        raise SbipipeError(
            f"{str(test_bank)!r} holds {bank.simulator_name} v{bank.simulator_version} simulations but the model is for "
            f"{posterior.simulator_name} v{posterior.simulator_version}; simulate a test bank of that simulator"
        )
    if bank.rows < MIN_TEST_SIMULATIONS:
        raise SbipipeError(f"{str(test_bank)!r} holds {bank.rows} rows; validation needs at least {MIN_TEST_SIMULATIONS}")
    if bank.content_hash() == card.get("training", {}).get("bank_sha256"):
        raise SbipipeError(
            f"{str(test_bank)!r} is the bank the model was trained on; validate on a held-out bank "
            "(`sbipipe simulate` with another --seed)"
        )
    report = Path(report_dir)
    report.mkdir(parents=True, exist_ok=True)
    names = posterior.parameter_names
    theta, x = bank.read(0, n_sims)
    simulator = find_simulator(posterior.simulator_name)
    prior_var = None
    if simulator is not None:  # the prior's variance, from many draws (else the test set's)
        prior_var = simulator.sample_prior(100_000, torch.Generator().manual_seed(seed)).double().var(0)
    checks = calibration_checks(posterior, theta, x, n_samples, seed, gate, prior_var, progress=progress)
    rows, failing, warnings = list(checks["rows"]), list(checks["failing"]), []
    plots = {"sbc": report / "sbc_ranks.png", "coverage": report / "coverage.png", "tarp": report / "tarp.png"}
    rank_histograms(checks["rank_counts"], names, checks["rank_band"], plots["sbc"], checks["sbc_pvalues"])
    coverage_plot(*checks["coverage"], plots["coverage"])
    tarp_plot(*checks["tarp"][:2], plots["tarp"], atc=checks["tarp"][2])

    c2sts = []
    for k, ref_path in enumerate(references):
        value, plot = _c2st_against_reference(posterior, ref_path, report / f"corner_reference_{k}.png", seed)
        c2sts.append(value)
        plots[f"corner_reference_{k}"] = plot
        rows.append(_row("c2st", "all", value, gate.c2st_max, None, observation=str(ref_path)))
    if c2sts:
        mean = float(np.mean(c2sts))
        ok = mean <= gate.c2st_max
        rows.append(_row("c2st_mean", "all", mean, gate.c2st_max, ok))
        if not ok:
            failing.append(f"c2st mean {mean:.3f} > {gate.c2st_max} over {len(c2sts)} references")

    obs_index = 0
    for obs_path in observations:
        xs = load_model_observation(obs_path, posterior.simulator_name, posterior.observation_shape)
        truth = read_truth(obs_path) if len(xs) == 1 else None
        draws = posterior.sample(xs, n_samples, seed=seed)
        for m in range(len(xs)):
            label = f"{obs_path}" + (f"[{m}]" if len(xs) > 1 else "")
            plot = report / f"corner_observation_{obs_index}.png"
            corner_plot(draws[m], names, plot, truth=truth)
            plots[f"corner_observation_{obs_index}"] = plot
            obs_index += 1
            if simulator is None:
                warnings.append(f"{label}: simulator {posterior.simulator_name!r} cannot be imported; no predictive check")
                continue
            from .ppc import posterior_predictive_check

            ppc = posterior_predictive_check(simulator, draws[m], xs[m], torch.Generator().manual_seed(seed + m))
            rows.append(_row("ppc_pvalue", "all", ppc["p_value"], None, None, observation=label))
            rows.append(_row("ppc_distance", "all", ppc["distance"], None, None, observation=label))
            if ppc["p_value"] < 0.01:
                warnings.append(f"{label}: posterior predictive p-value {ppc['p_value']:.3g}; the observation is unlike "
                                "what the model produces at its posterior")

    summary = {
        "calibrated": not failing,
        "failing": failing,
        "warnings": warnings,
        "thresholds": {**asdict(gate), "coverage_max_used": checks["coverage"][2],
                       "sbc_p_per_parameter": gate.sbc_p / len(names)},
        "contraction": checks["contraction"],
        "model": str(Path(model_dir).resolve()),
        "simulator": posterior.simulator_name,
        "simulator_version": posterior.simulator_version,
        "test_bank": str(Path(test_bank).resolve()),
        "test_bank_sha256": bank.content_hash(),
        "n_sims": int(len(theta)),
        "n_samples": int(n_samples),
        "seed": seed,
        "plots": {k: str(v) for k, v in plots.items()},
        "validated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    with atomic_path(report / "metrics.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    atomic_write_text(report / "summary.json", json.dumps(summary, indent=2) + "\n")
    update_card(model_dir, validation={"calibrated": summary["calibrated"], "failing": failing,
                                       "report": str(report.resolve()), "validated_at": summary["validated_at"],
                                       "test_bank_sha256": summary["test_bank_sha256"]})
    return summary


def _c2st_against_reference(posterior: PosteriorLike, path: str | os.PathLike, plot: Path,
                            seed: int) -> tuple[float, Path]:
    """C2ST (benchmark protocol) of posterior draws against a reference file's samples, and a corner
    plot of both. The observation is the reference file's ``observation`` dataset (written by
    ``sbipipe reference``) or the file its ``observation`` attribute names."""
    from .c2st import c2st
    from .plots import corner_plot
    from .samples import read_samples

    ref, names, attrs = read_samples(path)
    if ref.ndim != 2 or names != list(posterior.parameter_names):
        raise SbipipeError(f"{str(path)!r} holds samples {list(ref.shape)} of {names}; expected [N, "
                           f"{len(posterior.parameter_names)}] of {list(posterior.parameter_names)}")
    if attrs.get("simulator") not in (None, posterior.simulator_name):
        raise SbipipeError(f"{str(path)!r} is a reference for {attrs.get('simulator')}, not {posterior.simulator_name}")
    with h5py.File(path, "r") as f:
        x = torch.from_numpy(f["observation"][()]).float().unsqueeze(0) if "observation" in f else None
    if x is None:
        if not attrs.get("observation") or not Path(attrs["observation"]).is_file():
            raise SbipipeError(f"{str(path)!r} does not say which observation it belongs to; recreate it with "
                               "`sbipipe reference`")
        x = load_model_observation(attrs["observation"], posterior.simulator_name, posterior.observation_shape)
    n = min(len(ref), 10_000)
    draws = posterior.sample(x[:1], n, seed=seed)[0]
    value = c2st(draws, ref[:n], seed=seed + 1)
    corner_plot([draws, ref[:n]], list(posterior.parameter_names), plot, names=["posterior", "reference"])
    return value, plot
