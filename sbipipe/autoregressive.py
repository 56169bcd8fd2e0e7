r"""zuko's masked autoregressive flows (MAF: Papamakarios et al. 2017; NSF: Durkan et al. 2019)
with the same arguments, modules and state dicts, faster to sample from.

Inverting an autoregressive transform takes ``passes`` evaluations of its network. The first
reads x = 0 in every row, so for one observation it outputs the same parameters for all N draws:
here it runs on one row per context and its spline or affine map is broadcast over the draws
(:class:`AutoregressiveTransform`). With coupling layers (``passes=2``) each pass inverts only its
own group of features: the first group depends on nothing, the second on the first only, so each
pass computes the network's last layer and the univariate maps for its group alone. The result is
unchanged; of the network and spline work of drawing samples, over half goes. The first layer applies
its context columns once per context, not per draw, and the activations run in place. The NSF also uses
the leaner spline of :mod:`sbipipe.spline`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import zuko
from torch import Tensor, nn
from torch.nn import functional as F
from zuko.flows.autoregressive import MaskedAutoregressiveTransform
from zuko.utils import broadcast, unpack

from .spline import RationalQuadraticSpline

__all__ = ["MAF", "NSF", "AutoregressiveTransform"]

#: activations of the flows' networks that sampling applies in place
IN_PLACE = {nn.ReLU: torch.relu_, nn.Tanh: torch.tanh_}


class AutoregressiveTransform(zuko.transforms.AutoregressiveTransform):
    """:class:`zuko.transforms.AutoregressiveTransform` whose first inverse pass runs once per context,
    and whose two passes with coupling layers each invert only their own group of features."""

    def __init__(self, meta: Any, passes: int, invert_group: Any = None, **kwargs: Any):
        super().__init__(meta, passes, **kwargs)
        self.invert_group = invert_group

    def _inverse(self, y: Tensor) -> Tensor:
        x = y.new_zeros((1,) * (y.ndim - 1) + y.shape[-1:])  # the first pass: the same for every draw
        if self.passes == 2 and self.invert_group is not None:
            return self.invert_group(self.invert_group(x, y, 0), y, 1)
        for _ in range(self.passes):
            x = self.meta(x).inv(y)
        return x


class _MaskedAutoregressiveTransform(MaskedAutoregressiveTransform):
    def forward(self, c: Tensor | None = None) -> AutoregressiveTransform:
        return AutoregressiveTransform(partial(self.meta, c), self.passes, partial(self._invert_group, c))

    def _invert_group(self, c: Tensor | None, x: Tensor, y: Tensor, group: int) -> Tensor:
        """One pass of a two-pass (coupling) inverse: ``x`` is exact for the features of the groups
        before ``group`` (``order``), and the network's last layer and the univariate maps run for
        the features of ``group`` only. ``x = 0`` of shape ``[1, ..., 1, D]`` runs once per context."""
        features = torch.nonzero(self.order == group).squeeze(-1).to(y.device)  # ``order`` stays on CPU
        *hidden, last = self.hyper
        if hidden:  # the first layer's context columns act on c alone, once per context, not per draw
            first, *hidden = hidden
            w = first.mask * first.weight
            h = F.linear(x, w[:, : x.shape[-1]])
            bias = F.linear(c, w[:, x.shape[-1]:], first.bias) if c is not None else first.bias
            h = h.add_(bias) if h.shape == torch.broadcast_shapes(h.shape, bias.shape) else h + bias
        else:  # no hidden layer: the last one reads x and c
            h = torch.cat(broadcast(x, c, ignore=1), dim=-1) if c is not None else x
        for layer in hidden:  # activations in place: each [N, hidden] tensor is written once
            in_place = IN_PLACE.get(type(layer))
            h = in_place(h) if in_place else layer(h)
        rows = (features.unsqueeze(-1) * self.total + torch.arange(self.total, device=y.device)).flatten()
        phi = F.linear(h, (last.mask * last.weight)[rows], last.bias[rows]).unflatten(-1, (-1, self.total))
        x_group = self.univariate(*unpack(phi, self.shapes)).inv(y[..., features])
        return x.expand_as(y).index_copy(-1, features, x_group)


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
