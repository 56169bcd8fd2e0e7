"""Embedding networks: shapes, and the power-spectrum embedding against the physics module."""

from __future__ import annotations

import pytest
import torch

from sbipipe.errors import SbipipeError
from sbipipe.nets import (
    EMBEDDINGS,
    KinematicsEmbedding,
    PowerSpectrumEmbedding,
    build_embedding,
)
from simulators.cosmology import CosmoGaussian, CosmoLognormal, binned_power


def test_power_embedding_bins_equal_binned_power():
    sim = CosmoGaussian()
    g = torch.Generator().manual_seed(0)
    x = sim.simulate(sim.sample_prior(3, g), g)
    emb = PowerSpectrumEmbedding(sim.observation_shape)
    ours = torch.fft.rfft2(x, norm="ortho").abs().square().flatten(-2) @ emb.bins
    _, ref, _ = binned_power(x, sim.box)  # shells of width 2π/box centred on integer |k|
    ref = ref * sim.n**2 / sim.box**2
    assert ours.shape[-1] == 6 + round(sim.n / 2**0.5) - 2  # |k|² = 1, 2, 4, 5, 8, 9, then |k| = 3 … N/√2
    counts = emb.mode_counts
    k1 = (ours[:, :2] * counts[:2]).sum(-1) / counts[:2].sum()  # |k|² = 1, 2 round to |k| = 1
    assert torch.allclose(k1.double(), ref[:, 0], rtol=1e-4)
    assert torch.allclose(ours[:, 7 : 7 + sim.n // 2 - 3].double(), ref[:, 3 : sim.n // 2], rtol=1e-4)
    assert emb(x).shape == (3, emb.out_features)


def test_every_embedding_builds_for_its_shapes():
    shapes = {"identity": (5,), "mlp": (100,), "cnn": (32, 32), "cnn-circular": (32, 32), "power": (32, 32),
              "log-power": (32, 32), "deepset": (50, 3), "kinematics": (50, 3)}
    assert set(shapes) == set(EMBEDDINGS) - {"auto"}
    for kind, shape in shapes.items():
        net = build_embedding(kind, shape)
        assert net(torch.randn(4, *shape)).shape == (4, net.out_features)


def test_log_power_embedding_sees_the_gaussian_field_of_a_lognormal_one():
    """ln(1+δ) of a lognormal field is the Gaussian field up to its mean, so the second block of
    features equals the power embedding of the Gaussian field drawn with the same seed."""
    theta = torch.tensor([[0.3, 0.8], [0.2, 0.7]])
    gauss = CosmoGaussian(n=32).simulate(theta, torch.Generator().manual_seed(1))
    logn = CosmoLognormal(n=32).simulate(theta, torch.Generator().manual_seed(1))
    assert CosmoLognormal.embedding == "log-power"
    emb = build_embedding("log-power", (32, 32))
    f = emb.features(logn)
    k = PowerSpectrumEmbedding((32, 32)).bins.shape[1]
    assert f.shape == (2, 2 * k + 1)
    ref = PowerSpectrumEmbedding((32, 32)).features(gauss)
    assert torch.allclose(f[:, k : 2 * k], ref, atol=1e-3)
    assert torch.allclose(f[:, 2 * k], torch.log1p(logn).mean((-2, -1)))
    emb.fit_features(torch.cat([logn, gauss]))  # standardised: zero mean, unit sd over the fit set
    z = (emb.features(torch.cat([logn, gauss])) - emb.feature_mean) / emb.feature_std
    assert z.mean(0).abs().max() < 1e-4 and ((z.std(0) - 1).abs().max() < 1e-3)
    assert emb(logn).shape == (2, emb.out_features)


def test_binned_power_keeps_the_gaussian_field_posterior():
    """The power embedding's shells are (nearly) sufficient: the likelihood of the binned power,
    ½ Σ_b n_b [−P̂_b/λ̄_b(θ) − ln λ̄_b(θ)] (n_b modes of the full k plane), gives the exact cosmo_gaussian posterior mean within 0.1σ
    on a 201×201 prior grid (integer |k| bins up to N/2 shifted it by up to 0.75σ)."""
    sim = CosmoGaussian()
    emb = PowerSpectrumEmbedding(sim.observation_shape)
    axes = [torch.linspace(lo, hi, 201, dtype=torch.float64) for lo, hi in zip(sim.low, sim.high)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
    lam_bins = torch.cat([sim.eigenvalues(t).flatten(-2) @ emb.bins.double() for t in grid.split(4000)])
    g = torch.Generator().manual_seed(100)
    x = sim.simulate(sim.sample_prior(4, g), g)
    for xi in x:
        exact = torch.softmax(sim.log_likelihood(grid, xi), 0)
        p_hat = torch.fft.rfft2(xi.double(), norm="ortho").abs().square().flatten() @ emb.bins.double()
        binned = torch.softmax(0.5 * (-(p_hat / lam_bins) - lam_bins.log()) @ emb.mode_counts.double(), 0)
        for j in range(2):
            mean = (exact * grid[:, j]).sum()
            sd = ((exact * (grid[:, j] - mean) ** 2).sum()).sqrt()
            assert abs(float((binned * grid[:, j]).sum() - mean)) < 0.1 * float(sd)


def test_kinematics_profiles_padding_and_permutations():
    """The binned profiles equal a direct per-bin computation; padding rows and the order of the
    stars change nothing (dwarf galaxies with a Poisson number of stars)."""
    from simulators.dwarfs import Dwarf

    sim = Dwarf(poisson=True)
    assert sim.embedding == "kinematics"
    g = torch.Generator().manual_seed(3)
    x = sim.simulate(sim.sample_prior(64, g), g)  # [64, 160, 3], padded
    emb = KinematicsEmbedding(sim.observation_shape, bins=4)
    emb.fit_features(x)
    stars, mask, ln_rh = emb._stars(x)
    prof = emb._profiles(stars, mask, ln_rh)
    b = 5
    real = x[b, x[b, :, 2] > 0]
    ln_r, v2 = real[:, 0].log(), real[:, 1] ** 2
    median = ln_r.sort().values[(len(ln_r) - 1) // 2]  # R_h: the (lower) median radius
    which = torch.bucketize(ln_r - median, emb.edges)
    for k in range(4):
        sel = v2[which == k]
        assert prof[b, k] == pytest.approx(len(sel) / len(real), abs=1e-6)
        assert prof[b, 4 + k] == pytest.approx(torch.log(sel.mean() + 1).item(), rel=1e-5)
        kurtosis = (sel.pow(2).mean() / sel.mean() ** 2).item() if len(sel) > 1 else 3.0  # Gaussian's, for < 2 stars
        assert prof[b, 8 + k] == pytest.approx(kurtosis, rel=1e-4)
    assert prof[b, 12] == pytest.approx(median.item(), abs=1e-6)
    assert prof[b, 13] == pytest.approx(torch.log(torch.tensor(float(len(real)))).item(), rel=1e-6)
    # edges at training quantiles of R/R_h: the bins hold about a quarter of every galaxy's stars
    assert torch.allclose(prof[:, :4].mean(0), torch.full((4,), 0.25), atol=0.03)
    out = emb(x)
    perm = torch.randperm(real.shape[0], generator=g)
    shuffled = torch.zeros(1, 200, 3)  # more padding, stars in another order
    shuffled[0, : len(real)] = real[perm]
    assert torch.allclose(emb(shuffled)[0], out[b], atol=1e-5)
    with pytest.raises(SbipipeError, match=r"needs \[n, 3\] star sets"):
        KinematicsEmbedding((50, 4))


def test_an_unknown_embedding_is_one_clear_error(tmp_path):
    from sbipipe.bank import simulate_bank
    from sbipipe.comparison import train_comparison
    from sbipipe.nets import build_embedding
    from sbipipe.npe import train_posterior

    bank = simulate_bank("two_moons", tmp_path / "tm.h5", 100, seed=0).path
    for call in (lambda: train_posterior(bank, tmp_path / "m", embedding="nope"),
                 lambda: train_comparison(["two_moons", "two_moons"], tmp_path / "c", n=100, embedding="nope"),
                 lambda: build_embedding("nope", (2,))):
        with pytest.raises(SbipipeError, match="unknown embedding 'nope'; choose one of auto, identity"):
            call()
