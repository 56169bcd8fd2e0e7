"""Device helpers shared by the simulator families (see the device convention in :mod:`simulators`).

Everything here is a no-op on CPU inputs: the same tensors are returned and the same random calls
are made, so CPU results stay bit-identical to the device-unaware code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.distributions import constraints

from sbipipe.simulator import Simulator

__all__ = ["DeviceCache", "DeviceSimulator", "draw_device", "poisson", "rand", "randn"]

_CPU = torch.device("cpu")


def draw_device(generator: torch.Generator | None, device: torch.device | str | None = None) -> torch.device:
    """Where random numbers are drawn: the generator's device if one is given, else ``device``
    (the input's device; CPU when None)."""
    if generator is not None:
        return generator.device
    return _CPU if device is None else torch.device(device)


def randn(
    *size: Any, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype | None = None
) -> Tensor:
    """``torch.randn`` drawn on :func:`draw_device`, then moved to ``device``."""
    src = draw_device(generator, device)
    return torch.randn(*size, generator=generator, dtype=dtype, device=src).to(device)


def rand(
    *size: Any, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype | None = None
) -> Tensor:
    """``torch.rand`` drawn on :func:`draw_device`, then moved to ``device``."""
    src = draw_device(generator, device)
    return torch.rand(*size, generator=generator, dtype=dtype, device=src).to(device)


def poisson(
    rate: float, size: tuple[int, ...], generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Poisson(``rate``) counts of shape ``size`` drawn on :func:`draw_device`, then moved to ``device``."""
    src = draw_device(generator, device)
    return torch.poisson(torch.full(size, rate, dtype=dtype, device=src), generator=generator).to(device)


class DeviceCache:
    """Copies of precomputed tensors per (name, device, dtype), made on first use.

    :meth:`get` returns the tensor itself when it is already on the device (and dtype), so CPU
    callers see exactly the original objects. Pickling or copying gives an empty cache.
    """

    def __init__(self) -> None:
        self._store: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}

    def get(self, name: str, tensor: Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> Tensor:
        device = torch.device(device)
        dtype = tensor.dtype if dtype is None else dtype
        if tensor.device == device and tensor.dtype == dtype:
            return tensor
        key = (name, device, dtype)
        out = self._store.get(key)
        if out is None:
            out = self._store[key] = tensor.to(device=device, dtype=dtype)
        return out

    def __reduce__(self) -> tuple[Any, ...]:
        return (DeviceCache, ())

    def __len__(self) -> int:
        return len(self._store)


def _support_kind(sim: Simulator) -> tuple[str, Tensor | None, Tensor | None]:
    """How to check θ against the prior's support per element: ``("box", low, high)`` for a closed
    interval (float32 CPU bounds broadcastable to [D]), ``("real", None, None)`` for the real line,
    ``("other", None, None)`` otherwise."""
    support = sim.prior.support
    base = getattr(support, "base_constraint", support)
    if type(base) is constraints._Interval:
        lo = torch.as_tensor(base.lower_bound, dtype=torch.float32)
        hi = torch.as_tensor(base.upper_bound, dtype=torch.float32)
        return "box", lo, hi
    if type(base) is constraints._Real:
        return "real", None, None
    return "other", None, None


class DeviceSimulator(Simulator):
    """:class:`Simulator` whose ``check_theta`` also accepts θ on an accelerator.

    The prior's tensors stay on the CPU; for θ elsewhere a box prior's bounds are copied to θ's
    device once (cached) and checked there. θ that fails (or a prior whose support is neither a
    box nor the real line) is checked on a CPU copy by the base class, which raises the usual
    message. CPU θ takes the base class's path unchanged."""

    @property
    def _device_cache(self) -> DeviceCache:
        cache = self.__dict__.get("_device_cache_store")
        if cache is None:
            cache = self.__dict__["_device_cache_store"] = DeviceCache()
        return cache

    def check_theta(self, theta: Any) -> Tensor:
        theta = torch.as_tensor(theta)
        if theta.device.type == "cpu":
            return super().check_theta(theta)
        theta = theta.to(torch.float32)
        if theta.ndim == 1:
            theta = theta.unsqueeze(0)
        ok = theta.ndim == 2 and theta.shape[1] == self.dim
        kind, low, high = _support_kind(self)
        if ok and kind != "other":
            inside = torch.isfinite(theta)
            if kind == "box":
                cache = self._device_cache
                low = cache.get("check_theta.low", low, theta.device)
                high = cache.get("check_theta.high", high, theta.device)
                inside = inside & (low <= theta) & (theta <= high)
            ok = bool(inside.all())
        else:
            ok = False
        if not ok:
            super().check_theta(theta.detach().cpu())  # raises with the parameter's name
        return theta
