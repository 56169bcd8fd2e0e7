"""Find simulators by short name, import path (``package.module:object``) or plugin entry point."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from importlib.metadata import entry_points
from typing import Any

from .errors import SbipipeError
from .simulator import Simulator, as_simulator

__all__ = ["ENTRY_POINT_GROUP", "available_simulators", "find_simulator", "get_simulator", "load_object"]

ENTRY_POINT_GROUP = "sbipipe.simulators"


def _builtins() -> dict[str, str]:
    from simulators import BUILTIN

    return dict(BUILTIN)


def _plugins() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_simulators() -> list[str]:
    """Names of the built-in and plugin simulators, sorted."""
    return sorted({**_plugins(), **_builtins()})


def load_object(path: str) -> Any:
    """Import ``package.module:attribute`` (the current directory is importable)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise SbipipeError(f"bad import path {path!r}: expected 'package.module:object'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise SbipipeError(f"cannot import module {module_name!r} from {path!r}: {exc}") from None
    except Exception as exc:  # the user's module raised while importing
        raise SbipipeError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SbipipeError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def _instantiate(obj: Any, label: str) -> Simulator:
    if inspect.isclass(obj) or (callable(obj) and not hasattr(obj, "simulate")):
        try:
            obj = obj()
        except SbipipeError:
            raise
        except Exception as exc:
            raise SbipipeError(
                f"{label}: calling it with no arguments failed ({type(exc).__name__}: {exc}); "
                "point to an instance, a class or a zero-argument factory"
            ) from None
    return as_simulator(obj, name=label)


def get_simulator(spec: str | Any) -> Simulator:
    """A simulator from a short name, an import path, or an object that meets the contract."""
    if not isinstance(spec, str):
        return as_simulator(spec)
    if spec.startswith("emulator:"):  # a trained diffusion emulator: emulator:MODEL_DIR
        from .emulator import load_emulator

        return load_emulator(spec[len("emulator:"):])
    builtins = _builtins()
    if spec in builtins:
        return _instantiate(load_object(builtins[spec]), spec)
    plugins = _plugins()
    if spec in plugins:
        try:
            obj = plugins[spec].load()
        except Exception as exc:
            raise SbipipeError(f"plugin simulator {spec!r} failed to load: {exc}") from None
        return _instantiate(obj, spec)
    if ":" in spec:
        return _instantiate(load_object(spec), spec)
    raise SbipipeError(
        f"unknown simulator {spec!r}; known: {', '.join(available_simulators())} "
        "(or give an import path package.module:object)"
    )


def find_simulator(name: str) -> Simulator | None:
    """``get_simulator(name)``, or None where it cannot be loaded here (e.g. a user simulator whose
    package is not installed: a model's card still describes its observations)."""
    try:
        return get_simulator(name)
    except SbipipeError:
        return None
