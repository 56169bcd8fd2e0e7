"""The lean rational-quadratic spline and the faster-sampling MAF/NSF against zuko's (same
parameterisation, same values, same state dicts)."""

import shutil

import torch
import zuko
from zuko.transforms import MonotonicRQSTransform

import pytest

import sbipipe.spline
from sbipipe.autoregressive import MAF, NSF
from sbipipe.native import spline_library
from sbipipe.spline import RationalQuadraticSpline


@pytest.fixture(autouse=True, params=["compiled", "torch"])
def spline_path(request, monkeypatch):
    """Every test runs on both paths: the compiled C loop (where a compiler is) and the torch operations."""
    if request.param == "torch":
        monkeypatch.setattr(sbipipe.spline, "spline_library", lambda dtype: None)
    elif spline_library(torch.float64) is None:
        assert not shutil.which("cc"), "a C compiler is here but the compiled spline did not build"
        pytest.skip("no C compiler: the spline runs as torch operations")
    return request.param


def _params(shape: tuple[int, ...], bins: int = 8, scale: float = 2.0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(scale * torch.randn(*shape, k, generator=g, dtype=torch.float64) for k in (bins, bins, bins - 1))


def test_spline_values_log_jacobian_and_inverse_match_zuko():
    params = _params((300, 4))
    x = 3 * torch.randn(300, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[0, 0], x[1, 1] = 7.0, -6.0  # outside [-5, 5]: the identity, log-Jacobian 0
    ours, theirs = RationalQuadraticSpline(*params), MonotonicRQSTransform(*params)
    y, ladj = ours.call_and_ladj(x)
    y_ref, ladj_ref = theirs.call_and_ladj(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(ladj, ladj_ref, rtol=0, atol=1e-9)
    assert y[0, 0] == 7.0 and ladj[0, 0] == 0.0
    torch.testing.assert_close(ours.inv(y), x, rtol=0, atol=1e-8)
    torch.testing.assert_close(ours.inv(y), theirs.inv(y_ref), rtol=0, atol=1e-8)
    # the log-Jacobian is the derivative's log (central differences)
    h = 1e-6
    slope = (ours(x + h) - ours(x - h)) / (2 * h)
    torch.testing.assert_close(ladj, slope.log(), rtol=0, atol=1e-5)


def test_spline_gradients_stay_finite_outside_the_bound():
    params = [p.float().requires_grad_() for p in _params((64, 3), scale=3.0)]
    x = torch.linspace(-40, 40, 64 * 3).reshape(64, 3)  # most of it outside [-5, 5]
    y, ladj = RationalQuadraticSpline(*params).call_and_ladj(x)
    (y.sum() + ladj.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in params)
    params = [p.detach().requires_grad_() for p in params]
    RationalQuadraticSpline(*params).inv(x).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in params)


def test_compiled_spline_takes_the_shapes_it_can_index_and_leaves_the_rest_to_torch(spline_path):
    from sbipipe.spline import _kernels
    params = [p.float() for p in _params((5, 3))]
    spline = RationalQuadraticSpline(*params)
    compiled = spline_path == "compiled"
    for x_shape, expected in (((5, 3), compiled), ((7, 5, 3), compiled), ((3,), False), ((5, 1), False)):
        assert (_kernels(torch.zeros(x_shape), spline.logits, spline.derivatives) is not None) == expected
    assert _kernels(torch.zeros(5, 3, dtype=torch.float64), spline.logits, spline.derivatives) is None  # mixed dtypes
    # the torch path broadcasts what the kernel cannot index: x [5, 1] against tables [5, 3]
    x = torch.linspace(-4, 4, 5).unsqueeze(-1)
    y, ladj = spline.call_and_ladj(x)
    y_ref, ladj_ref = MonotonicRQSTransform(*params).call_and_ladj(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ladj, ladj_ref, rtol=0, atol=1e-5)


def test_spline_broadcasts_leading_sample_dimensions():
    params = _params((5, 3))
    x = torch.randn(7, 5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y, ladj = RationalQuadraticSpline(*params).call_and_ladj(x)
    y_ref, ladj_ref = MonotonicRQSTransform(*params).call_and_ladj(x)
    assert y.shape == ladj.shape == (7, 5, 3)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(ladj, ladj_ref, rtol=0, atol=1e-9)



@pytest.mark.parametrize("table_shape,x_shape", [((40, 3), (40, 3)), ((5, 3), (7, 5, 3)), ((1, 3), (9, 1, 3))])
def test_spline_hand_written_gradients_match_zukos_autograd(table_shape, x_shape):
    # the forward map's backward is written out (one autograd node per spline): in float64 its
    # gradients with respect to x, widths, heights and slopes equal autograd's through zuko's spline,
    # with points outside the bound and tables broadcast over leading dimensions
    g = torch.Generator().manual_seed(5)
    params = _params(table_shape)
    x = 3 * torch.randn(*x_shape, generator=g, dtype=torch.float64)
    x.view(-1)[:3] = torch.tensor([7.0, -5.5, 4.999])
    weights = [torch.randn(*x_shape, generator=g, dtype=torch.float64) for _ in range(2)]
    grads = []
    for spline in (RationalQuadraticSpline, MonotonicRQSTransform):
        leaves = [t.clone().requires_grad_() for t in (x, *params)]
        y, ladj = spline(*leaves[1:]).call_and_ladj(leaves[0])
        ((y * weights[0]).sum() + (ladj * weights[1]).sum()).backward()
        grads.append([t.grad for t in leaves])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-9)
    leaves = [t.clone().requires_grad_() for t in (x, *params)]
    assert torch.autograd.gradcheck(lambda x, *p: RationalQuadraticSpline(*p).call_and_ladj(x), leaves)

@pytest.mark.parametrize("name", ["nsf", "maf"])
def test_flows_are_zukos_with_the_same_state_dict_densities_and_draws(name):
    ours_cls, theirs_cls = {"nsf": (NSF, zuko.flows.NSF), "maf": (MAF, zuko.flows.MAF)}[name]
    torch.manual_seed(0)
    ours = ours_cls(3, 4, transforms=3, hidden_features=(32, 32), passes=2)
    theirs = theirs_cls(3, 4, transforms=3, hidden_features=(32, 32), passes=2)
    theirs.load_state_dict(ours.state_dict())  # same modules and names
    g = torch.Generator().manual_seed(3)
    theta, x = torch.randn(64, 3, generator=g), torch.randn(64, 4, generator=g)
    torch.testing.assert_close(ours(x).log_prob(theta), theirs(x).log_prob(theta), rtol=0, atol=1e-4)
    # draws: the first inverse pass runs once per context and is broadcast over the draws; each of the
    # two passes inverts only its own group of features (here 2 and 1 of 3)
    for context, shape in ((x[:1], (500, 1, 3)), (x[:5], (100, 5, 3)), (x, (64, 3))):
        z = torch.randn(shape, generator=g)
        ours_inv, theirs_inv = ours(context).transform.inv(z), theirs(context).transform.inv(z)
        assert ours_inv.shape == z.shape
        torch.testing.assert_close(ours_inv, theirs_inv, rtol=0, atol=1e-4)
        torch.testing.assert_close(ours(context).transform(ours_inv), z, rtol=0, atol=1e-4)
    draws, log_q = ours(x[:2]).rsample_and_log_prob((50,))
    torch.testing.assert_close(log_q, theirs(x[:2]).log_prob(draws), rtol=0, atol=1e-4)
    # a network without hidden layers: the last layer reads x and the context itself
    torch.manual_seed(1)
    kwargs = {"transforms": 2, "hidden_features": (), "passes": 2}
    ours, theirs = ours_cls(3, 4, **kwargs), theirs_cls(3, 4, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    z = torch.randn(20, 2, 3, generator=g)
    torch.testing.assert_close(ours(x[:2]).transform.inv(z), theirs(x[:2]).transform.inv(z), rtol=0, atol=1e-4)


@pytest.mark.parametrize("features,context,hidden,activation", [
    (5, 6, (64, 64), torch.nn.ReLU), (2, 3, (16, 16, 16), torch.nn.Tanh), (4, 0, (32, 32), torch.nn.ReLU),
    (3, 2, (), torch.nn.ReLU), (5, 1, (8,), torch.nn.ELU),
])
def test_coupling_inverse_computes_only_what_depends_on_the_first_group(features, context, hidden, activation):
    # the second pass computes per draw only the units that depend on the first group's features,
    # reading the context-only units as a bias: in float64 it equals zuko's full passes
    torch.manual_seed(2)
    kwargs = {"transforms": 2, "hidden_features": hidden, "passes": 2, "activation": activation}
    ours, theirs = NSF(features, context, **kwargs).double(), zuko.flows.NSF(features, context, **kwargs).double()
    theirs.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, context, generator=g, dtype=torch.float64) if context else None
    z = torch.randn(40, 3, features, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ours(x).transform.inv(z), theirs(x).transform.inv(z), rtol=0, atol=1e-10)
