"""Contract tests, parametrised over every registered simulator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sbipipe import SbipipeError, available_simulators, get_simulator, has_likelihood

NAMES = available_simulators()


@pytest.fixture(scope="module", params=NAMES)
def sim(request):
    return get_simulator(request.param)


def _draw(sim, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = sim.sample_prior(n, g)
    return theta, sim.simulate(theta, g)


def test_shapes_and_dtype(sim):
    theta, x = _draw(sim)
    assert theta.shape == (64, sim.dim) and theta.dtype == torch.float32
    assert x.shape == (64, *sim.observation_shape) and x.dtype == torch.float32
    assert len(sim.parameter_labels) == len(sim.parameter_units) == sim.dim
    assert sim.name and str(sim.version)


def test_same_seed_same_bits(sim):
    t1, x1 = _draw(sim, seed=7)
    t2, x2 = _draw(sim, seed=7)
    t3, x3 = _draw(sim, seed=8)
    assert torch.equal(t1, t2) and torch.equal(x1, x2)
    assert not torch.equal(x1, x3)


def test_prior_draws_inside_support_and_outputs_finite(sim):
    theta, x = _draw(sim, n=256, seed=1)
    sim.check_theta(theta)  # raises if any draw leaves the support
    assert torch.isfinite(sim.prior.log_prob(theta)).all()
    assert torch.isfinite(x).all()


def test_check_theta_rejects_bad_values(sim):
    theta, _ = _draw(sim, n=2)
    with pytest.raises(SbipipeError, match=r"expected theta of shape"):
        sim.check_theta(theta[:, :-1])
    bad = theta.clone()
    bad[1, -1] = float("nan")
    with pytest.raises(SbipipeError, match=sim.parameter_names[-1]):
        sim.check_theta(bad)
    lo = getattr(getattr(sim.prior.support, "base_constraint", None), "lower_bound", None)
    if lo is not None:  # a bounded prior: one step below the lower bound is outside
        bad = theta.clone()
        bad[0, 0] = torch.as_tensor(lo).reshape(-1)[0] - 1.0
        with pytest.raises(SbipipeError, match=rf"{sim.parameter_names[0]}.*outside the prior support"):
            sim.check_theta(bad)


def test_validate_observation(sim):
    _, x = _draw(sim, n=3)
    assert sim.validate_observation(x[0]).shape == (1, *sim.observation_shape)
    assert sim.validate_observation(x.numpy()).shape == (3, *sim.observation_shape)
    with pytest.raises(SbipipeError, match="expected an observation of shape"):
        sim.validate_observation(torch.zeros(3, *sim.observation_shape, 2))
    with pytest.raises(SbipipeError, match="expected an observation of shape"):
        sim.validate_observation(x.reshape(-1)[:-1])
    nan = x.clone()
    nan.view(-1)[0] = float("nan")
    with pytest.raises(SbipipeError, match="NaN/inf"):
        sim.validate_observation(nan)
    with pytest.raises(SbipipeError, match="real-valued"):
        sim.validate_observation(np.zeros(sim.observation_shape, dtype=complex))


def test_log_likelihood_batched(sim):
    if not has_likelihood(sim):
        pytest.skip(f"{sim.name} has no tractable likelihood")
    theta, x = _draw(sim, n=16, seed=3)
    ll = sim.log_likelihood(theta, x)
    assert ll.shape == (16,) and torch.isfinite(ll).all()
    # each observation is better explained by its own parameters than by a shuffled set on average
    shuffled = sim.log_likelihood(theta.roll(1, 0), x)
    assert (ll > shuffled).float().mean() > 0.6


def test_default_prior_sampler_is_reproducible_across_threads():
    """The default sampler seeds torch's process-wide RNG; two chunks simulated at once by a thread
    task runner used to get each other's draws (a resumed flow bank differed from a fresh one)."""
    import threading

    from torch.distributions import Independent, Uniform

    from sbipipe.simulator import as_simulator

    class NoSampler:
        parameter_names = ["a", "b"]
        prior = Independent(Uniform(torch.zeros(2), torch.ones(2)), 1)

        def simulate(self, theta, generator=None):
            return theta

    sim = as_simulator(NoSampler())
    want = {s: sim.sample_prior(2000, torch.Generator().manual_seed(s)) for s in range(16)}
    wrong = []

    def draw(s: int) -> None:
        for _ in range(20):
            if not torch.equal(sim.sample_prior(2000, torch.Generator().manual_seed(s)), want[s]):
                wrong.append(s)

    threads = [threading.Thread(target=draw, args=(s,)) for s in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []  # without the lock: 13 of 320 draws wrong in one run
