"""The model registry: validated models by name and version, in the project home.

``HOME/models/registry.json`` lists the entries (name, version, simulator, model directory, card,
validation verdict, report location, created time); ``register_model`` copies the model
directory (and its report) to ``HOME/models/NAME/vVERSION/`` so a registered version never
changes under its users. Writers take a lock; every write is atomic.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .errors import SbipipeError
from .service import project_home
from .store import CARD, read_card

__all__ = ["get_model", "list_models", "register_model", "registry_path", "set_verdict"]

FORMAT = "sbipipe.registry/1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def registry_path(home: Path | None = None) -> Path:
    return (home or project_home()) / "models" / "registry.json"


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SbipipeError(f"model registry {str(path)!r} is unreadable ({exc}); restore it or remove it") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SbipipeError(f"{str(path)!r} is not an sbipipe model registry ({FORMAT})")
    return list(data["models"])


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[list[dict[str, Any]]]:
    """The registry's entries under an exclusive lock; the (mutated) list is written back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".registry.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = _read(path)
        yield entries
        atomic_write_text(path, json.dumps({"format": FORMAT, "models": entries}, indent=2) + "\n")


def _verdict(calibrated: bool | None) -> str:
    return {True: "passed", False: "failed", None: "not validated"}[calibrated]


def register_model(name: str, model_dir: str | os.PathLike, report_dir: str | os.PathLike | None = None,
                   calibrated: bool | None = None, home: Path | None = None, **extra: Any) -> dict[str, Any]:
    """Copy a model directory (and its validation report) into the registry as the next version of
    ``name``; return the new entry."""
    if not _NAME.match(name):
        raise SbipipeError(f"model name {name!r}: use letters, digits, '_', '.', '-' (at most 64, starting alphanumeric)")
    card = read_card(model_dir)
    path = registry_path(home)
    with _locked(path) as entries:
        version = 1 + max((e["version"] for e in entries if e["name"] == name), default=0)
        target = path.parent / name / f"v{version}"
        if target.exists():  # left by a registration that was cut off before the registry write
            shutil.rmtree(target)
        shutil.copytree(model_dir, target / "model", ignore=shutil.ignore_patterns("checkpoints", ".*.tmp"))
        report = None
        if report_dir is not None and Path(report_dir).is_dir():
            report = target / "report"
            shutil.copytree(report_dir, report, ignore=shutil.ignore_patterns("*.h5", ".*.tmp"))
        entry = {
            "name": name,
            "version": version,
            "simulator": card.get("simulator"),
            "simulator_version": str(card.get("simulator_version")),
            "model": str(target / "model"),
            "card": str(target / "model" / CARD),
            "calibrated": calibrated,
            "verdict": _verdict(calibrated),
            "report": str(report) if report else None,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **extra,
        }
        entries.append(entry)
    return entry


def list_models(home: Path | None = None) -> list[dict[str, Any]]:
    """All entries, by name then version."""
    return sorted(_read(registry_path(home)), key=lambda e: (e["name"], e["version"]))


def get_model(spec: str, home: Path | None = None) -> dict[str, Any]:
    """The entry for ``NAME`` (latest version) or ``NAME:VERSION``; unknown names list the known ones."""
    name, _, version = spec.partition(":")
    entries = list_models(home)
    mine = [e for e in entries if e["name"] == name]
    if not mine:
        known = sorted({e["name"] for e in entries})
        hint = f"registered models: {', '.join(known)}" if known else "no model is registered yet (run the pipeline flow)"
        raise SbipipeError(f"unknown model {name!r}; {hint}")
    if not version:
        return mine[-1]
    try:
        wanted = int(version.lstrip("v"))
    except ValueError:
        raise SbipipeError(f"model {spec!r}: the version after ':' must be a number") from None
    for e in mine:
        if e["version"] == wanted:
            return e
    raise SbipipeError(f"model {name!r} has no version {wanted}; versions: {', '.join(str(e['version']) for e in mine)}")


def set_verdict(name: str, version: int, calibrated: bool, report: str | None, home: Path | None = None) -> dict[str, Any]:
    """Record a (re-)validation verdict on a registered version."""
    with _locked(registry_path(home)) as entries:
        for e in entries:
            if e["name"] == name and e["version"] == version:
                e.update(calibrated=calibrated, verdict=_verdict(calibrated), report=report,
                         validated=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
                return dict(e)
    raise SbipipeError(f"model {name}:{version} is not registered")
