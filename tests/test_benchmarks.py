"""The sbibm benchmark tasks: their definitions and exact likelihoods against independent formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from sbipipe import get_simulator


def test_two_moons_matches_sbibm_definition():
    sim = get_simulator("two_moons")
    g = torch.Generator().manual_seed(0)
    theta = torch.tensor([[0.3, -0.5]]).expand(200_000, 2)
    x = sim.simulate(theta, g).double().numpy()
    # undo the θ-dependent offset of sbibm's definition and recover (r, a)
    t1, t2 = 0.3, -0.5
    u = x[:, 0] - 0.25 + abs(t1 + t2) / math.sqrt(2)
    v = x[:, 1] - (t2 - t1) / math.sqrt(2)
    r, a = np.hypot(u, v), np.arctan2(v, u)
    assert abs(r.mean() - 0.1) < 1e-4 and abs(r.std() - 0.01) < 1e-4  # r ~ N(0.1, 0.01²)
    assert stats.kstest(a, stats.uniform(-math.pi / 2, math.pi).cdf).pvalue > 1e-3  # a ~ U(-π/2, π/2)


def test_two_moons_likelihood_is_a_normalised_density():
    sim = get_simulator("two_moons")
    theta = torch.tensor([0.2, 0.7])
    s = 1 / math.sqrt(2)
    cx, cy = 0.25 - abs(0.9) * s, (0.7 - 0.2) * s
    h = 0.0005
    gx, gy = torch.meshgrid(
        torch.arange(cx - 0.01, cx + 0.16, h, dtype=torch.float64),
        torch.arange(cy - 0.16, cy + 0.16, h, dtype=torch.float64),
        indexing="ij",
    )
    xs = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)
    dens = torch.exp(sim.log_likelihood(theta.double().expand(len(xs), 2), xs))
    assert float(dens.sum() * h * h) == pytest.approx(1.0, abs=5e-3)


def test_gaussian_linear_likelihood_and_posterior():
    sim = get_simulator("gaussian_linear")
    g = torch.Generator().manual_seed(1)
    theta = sim.sample_prior(5, g)
    x = sim.simulate(theta, g)
    expected = stats.multivariate_normal(mean=theta[0].numpy(), cov=0.1 * np.eye(10)).logpdf(x[0].numpy())
    assert float(sim.log_likelihood(theta[:1], x[:1])) == pytest.approx(expected, rel=1e-5)
    post = sim.posterior(x[0])
    assert torch.allclose(post.mean, x[0] / 2, atol=1e-6)
    assert torch.allclose(post.covariance_matrix, 0.05 * torch.eye(10), atol=1e-7)
    # the posterior ∝ likelihood × prior: differences of log densities agree
    t = sim.sample_prior(50, g)
    lhs = post.log_prob(t) - post.log_prob(t[:1])
    rhs = sim.log_likelihood(t, x[:1].expand(50, 10)) + sim.prior.log_prob(t)
    rhs = rhs - rhs[:1]
    assert torch.allclose(lhs, rhs, atol=1e-3)


def test_slcp_likelihood_against_scipy():
    sim = get_simulator("slcp")
    g = torch.Generator().manual_seed(2)
    theta = sim.sample_prior(8, g).double()
    x = sim.simulate(theta.float(), g).double()
    for i in range(8):
        t = theta[i].numpy()
        s1, s2, rho = t[2] ** 2, t[3] ** 2, math.tanh(t[4])
        cov = np.array([[s1**2 + 1e-6, rho * s1 * s2], [rho * s1 * s2, s2**2 + 1e-6]])
        ref = stats.multivariate_normal(mean=t[:2], cov=cov).logpdf(x[i].numpy().reshape(4, 2)).sum()
        assert float(sim.log_likelihood(theta[i : i + 1], x[i : i + 1])) == pytest.approx(ref, rel=1e-6, abs=1e-6)


def test_slcp_draws_have_the_stated_moments():
    sim = get_simulator("slcp")
    theta = torch.tensor([[0.5, -1.0, 1.2, -0.8, 0.7]]).expand(100_000, 5)
    x = sim.simulate(theta, torch.Generator().manual_seed(3)).reshape(-1, 2).double()
    s1, s2, rho = 1.2**2, 0.8**2, math.tanh(0.7)
    assert torch.allclose(x.mean(0), torch.tensor([0.5, -1.0], dtype=torch.float64), atol=0.01)
    cov = torch.cov(x.T)
    assert float(cov[0, 0]) == pytest.approx(s1**2, rel=0.01)
    assert float(cov[1, 1]) == pytest.approx(s2**2, rel=0.01)
    assert float(cov[0, 1] / (cov[0, 0] * cov[1, 1]).sqrt()) == pytest.approx(rho, abs=0.01)
