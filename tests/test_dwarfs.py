"""Dwarf-galaxy Jeans simulators: physics against independent quadrature and analytic results,
sampling against the likelihood, prior-wide robustness, and the observation layout."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from sbipipe.errors import SbipipeError
from sbipipe.simulator import as_simulator
from simulators.dwarfs import (
    G,
    Dwarf,
    DwarfCored,
    DwarfCusp,
    JeansGrid,
    gnfw_enclosed_mass,
    plummer_enclosed_mass,
)


# -- an independent reference: nested scipy.integrate.quad -----------------------------------
def _reference_sigma_p(gamma, rs, rho0, rstar, beta0, ra, radii):
    """σ_p(R) in km/s by nested adaptive quadrature; M(r) from the hypergeometric closed form
    M = 4π ρ₀ r_s³ x^(3−γ)/(3−γ) ₂F₁(3−γ, 3−γ; 4−γ; −x)."""
    a3 = 3.0 - gamma

    def mass(r):
        x = r / rs
        return 4 * math.pi * rho0 * rs**3 * x**a3 / a3 * special.hyp2f1(a3, a3, a3 + 1, -x)

    def nu(r):
        return (1 + (r / rstar) ** 2) ** -2.5

    def log_f(r):
        return 2 * beta0 * math.log(r) + (1 - beta0) * math.log1p((r / ra) ** 2)

    def beta(r):
        q = (r / ra) ** 2
        return (beta0 + q) / (1 + q)

    def nu_sigma_r2(r):
        lf = log_f(r)
        integrand = lambda s: math.exp(log_f(s) - lf) * nu(s) * G * mass(s) / s**2  # noqa: E731
        return integrate.quad(integrand, r, np.inf, epsrel=1e-9, epsabs=0, limit=200)[0]

    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        for R in radii:
            # r = √(R² + u²) removes the 1/√(r² − R²) singularity
            def f(u, R=R):
                r = math.hypot(R, u)
                return (1 - beta(r) * R**2 / r**2) * nu_sigma_r2(r)

            cuts = [0.0, *sorted({R, rstar, 10 * max(R, rstar)}), np.inf]
            num = sum(integrate.quad(f, lo, hi, epsrel=1e-8, epsabs=0, limit=200)[0] for lo, hi in zip(cuts, cuts[1:]))
            sigma = 2 * integrate.quad(lambda u: nu(math.hypot(R, u)), 0, np.inf, epsrel=1e-11)[0]
            out.append(math.sqrt(2 * num / sigma))
    return np.array(out)


@pytest.mark.parametrize("gamma", [-1.0, 0.0, 0.5, 1.0, 1.7, 1.999])
def test_gnfw_mass_matches_hypergeometric(gamma):
    """m(x) = x^(3−γ)/(3−γ) ₂F₁(3−γ, 3−γ; 4−γ; −x) (scipy), to 10⁻⁸."""
    a3 = 3 - gamma
    x = np.array([1e-4, 0.05, 0.9, 1.0, 1.1, 7.0, 300.0, 1e5])
    ref = x**a3 / a3 * special.hyp2f1(a3, a3, a3 + 1, -x)
    m = gnfw_enclosed_mass(torch.tensor(x) * 0.7, gamma, 0.7, 3.0).numpy() / (4 * math.pi * 3.0 * 0.7**3)
    np.testing.assert_allclose(m, ref, rtol=1e-8)
    if gamma == 1.0:  # NFW: ln(1 + x) − x/(1 + x)
        np.testing.assert_allclose(m, np.log1p(x) - x / (1 + x), rtol=1e-8)


# (γ, log10 rs, log10 ρ0, r*/rs, β0, ra/r*): isotropic NFW (r_a → ∞), cored + tangential,
# near-singular cusp + radial, hollow centre, and a prior corner
PHYSICS_CASES = [
    (1.0, 0.0, 7.0, 0.5, 0.0, 1e6),
    (0.0, -0.5, 7.5, 0.3, -0.5, 0.5),
    (1.95, 0.5, 6.0, 0.8, 0.5, 1.0),
    (-1.0, 1.0, 5.5, 0.2, 0.3, 2.0),
]


@pytest.mark.parametrize("case", PHYSICS_CASES)
def test_dispersion_matches_nested_quad(case):
    """Tolerance 0.1 % (measured ≤ 7·10⁻⁵ over the prior; the requirement is 0.5 %)."""
    sim = Dwarf()
    theta = torch.tensor([case], dtype=torch.float64)
    p = {k: v.item() for k, v in sim.physical(theta).items()}
    radii = np.array([0.03, 0.4, 1.5, 6.0]) * p["rstar"]
    ref = _reference_sigma_p(p["gamma"], p["rs"], p["rho0"], p["rstar"], p["beta0"], p["ra"], radii)
    got = sim.velocity_dispersion(theta, torch.tensor(radii)[None]).double().numpy()[0]
    np.testing.assert_allclose(got, ref, rtol=1e-3)


def test_plummer_self_consistent_isotropic():
    """Plummer stars in their own potential, β = 0: σ_r² = GM/(6√(r² + a²)) and
    σ_p² = 3πGM/(64a)/√(1 + R²/a²). Tolerance 0.05 % (measured 1.4·10⁻⁴)."""
    grid = JeansGrid()
    mass, a = torch.tensor([1e7, 3e8]), torch.tensor([0.3, 1.2])
    R = torch.tensor([1e-3, 0.03, 0.3, 1.0, 3.0, 30.0, 300.0]) * a[:, None]
    got = grid.dispersion(R, a, lambda r: plummer_enclosed_mass(r, mass[:, None], a[:, None]))
    want = torch.sqrt(3 * math.pi * G * mass[:, None] / (64 * a[:, None]) / torch.sqrt(1 + (R / a[:, None]) ** 2))
    torch.testing.assert_close(got.double(), want.double(), rtol=5e-4, atol=0)
    # the radial part alone, in units of a, on the grid (0.01 a < r < 100 a)
    gm = G * mass[:, None] * grid.s**3 / (1 + grid.s**2) ** 1.5 / a[:, None]
    s2 = grid.sigma_r2(gm, torch.zeros(2), torch.full((2,), math.inf))
    keep = (grid.s > 1e-2) & (grid.s < 1e2)
    want_r = G * mass[:, None] / (6 * a[:, None] * torch.sqrt(1 + grid.s**2))
    torch.testing.assert_close(s2[:, keep].double(), want_r[:, keep].double(), rtol=5e-4, atol=0)


def test_fixed_slope_variants_match_dwarf():
    theta = Dwarf().sample_prior(50, torch.Generator().manual_seed(2))
    for cls, gamma in ((DwarfCored, 0.0), (DwarfCusp, 1.0)):
        sim = cls()
        assert sim.dim == 5 and "gamma" not in sim.parameter_names
        full = theta.clone()
        full[:, 0] = gamma
        a = sim.simulate(theta[:, 1:], torch.Generator().manual_seed(3))
        b = Dwarf().simulate(full, torch.Generator().manual_seed(3))
        assert torch.equal(a, b)
        torch.testing.assert_close(sim.log_likelihood(theta[:, 1:], a), Dwarf().log_likelihood(full, a))


# -- robustness over the prior ---------------------------------------------------------------
@pytest.mark.parametrize(
    "sim", [Dwarf(), DwarfCored(), DwarfCusp(), Dwarf(poisson=True)], ids=["dwarf", "cored", "cusp", "poisson"]
)
def test_prior_draws_finite_with_valid_masks(sim):
    gen = torch.Generator().manual_seed(0)
    n_max = sim.observation_shape[0]
    assert sim.observation_shape == ((160 if sim.poisson else 100), 3)
    counts = []
    for _ in range(4):  # 10⁴ prior draws in chunks
        theta = sim.sample_prior(2500, gen)
        assert theta.shape == (2500, sim.dim) and torch.isfinite(sim.prior.log_prob(theta)).all()
        x = sim.simulate(theta, gen)
        assert x.shape == (2500, n_max, 3) and x.dtype == torch.float32
        assert torch.isfinite(x).all()
        mask = x[..., 2]
        assert ((mask == 0) | (mask == 1)).all()
        assert (mask[:, 1:] <= mask[:, :-1]).all()  # stars first, then padding
        assert (x[mask == 0] == 0).all()
        assert (x[..., 0][mask == 1] > 0).all()
        counts.append(mask.sum(-1))
        ll = sim.log_likelihood(theta[:500], x[:500])
        assert ll.shape == (500,) and torch.isfinite(ll).all()
    counts = torch.cat(counts)
    if sim.poisson:
        assert counts.min() >= 1 and counts.max() <= n_max
        assert abs(counts.mean().item() - 100) < 0.5 and abs(counts.var().item() - 100) < 6
    else:
        assert (counts == 100).all()


def test_prior_corners_finite():
    sim = Dwarf()
    box = sim.prior.base_dist
    corners = torch.tensor(list(itertools.product(*zip(box.low.tolist(), box.high.tolist()))))
    x = sim.simulate(corners, torch.Generator().manual_seed(1))
    assert torch.isfinite(x).all() and torch.isfinite(sim.log_likelihood(corners, x)).all()
    sig = sim.velocity_dispersion(corners, torch.tensor([1e-5, 1e-2, 1.0, 1e2, 1e4]))
    assert torch.isfinite(sig).all() and (sig > 0).all()


def test_determinism_by_seed():
    sim = Dwarf(poisson=True)
    theta = sim.sample_prior(64, torch.Generator().manual_seed(5))
    assert torch.equal(theta, sim.sample_prior(64, torch.Generator().manual_seed(5)))
    a = sim.simulate(theta, torch.Generator().manual_seed(11))
    b = sim.simulate(theta, torch.Generator().manual_seed(11))
    c = sim.simulate(theta, torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)


# -- sampling agrees with the likelihood -----------------------------------------------------
def test_samples_follow_the_model():
    """R/r_* has CDF R²/(R² + r_*²) and v/√(σ_p² + ε²) is standard normal (KS, p > 10⁻³)."""
    sim = Dwarf(n_stars=400)
    theta = sim.sample_prior(50, torch.Generator().manual_seed(21))
    x = sim.simulate(theta, torch.Generator().manual_seed(22)).double()
    rstar = sim.physical(theta)["rstar"][:, None]
    rho = (x[..., 0] / rstar).flatten().numpy()
    assert stats.kstest(rho**2 / (1 + rho**2), "uniform").pvalue > 1e-3
    sig = sim.velocity_dispersion(theta, x[..., 0]).double()
    z = (x[..., 1] / torch.sqrt(sig**2 + sim.velocity_error**2)).flatten().numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3


@pytest.fixture(scope="module")
def rich_galaxy():
    sim = Dwarf(n_stars=1000)
    truth = torch.tensor([[1.0, 0.0, 6.5, 0.5, 0.0, 1.0]])
    return sim, truth, sim.simulate(truth, torch.Generator().manual_seed(7))


def test_likelihood_at_truth_beats_prior_draws(rich_galaxy):
    sim, truth, x = rich_galaxy
    theta = sim.sample_prior(2000, torch.Generator().manual_seed(8))
    ll = sim.log_likelihood(theta, x)  # x [1, n, 3] broadcasts against theta [2000, 6]
    assert ll.shape == (2000,)
    assert (ll < sim.log_likelihood(truth, x)).float().mean() >= 0.99


@pytest.mark.parametrize(
    "index, lo, hi, tol",
    [(2, 5.5, 7.5, 0.1), (3, 0.2, 1.0, 0.05), (0, -1.0, 2.0, 0.3), (1, -1.0, 1.0, 0.1)],
    ids=["log10_rho0", "rstar_over_rs", "gamma", "log10_rs"],
)
def test_likelihood_scan_peaks_near_truth(rich_galaxy, index, lo, hi, tol):
    sim, truth, x = rich_galaxy
    grid = torch.linspace(lo, hi, 81)
    theta = truth.repeat(len(grid), 1)
    theta[:, index] = grid
    best = grid[sim.log_likelihood(theta, x).argmax()].item()
    assert abs(best - truth[0, index].item()) <= tol


def test_likelihood_broadcasting_and_dtype():
    sim = DwarfCusp(n_stars=20)
    theta = sim.sample_prior(3, torch.Generator().manual_seed(1))
    x = sim.simulate(theta, torch.Generator().manual_seed(2))
    each = torch.stack([sim.log_likelihood(theta[i], x[i]) for i in range(3)])
    torch.testing.assert_close(sim.log_likelihood(theta, x), each)
    grid = sim.log_likelihood(theta[:, None, :], x[None])  # [3 θ, 3 x]
    assert grid.shape == (3, 3)
    torch.testing.assert_close(torch.diagonal(grid), each)
    assert sim.log_likelihood(theta.double(), x).dtype == torch.float64


def test_padding_rows_are_ignored_by_the_likelihood():
    sim = Dwarf(poisson=True)
    theta = sim.sample_prior(4, torch.Generator().manual_seed(3))
    x = sim.simulate(theta, torch.Generator().manual_seed(4))
    n = int(x[0, :, 2].sum())
    shrunk = Dwarf(n_stars=n, n_max=n)
    torch.testing.assert_close(sim.log_likelihood(theta[0], x[0]), shrunk.log_likelihood(theta[0], x[0, :n]))


# -- the contract ----------------------------------------------------------------------------
def test_contract_and_metadata():
    for cls, name, dim in ((Dwarf, "dwarf", 6), (DwarfCored, "dwarf_cored", 5), (DwarfCusp, "dwarf_cusp", 5)):
        sim = as_simulator(cls())
        assert sim.name == name and sim.dim == dim and sim.version == "1"
        assert len(sim.parameter_labels) == len(sim.parameter_units) == dim
        assert tuple(sim.prior.event_shape) == (dim,)
    assert Dwarf().parameter_names == ("gamma", "log10_rs", "log10_rho0", "rstar_over_rs", "beta0", "ra_over_rstar")
    assert Dwarf(poisson=True).version == "1+poisson"
    assert Dwarf(n_stars=50, velocity_error=5).version == "1+n50+err5"


def test_validate_observation():
    sim = Dwarf(poisson=True)
    x = sim.simulate(sim.sample_prior(2, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(0))
    assert sim.validate_observation(x[0]).shape == (1, 160, 3)
    assert sim.validate_observation(x.numpy()).shape == (2, 160, 3)
    empty = x.clone()
    empty[1] = 0
    with pytest.raises(SbipipeError, match="no stars"):
        sim.validate_observation(empty)
    fuzzy = x.clone()
    fuzzy[0, 0, 2] = 0.5
    with pytest.raises(SbipipeError, match="mask"):
        sim.validate_observation(fuzzy)
    with pytest.raises(SbipipeError, match="shape"):
        sim.validate_observation(x[:, :100])
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(SbipipeError, match="NaN"):
        sim.validate_observation(bad)
