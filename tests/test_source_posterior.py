"""Score-based source prior: synthetic galaxies, diffusion machinery, convolved likelihood,
posterior sampler (exact Gaussian check on a small grid) and the CLI.

Tolerances are stated next to each check; all randomness is seeded. The full-size checks are
``benchmarks/score_prior_gaussian_check.py`` and ``benchmarks/score_prior_reconstruction.py``.
"""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch

from sbipipe.diffusion import Denoiser, ScoreModel, UNet, dsm_loss, ema_update, karras_sigmas, pc_sample
from sbipipe.errors import SbipipeError
from sbipipe.simulator import as_simulator
from sbipipe.source_posterior import (
    ConvolvedLikelihood,
    GaussianSourcePrior,
    gaussian_linear_posterior,
    lens_matrix,
    parse_lens,
    psnr,
    sample_source_posterior,
)
from sbipipe.training import TensorData, TrainConfig, fit
from simulators.galaxies import SyntheticGalaxies
from simulators.lensing import LensSIEShear, lensing_operator

from .conftest import assert_one_line_error, run_cli

LENS = {"theta_E": 1.1, "e1": 0.08, "e2": -0.05, "x0": 0.03, "y0": -0.02, "gamma1": 0.03, "gamma2": 0.01}
NAMES = list(SyntheticGalaxies().parameter_names)


def galaxy_theta(**values: float) -> torch.Tensor:
    base = {"x0": 0.0, "y0": 0.0, "q": 1.0, "phi": 0.0, "r_disc": 0.2, "bulge_fraction": 0.0, "bulge_size": 0.3,
            "bulge_n": 3.0, "arm_strength": 0.0, "pitch": 20.0, "clump_fraction": 0.0, "flux": 1000.0}
    base.update(values)
    return torch.tensor([[base[n] for n in NAMES]])


# --- synthetic galaxies ----------------------------------------------------------------------------


def test_galaxies_contract_flux_and_reproducibility():
    sim = SyntheticGalaxies()
    assert as_simulator(sim) is sim and sim.name == "galaxy" and sim.observation_shape == (64, 64)
    theta = sim.sample_prior(9, torch.Generator().manual_seed(0))
    assert theta.shape == (9, 12) and torch.isfinite(sim.prior.log_prob(theta)).all()
    x = sim.simulate(theta, torch.Generator().manual_seed(1))
    assert x.shape == (9, 64, 64) and (x >= 0).all()
    # pixels hold fluxes: each image sums to its total flux (float32 rounding: 1e-4)
    np.testing.assert_allclose(x.sum((1, 2)).numpy(), theta[:, NAMES.index("flux")].numpy(), rtol=1e-4)
    assert torch.equal(x, sim.simulate(theta, torch.Generator().manual_seed(1)))  # same seed, same bits
    again = SyntheticGalaxies(chunk_size=4).simulate(theta, torch.Generator().manual_seed(1))
    torch.testing.assert_close(x, again, rtol=1e-6, atol=0)  # chunking changes only vectorised rounding
    assert not torch.equal(x, sim.simulate(theta, torch.Generator().manual_seed(2)))  # arms, clumps differ


def test_galaxy_geometry():
    """A pure disc's light centroid sits at (x0, y0) (within 0.1 pixel), its second moments give
    the axis ratio q (3 %) and the position angle φ (0.01 rad); a round n = 2 bulge of R_b = 0.15″
    holds half its light inside R_b (±0.02: pixel-centre aperture, 0.6 % of the light beyond the field)."""
    sim = SyntheticGalaxies()
    x, y = sim.grid(torch.float64)
    pix = sim.pixel_scale
    xc, yc = (x.reshape(64, 2, 64, 2).mean((1, 3)), y.reshape(64, 2, 64, 2).mean((1, 3)))
    img = sim.simulate(galaxy_theta(x0=0.1, y0=-0.05, q=0.5, phi=0.3), torch.Generator().manual_seed(0))[0].double()
    f = img.sum()
    mx, my = (img * xc).sum() / f, (img * yc).sum() / f
    assert abs(mx - 0.1) < 0.1 * pix and abs(my + 0.05) < 0.1 * pix
    dx, dy = xc - mx, yc - my
    m = torch.tensor([[(img * dx * dx).sum(), (img * dx * dy).sum()], [(img * dx * dy).sum(), (img * dy * dy).sum()]]) / f
    ev, vec = torch.linalg.eigh(m)
    assert math.sqrt(ev[0] / ev[1]) == pytest.approx(0.5, rel=0.03)
    angle = math.atan2(vec[1, 1], vec[0, 1]) % math.pi
    assert angle == pytest.approx(0.3, abs=0.01)
    bulge = sim.simulate(galaxy_theta(bulge_fraction=1.0, q=1.0, r_disc=0.3, bulge_size=0.5, bulge_n=2.0),
                         torch.Generator().manual_seed(0))[0].double()
    inside = bulge[(xc**2 + yc**2).sqrt() < 0.15].sum() / bulge.sum()
    assert float(inside) == pytest.approx(0.5, abs=0.02)


# --- diffusion machinery ---------------------------------------------------------------------------


def test_unet_shapes_conditioning_and_circular_equivariance():
    torch.manual_seed(0)
    net = UNet(2, 3, channels=(8, 16), blocks=2, cond_dim=4, circular=True)
    with torch.no_grad():  # the head is zero-initialised: give every weight a value
        for p in net.parameters():
            p.normal_(0, 0.2)
    x, cond, noise = torch.randn(3, 2, 16, 16), torch.randn(3, 4), torch.tensor([-1.0, 0.0, 0.5])
    out = net(x, noise, cond)
    assert out.shape == (3, 3, 16, 16) and out.abs().max() > 0
    # circular padding: a shift by 2^(levels-1) = 2 pixels shifts the output (float32 rounding, 1e-4)
    shifted = net(torch.roll(x, (2, -4), (-2, -1)), noise, cond)
    torch.testing.assert_close(shifted, torch.roll(out, (2, -4), (-2, -1)), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(net(x, noise, cond + 1), out)  # the conditioning vector matters
    with pytest.raises(SbipipeError, match="cond"):
        net(x, noise)
    with pytest.raises(SbipipeError, match="divisible"):
        net(torch.randn(1, 2, 15, 16), noise[:1], cond[:1])


def test_karras_sigmas_and_ema():
    s = karras_sigmas(10, 0.002, 80.0)
    assert s[0].item() == pytest.approx(80.0) and s[-1].item() == pytest.approx(0.002) and (s.diff() < 0).all()
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.9 * p.detach() + 0.1 * q.detach() for p, q in zip(a.parameters(), b.parameters())]
    ema_update(a, b, 0.9)
    for p, e in zip(a.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)


class _Zero(torch.nn.Module):
    def forward(self, x, noise, cond=None):
        return torch.zeros_like(x)


def test_dsm_loss_of_the_exact_denoiser_is_one():
    """For data N(0, σ_d² I), F = 0 makes D = σ_d²/(σ² + σ_d²) x = E[x₀ | x_σ] exactly, and every
    weighted term λ(σ)(D − x₀)² is then a χ²₁ variable: the loss is 1 for every σ (3·10⁵ terms:
    tolerance 0.02 ≈ 8 standard errors)."""
    gen = torch.Generator().manual_seed(0)
    x0 = 0.5 * torch.randn(20_000, 16, generator=gen)
    loss = dsm_loss(Denoiser(_Zero(), 0.5), x0, sigma_data=0.5, generator=gen)
    assert loss.item() == pytest.approx(1.0, abs=0.02)


def test_score_model_trains_with_ema_through_fit(tmp_path):
    torch.manual_seed(0)
    data = 0.5 * torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    model = ScoreModel(UNet(1, 1, (4, 8)), ema_decay=0.9)
    cfg = TrainConfig(max_epochs=2, batch_size=16, seed=0, device="cpu", patience=5)
    history = fit(model, TensorData(data[:32]), TensorData(data[32:]), cfg, checkpoint=tmp_path / "ck.pt")
    assert len(history) == 2 and np.isfinite(history["val_loss"]).all()
    assert int(model.ema_steps) == 4  # one EMA update per optimiser step (2 epochs x 2 batches)
    raw = torch.cat([p.flatten() for p in model.denoiser.parameters()])
    ema = torch.cat([p.flatten() for p in model.ema.parameters()])
    assert not torch.equal(raw, ema) and not any(p.requires_grad for p in model.ema.parameters())
    model.eval()
    assert model.loss(data[32:]).item() == model.loss(data[32:]).item()  # fixed validation noise


# --- likelihood, operator, sampler -----------------------------------------------------------------


def _dense_loglik(z, a, y, std, sigma):
    cov = torch.diag(std**2) + sigma**2 * a @ a.T
    return torch.distributions.MultivariateNormal(a @ z, cov).log_prob(y)


@pytest.mark.parametrize("sigma", [0.0, 0.3, 2.0])
def test_convolved_likelihood_score_matches_autograd(sigma):
    """Score of log N(y; c A z, Σ + σ² c² A Aᵀ) against autograd of the dense density (float64, 1e-8)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(30, 16, generator=gen, dtype=torch.float64)
    a[:, 5] = 0  # a source pixel the image does not see: no likelihood term
    std = 0.5 + torch.rand(30, generator=gen, dtype=torch.float64)
    y = torch.randn(30, generator=gen, dtype=torch.float64)
    like = ConvolvedLikelihood(a, y, std, data_scale=2.0, dtype=torch.float64)
    z = torch.randn(3, 4, 4, generator=gen, dtype=torch.float64)
    got = like.score(z, sigma)
    for i in range(3):
        zi = z[i].reshape(-1).clone().requires_grad_(True)
        _dense_loglik(zi, 2.0 * a, y, std, sigma).backward()
        torch.testing.assert_close(got[i].reshape(-1), zi.grad, atol=1e-8, rtol=1e-8)
    assert (got.reshape(3, -1)[:, 5] == 0).all() and len(like.active) == 15
    chi2 = ((y - 2.0 * a @ z[0].reshape(-1)) / std).square().sum() / 30
    assert like.chi2_per_pixel(z[:1]).item() == pytest.approx(chi2.item(), rel=1e-10)


def test_gaussian_prior_score_matches_autograd():
    gen = torch.Generator().manual_seed(3)
    l = torch.randn(9, 9, generator=gen, dtype=torch.float64)
    cov, mean = l @ l.T + 0.1 * torch.eye(9, dtype=torch.float64), torch.randn(3, 3, generator=gen, dtype=torch.float64)
    prior = GaussianSourcePrior(mean, cov, 0.1, dtype=torch.float64)
    z = torch.randn(2, 3, 3, generator=gen, dtype=torch.float64)
    for sigma in (0.01, 1.0):
        zi = z[1].reshape(-1).clone().requires_grad_(True)
        d = torch.distributions.MultivariateNormal(mean.reshape(-1), cov + sigma**2 * torch.eye(9, dtype=torch.float64))
        d.log_prob(zi).backward()
        torch.testing.assert_close(prior.score(z, sigma)[1].reshape(-1), zi.grad, atol=1e-9, rtol=1e-9)


def test_operator_matrix_is_the_lensing_operator():
    a, noise, shape = lens_matrix(LENS, 8, 0.2)
    assert a.shape == (64 * 64, 64) and noise == 1.0 and shape == (64, 64)
    sim = LensSIEShear()
    theta = torch.zeros(1, sim.dim)
    for k, v in LENS.items():
        theta[0, sim.parameter_names.index(k)] = v
    op = sim.lensing_operator(theta, source_pixels=8, source_pixel_scale=0.2, dtype=torch.float64)
    s = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close((s.reshape(2, -1) @ a.T).reshape(2, 64, 64), op(s), atol=1e-10, rtol=1e-10)
    # and the operator is the simulator's physics: python-float lens parameters agree to float32 rounding
    op64 = lensing_operator(**LENS, source_pixels=8, source_pixel_scale=0.2, dtype=torch.float64)
    torch.testing.assert_close(op(s), op64(s), rtol=1e-5, atol=1e-6)


def _small_gaussian_problem(pixels=8, pixel_scale=0.24):
    a, noise, _ = lens_matrix(LENS, pixels, pixel_scale)
    c = (torch.arange(pixels, dtype=torch.float64) - (pixels - 1) / 2) * pixel_scale
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)
    cov = 25 * torch.exp(-0.5 * torch.cdist(pts, pts) ** 2 / 0.4**2) + 0.05 * torch.eye(pixels**2, dtype=torch.float64)
    mean = 400 * torch.softmax(-(xx**2 + yy**2).reshape(-1) / 0.1, 0)
    gen = torch.Generator().manual_seed(1)
    truth = mean + torch.linalg.cholesky(cov) @ torch.randn(pixels**2, generator=gen, dtype=torch.float64)
    y = a @ truth + noise * torch.randn(a.shape[0], generator=gen, dtype=torch.float64)
    m, p = gaussian_linear_posterior(mean, cov, a, noise, y)
    return GaussianSourcePrior(mean.reshape(pixels, pixels), cov, pixel_scale), ConvolvedLikelihood(a, y, noise), m, p


def test_sampler_reproduces_the_analytic_gaussian_posterior():
    """Small version of benchmarks/score_prior_gaussian_check.py (8 × 8 source): 600 particles,
    mean_err < 0.12 (Monte-Carlo floor 0.033) and var_ratio within [0.88, 1.12] (per-pixel
    scatter √(2/600) = 0.058, averaged over 64 correlated pixels); without the Langevin corrector
    the convolved-likelihood approximation leaves a clear bias (mean_err > 0.12)."""
    prior, like, m, p = _small_gaussian_problem()
    sd = p.diagonal().sqrt()

    def metrics(samples):
        s = samples.reshape(len(samples), -1).double()
        return float(((s.mean(0) - m).abs() / sd).mean()), float((s.var(0) / p.diagonal()).mean())

    post = sample_source_posterior(prior, like, 600, steps=40, corrector_steps=8, snr=0.3, sigma_min=0.01,
                                   batch_size=600, seed=0)
    mean_err, var_ratio = metrics(post.samples)
    assert mean_err < 0.12 and 0.88 < var_ratio < 1.12, (mean_err, var_ratio)
    assert post.chi2_per_pixel.shape == (600,) and 0.8 < post.chi2_mean < 1.2
    biased = sample_source_posterior(prior, like, 600, steps=40, corrector_steps=0, sigma_min=0.01, batch_size=600)
    assert metrics(biased.samples)[0] > 0.12
    with pytest.raises(SbipipeError, match="source pixels"):
        sample_source_posterior(GaussianSourcePrior(torch.zeros(4, 4), torch.eye(16), 0.1), like, 2)


def test_pc_sample_draws_a_gaussian():
    """With the exact score of N(1, 0.5² I) in 64 dimensions (noised: N(1, (0.25 + σ²) I)), the
    predictor–corrector sampler (40 levels, 2 Langevin steps each) returns mean 1 (±0.01; standard
    error 0.001) and standard deviation 0.5 within 3 % (Langevin and predictor discretisation
    bias, measured +1.5 %)."""
    gen = torch.Generator().manual_seed(0)
    sig = karras_sigmas(40, 0.002, 20.0)
    x = 1 + 20.0 * torch.randn(4000, 64, generator=gen)
    out = pc_sample(lambda v, s: -(v - 1) / (0.25 + s * s), x, sig, gen, corrector_steps=2, snr=0.16)
    assert out.mean().item() == pytest.approx(1.0, abs=0.01)
    assert out.std().item() == pytest.approx(0.5, rel=0.03)


def test_psnr_and_parse_lens(tmp_path):
    truth = torch.zeros(4, 4)
    truth[0, 0] = 2.0
    assert psnr(truth + 0.1, truth) == pytest.approx(10 * math.log10(4 / 0.01))
    assert parse_lens("theta_E=1.2, e1=0.1")["e1"] == 0.1 and parse_lens({"theta_E": 1.0})["gamma2"] == 0.0
    truth_file = tmp_path / "obs.truth.json"
    truth_file.write_text(json.dumps({"parameter_names": ["theta_E", "e1", "src_x"], "theta": [1.3, 0.2, 0.5]}))
    assert parse_lens(str(truth_file)) == {**dict.fromkeys(LENS, 0.0), "theta_E": 1.3, "e1": 0.2}
    for bad, match in [("theta_E=1,foo=2", "unknown"), ("e1=0.1", "theta_E"), ("theta_E=abc", "not a number"),
                       ("theta_E", "name=value")]:
        with pytest.raises(SbipipeError, match=match):
            parse_lens(bad)


# --- command line --------------------------------------------------------------------------------


def test_cli_train_prior_and_sample_source(tmp_path):
    prior = tmp_path / "prior"
    run_cli("source-prior", "train", "-o", prior, "--images", 40, "--epochs", 1, "--batch-size", 20, "--channels", "4,8",
            "--pixels", 16, "--pixel-scale", 0.16, "--device", "cpu", check=True)
    card = json.loads((prior / "card.json").read_text())
    assert card["architecture"]["kind"] == "source_prior" and card["source"]["pixels"] == 16
    sim = LensSIEShear()  # an observation and its truth file, as `sbipipe observe` writes them
    gen = torch.Generator().manual_seed(3)
    theta = sim.sample_prior(1, gen)
    np.save(tmp_path / "obs.npy", sim.simulate(theta, gen)[0].numpy())
    (tmp_path / "obs.truth.json").write_text(json.dumps({"parameter_names": list(sim.parameter_names),
                                                         "theta": theta[0].tolist()}))
    out = tmp_path / "post.h5"
    proc = run_cli("source-posterior", "--prior", prior, "--lens", tmp_path / "obs.truth.json", "--observation",
                   tmp_path / "obs.npy", "-n", 3, "--steps", 4, "--corrector-steps", 1, "-o", out, check=True)
    assert "chi2/pixel" in proc.stdout
    with h5py.File(out) as f:
        assert f["samples"].shape == (3, 16, 16) and f["observation"].shape == (64, 64)
        assert np.isfinite(f["chi2_per_pixel"][()]).all() and f.attrs["kind"] == "source_posterior"
    bad = run_cli("source-posterior", "--prior", prior, "--lens", "theta_E=1,psi=2", "--observation", tmp_path / "obs.npy",
                  "-o", tmp_path / "x.h5")
    assert_one_line_error(bad, "unknown lens parameter")
