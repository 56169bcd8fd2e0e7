"""Device helpers shared by the simulator families (see the device convention in :mod:`simulators`).

Everything here is a no-op on CPU inputs: the same tensors are returned and the same random calls
are made, so CPU results stay bit-identical to the device-unaware code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

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


class DeviceSimulator(Simulator):
    """:class:`Simulator` with a per-instance :class:`DeviceCache` for tensors copied to θ's device."""

    @property
    def _device_cache(self) -> DeviceCache:
        cache = self.__dict__.get("_device_cache_store")
        if cache is None:
            cache = self.__dict__["_device_cache_store"] = DeviceCache()
        return cache
