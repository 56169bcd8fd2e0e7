r"""The simulator contract.

A simulator is any object with

* ``parameter_names`` — a sequence of ``D`` names,
* ``prior`` — a :class:`torch.distributions.Distribution` with event shape ``[D]``,
* ``simulate(theta, generator=None)`` — ``[B, D] -> [B, *observation_shape]``, batched and
  vectorised, bit-identical for the same generator seed on CPU.

Everything else has a default in :class:`Simulator`: ``name``, ``version`` (bump it when the
physics changes; it is part of every cache key), ``parameter_labels``, ``parameter_units``,
``observation_shape`` (inferred from one simulation), ``validate_observation`` and
``check_theta``. A simulator with a tractable likelihood also defines
``log_likelihood(theta, x) -> [B]``.

Optional hints that training reads: ``embedding`` (the name of a preferred embedding network),
``ensemble`` (how many estimators to train by default), ``support`` (``"map"`` or ``"truncate"``:
how a bounded prior's box is kept by default) and ``exchangeable_draws = (n, F)``: the
observation is n draws of F numbers each, i.i.d. given θ, so their order carries no information
and training shuffles it in every batch; ``parameter_symmetries``: signed permutations
``(permutation, signs)``, g(θ)_i = s_i θ_{π_i}, under which the likelihood and the prior are
unchanged, and ``sign_symmetries``: indices whose sign flip is one (slcp's θ3, θ4). The flows then
model one mirror image and average over the group (:func:`parameter_symmetries`; the reference
sampler runs on a half-space for each sign symmetry).

Objects that do not subclass :class:`Simulator` are wrapped by :func:`as_simulator`.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution

from .errors import SbipipeError

__all__ = ["Simulator", "as_simulator", "check_observation", "describe_distribution", "forked_rng", "has_likelihood",
           "parameter_symmetries", "sample_prior"]

_GLOBAL_RNG_LOCK = threading.RLock()  # re-entrant: a seeded draw may nest another


@contextlib.contextmanager
def forked_rng(seed: int | None, devices: Sequence[torch.device] = ()) -> Iterator[None]:
    """torch's process-wide RNG (and that of CUDA ``devices``) forked, seeded with ``seed`` unless
    it is None, and restored afterwards, one thread at a time: the RNG is shared by threads, so two
    seeded draws at once (chunks of a thread task runner) would otherwise take each other's numbers."""
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=list(devices)):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def parameter_symmetries(simulator: Any) -> list[list[list[int]]]:
    """The signed permutations ``(permutation, signs)`` of θ that a simulator declares leave its
    likelihood and prior unchanged: its ``parameter_symmetries`` and a sign flip per index of its
    ``sign_symmetries``."""
    dim = len(simulator.parameter_names)
    out = [[[int(i) for i in perm], [int(s) for s in signs]] for perm, signs in getattr(simulator, "parameter_symmetries", ())]
    for i in getattr(simulator, "sign_symmetries", ()):
        out.append([list(range(dim)), [-1 if j == int(i) else 1 for j in range(dim)]])
    return out


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class Simulator:
    """Base class with the contract's defaults. Subclasses set ``parameter_names``, ``prior``
    and implement ``simulate``."""

    name: str = ""
    version: str = "1"
    parameter_names: Sequence[str] = ()
    prior: Distribution

    def simulate(self, theta: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    # -- defaults -----------------------------------------------------------------------
    @property
    def parameter_labels(self) -> list[str]:
        return list(self.parameter_names)

    @property
    def parameter_units(self) -> list[str]:
        return [""] * len(self.parameter_names)

    @property
    def dim(self) -> int:
        return len(self.parameter_names)

    @property
    def observation_shape(self) -> tuple[int, ...]:
        cached = self.__dict__.get("_observation_shape")
        if cached is None:
            theta = sample_prior(self, 1, torch.Generator().manual_seed(0))
            x = self.simulate(theta, torch.Generator().manual_seed(0))
            cached = tuple(int(s) for s in x.shape[1:])
            self.__dict__["_observation_shape"] = cached
        return cached

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` prior draws ``[n, D]``; reproducible for a seeded ``generator``.

        ``torch.distributions`` take no generator, so the draw runs on a forked global RNG
        seeded from ``generator`` (:func:`forked_rng`). Subclasses may override with a generator-native sampler.
        """
        if generator is None:
            return self.prior.sample((n,)).to(torch.float32)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with forked_rng(seed):
            return self.prior.sample((n,)).to(torch.float32)

    def check_theta(self, theta: Any) -> Tensor:
        """Return ``theta`` as float32 ``[B, D]`` on its device; raise if the shape is wrong, a
        value is not finite, or a value lies outside the prior's support (naming the parameter).
        The check runs on a CPU copy, where the prior lives."""
        theta = torch.as_tensor(theta).to(torch.float32)
        if theta.ndim == 1:
            theta = theta.unsqueeze(0)
        d = self.dim
        if theta.ndim != 2 or theta.shape[1] != d:
            raise SbipipeError(
                f"{self.name}: expected theta of shape [B, {d}] for parameters "
                f"{list(self.parameter_names)}, got {list(theta.shape)}"
            )
        values = theta.detach().cpu()
        bad = ~torch.isfinite(values)
        support = self.prior.support
        base = getattr(support, "base_constraint", support)
        try:
            inside = base.check(values)
            if inside.shape == values.shape:
                bad |= ~inside
            else:  # a constraint on whole vectors (e.g. simplex): check rows only
                bad |= ~support.check(values).reshape(-1, 1).expand_as(values)
        except (NotImplementedError, RuntimeError):
            bad |= ~torch.isfinite(self.prior.log_prob(values)).reshape(-1, 1).expand_as(values)
        if bad.any():
            row, col = (int(i) for i in bad.nonzero()[0])
            raise SbipipeError(
                f"{self.name}: parameter {self.parameter_names[col]!r} = {values[row, col].item():.6g} "
                f"(row {row}) is outside the prior support {_describe_support(base, col)}; "
                "give values inside the prior"
            )
        return theta

    def validate_observation(self, x: Any) -> Tensor:
        """Return ``x`` as float32 ``[M, *observation_shape]`` (a single observation gets
        ``M = 1``); raise a clear error for a wrong shape, dtype, NaN or inf."""
        return check_observation(x, self.observation_shape, self.name)

    def describe_prior(self) -> str:
        return describe_distribution(self.prior)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} v{self.version}>"


class _Wrapped(Simulator):
    """A duck-typed simulator with the base class's defaults filled in."""

    def __init__(self, obj: Any, name: str):
        self._obj = obj
        self.name = getattr(obj, "name", None) or name
        self.version = str(getattr(obj, "version", "1"))
        self.parameter_names = list(obj.parameter_names)
        self.prior = obj.prior

    def simulate(self, theta: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self._obj.simulate(theta, generator)

    def __getattr__(self, item: str) -> Any:  # log_likelihood, labels, units, ...
        if item.startswith("__") or item == "_obj":
            raise AttributeError(item)
        return getattr(self._obj, item)

    @property
    def parameter_labels(self) -> list[str]:
        return list(getattr(self._obj, "parameter_labels", self.parameter_names))

    @property
    def parameter_units(self) -> list[str]:
        return list(getattr(self._obj, "parameter_units", [""] * len(self.parameter_names)))

    @property
    def observation_shape(self) -> tuple[int, ...]:
        shape = getattr(self._obj, "observation_shape", None)
        return tuple(shape) if shape is not None else Simulator.observation_shape.fget(self)

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        own = getattr(self._obj, "sample_prior", None)
        return own(n, generator) if callable(own) else Simulator.sample_prior(self, n, generator)


def as_simulator(obj: Any, name: str = "") -> Simulator:
    """Check ``obj`` against the contract and give it the defaults of :class:`Simulator`."""
    missing = [a for a in ("parameter_names", "prior", "simulate") if not hasattr(obj, a)]
    if missing:
        raise SbipipeError(
            f"{name or type(obj).__name__} is not a simulator: it lacks {', '.join(missing)} "
            "(a simulator needs parameter_names, prior and simulate(theta, generator))"
        )
    if not isinstance(obj.prior, Distribution):
        raise SbipipeError(
            f"{name or type(obj).__name__}: prior must be a torch.distributions.Distribution, "
            f"got {type(obj.prior).__name__}"
        )
    d = len(obj.parameter_names)
    if tuple(obj.prior.event_shape) != (d,):
        raise SbipipeError(
            f"{name or type(obj).__name__}: prior event shape {list(obj.prior.event_shape)} does not "
            f"match the {d} parameter names {list(obj.parameter_names)}"
        )
    if isinstance(obj, Simulator):
        if not obj.name:
            obj.name = name or _snake(type(obj).__name__)
        return obj
    return _Wrapped(obj, name or _snake(type(obj).__name__))


def check_observation(x: Any, shape: tuple[int, ...], name: str) -> Tensor:
    """``x`` as float32 ``[M, *shape]``; a clear error for a wrong shape, dtype, NaN or inf."""
    if isinstance(x, np.ndarray):
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise SbipipeError(f"{name}: expected a real-valued observation, got dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    x = torch.as_tensor(x)
    if x.is_complex() or x.dtype == torch.bool:
        raise SbipipeError(f"{name}: expected a real-valued observation, got dtype {x.dtype}")
    x = x.to(torch.float32)
    shape = tuple(shape)
    if tuple(x.shape) == shape:
        x = x.unsqueeze(0)
    elif tuple(x.shape[1:]) != shape or x.ndim != len(shape) + 1:
        raise SbipipeError(
            f"{name}: expected an observation of shape {list(shape)} "
            f"(or a stack [M, {', '.join(map(str, shape))}]), got {list(x.shape)}"
        )
    if x.shape[0] == 0:
        raise SbipipeError(f"{name}: the observation stack is empty")
    if not torch.isfinite(x).all():
        n_bad = int((~torch.isfinite(x)).sum())
        raise SbipipeError(
            f"{name}: the observation holds {n_bad} NaN/inf value(s); mask or remove them before inference"
        )
    return x


def has_likelihood(simulator: Any) -> bool:
    """Whether the simulator provides an exact ``log_likelihood(theta, x)``."""
    return callable(getattr(simulator, "log_likelihood", None))


def sample_prior(simulator: Any, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Prior draws through the simulator's own sampler (see :meth:`Simulator.sample_prior`)."""
    return as_simulator(simulator).sample_prior(n, generator)


def _describe_support(constraint: Any, col: int) -> str:
    lo, hi = getattr(constraint, "lower_bound", None), getattr(constraint, "upper_bound", None)
    pick = lambda b: float(b.reshape(-1)[col] if torch.is_tensor(b) and b.numel() > 1 else b)  # noqa: E731
    if lo is not None and hi is not None:
        return f"[{pick(lo):g}, {pick(hi):g}]"
    if lo is not None:
        return f"[{pick(lo):g}, inf)"
    if hi is not None:
        return f"(-inf, {pick(hi):g}]"
    return str(constraint)


def describe_distribution(dist: Distribution) -> str:
    """A short description of a prior, e.g. ``Uniform(-1, 1)^2`` or ``Normal(0, [0.1, 0.2])``."""
    inner = dist
    while hasattr(inner, "base_dist"):
        inner = inner.base_dist

    def fmt(t: Tensor) -> str:
        v = t.reshape(-1)
        if v.numel() and bool((v == v[0]).all()):
            return f"{v[0].item():.4g}"
        return "[" + ", ".join(f"{x:.4g}" for x in v.tolist()) + "]"

    d = int(dist.event_shape[0]) if len(dist.event_shape) else 1
    power = f"^{d}" if d > 1 else ""
    if isinstance(inner, torch.distributions.Uniform):
        lo, hi = fmt(inner.low), fmt(inner.high)
        return f"Uniform({lo}, {hi}){power if '[' not in lo + hi else ''}"
    if isinstance(inner, torch.distributions.Normal):
        loc, scale = fmt(inner.loc), fmt(inner.scale)
        return f"Normal({loc}, {scale}){power if '[' not in loc + scale else ''}"
    if isinstance(inner, torch.distributions.MultivariateNormal):
        return f"MultivariateNormal(loc={fmt(inner.loc)}, diag(cov)={fmt(torch.diagonal(inner.covariance_matrix))})"
    if type(dist).__repr__ is not Distribution.__repr__:  # the prior describes itself
        return repr(dist)
    return type(dist).__name__
