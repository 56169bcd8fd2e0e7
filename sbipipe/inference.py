"""Posterior estimation for a submitted observation with a stored model (what the ``infer`` flow runs).

Loaded posteriors are kept in memory (keyed by model directory and card time), so a long-running
service answers an observation without reloading its model.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from .errors import SbipipeError
from .posterior import Posterior, load_posterior
from .store import CARD

__all__ = ["cached_posterior", "check_observation_file", "infer_observation"]

_CACHE: OrderedDict[tuple[str, float, str], Posterior] = OrderedDict()
_CACHE_SIZE = 8
_LOCK = threading.Lock()


def cached_posterior(model_dir: str | os.PathLike, device: str = "cpu") -> Posterior:
    """``load_posterior`` once per model directory and card version (the last 8 are kept)."""
    model_dir = Path(model_dir).resolve()
    try:
        key = (str(model_dir), (model_dir / CARD).stat().st_mtime, device)
    except OSError:
        return load_posterior(model_dir, device=device)  # gives the usual "not a model directory" error
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    post = load_posterior(model_dir, device=device)
    with _LOCK:
        _CACHE[key] = post
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return post


def _simulator(name: str) -> Any:
    from .registry import get_simulator

    try:
        return get_simulator(name)
    except SbipipeError:  # e.g. a user simulator not importable here: check against the model's shape
        return None


def check_observation_file(model_dir: str | os.PathLike, observation: str | os.PathLike) -> dict[str, Any]:
    """Validate an observation file against a model (shape, finite, real numbers); its description."""
    post = cached_posterior(model_dir)
    x = _load(post, observation)
    return {"observation": str(observation), "sha256": hashlib.sha256(Path(observation).read_bytes()).hexdigest(),
            "count": len(x), "shape": list(x.shape[1:])}


def _load(post: Posterior, observation: str | os.PathLike) -> Any:
    from .observations import load_observation

    return load_observation(observation, _simulator(post.simulator_name), post.observation_shape, post.simulator_name)


def infer_observation(model_dir: str | os.PathLike, observation: str | os.PathLike, output_dir: str | os.PathLike,
                      n_samples: int = 10_000, seed: int = 0, plot: bool = True) -> dict[str, Any]:
    """Sample the posterior of each observation in the file; write ``samples.h5``, its CSV summary
    and (with ``plot``) a corner plot of the first observation to ``output_dir``."""
    from .observations import truth_path
    from .samples import summary_path, write_samples

    post = cached_posterior(model_dir)
    x = _load(post, observation)
    out = Path(output_dir)
    samples = post.sample(x, n_samples, seed=seed)  # [M, n, D]
    single = len(x) == 1
    path = out / "samples.h5"
    attrs = {"model": str(model_dir), "observation": str(observation), "simulator": post.simulator_name,
             "simulator_version": post.simulator_version, "seed": seed, "kind": "posterior"}
    table = write_samples(path, samples[0] if single else samples, post.parameter_names, attrs)
    corner = None
    if plot:
        from .plots import corner_plot

        truth = None
        try:
            truth = json.loads(truth_path(observation).read_text()).get("theta")
        except (OSError, ValueError, AttributeError):
            pass
        corner = out / "corner.png"
        corner_plot(samples[0], post.parameter_names, corner, truth=truth)
    return {
        "samples": str(path.resolve()),
        "summary_csv": str(summary_path(path).resolve()),
        "corner": str(corner.resolve()) if corner else None,
        "summary": table.to_dict("records"),
        "observations": len(x),
        "n_samples": n_samples,
        "parameter_names": list(post.parameter_names),
        "simulator": post.simulator_name,
        "simulator_version": post.simulator_version,
    }
