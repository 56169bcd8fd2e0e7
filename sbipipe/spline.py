r"""The monotonic rational-quadratic spline of neural spline flows (Durkan et al. 2019,
https://arxiv.org/abs/1906.04032), leaner than zuko's.

:class:`RationalQuadraticSpline` is :class:`zuko.transforms.MonotonicRQSTransform`, same
parameterisation and same values, with fewer tensor operations: widths and heights share one
softsign/exp/cumsum, and only each point's bin is normalised and squashed. The forward map and
its log-Jacobian are one autograd function whose backward is written out (:class:`_SplineCall`):
training records one node per spline instead of ~45, and the backward avoids what is slow on CPU
(boolean masks in arithmetic, ``where`` on whole tables, gathers' scatter into zeroed tables). On
CPU a small flow's step is dominated by per-operation overhead, so this matters. Where a C compiler
is (:mod:`sbipipe.native`), the per-point work is one compiled loop instead
(:class:`_CompiledSplineCall`): torch computes the knot tables, the loop the rest; an NSF training
step (512 rows, 5 transforms) then costs 0.5–0.7× zuko's (``benchmarks/flow_speed.py``,
``benchmarks/spline_paths.py``). On ``[−B, B]`` the spline maps x to

    y = y_k + h [s ξ² + d_k ξ(1 − ξ)] / [s + (d_k + d_{k+1} − 2s) ξ(1 − ξ)],

with ξ = (x − x_k)/w, w = x_{k+1} − x_k, h = y_{k+1} − y_k and s = h/w; outside it is the identity.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn import functional as F
from zuko.transforms import MonotonicRQSTransform, Transform

from .native import spline_library

__all__ = ["RationalQuadraticSpline"]


def _tables(logits: Tensor, c: float) -> tuple[Tensor, Tensor, Tensor]:
    """For ``logits [2, *, K]`` (widths, heights): 1/(1 + c|l|), the softmax numerators
    e = exp(l/(1 + c|l|)) (the softsign bounds the exponent by 1/c, so exp needs no shift) and their
    cumulative sums, the bins' right ends unnormalised; each ``[2, *, K]``."""
    inv = logits.abs().mul_(c).add_(1).reciprocal_()
    e = (logits * inv).exp_()
    return inv, e, e.cumsum(-1)


def _locate(v: Tensor, row: int, e: Tensor, cum: Tensor, raw: Tensor, c: float, bound: float) -> tuple[Tensor, ...]:
    """For ``v [*]`` searched in the x (``row`` 0) or y knots (1): v broadcast with the tables, the
    float mask ``below [*, K]`` of the bins left of v's bin (1 for i < k), the bin index and the
    next ``at [*, 2]`` (k, k + 1), the tables' scales 2B/total ``[2, *, 1]``, the bin's left ends
    plus B and sizes ``[2, *, 1]`` (x0 + B, y0 + B; w, h), its end slopes ``d [*, 2]`` (d0, d1) and
    their logits' 1/(1 + c|r|/2). v is compared with the knots rescaled by the total (no table is
    scaled), and the comparisons counted by a product with ones (faster on CPU than a sum)."""
    raw = F.pad(raw, (1, 1))  # the end slopes' logits are 0: slope 1 (padded before any broadcast)
    if cum.shape[1:-1] != v.shape:
        shape = torch.broadcast_shapes(cum.shape[1:-1], v.shape)
        lead = (1,) * (len(shape) + 2 - cum.ndim)  # the tables' missing leading dimensions
        cum, e = (t.view(2, *lead, *t.shape[1:]).expand(2, *shape, -1) for t in (cum, e))
        raw, v = raw.expand(*shape, -1), v.expand(shape)
    bins = cum.shape[-1]
    scale = (2 * bound) / cum[..., -1:]
    # C_i < (v + B)/scale for i < k; the last knot, the total, only for v ≥ B (outside: clamped)
    below = torch.lt(cum[row], ((v + bound) / scale[row, ..., 0]).unsqueeze(-1), out=torch.empty_like(cum[row]))
    at = (below @ below.new_ones(bins, 1)).long().clamp_max_(bins - 1) + torch.arange(2, device=v.device)
    k = at[..., :1].expand(2, *at.shape[:-1], 1)
    size = e.gather(-1, k).mul_(scale)
    left = cum.gather(-1, k).mul_(scale).sub_(size)
    r = raw.gather(-1, at)
    r_inv = r.abs().mul_(0.5 * c).add_(1).reciprocal_()
    return v, below, at, scale, left, size, (r * r_inv).exp_(), r_inv


class _SplineCall(torch.autograd.Function):
    """y and log dy/dx of the spline, with the backward written out: per point, the partial
    derivatives with respect to ξ, s, d_k, d_{k+1}, y_k and h, chained to x and to the logits.
    A logit enters its bin's ends through the cumulative sums (bins left of k), its own size (bin
    k) and the total (every bin): a mask of the bins and one scatter per point."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, logits: Tensor, raw: Tensor, c: float, bound: float) -> tuple[Tensor, Tensor]:
        inv, e, cum = _tables(logits, c)
        x, below, at, scale, left, size, d, r_inv = _locate(x, 0, e, cum, raw, c, bound)
        x0, y0 = (left - bound).squeeze(-1).unbind(0)
        (w, h), (d0, d1) = size.squeeze(-1).unbind(0), d.unbind(-1)
        inside = x.abs() < bound
        s = h / w
        z = ((x - x0) / w).clamp_(0, 1)  # finite values outside the bound, where y = x
        zz = z * (1 - z)
        den = s + (d0 + d1 - 2 * s) * zz
        num = s * z * z + d0 * zz
        q = 2 * s * zz + d0 * (1 - z).square() + d1 * z * z
        y = y0 + h * num / den
        jac = s * s * q / (den * den)
        ctx.c, ctx.bound, ctx.shapes = c, bound, (x.shape, logits.shape, raw.shape)
        ctx.save_for_backward(inside, z, zz, s, w, h, d0, d1, den, num, q, below, at, scale, left, size, d * r_inv * r_inv,
                              e * inv * inv)
        return torch.where(inside, y, x), torch.where(inside, jac.log(), 0.0)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: Tensor, gl: Tensor) -> tuple[Tensor | None, ...]:
        inside, z, zz, s, w, h, d0, d1, den, num, q, below, at, scale, left, size, dd, de = ctx.saved_tensors
        x_shape, logits_shape, raw_shape = ctx.shapes
        gy_in, gl_in = gy * inside, gl * inside  # outside, y = x and the log-Jacobian is 0
        # d/dξ, d/ds, d/dd0, d/dd1 of y = y0 + h num/den and of log jac = 2 log s + log q − 2 log den
        a = gy_in * h / (den * den)
        b = gl_in / q
        zb = 2 * zz * gl_in / den
        om = 1 - z
        g_z = a * s * q + 2 * b * (s * (om - z) - d0 * om + d1 * z) - 2 * (d0 + d1 - 2 * s) * (om - z) * gl_in / den
        g_s = a * (z * z * den - num * (1 - 2 * zz)) + 2 * gl_in / s + 2 * b * zz - 2 * gl_in / den + 2 * zb
        g_d = torch.stack((a * zz * (den - num) + b * om * om - zb, b * z * z - a * num * zz - zb), -1)
        # ξ = (x − x0)/w, s = h/w
        g_zw = g_z / w
        g_x = torch.where(inside, g_zw, gy)
        g_left = torch.stack((-g_zw, gy_in)).unsqueeze(-1)  # [2, *, 1]: x0, y0
        g_size = torch.stack((-(g_zw * z + g_s * s / w), gy_in * num / den + g_s / w)).unsqueeze(-1)  # w, h
        # left + B = C_{k−1}·scale, size = e_k·scale, scale = 2B/C_{K−1}: dC_{k−1}/de_i = [i < k],
        # de_k/de_i = [i = k], dC_{K−1}/de_i = 1
        g_total = -(g_left * left + g_size * size) * scale / (2 * ctx.bound)
        g_e = torch.addcmul(g_total, g_left * scale, below)
        g_e.scatter_add_(-1, at[..., :1].expand(2, *at.shape[:-1], 1), g_size * scale)
        # summed over broadcast dimensions (the tables' missing leading ones too), then through the
        # softsign and exp: de/dl = e/(1 + c|l|)²
        lead = (1,) * (g_e.ndim - len(logits_shape))
        g_logits = g_e.sum_to_size(2, *lead, *logits_shape[1:]).view(logits_shape) * de
        g_raw = torch.zeros(*at.shape[:-1], raw_shape[-1] + 2, dtype=gy.dtype, device=gy.device)
        g_raw.scatter_(-1, at, g_d * dd)  # the padded slopes: d0 at k, d1 at k + 1
        return g_x.sum_to_size(x_shape), g_logits, g_raw[..., 1:-1].sum_to_size(raw_shape), None, None


def _knot_tables(logits: Tensor, raw: Tensor, c: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For the compiled spline: 1 + c|l| and the softmax numerators e = exp(l/(1 + c|l|)) of
    ``logits [2, *, K]``, and 1 + c|r|/2 and the knot slopes d = exp(r/(1 + c|r|/2)) ``[*, K + 1]``
    (r = 0 at both ends: slope 1), computed as whole tables (vectorised) for the C loop to read."""
    soft = logits.abs().mul_(c).add_(1)
    raw = F.pad(raw, (1, 1))
    r_soft = raw.abs().mul_(0.5 * c).add_(1)
    return soft, torch.div(logits, soft).exp_(), r_soft, torch.div(raw, r_soft).exp_()


class _CompiledSplineCall(torch.autograd.Function):
    """:class:`_SplineCall` with the per-point work in one compiled loop (``spline_kernel.c``):
    torch computes the knot tables, the loop finds each point's bin and evaluates the spline, and
    its backward (which recomputes the bins) returns the gradients with respect to the tables."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, logits: Tensor, raw: Tensor, c: float, bound: float, kernels: tuple) -> tuple[Tensor, Tensor]:
        x = x.contiguous()
        soft, e, r_soft, d = _knot_tables(logits.contiguous(), raw.contiguous(), c)
        y, ladj = torch.empty_like(x), torch.empty_like(x)
        bins = e.shape[-1]
        kernels[0](x.data_ptr(), e.data_ptr(), d.data_ptr(), x.numel(), d.numel() // (bins + 1), bins, bound,
                   y.data_ptr(), ladj.data_ptr())
        ctx.save_for_backward(x, soft, e, r_soft, d)
        ctx.bound, ctx.backward_kernel = bound, kernels[1]
        return y, ladj

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: Tensor, gl: Tensor) -> tuple[Tensor | None, ...]:
        x, soft, e, r_soft, d = ctx.saved_tensors
        gy, gl = gy.contiguous(), gl.contiguous()
        gx, g_e, g_d = torch.empty_like(x), torch.zeros_like(e), torch.zeros_like(d)
        bins = e.shape[-1]
        ctx.backward_kernel(x.data_ptr(), e.data_ptr(), d.data_ptr(), gy.data_ptr(), gl.data_ptr(), x.numel(),
                            d.numel() // (bins + 1), bins, ctx.bound, gx.data_ptr(), g_e.data_ptr(), g_d.data_ptr())
        # through the softsign and exp: de/dl = e/(1 + c|l|)², dd/dr = d/(1 + c|r|/2)²
        return gx, g_e.mul_(e).div_(soft.square()), g_d.mul_(d).div_(r_soft.square())[..., 1:-1], None, None, None


def _kernels(x: Tensor, logits: Tensor, raw: Tensor) -> tuple | None:
    """The compiled spline for these tensors, or None where it does not apply: it takes CPU
    tensors of one float dtype whose parameters' batch shape (leading ones aside) ends x's shape,
    so that point i uses parameter row i mod P (training: one row per point; sampling: the rows of
    one observation broadcast over the draws)."""
    if x.device.type != "cpu" or not (x.dtype == logits.dtype == raw.dtype) or x.numel() == 0:
        return None
    bins = logits.shape[-1]
    if raw.shape[-1] != bins - 1 or raw.shape[:-1] != logits.shape[1:-1]:
        return None
    rows = list(raw.shape[:-1])
    while rows and rows[0] == 1:
        rows.pop(0)
    if len(rows) > x.ndim or list(x.shape[x.ndim - len(rows):]) != rows:
        return None
    return spline_library(x.dtype)


class RationalQuadraticSpline(MonotonicRQSTransform):
    """Monotonic RQS on ``[-bound, bound]`` from unconstrained ``widths [*, K]``, ``heights [*, K]``
    and interior ``derivatives [*, K - 1]``; slopes are at least ``slope``.

    The knots are kept as unnormalised cumulative sums C of e = exp(softsign(logits)) (the softmax
    without its division): the bin search compares C with the point rescaled by C's total, and
    only the two knots and two slopes of each point's bin are normalised and squashed, so no
    table of all knots is built."""

    def __init__(self, widths: Tensor, heights: Tensor, derivatives: Tensor, bound: float = 5.0,
                 slope: float = 1e-3, **kwargs: Any):
        Transform.__init__(self, **kwargs)
        self.c = 2 / -math.log(slope)  # zuko's soft bound on the logits, so that slopes stay ≥ ``slope``
        self.logits = torch.stack((widths, heights))  # [2, *, K]
        self.derivatives = derivatives
        self.bound = bound

    @property
    def bins(self) -> int:
        return self.logits.shape[-1]

    def _call(self, x: Tensor) -> Tensor:
        return self.call_and_ladj(x)[0]

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        kernels = _kernels(x, self.logits, self.derivatives)
        if kernels is not None:
            return _CompiledSplineCall.apply(x, self.logits, self.derivatives, self.c, self.bound, kernels)
        return _SplineCall.apply(x, self.logits, self.derivatives, self.c, self.bound)

    def _inverse(self, y: Tensor) -> Tensor:
        kernels = _kernels(y, self.logits, self.derivatives)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (y, self.logits, self.derivatives))
        if kernels is not None and not needs_grad:  # drawing samples; reparameterised draws take the torch path
            y = y.contiguous()
            _, e, _, d = _knot_tables(self.logits.contiguous(), self.derivatives.contiguous(), self.c)
            x = torch.empty_like(y)
            kernels[2](y.data_ptr(), e.data_ptr(), d.data_ptr(), y.numel(), d.numel() // (self.bins + 1), self.bins,
                       self.bound, x.data_ptr())
            return x
        _, e, cum = _tables(self.logits, self.c)
        y, _, _, _, left, size, d, _ = _locate(y, 1, e, cum, self.derivatives, self.c, self.bound)
        x0, y0 = (left - self.bound).squeeze(-1).unbind(0)
        (w, h), (d0, d1) = size.squeeze(-1).unbind(0), d.unbind(-1)
        inside = y.abs() < self.bound
        s = h / w
        r = torch.minimum((y - y0).clamp_min_(0), h)  # finite values outside the bound, where x = y
        t = d0 + d1 - 2 * s
        a = h * (s - d0) + r * t
        b = h * d0 - r * t
        c = -s * r
        z = 2 * c / (-b - (b * b - 4 * a * c).sqrt())  # the root in [0, 1] of a z² + b z + c
        return torch.where(inside, x0 + z * w, y)
