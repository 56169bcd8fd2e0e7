"""Posterior estimation for a submitted observation with a stored model (what the ``infer`` flow runs).

Loaded posteriors are kept in memory (keyed by model directory and card time), so a long-running
service answers an observation without reloading its model.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from .allocator import retain_freed_memory
from .observations import load_model_observation, read_truth
from .posterior import Posterior, load_posterior
from .store import CARD

__all__ = ["cached_posterior", "check_observation_file", "infer_observation"]

_CACHE: OrderedDict[tuple[str, float, str], Posterior] = OrderedDict()
_CACHE_SIZE = 8
_LOCK = threading.Lock()


def cached_posterior(model_dir: str | os.PathLike, device: str = "cpu") -> Posterior:
    """``load_posterior`` once per model directory and card version (the last 8 are kept). The
    process keeps freed memory for reuse (:func:`sbipipe.allocator.retain_freed_memory`)."""
    retain_freed_memory()
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


def check_observation_file(model_dir: str | os.PathLike, observation: str | os.PathLike) -> dict[str, Any]:
    """Validate an observation file against a model (shape, finite, real numbers); its description."""
    post = cached_posterior(model_dir)
    x = load_model_observation(observation, post.simulator_name, post.observation_shape)
    return {"observation": str(observation), "sha256": hashlib.sha256(Path(observation).read_bytes()).hexdigest(),
            "count": len(x), "shape": list(x.shape[1:])}


def infer_observation(model_dir: str | os.PathLike, observation: str | os.PathLike, samples_path: str | os.PathLike,
                      n_samples: int = 10_000, seed: int = 0, plot_path: str | os.PathLike | None = None,
                      device: str = "cpu") -> dict[str, Any]:
    """Sample the posterior of each observation in the file; write ``samples_path`` (``[n, D]``, or
    ``[M, n, D]`` for a stack; for a truncated posterior also ``acceptance [M]``, see
    :meth:`Posterior.acceptance`), its CSV summary and (with ``plot_path``) a corner plot of the first
    observation, with the truth marked where ``OBS.truth.json`` gives it. Returns what was written
    and the summary table as records."""
    from .atomic import check_writable
    from .samples import summary_path, write_samples

    post = cached_posterior(model_dir, device)
    check_writable(samples_path)
    x = load_model_observation(observation, post.simulator_name, post.observation_shape)
    samples = post.sample(x, n_samples, seed=seed)  # [M, n, D]
    single = len(x) == 1
    path = Path(samples_path)
    attrs = {"model": str(model_dir), "observation": str(observation), "simulator": post.simulator_name,
             "simulator_version": post.simulator_version, "seed": seed, "kind": "posterior"}
    # a truncated posterior reports the fraction of its mass inside the prior per observation
    acceptance = post.acceptance(x, seed=seed) if post.truncated else None
    table = write_samples(path, samples[0] if single else samples, post.parameter_names, attrs,
                          datasets={"acceptance": acceptance} if acceptance is not None else None)
    if plot_path is not None:
        from .plots import corner_plot

        corner_plot(samples[0], post.parameter_names, plot_path, truth=read_truth(observation))
    return {
        "samples": str(path.resolve()),
        "summary_csv": str(summary_path(path).resolve()),
        "corner": str(Path(plot_path).resolve()) if plot_path is not None else None,
        "summary": table.to_dict("records"),
        "observations": len(x),
        "shape": list(samples.shape[1:] if single else samples.shape),
        "n_samples": n_samples,
        "parameter_names": list(post.parameter_names),
        "simulator": post.simulator_name,
        "simulator_version": post.simulator_version,
        "acceptance": acceptance.tolist() if acceptance is not None else None,
    }
