"""Read and write observations: ``.npy``, ``.csv`` or ``.h5`` holding one observation or a stack.

Nothing is unpickled: ``.npy`` is read with ``allow_pickle=False``; ``.h5`` must hold a dataset
named ``x`` or ``observation`` (or exactly one dataset).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

from .atomic import atomic_path, atomic_write_text
from .errors import SbipipeError
from .simulator import Simulator, check_observation

__all__ = ["load_model_observation", "load_observation", "parse_theta", "read_array", "read_truth", "save_observation",
           "truth_path"]


def truth_path(path: str | os.PathLike) -> Path:
    """``obs.npy`` → ``obs.truth.json``."""
    path = Path(path)
    return path.with_name(path.name.rsplit(".", 1)[0] + ".truth.json")


def read_array(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".csv":
        return np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=1, comments="#")
    if suffix in (".h5", ".hdf5"):
        with h5py.File(path, "r") as f:
            names = [k for k in f if isinstance(f[k], h5py.Dataset)]
            for key in ("x", "observation", "observations"):
                if key in names:
                    return f[key][()]
            if len(names) == 1:
                return f[names[0]][()]
            raise SbipipeError(
                f"{str(path)!r} holds datasets {names}; expected one named 'x' or 'observation'"
            )
    raise SbipipeError(f"{str(path)!r}: unknown observation format {suffix!r}; use .npy, .csv or .h5")


def load_observation(path: str | os.PathLike, simulator: Simulator | None = None,
                     shape: tuple[int, ...] | None = None, name: str = "observation") -> Tensor:
    """An observation file as float32 ``[M, *observation_shape]``, validated by the simulator (or,
    without one, checked against ``shape``: finite, real, the right shape).

    A CSV file holds one flattened observation per row (or one observation of a vector simulator
    per row); it is reshaped to the observation shape."""
    path = Path(path)
    if not path.is_file():
        raise SbipipeError(f"observation file {str(path)!r} does not exist")
    try:
        arr = read_array(path)
    except SbipipeError:
        raise
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SbipipeError(f"cannot read observation {str(path)!r}: {first}") from None
    shape = tuple(simulator.observation_shape) if simulator is not None else tuple(shape or ())
    if path.suffix.lower() == ".csv":
        size = int(np.prod(shape))
        if arr.size % size:
            raise SbipipeError(
                f"{str(path)!r} holds {arr.size} numbers; expected a multiple of {size} "
                f"(observations of shape {list(shape)}, one per row)"
            )
        arr = arr.reshape(-1, *shape)
    if simulator is not None:
        return simulator.validate_observation(arr)
    return check_observation(arr, shape, name)


def load_model_observation(path: str | os.PathLike, simulator_name: str, shape: tuple[int, ...]) -> Tensor:
    """An observation for a model: validated by the model's simulator where it can be loaded here,
    else checked against the model's observation shape."""
    from .registry import find_simulator

    return load_observation(path, find_simulator(simulator_name), shape, simulator_name)


def read_truth(path: str | os.PathLike) -> list[float] | None:
    """The true parameters beside an observation (``OBS.truth.json``), if there are any."""
    try:
        theta = json.loads(truth_path(path).read_text()).get("theta")
    except (OSError, ValueError, AttributeError):
        return None
    return [float(v) for v in theta] if isinstance(theta, list) else None


def save_observation(path: str | os.PathLike, x: Tensor, truth: dict[str, Any] | None = None) -> Path:
    """Write ``x`` to ``.npy``/``.csv``/``.h5`` atomically, and ``truth`` beside it as JSON."""
    path = Path(path)
    arr = x.detach().cpu().numpy().astype(np.float32)
    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix == ".npy":
            with open(tmp, "wb") as fh:
                np.save(fh, arr, allow_pickle=False)
        elif suffix == ".csv":
            np.savetxt(tmp, arr.reshape(1, -1) if arr.ndim <= 1 else arr.reshape(arr.shape[0], -1), delimiter=",")
        elif suffix in (".h5", ".hdf5"):
            with h5py.File(tmp, "w") as f:
                f["x"] = arr
        else:
            raise SbipipeError(f"{str(path)!r}: unknown observation format {suffix!r}; use .npy, .csv or .h5")
    if truth is not None:
        atomic_write_text(truth_path(path), json.dumps(truth, indent=2) + "\n")
    return path


def parse_theta(text: str, simulator: Simulator) -> Tensor:
    """``"0.3,0.8"`` → a checked ``[1, D]`` tensor."""
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise SbipipeError(f"--theta {text!r}: expected comma-separated numbers for {list(simulator.parameter_names)}") from None
    if len(values) != simulator.dim:
        raise SbipipeError(
            f"--theta has {len(values)} values; {simulator.name} expects {simulator.dim}: "
            f"{', '.join(simulator.parameter_names)}"
        )
    return simulator.check_theta(torch.tensor([values]))
