r"""zuko's masked autoregressive flows (MAF: Papamakarios et al. 2017; NSF: Durkan et al. 2019)
with the same arguments, modules and state dicts, faster to sample from.

Inverting an autoregressive transform takes ``passes`` evaluations of its network. The first
reads x = 0 in every row, so for one observation it outputs the same parameters for all N draws:
here it runs on one row per context and its spline or affine map is broadcast over the draws
(:class:`AutoregressiveTransform`). With coupling layers (``passes=2``) the first pass already
inverts the first group of features exactly (they depend on nothing), so the second computes the
network's last layer and the univariate maps for the second group only. The result is unchanged;
of the network and spline work of drawing samples, over half goes. The NSF also uses the leaner
spline of :mod:`sbipipe.spline`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import zuko
from torch import Tensor
from torch.nn import functional as F
from zuko.flows.autoregressive import MaskedAutoregressiveTransform
from zuko.utils import broadcast, unpack

from .spline import RationalQuadraticSpline

__all__ = ["MAF", "NSF", "AutoregressiveTransform"]


class AutoregressiveTransform(zuko.transforms.AutoregressiveTransform):
    """:class:`zuko.transforms.AutoregressiveTransform` whose first inverse pass runs once per context,
    and whose second (and last, with coupling layers) inverts only the features still unknown."""

    def __init__(self, meta: Any, passes: int, last_pass: Any = None, **kwargs: Any):
        super().__init__(meta, passes, **kwargs)
        self.last_pass = last_pass

    def _inverse(self, y: Tensor) -> Tensor:
        x = self.meta(y.new_zeros((1,) * (y.ndim - 1) + y.shape[-1:])).inv(y)  # the same for every draw
        if self.passes == 2 and self.last_pass is not None:
            return self.last_pass(x, y)
        for _ in range(self.passes - 1):
            x = self.meta(x).inv(y)
        return x


class _MaskedAutoregressiveTransform(MaskedAutoregressiveTransform):
    def forward(self, c: Tensor | None = None) -> AutoregressiveTransform:
        return AutoregressiveTransform(partial(self.meta, c), self.passes, partial(self._second_group, c))

    def _second_group(self, c: Tensor | None, x: Tensor, y: Tensor) -> Tensor:
        """The second pass of a two-pass inverse: ``x`` is exact for the first group of features
        (``order == 0``); the network's last layer and the univariate maps run for the rest only."""
        late = torch.nonzero(self.order > 0).squeeze(-1).to(y.device)  # ``order`` is not a buffer: it stays on CPU
        h = torch.cat(broadcast(x, c, ignore=1), dim=-1) if c is not None else x
        *hidden, last = self.hyper
        for layer in hidden:
            h = layer(h)
        rows = (late.unsqueeze(-1) * self.total + torch.arange(self.total, device=y.device)).flatten()
        phi = F.linear(h, (last.mask * last.weight)[rows], last.bias[rows]).unflatten(-1, (-1, self.total))
        x_late = self.univariate(*unpack(phi, self.shapes)).inv(y[..., late])
        return x.expand_as(y).index_copy(-1, late, x_late)


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
