"""Physics and contract checks of the projected-field simulators in :mod:`simulators.cosmology`.

Every random draw is seeded; the statistical tolerances are stated next to each check.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats
from torch.distributions import MultivariateNormal

from sbipipe.errors import SbipipeError
from sbipipe.simulator import as_simulator
from simulators.cosmology import (
    CosmoGaussian,
    CosmoLognormal,
    binned_power,
    eh98_nowiggle_transfer,
    linear_power,
    sigma_r,
)

OB, H, NS, TCMB = 0.049, 0.6711, 0.9624, 2.7255
SIMULATORS = [CosmoGaussian, CosmoLognormal]


# -- an independent numpy/scipy evaluation of the spectrum (k in 1/Mpc internally) -----------
def _transfer_np(k_h: np.ndarray, om: float) -> np.ndarray:
    """EH98 eqs. 26-31 written in 1/Mpc units: q = k Θ² / (ω_m γ(k)), γ = α + (1-α)/(1+(0.43 k s)^4)."""
    k = np.asarray(k_h, dtype=np.float64) * H  # 1/Mpc
    wm, wb, fb = om * H * H, OB * H * H, OB / om
    s = 44.5 * np.log(9.83 / wm) / np.sqrt(1.0 + 10.0 * wb**0.75)
    alpha = 1.0 - 0.328 * np.log(431.0 * wm) * fb + 0.38 * np.log(22.3 * wm) * fb * fb
    shape = wm * (alpha + (1.0 - alpha) / (1.0 + np.power(0.43 * k * s, 4)))
    q = k * (TCMB / 2.7) ** 2 / shape
    lo = np.log(2.0 * np.e + 1.8 * q)
    return lo / (lo + (14.2 + 731.0 / (1.0 + 62.5 * q)) * q * q)


def _sigma8_sq_np(om: float) -> float:
    """σ²(8 Mpc/h) of k^n_s T² by adaptive quadrature, W(x) = 3 j₁(x)/x."""

    def integrand(lnk: float) -> float:
        k = math.exp(lnk)
        w = 3.0 * special.spherical_jn(1, 8.0 * k) / (8.0 * k)
        return k**3 * k**NS * _transfer_np(k, om) ** 2 * w * w / (2 * math.pi**2)

    val, _ = integrate.quad(integrand, math.log(1e-7), math.log(1e3), limit=1000, epsabs=0, epsrel=1e-10)
    return val


def _power_np(k_h: np.ndarray, om: float, s8: float) -> np.ndarray:
    return s8**2 / _sigma8_sq_np(om) * np.asarray(k_h) ** NS * _transfer_np(k_h, om) ** 2


@pytest.mark.parametrize("om", [0.1, 0.3175, 0.5])
def test_transfer_and_sigma8_match_independent_evaluation(om):
    k = np.logspace(-4, 1.3, 300)
    t = eh98_nowiggle_transfer(torch.tensor(k), om).numpy()
    np.testing.assert_allclose(t, _transfer_np(k, om), rtol=1e-10)  # same formulae: round-off only
    assert abs(eh98_nowiggle_transfer(1e-5, om).item() - 1) < 1e-4  # T -> 1 on large scales
    # σ_8 normalisation: fixed Simpson rule vs adaptive quad, required < 0.1 %, tested at 1e-5
    assert float(sigma_r(om)) ** 2 == pytest.approx(_sigma8_sq_np(om), rel=1e-5)
    for s8 in (0.6, 0.834, 1.0):
        p = linear_power(torch.tensor(k), om, s8).numpy()
        np.testing.assert_allclose(p, _power_np(k, om, s8), rtol=1e-5)
        assert float(sigma_r(om, amplitude=p[0] / (k[0] ** NS * t[0] ** 2))) == pytest.approx(s8, rel=1e-5)


def test_linear_power_broadcasts_and_is_plausible():
    k = torch.logspace(-3, 0, 50)
    theta = torch.tensor([[0.3, 0.8], [0.4, 0.9]], dtype=torch.float64)
    p = linear_power(k, theta[:, :1], theta[:, 1:])
    assert p.shape == (2, 50)
    torch.testing.assert_close(p[1], linear_power(k, 0.4, 0.9))
    # Planck/Quijote-like cosmology: P(0.1 h/Mpc) ≈ 6000 (Mpc/h)³, turnover near k ≈ 0.015-0.02 h/Mpc
    assert 5000 < float(linear_power(0.1, 0.3175, 0.834)) < 7000
    kk = torch.logspace(-3, 0, 2000)
    assert 0.01 < float(kk[linear_power(kk, 0.3175, 0.834).argmax()]) < 0.025


# -- the exact likelihood against dense linear algebra on tiny grids ------------------------
def _dense_setup(n: int, theta: tuple[float, float]):
    box, lz = n * 250.0 / 64, 100.0
    area = (box / n) ** 2
    kx = torch.fft.fftfreq(n, d=box / n, dtype=torch.float64) * 2 * math.pi
    kmag = torch.sqrt(kx[:, None] ** 2 + kx[None, :] ** 2)
    lam = linear_power(kmag.clamp_min(1e-3), *theta) / (lz * area)
    lam[0, 0] = 0.0
    xi = torch.fft.ifft2(lam.to(torch.complex128)).real  # C_ij = (1/N²) Σ_k λ_k e^{ik(r_i - r_j)}
    idx = torch.arange(n)
    dx = (idx[:, None, None, None] - idx[None, None, :, None]) % n
    dy = (idx[None, :, None, None] - idx[None, None, None, :]) % n
    cov = xi[dx, dy].reshape(n * n, n * n)
    # orthonormal basis of the zero-mean hyperplane {Σ x = 0}
    m = torch.cat([torch.ones(n * n, 1, dtype=torch.float64), torch.eye(n * n, dtype=torch.float64)[:, 1:]], 1)
    q = torch.linalg.qr(m).Q[:, 1:]
    return box, lz, cov, q


@pytest.mark.parametrize("n", [5, 6])
def test_gaussian_likelihood_equals_dense_mvn_on_zero_mean_subspace(n):
    thetas = [(0.3, 0.8), (0.45, 0.65)]
    sim = CosmoGaussian(n=n, box=n * 250.0 / 64)
    x = sim.simulate(torch.tensor([thetas[0]]), torch.Generator().manual_seed(n))[0].double()
    x = x - x.mean()
    for theta in thetas:
        _, _, cov, q = _dense_setup(n, theta)
        mvn = MultivariateNormal(torch.zeros(n * n - 1, dtype=torch.float64), q.T @ cov @ q)
        ref = mvn.log_prob(q.T @ x.reshape(-1))
        got = sim.log_likelihood(torch.tensor([theta], dtype=torch.float64), x)
        assert got.shape == (1,)
        assert float(got) == pytest.approx(float(ref), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("n", [5, 6])
def test_lognormal_likelihood_equals_dense_change_of_variables(n):
    thetas = [(0.35, 0.9), (0.2, 0.7)]
    sim = CosmoLognormal(n=n, box=n * 250.0 / 64)
    x = sim.simulate(torch.tensor([thetas[0]]), torch.Generator().manual_seed(n))[0].double()
    x = x - x.mean()  # on the hyperplane {Σ x = 0} exactly
    _, _, _, q = _dense_setup(n, thetas[0])
    # log|det| of y ↦ Qᵀ log(1 + Q y) between orthonormal coordinates of the hyperplane
    jac = torch.autograd.functional.jacobian(lambda y: q.T @ torch.log1p(q @ y), q.T @ x.reshape(-1))
    logdet = torch.linalg.slogdet(jac).logabsdet
    assert float(logdet) == pytest.approx(float(-torch.log1p(x).sum()), rel=1e-10, abs=1e-10)
    g = q.T @ torch.log1p(x).reshape(-1)
    for theta in thetas:
        _, _, cov, q = _dense_setup(n, theta)
        ref = MultivariateNormal(torch.zeros(n * n - 1, dtype=torch.float64), q.T @ cov @ q).log_prob(g) + logdet
        got = sim.log_likelihood(torch.tensor([theta], dtype=torch.float64), x)
        assert float(got) == pytest.approx(float(ref), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("n", [4, 5])
@pytest.mark.parametrize("cls", SIMULATORS)
def test_simulated_covariance_is_the_likelihood_covariance(cls, n):
    """40k fields: the sample covariance of (the log of) the field equals the dense C, entry by
    entry within 5σ (σ ≈ √(2/m) C_max), and every Fourier mode k ≠ 0 (Nyquist ones included) has
    ⟨|δ̂_k|²⟩ = N² λ_k within 5σ (σ = √(2/m) at most: χ²₂/2 or χ²₁ per mode)."""
    theta = (0.3, 0.8)
    sim = cls(n=n, box=n * 250.0 / 64)
    _, _, cov, _ = _dense_setup(n, theta)
    m = 40_000
    x = sim.simulate(torch.tensor([theta]).expand(m, 2), torch.Generator().manual_seed(1)).double()
    g = torch.log1p(x) if cls is CosmoLognormal else x
    g = g - g.mean((1, 2), keepdim=True)
    flat = g.reshape(m, -1)
    emp = flat.T @ flat / m
    assert float((emp - cov).abs().max()) < 5 * math.sqrt(2 / m) * float(cov.diagonal().max())
    lam_full = torch.fft.fft2(cov[0].reshape(n, n).to(torch.complex128)).real  # eigenvalues of C
    ratio = (torch.fft.fft2(g).abs() ** 2).mean(0) / (n * n * lam_full.clamp_min(1e-300))
    ratio[0, 0] = 1.0
    assert float((ratio - 1).abs().max()) < 5 * math.sqrt(2 / m)


# -- the power spectrum of generated fields -------------------------------------------------
@pytest.mark.parametrize("cls", SIMULATORS)
def test_mean_power_spectrum_matches_input(cls):
    """300 fields at (0.3, 0.8): per bin |P̂/P − 1| < max(3 %, 4σ) with σ the exact sampling
    error (σ² = 2 Σ P_k² / (n Σ P_k)²; low-k bins have few modes), and χ² over bins < 99.9 %."""
    sim, n_fields = cls(), 300
    theta = torch.tensor([[0.3, 0.8]])
    x = sim.simulate(theta.expand(n_fields, 2), torch.Generator().manual_seed(7))
    g = torch.log1p(x.double()) if cls is CosmoLognormal else x  # the lognormal's log field has P_2D
    n, box = sim.n, sim.box
    k1 = np.fft.fftfreq(n, d=box / n) * 2 * np.pi
    kmag = np.sqrt(k1[:, None] ** 2 + k1[None, :] ** 2)
    p_in = _power_np(np.where(kmag > 0, kmag, 1.0), 0.3, 0.8) / sim.slab_depth
    p_hat = (np.abs(np.fft.fft2(g.numpy().astype(np.float64))) ** 2).mean(0) * (box / n) ** 2 / n**2
    edges = (np.arange(n // 2 + 1) + 0.5) * 2 * np.pi / box
    kc, p_meas, counts = binned_power(g, box, torch.tensor(edges))
    assert counts.sum() == ((kmag >= edges[0]) & (kmag < edges[-1])).sum()
    chi2 = 0.0
    for b in range(len(edges) - 1):
        sel = (kmag >= edges[b]) & (kmag < edges[b + 1])
        expect = p_in[sel].mean()
        assert float(p_meas[:, b].mean()) == pytest.approx(p_hat[sel].mean(), rel=1e-9)
        assert float(kc[b]) == pytest.approx(kmag[sel].mean(), rel=1e-12)
        sigma = math.sqrt(2 * (p_in[sel] ** 2).sum() / n_fields) / p_in[sel].sum()
        ratio = p_hat[sel].mean() / expect
        assert abs(ratio - 1) < max(0.03, 4 * sigma), (b, ratio, sigma)
        chi2 += ((ratio - 1) / sigma) ** 2
    assert chi2 < stats.chi2.ppf(0.999, len(edges) - 1)
    torch.testing.assert_close(
        sim.power_2d(theta)[0, 1:4, 0], torch.tensor(p_in[1:4, 0]), rtol=1e-5, atol=0
    )


def test_pixel_variance_is_exact():
    sim = CosmoGaussian()
    theta = torch.tensor([[0.3, 0.8], [0.5, 1.0]])
    var = sim.pixel_variance(theta)
    lam = sim.eigenvalues(theta)
    full = torch.fft.irfft2(lam.to(torch.complex128), s=(64, 64))[:, 0, 0]  # ξ(0) = Σ_k λ_k / N²
    torch.testing.assert_close(var, full, rtol=1e-10, atol=0)
    x = sim.simulate(theta.repeat(200, 1), torch.Generator().manual_seed(3))
    emp = x.double().pow(2).mean((1, 2)).reshape(200, 2).mean(0)
    torch.testing.assert_close(emp, var, rtol=0.05, atol=0)  # 200 fields per θ: a few % scatter


def test_lognormal_mean_density_conventions():
    theta = torch.tensor([[0.3, 0.8], [0.5, 1.0]])
    x = CosmoLognormal().simulate(theta, torch.Generator().manual_seed(0)).double()
    assert x.mean((1, 2)).abs().max() < 1e-6  # field mean density: δ has zero mean per field
    ens = CosmoLognormal(mean_density="ensemble")
    y = ens.simulate(theta, torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(torch.log1p(y).mean((1, 2)), -ens.pixel_variance(theta) / 2, rtol=1e-4, atol=1e-5)
    assert (x > -1).all() and (y > -1).all()
    with pytest.raises(ValueError):
        CosmoLognormal(mean_density="bogus")


# -- the likelihood recovers the truth ------------------------------------------------------
@pytest.mark.parametrize(
    "cls, truth, seed",
    [(CosmoGaussian, (0.3, 0.8), 11), (CosmoLognormal, (0.3, 0.8), 12), (CosmoLognormal, (0.42, 0.95), 13)],
)
def test_likelihood_grid_maximum_near_truth(cls, truth, seed):
    """41×41 grid over the prior; 2(ℓ_max − ℓ_truth) < χ²₂(99.9 %) = 13.8 and the grid argmax
    within 0.1 of the truth in both parameters (the 1σ widths are ≈ 0.06 in Ω_m, 0.05 in σ_8)."""
    sim = cls()
    x = sim.simulate(torch.tensor([truth]), torch.Generator().manual_seed(seed))[0]
    om, s8 = torch.linspace(0.1, 0.5, 41), torch.linspace(0.6, 1.0, 41)
    grid = torch.stack(torch.meshgrid(om, s8, indexing="ij"), -1).reshape(-1, 2)
    ll = sim.log_likelihood(grid, x)  # one x broadcast against 1681 θ
    assert ll.shape == (1681,) and torch.isfinite(ll).all()
    best = grid[ll.argmax()]
    ll_truth = sim.log_likelihood(torch.tensor([truth]), x)
    assert float(2 * (ll.max() - ll_truth)) < 13.8
    assert abs(float(best[0]) - truth[0]) < 0.1 and abs(float(best[1]) - truth[1]) < 0.1


@pytest.mark.parametrize("cls", SIMULATORS)
def test_likelihood_broadcasting_and_invalid_values(cls):
    sim = cls()
    theta = sim.sample_prior(3, torch.Generator().manual_seed(0))
    x = sim.simulate(theta, torch.Generator().manual_seed(1))
    ll = sim.log_likelihood(theta, x)
    assert ll.shape == (3,) and ll.dtype == torch.float64
    one = sim.log_likelihood(theta, x[1])
    torch.testing.assert_close(one[1], ll[1])
    torch.testing.assert_close(one, torch.stack([sim.log_likelihood(t[None], x[1])[0] for t in theta]))
    nonphysical = torch.tensor([[0.0, 0.8], [0.3, -0.1], [float("nan"), 0.8], [0.3, 0.8]])
    ll_bad = sim.log_likelihood(nonphysical, x[0])
    assert (ll_bad[:3] == -math.inf).all() and torch.isfinite(ll_bad[3])
    if cls is CosmoLognormal:
        bad = x[0].clone()
        bad[3, 4] = -1.0
        assert sim.log_likelihood(theta[:1], bad).item() == -math.inf


# -- the simulator contract -----------------------------------------------------------------
@pytest.mark.parametrize("cls", SIMULATORS)
def test_contract_shape_determinism_and_finiteness(cls):
    sim = as_simulator(cls())
    assert sim.name == {"CosmoGaussian": "cosmo_gaussian", "CosmoLognormal": "cosmo_lognormal"}[cls.__name__]
    assert list(sim.parameter_names) == ["Omega_m", "sigma_8"] and sim.parameter_labels == ["Ω_m", "σ_8"]
    assert tuple(sim.prior.event_shape) == (2,) and sim.observation_shape == (64, 64)
    theta = sim.sample_prior(10_000, torch.Generator().manual_seed(0))
    assert theta.shape == (10_000, 2)
    assert (theta[:, 0] >= 0.1).all() and (theta[:, 0] <= 0.5).all()
    assert (theta[:, 1] >= 0.6).all() and (theta[:, 1] <= 1.0).all()
    gen = torch.Generator().manual_seed(1)
    for chunk in theta.split(2500):
        x = sim.simulate(chunk, gen)
        assert x.shape == (2500, 64, 64) and x.dtype == torch.float32
        assert torch.isfinite(x).all()
    a = sim.simulate(theta[:8], torch.Generator().manual_seed(5))
    b = sim.simulate(theta[:8], torch.Generator().manual_seed(5))
    c = sim.simulate(theta[:8], torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    p1, p2 = (sim.sample_prior(4, torch.Generator().manual_seed(2)) for _ in range(2))
    assert torch.equal(p1, p2)


@pytest.mark.parametrize("cls", SIMULATORS)
def test_theta_outside_prior_raises(cls):
    sim = cls()
    for bad in ([0.05, 0.8], [0.3, 1.2], [float("nan"), 0.8]):
        with pytest.raises(SbipipeError, match="outside the prior|Omega_m|sigma_8"):
            sim.simulate(torch.tensor([[0.3, 0.8], bad]))
    with pytest.raises(SbipipeError):
        sim.simulate(torch.tensor([[0.3, 0.8, 0.1]]))


def test_constructor_kwargs_change_the_physics():
    base, other = CosmoGaussian(), CosmoGaussian(n=32, box=500.0, slab_depth=50.0, omega_b=0.04, h=0.7, n_s=1.0)
    assert other.observation_shape == (32, 32)
    theta = torch.tensor([[0.3, 0.8]], dtype=torch.float64)
    assert other.eigenvalues(theta).shape == (1, 32, 17)
    # the mode (k_x, k_y) = (8, 0)·2π/500 has |k| = 0.1005
    kk = 8 * 2 * math.pi / 500.0
    expect = linear_power(torch.tensor([kk], dtype=torch.float64), 0.3, 0.8, omega_b=0.04, h=0.7, n_s=1.0) / 50.0
    torch.testing.assert_close(other.power_2d(theta)[0, 8, 0], expect[0], rtol=1e-10, atol=0)
    assert not torch.allclose(base.power_2d(theta)[0, 2, 0], other.power_2d(theta)[0, 4, 0])
