"""Parameter symmetries: the declared ones are true of the simulators, the group closes, and a flow
averaged over it is symmetric, normalised and samples both mirror images equally."""

from __future__ import annotations

import pytest
import torch

from sbipipe import SbipipeError
from sbipipe.bank import simulate_bank
from sbipipe.estimators import FlowPosterior, prior_bounds, symmetry_group
from sbipipe.npe import train_posterior
from sbipipe.posterior import load_posterior
from sbipipe.registry import get_simulator
from sbipipe.simulator import parameter_symmetries

from .conftest import assert_one_line_error, run_cli


@pytest.mark.parametrize("name, order", [("two_moons", 2), ("slcp", 4)])
def test_declared_symmetries_leave_likelihood_and_prior_unchanged(name, order):
    sim = get_simulator(name)
    perms, signs = symmetry_group(parameter_symmetries(sim), sim.dim)
    assert len(perms) == order
    g = torch.Generator().manual_seed(0)
    theta = sim.sample_prior(500, g)
    x = sim.simulate(theta, g)
    for perm, sign in zip(perms, signs):
        image = theta[:, perm] * sign
        assert torch.allclose(sim.log_likelihood(image, x), sim.log_likelihood(theta, x), atol=1e-4)
        assert torch.allclose(sim.prior.log_prob(image), sim.prior.log_prob(theta), atol=1e-6)
    assert parameter_symmetries(get_simulator("gaussian_linear")) == []


def test_symmetry_group_closure_and_bad_generators():
    cycle = ([1, 2, 0], [1, 1, 1])  # a 3-cycle generates 3 elements; with a sign flip, 6
    assert len(symmetry_group([cycle], 3)[0]) == 3
    perms, signs = symmetry_group([cycle, ([0, 1, 2], [-1, -1, -1])], 3)
    assert len(perms) == 6 and perms[0].tolist() == [0, 1, 2] and signs[0].tolist() == [1, 1, 1]
    theta = torch.randn(7, 3)
    images = {tuple((theta[0, p] * s).tolist()) for p, s in zip(perms, signs)}
    assert len(images) == 6  # distinct elements act differently
    for bad in (([0, 0, 1], [1, 1, 1]), ([0, 1, 2], [1, 2, 1]), ([0, 1], [1, 1])):
        with pytest.raises(SbipipeError, match="permutation of 0..2"):
            symmetry_group([bad], 3)


def test_symmetric_flow_is_symmetric_normalised_and_samples_both_images():
    sim = get_simulator("two_moons")
    lo, hi = prior_bounds(sim.prior, 2)
    torch.manual_seed(0)
    flow = FlowPosterior(2, (2,), lo, hi, symmetries=parameter_symmetries(sim))
    g = torch.Generator().manual_seed(1)
    theta = sim.sample_prior(2000, g)
    x = sim.simulate(theta, g)
    flow.fit_standardization(theta, x)
    mirror = torch.stack([-theta[:, 1], -theta[:, 0]], -1)
    with torch.no_grad():
        assert torch.allclose(flow.log_prob(theta, x), flow.log_prob(mirror, x), atol=1e-5)
        folded = flow.fold(theta)  # in the domain θ1 + 2θ2 ≥ its mirror's, i.e. θ1 + θ2 ≥ 0
        assert (folded.sum(-1) >= 0).all()
        assert torch.equal(torch.where((theta.sum(-1) >= 0)[:, None], theta, mirror), folded)
        t = torch.linspace(-1 + 1e-3, 1 - 1e-3, 300)
        grid = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 1, 2)
        density = flow.log_prob(grid, x[:2]).exp()  # [G, 2]
        assert torch.allclose(density.sum(0) * (t[1] - t[0]) ** 2, torch.ones(2, dtype=density.dtype), atol=0.02)
        draws = flow.sample(x[:2], 20_000)
    assert draws.abs().max() <= 1.0
    share = (draws.sum(-1) > 0).double().mean(-1)
    assert torch.allclose(share, torch.full((2,), 0.5, dtype=share.dtype), atol=0.02)  # both images, equally


def test_training_records_and_reloads_the_symmetries(tmp_path):
    bank = simulate_bank("two_moons", tmp_path / "tm.h5", 600, seed=0).path
    post = train_posterior(bank, tmp_path / "m", estimator="nsf", max_epochs=3)
    assert post.card["architecture"]["symmetries"] == [[[1, 0], [-1, -1]]]
    theta, x = torch.rand(50, 2) * 2 - 1, torch.tensor([[0.1, -0.2]])
    loaded = load_posterior(tmp_path / "m")
    assert torch.equal(loaded.log_prob(theta, x), post.log_prob(theta, x))
    assert torch.allclose(post.log_prob(theta, x), post.log_prob(theta.flip(-1).neg(), x), atol=1e-5)
    truncated = train_posterior(bank, tmp_path / "t", estimator="nsf", max_epochs=3, support="truncate")
    draws = truncated.sample(x, 4000, seed=0)
    assert draws.abs().max() <= 1.0 and abs(float((draws.sum(-1) > 0).double().mean()) - 0.5) < 0.03
    assert torch.allclose(truncated.log_prob(theta, x), truncated.log_prob(theta.flip(-1).neg(), x), atol=1e-5)
    plain = train_posterior(bank, tmp_path / "p", estimator="nsf", max_epochs=3, symmetries=False)
    assert plain.card["architecture"]["symmetries"] == []
    with pytest.raises(SbipipeError, match="gaussian_linear declares no parameter symmetries"):
        train_posterior(simulate_bank("gaussian_linear", tmp_path / "gl.h5", 100, seed=0).path, tmp_path / "g",
                        symmetries=True)
    with pytest.raises(SbipipeError, match="applies to the flows"):
        train_posterior(bank, tmp_path / "s", estimator="score", symmetries=True)
    # the command line: --no-symmetries, and the one-line error where there are none
    run_cli("train", bank, "-o", tmp_path / "c", "--estimator", "maf", "--max-epochs", "2", "--no-symmetries", check=True)
    assert load_posterior(tmp_path / "c").card["architecture"]["symmetries"] == []
    assert_one_line_error(run_cli("train", tmp_path / "gl.h5", "-o", tmp_path / "c2", "--symmetries"),
                          "gaussian_linear declares no parameter symmetries")


def test_a_symmetry_that_changes_the_prior_is_refused(tmp_path, monkeypatch):
    from simulators.benchmarks import TwoMoons

    # a shift of the box [-1, 1]² to [0, 2]² breaks the mirror θ → (−θ2, −θ1)
    monkeypatch.setattr(TwoMoons, "low", 0.0)
    monkeypatch.setattr(TwoMoons, "high", 2.0)
    sim = TwoMoons()
    from sbipipe.npe import check_prior_symmetries

    with pytest.raises(SbipipeError, match="prior is changed by its declared parameter symmetry"):
        check_prior_symmetries(sim, parameter_symmetries(sim))
    check_prior_symmetries(get_simulator("slcp"), parameter_symmetries(get_simulator("slcp")))
