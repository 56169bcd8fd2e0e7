"""Device tests, parametrised over every registered simulator: simulate, sample_prior and
log_likelihood on CUDA (skipped without a GPU).

Convention (see :mod:`simulators`): random numbers are drawn on the generator's device and moved
to θ's device, so a CPU generator with CUDA θ reproduces the CPU draws and the results match the
CPU up to floating-point differences of the GPU's math; a CUDA generator draws natively.
"""

from __future__ import annotations

import pytest
import torch

from sbipipe import SbipipeError, available_simulators, get_simulator, has_likelihood

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NAMES = available_simulators()
DEVICE = torch.device("cuda")
TOL = 1e-4  # relative to the scale of the compared values: GPU math differs from the CPU's slightly


@pytest.fixture(scope="module", params=NAMES)
def sim(request):
    return get_simulator(request.param)


def _on_device(t: torch.Tensor) -> bool:
    return t.device.type == DEVICE.type


def _assert_matches_cpu(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert _on_device(actual), actual.device
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    actual = actual.cpu()
    assert torch.equal(torch.isfinite(actual), torch.isfinite(expected))
    finite = torch.isfinite(expected)
    scale = max(1.0, float(expected[finite].abs().max())) if finite.any() else 1.0
    torch.testing.assert_close(actual[finite], expected[finite], rtol=TOL, atol=TOL * scale)


def test_cpu_generator_with_cuda_theta_reproduces_cpu(sim):
    theta = sim.sample_prior(32, torch.Generator().manual_seed(0))
    assert theta.device.type == "cpu"
    x_cpu = sim.simulate(theta, torch.Generator().manual_seed(1))
    x_dev = sim.simulate(theta.to(DEVICE), torch.Generator().manual_seed(1))
    assert _on_device(x_dev)
    assert x_dev.shape == (32, *sim.observation_shape) and x_dev.dtype == torch.float32
    assert torch.isfinite(x_dev).all()
    _assert_matches_cpu(x_dev, x_cpu)
    if has_likelihood(sim):
        ll_cpu = sim.log_likelihood(theta, x_cpu)
        ll_dev = sim.log_likelihood(theta.to(DEVICE), x_cpu.to(DEVICE))
        assert ll_dev.shape == (32,) and torch.isfinite(ll_dev).all()
        _assert_matches_cpu(ll_dev, ll_cpu)
        # one observation broadcast against a batch of θ
        ll1_cpu = sim.log_likelihood(theta, x_cpu[:1])
        ll1_dev = sim.log_likelihood(theta.to(DEVICE), x_cpu[:1].to(DEVICE))
        _assert_matches_cpu(ll1_dev, ll1_cpu)


def test_cuda_generator_draws_on_device(sim):
    theta = sim.sample_prior(16, torch.Generator(device=DEVICE).manual_seed(0))
    assert _on_device(theta) and theta.shape == (16, sim.dim) and theta.dtype == torch.float32
    again = sim.sample_prior(16, torch.Generator(device=DEVICE).manual_seed(0))
    assert torch.equal(theta, again)
    sim.check_theta(theta)  # the draws lie inside the prior's support
    x = sim.simulate(theta, torch.Generator(device=DEVICE).manual_seed(1))
    assert _on_device(x) and x.shape == (16, *sim.observation_shape) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    if has_likelihood(sim):
        ll = sim.log_likelihood(theta, x)
        assert _on_device(ll) and ll.shape == (16,) and torch.isfinite(ll).all()


def test_no_generator_draws_on_theta_device(sim):
    assert sim.sample_prior(4).device.type == "cpu"
    theta = sim.sample_prior(4, torch.Generator().manual_seed(2)).to(DEVICE)
    x = sim.simulate(theta)
    assert _on_device(x) and x.shape == (4, *sim.observation_shape) and torch.isfinite(x).all()


def test_check_theta_on_device(sim):
    theta = sim.sample_prior(2, torch.Generator().manual_seed(3)).to(DEVICE)
    assert _on_device(sim.check_theta(theta))
    bad = theta.clone()
    bad[1, -1] = float("nan")
    with pytest.raises(SbipipeError, match=sim.parameter_names[-1]):
        sim.check_theta(bad)
