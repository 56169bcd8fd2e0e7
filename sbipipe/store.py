"""Model directories: ``weights.safetensors`` + ``card.json``. Nothing is unpickled.

The card records what a model is for and how it was made: simulator name and version, parameter
names, prior and its support bounds, the architecture, standardisation statistics, the training
bank's path and content hash, package versions, training time and final losses.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_path, atomic_write_text
from .errors import SbipipeError

__all__ = ["CARD", "WEIGHTS", "package_versions", "read_card", "read_weights", "update_card", "write_model"]

CARD = "card.json"
WEIGHTS = "weights.safetensors"
FORMAT = "sbipipe.model/1"


def package_versions() -> dict[str, str]:
    out = {}
    for pkg in ("sbipipe", "torch", "zuko", "sbi", "prefect", "h5py", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def write_model(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], card: dict[str, Any],
                history: Any | None = None, checkpoints: str | os.PathLike | None = None) -> Path:
    """Write weights and ``history.csv`` (a DataFrame of the training loop's losses) first, then the
    card (a directory with a card is complete), then delete the ``checkpoints`` folder, if given."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SbipipeError(f"cannot create model directory {str(directory)!r}: {exc.strerror}") from None
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    if history is not None:
        with atomic_path(directory / "history.csv") as tmp:
            history.to_csv(tmp, index=False)
    atomic_write_text(directory / CARD, json.dumps({"format": FORMAT, **card}, indent=2) + "\n")
    if checkpoints is not None:
        shutil.rmtree(checkpoints, ignore_errors=True)
    return directory


def read_card(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CARD
    if not path.is_file():
        raise SbipipeError(f"{str(directory)!r} is not a model directory (no {CARD}); train one with `sbipipe train`")
    try:
        card = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SbipipeError(f"{str(path)!r} is corrupt ({exc}); retrain the model") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise SbipipeError(f"{str(path)!r} is not an sbipipe model card (format {FORMAT})")
    return card


def read_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise SbipipeError(f"{str(directory)!r} has no {WEIGHTS}; the model directory is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SbipipeError(f"{str(path)!r} is corrupt ({str(exc).splitlines()[0]}); retrain the model") from None


def update_card(directory: str | os.PathLike, **fields: Any) -> None:
    """Add or replace card fields (e.g. a validation verdict), atomically."""
    card = read_card(directory)
    card.update(fields)
    atomic_write_text(Path(directory) / CARD, json.dumps(card, indent=2) + "\n")
