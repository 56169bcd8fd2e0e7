r"""zuko's masked autoregressive flows (MAF: Papamakarios et al. 2017; NSF: Durkan et al. 2019)
with the same arguments, modules and state dicts, faster to sample from.

Inverting an autoregressive transform takes ``passes`` evaluations of its network. The first
reads x = 0 in every row, so for one observation it outputs the same parameters for all N draws:
here it runs on one row per context and its spline or affine map is broadcast over the draws
(:class:`AutoregressiveTransform`). With coupling layers (``passes=2``) the second pass is the only
one per draw, and in zuko's masked network about half the hidden units depend on the context alone
(MADE masks: Germain et al. 2015); their values come from the first pass, so per draw the second
pass computes only the units that depend on the first group of features, and the last layer only
the second group's outputs. The result is unchanged (float64 tests against zuko); of the network
work of drawing samples, about two thirds goes. The NSF also uses the leaner spline of
:mod:`sbipipe.spline`.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import torch
import zuko
from torch import Tensor, nn
from torch.nn import functional as F
from zuko.flows.autoregressive import MaskedAutoregressiveTransform
from zuko.utils import unpack

from .activations import Tanh, tanh_
from .spline import RationalQuadraticSpline

__all__ = ["MAF", "NSF", "AutoregressiveTransform"]

#: activations of the flows' networks that sampling applies in place
IN_PLACE = {nn.ReLU: torch.relu_, nn.Tanh: torch.tanh_, Tanh: tanh_}


class AutoregressiveTransform(zuko.transforms.AutoregressiveTransform):
    """:class:`zuko.transforms.AutoregressiveTransform` whose first inverse pass runs once per context,
    and whose two passes with coupling layers each invert only their own group of features."""

    def __init__(self, meta: Any, passes: int, invert_coupling: Any = None, **kwargs: Any):
        super().__init__(meta, passes, **kwargs)
        self.invert_coupling = invert_coupling

    def _inverse(self, y: Tensor) -> Tensor:
        if self.passes == 2 and self.invert_coupling is not None:
            return self.invert_coupling(y)
        x = y.new_zeros((1,) * (y.ndim - 1) + y.shape[-1:])  # the first pass: the same for every draw
        for _ in range(self.passes):
            x = self.meta(x).inv(y)
        return x


class _MaskedAutoregressiveTransform(MaskedAutoregressiveTransform):
    def forward(self, c: Tensor | None = None) -> AutoregressiveTransform:
        return AutoregressiveTransform(partial(self.meta, c), self.passes, partial(self._invert_coupling, c))

    def _coupling_plan(self, device: torch.device) -> _CouplingPlan:
        """The index tensors of :meth:`_invert_coupling`, built once per device (the masks are fixed)."""
        plans = self.__dict__.setdefault("_plans", {})
        if device not in plans:
            layers = [m for m in self.hyper if isinstance(m, nn.Linear)]
            order = self.order.to(device)
            d = len(order)
            groups = tuple(torch.nonzero(order == g).squeeze(-1) for g in (0, 1))
            rows = tuple((g.unsqueeze(-1) * self.total + torch.arange(self.total, device=device)).flatten() for g in groups)
            dep = torch.zeros(layers[0].in_features, dtype=torch.bool, device=device)
            dep[groups[0]] = True
            a, b = [groups[0]], [torch.arange(d, layers[0].in_features, device=device)]  # input: x's first group; the context
            for layer in layers[:-1]:
                dep = (layer.mask.to(device) & dep).any(-1)
                a.append(dep.nonzero().squeeze(-1))
                b.append((~dep).nonzero().squeeze(-1))
            plans[device] = _CouplingPlan(groups, rows, a, b, [*a[1:], rows[1]])
        return plans[device]

    def _invert_coupling(self, c: Tensor | None, y: Tensor) -> Tensor:
        r"""The inverse with coupling layers (two groups of features, ``passes=2``). The first group's
        parameters depend on the context alone, so the first pass runs the network once per context
        (x = 0). The second group's depend on the first group only through the units that do (A in
        :class:`_CouplingPlan`), so per draw the second pass computes only those, each layer reading
        its inputs' context-only units (B) as a once-per-context bias, and the last layer computes
        the second group's outputs alone."""
        layers = [m for m in self.hyper if isinstance(m, nn.Linear)]
        acts = [IN_PLACE.get(type(m), m) for m in self.hyper if not isinstance(m, nn.Linear)]
        weights = [layer.mask * layer.weight for layer in layers]
        plan = self._coupling_plan(y.device)
        d = y.shape[-1]
        # first pass, x = 0: every unit, once per context (h0[i]: the values of layer i's inputs)
        h0: list[Tensor | None] = [c]
        for w, layer, act in zip(weights, layers, acts):
            if h0[-1] is None:  # no context: the first layer's units are act(bias)
                h0.append(act(layer.bias.clone()))
            else:
                h0.append(act(F.linear(h0[-1], w[:, d:] if len(h0) == 1 else w, layer.bias)))
        phi = _ctx_linear(h0[-1], weights[-1], layers[-1].bias, plan.rows[0], plan.b[-1])  # the first group reads B units only
        x_first = self._univariate(phi, y[..., plan.groups[0]])
        # second pass, per draw: the A units only
        h = x_first
        for i, (w, layer) in enumerate(zip(weights, layers)):
            out = plan.out[i]
            pre = F.linear(h, w[out.unsqueeze(-1), plan.a[i]])
            bias = _ctx_linear(h0[i], w, layer.bias, out, plan.b[i])
            pre = pre.add_(bias) if pre.shape == torch.broadcast_shapes(pre.shape, bias.shape) else pre + bias
            h = acts[i](pre) if i < len(acts) else pre
        x_second = self._univariate(h, y[..., plan.groups[1]])
        shape = torch.broadcast_shapes(x_first.shape[:-1], x_second.shape[:-1]) + (d,)
        x = y.new_empty(shape)
        x[..., plan.groups[0]] = x_first.expand(*shape[:-1], -1)
        x[..., plan.groups[1]] = x_second
        return x

    def _univariate(self, phi: Tensor, y: Tensor) -> Tensor:
        """The univariate maps with parameters ``phi [..., F·total]`` inverted at ``y [..., F]``."""
        return self.univariate(*unpack(phi.unflatten(-1, (-1, self.total)), self.shapes)).inv(y)


class _CouplingPlan(NamedTuple):
    """For the network's input (0) and each hidden layer (1…): ``a[i]``, its units that depend on the
    first group's features, and ``b[i]``, those that depend on the context alone (for the input:
    the context's columns; x's second group is zero in the second pass). ``out[i]``: what layer i
    computes per draw (the next A units; for the last layer the second group's ``rows``)."""

    groups: tuple[Tensor, Tensor]
    rows: tuple[Tensor, Tensor]
    a: list[Tensor]
    b: list[Tensor]
    out: list[Tensor]


def _ctx_linear(h: Tensor | None, w: Tensor, bias: Tensor, out: Tensor, cols: Tensor) -> Tensor:
    """Outputs ``out`` of a layer from its context-only inputs ``h[..., cols]`` (``h = None``: none,
    only the bias). For the network's input h is the context itself, its columns at the end."""
    if h is None or not len(cols):
        return bias[out]
    return F.linear(h if h.shape[-1] == len(cols) else h[..., cols], w[out.unsqueeze(-1), cols], bias[out])


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
