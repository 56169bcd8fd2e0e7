"""Posterior (or reference) samples on disk: HDF5 ``samples [N, D]`` or ``[M, N, D]`` with
attribute ``parameter_names``, and a CSV summary beside it (``SAMPLES.summary.csv``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .atomic import atomic_path
from .errors import SbipipeError

__all__ = ["read_samples", "summarize", "summary_path", "write_samples"]

QUANTILES = (0.05, 0.5, 0.95)


def summary_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name.rsplit(".", 1)[0] + ".summary.csv")


def summarize(samples: Tensor, parameter_names: list[str]) -> pd.DataFrame:
    """Per observation and parameter: mean, std and the 5/50/95% quantiles."""
    s = samples if samples.ndim == 3 else samples.unsqueeze(0)
    s = s.double()
    q = torch.quantile(s, torch.tensor(QUANTILES, dtype=s.dtype), dim=1)  # [3, M, D]
    rows = []
    for m in range(s.shape[0]):
        for d, name in enumerate(parameter_names):
            rows.append(
                {
                    "observation": m,
                    "parameter": name,
                    "mean": float(s[m, :, d].mean()),
                    "std": float(s[m, :, d].std()),
                    **{f"q{int(p * 100):02d}": float(q[i, m, d]) for i, p in enumerate(QUANTILES)},
                }
            )
    return pd.DataFrame(rows)


def write_samples(
    path: str | os.PathLike, samples: Tensor, parameter_names: list[str], attrs: dict[str, Any] | None = None,
    datasets: dict[str, Tensor] | None = None,
) -> pd.DataFrame:
    """Write samples (and extra ``datasets``, e.g. the observation) and their CSV summary
    atomically; return the summary table."""
    if samples.shape[-1] != len(parameter_names):
        raise SbipipeError(f"samples have {samples.shape[-1]} columns but {len(parameter_names)} parameter names")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("samples", data=samples.detach().cpu().numpy().astype(np.float32))
        f.attrs["parameter_names"] = list(parameter_names)
        for key, value in (datasets or {}).items():
            f.create_dataset(key, data=value.detach().cpu().numpy())
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
    table = summarize(samples, list(parameter_names))
    with atomic_path(summary_path(path)) as tmp:
        table.to_csv(tmp, index=False)
    return table


def read_samples(path: str | os.PathLike) -> tuple[Tensor, list[str], dict[str, Any]]:
    """``(samples, parameter_names, attrs)`` from a samples file."""
    try:
        with h5py.File(path, "r") as f:
            if "samples" not in f or "parameter_names" not in f.attrs:
                raise SbipipeError(f"{str(path)!r} is not a samples file (needs dataset 'samples' and attribute 'parameter_names')")
            samples = torch.from_numpy(f["samples"][()])
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    except OSError as exc:
        raise SbipipeError(f"cannot read {str(path)!r} as HDF5: {str(exc).splitlines()[0]}") from None
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in attrs.pop("parameter_names")]
    return samples, names, attrs
