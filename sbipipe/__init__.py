"""sbipipe: simulation-based inference pipelines for astrophysics and cosmology."""

from .errors import SbipipeError
from .registry import available_simulators, get_simulator
from .simulator import Simulator, as_simulator, has_likelihood

__version__ = "0.1.0"

__all__ = [
    "SbipipeError",
    "Simulator",
    "__version__",
    "as_simulator",
    "available_simulators",
    "get_simulator",
    "has_likelihood",
]
