r"""zuko's masked autoregressive flows (MAF: Papamakarios et al. 2017; NSF: Durkan et al. 2019)
with the same arguments, modules and state dicts, faster to sample from.

Inverting an autoregressive transform takes ``passes`` evaluations of its network. The first
reads x = 0 in every row, so for one observation it outputs the same parameters for all N draws:
here it runs on one row per context and its spline or affine map is broadcast over the draws
(:class:`AutoregressiveTransform`). The result is unchanged; with coupling layers (``passes=2``)
half of the network work of drawing samples goes. The NSF also uses the leaner spline of
:mod:`sbipipe.spline`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import zuko
from torch import Tensor
from zuko.flows.autoregressive import MaskedAutoregressiveTransform

from .spline import RationalQuadraticSpline

__all__ = ["MAF", "NSF", "AutoregressiveTransform"]


class AutoregressiveTransform(zuko.transforms.AutoregressiveTransform):
    """:class:`zuko.transforms.AutoregressiveTransform` whose first inverse pass runs once per context."""

    def _inverse(self, y: Tensor) -> Tensor:
        x = self.meta(y.new_zeros((1,) * (y.ndim - 1) + y.shape[-1:])).inv(y)  # the same for every draw
        for _ in range(self.passes - 1):
            x = self.meta(x).inv(y)
        return x


class _MaskedAutoregressiveTransform(MaskedAutoregressiveTransform):
    def forward(self, c: Tensor | None = None) -> AutoregressiveTransform:
        return AutoregressiveTransform(partial(self.meta, c), self.passes)


class MAF(zuko.flows.MAF):
    """:class:`zuko.flows.MAF` (same arguments and state dict) with :class:`AutoregressiveTransform`."""

    def __init__(self, features: int, context: int = 0, transforms: int = 3, randperm: bool = False, **kwargs: Any):
        super().__init__(features, context, transforms, randperm, **kwargs)
        for t in self.transform.transforms:
            t.__class__ = _MaskedAutoregressiveTransform


class NSF(MAF):
    """:class:`zuko.flows.NSF` (same arguments and state dict) with :class:`RationalQuadraticSpline`."""

    def __init__(self, features: int, context: int = 0, bins: int = 8, slope: float = 1e-3, **kwargs: Any):
        super().__init__(features=features, context=context, univariate=partial(RationalQuadraticSpline, slope=slope),
                         shapes=[(bins,), (bins,), (bins - 1,)], **kwargs)
