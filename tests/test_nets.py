"""Embedding networks: shapes, and the power-spectrum embedding against the physics module."""

from __future__ import annotations

import torch

from sbipipe.nets import EMBEDDINGS, PowerSpectrumEmbedding, build_embedding
from simulators.cosmology import CosmoGaussian, binned_power


def test_power_embedding_bins_equal_binned_power():
    sim = CosmoGaussian()
    g = torch.Generator().manual_seed(0)
    x = sim.simulate(sim.sample_prior(3, g), g)
    emb = PowerSpectrumEmbedding(sim.observation_shape)
    ours = torch.fft.rfft2(x, norm="ortho").abs().square().flatten(-2) @ emb.bins
    _, ref, _ = binned_power(x, sim.box)  # shells of width 2π/box centred on integer |k|
    ratio = ours.double() * sim.box**2 / sim.n**2 / ref[:, : sim.n // 2]
    assert torch.allclose(ratio, torch.ones_like(ratio), rtol=1e-4)
    assert emb(x).shape == (3, emb.out_features)


def test_every_embedding_builds_for_its_shapes():
    shapes = {"identity": (5,), "mlp": (100,), "cnn": (32, 32), "cnn-circular": (32, 32), "power": (32, 32),
              "deepset": (50, 3)}
    assert set(shapes) == set(EMBEDDINGS) - {"auto"}
    for kind, shape in shapes.items():
        net = build_embedding(kind, shape)
        assert net(torch.randn(4, *shape)).shape == (4, net.out_features)
