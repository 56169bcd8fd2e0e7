"""Embedding networks: shapes, and the power-spectrum embedding against the physics module."""

from __future__ import annotations

import torch

from sbipipe.nets import EMBEDDINGS, PowerSpectrumEmbedding, build_embedding
from simulators.cosmology import CosmoGaussian, CosmoLognormal, binned_power


def test_power_embedding_bins_equal_binned_power():
    sim = CosmoGaussian()
    g = torch.Generator().manual_seed(0)
    x = sim.simulate(sim.sample_prior(3, g), g)
    emb = PowerSpectrumEmbedding(sim.observation_shape)
    ours = torch.fft.rfft2(x, norm="ortho").abs().square().flatten(-2) @ emb.bins
    _, ref, _ = binned_power(x, sim.box)  # shells of width 2π/box centred on integer |k|
    assert ours.shape[-1] == round(sim.n / 2**0.5)  # up to the corner of the grid
    ratio = ours[:, : sim.n // 2].double() * sim.box**2 / sim.n**2 / ref[:, : sim.n // 2]
    assert torch.allclose(ratio, torch.ones_like(ratio), rtol=1e-4)
    assert emb(x).shape == (3, emb.out_features)


def test_every_embedding_builds_for_its_shapes():
    shapes = {"identity": (5,), "mlp": (100,), "cnn": (32, 32), "cnn-circular": (32, 32), "power": (32, 32),
              "log-power": (32, 32), "deepset": (50, 3)}
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
    assert f.shape == (2, 2 * 23 + 1)  # 23 integer |k| bins up to 32/√2
    ref = PowerSpectrumEmbedding((32, 32)).features(gauss)
    assert torch.allclose(f[:, 23:46], ref, atol=1e-3)
    assert torch.allclose(f[:, 46], torch.log1p(logn).mean((-2, -1)))
    emb.fit_features(torch.cat([logn, gauss]))  # standardised: zero mean, unit sd over the fit set
    z = (emb.features(torch.cat([logn, gauss])) - emb.feature_mean) / emb.feature_std
    assert z.mean(0).abs().max() < 1e-4 and ((z.std(0) - 1).abs().max() < 1e-3)
    assert emb(logn).shape == (2, emb.out_features)
