"""Exact reference posteriors (emcee) and the observe/reference commands."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from sbipipe import SbipipeError, get_simulator
from sbipipe.observations import load_observation, save_observation
from sbipipe.reference import reference_posterior
from sbipipe.samples import read_samples

from .conftest import assert_one_line_error, run_cli


def test_reference_matches_the_analytic_gaussian_linear_posterior():
    sim = get_simulator("gaussian_linear")
    g = torch.Generator().manual_seed(4)
    x = sim.simulate(sim.sample_prior(1, g), g)
    ref = reference_posterior(sim, x, n=4000, seed=1, walkers=64, burn_in=500)
    exact = sim.posterior(x[0])
    s = ref.samples.double()
    # posterior std is √0.05 ≈ 0.224; with ≥ 50 τ of chain the Monte Carlo error of the mean is ≲ 0.01
    assert torch.allclose(s.mean(0), exact.mean.double(), atol=0.03)
    assert torch.allclose(s.std(0), exact.stddev.double(), rtol=0.1)
    assert ref.diagnostics["converged"] and ref.diagnostics["steps_over_tau"] >= 50
    assert 0.1 < ref.diagnostics["acceptance_fraction"] < 0.8


def test_reference_two_moons_matches_rejection_sampling():
    """Rejection sampling from the prior (L ≤ 130 everywhere) is an independent exact sampler."""
    sim = get_simulator("two_moons")
    x = torch.tensor([[0.05, 0.1]])
    ref = reference_posterior(sim, x, n=4000, seed=2).samples.double()
    g = torch.Generator().manual_seed(0)
    theta = sim.sample_prior(2_000_000, g)
    ll = sim.log_likelihood(theta, x.expand(len(theta), 2)).double()
    keep = torch.rand(len(theta), generator=g, dtype=torch.float64) < torch.exp(ll - 5.0)  # log 130 < 5
    exact = theta[keep].double()
    assert len(exact) > 2000
    # the posterior is two crescents mirrored in θ1 = θ2; compare mode masses and moments
    frac = lambda s: float((s[:, 0] > s[:, 1]).double().mean())  # noqa: E731
    assert frac(ref) == pytest.approx(frac(exact), abs=0.06)
    assert torch.allclose(ref.mean(0), exact.mean(0), atol=0.05)
    assert torch.allclose(ref.std(0), exact.std(0), rtol=0.1)


def test_reference_refuses_without_likelihood_or_with_a_stack():
    class NoLik:
        parameter_names = ["a"]
        prior = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(1), torch.ones(1)), 1)

        def simulate(self, theta, generator=None):
            return theta

    with pytest.raises(SbipipeError, match="has no log_likelihood"):
        reference_posterior(get_simulator(NoLik()), torch.zeros(1))
    with pytest.raises(SbipipeError, match="one observation"):
        reference_posterior(get_simulator("two_moons"), torch.zeros(3, 2))


@pytest.mark.parametrize("suffix", [".npy", ".csv", ".h5"])
def test_observation_round_trip(tmp_path, suffix):
    sim = get_simulator("slcp")
    x = sim.simulate(sim.sample_prior(3, torch.Generator().manual_seed(0)))
    path = save_observation(tmp_path / f"obs{suffix}", x, {"theta": [1.0]})
    back = load_observation(path, sim)
    assert back.shape == (3, 8) and torch.allclose(back, x, atol=1e-6)
    assert json.loads((tmp_path / "obs.truth.json").read_text()) == {"theta": [1.0]}


def test_observation_files_that_are_refused(tmp_path):
    sim = get_simulator("two_moons")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(SbipipeError, match="cannot read observation"):
        load_observation(tmp_path / "obj.npy", sim)  # object arrays would need unpickling
    (tmp_path / "bad.csv").write_text("1,2,3\n")
    with pytest.raises(SbipipeError, match="multiple of 2"):
        load_observation(tmp_path / "bad.csv", sim)
    with h5py.File(tmp_path / "two.h5", "w") as f:
        f["a"], f["b"] = np.zeros(2), np.zeros(2)
    with pytest.raises(SbipipeError, match="expected one named 'x'"):
        load_observation(tmp_path / "two.h5", sim)
    (tmp_path / "obs.txt").write_text("1 2")
    with pytest.raises(SbipipeError, match="unknown observation format"):
        load_observation(tmp_path / "obs.txt", sim)


def test_observe_and_reference_commands(tmp_path):
    obs = tmp_path / "obs.npy"
    proc = run_cli("observe", "gaussian_linear", "--theta", ",".join(["0.1"] * 10), "-o", obs, "--seed", "2", check=True)
    assert "truth in" in proc.stdout
    truth = json.loads((tmp_path / "obs.truth.json").read_text())
    assert truth["parameter_names"][0] == "theta1" and truth["theta"] == pytest.approx([0.1] * 10)
    ref = tmp_path / "ref.h5"
    proc = run_cli("reference", "gaussian_linear", "--observation", obs, "-n", "500", "-o", ref, "--seed", "1", check=True)
    assert "theta10" in proc.stdout and "tau" in proc.stdout
    samples, names, attrs = read_samples(ref)
    assert samples.shape == (500, 10) and names[0] == "theta1"
    assert attrs["kind"] == "reference" and attrs["tau_max"] > 0 and "acceptance_fraction" in attrs
    assert (tmp_path / "ref.summary.csv").read_text().startswith("observation,parameter,mean,std,q05,q50,q95")
    assert_one_line_error(run_cli("observe", "two_moons", "--theta", "0.1,7", "-o", obs), "theta2", "outside the prior")
    assert_one_line_error(run_cli("observe", "two_moons", "--theta", "0.1", "-o", obs), "expects 2")
    assert_one_line_error(run_cli("reference", "two_moons", "--observation", obs, "-o", ref), "expected an observation of shape [2]")


def test_slcp_mirror_symmetry_is_exact_and_used():
    sim = get_simulator("slcp")
    g = torch.Generator().manual_seed(3)
    theta = sim.sample_prior(100, g)
    x = sim.simulate(theta, g)
    for i in sim.sign_symmetries:  # the declared symmetry really leaves the likelihood unchanged
        flipped = theta.clone()
        flipped[:, i] = -flipped[:, i]
        assert torch.allclose(sim.log_likelihood(flipped, x), sim.log_likelihood(theta, x), atol=1e-4)
    ref = reference_posterior(sim, x[:1], n=4000, seed=0, burn_in=300)
    s = ref.samples
    for i in sim.sign_symmetries:  # all four mirror modes are populated equally
        assert abs(float((s[:, i] > 0).float().mean()) - 0.5) < 0.05
    assert ref.diagnostics["sign_symmetries"] == [2, 3] and ref.diagnostics["converged"]
