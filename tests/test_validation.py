"""The validator must accept the exact posterior and reject miscalibrated ones."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from sbipipe.calibration import coverage_curve, hpd_levels, rank_uniformity, sbc_ranks, tarp
from sbipipe.simulator import forked_rng
from sbipipe.validation import Gate, calibration_checks
from simulators.benchmarks import GaussianLinear


class AnalyticGL:
    """The exact gaussian_linear posterior, optionally with widths scaled or the mean shifted by
    ``shift`` posterior standard deviations (in every parameter)."""

    parameter_names = [f"theta{i + 1}" for i in range(10)]

    def __init__(self, scale: float = 1.0, shift: float = 0.0):
        sim = GaussianLinear()
        self.var = 1 / (1 / sim.prior_scale**2 + 1 / sim.noise_scale**2)
        self.noise_var = sim.noise_scale**2
        self.scale, self.shift = scale, shift

    def _mean_std(self, x):
        std = math.sqrt(self.var)
        return self.var * x / self.noise_var + self.shift * std, self.scale * std

    def sample(self, x, n, seed=None):
        gen = torch.Generator().manual_seed(seed or 0)
        mean, std = self._mean_std(x)
        return mean.unsqueeze(1) + std * torch.randn(len(x), n, 10, generator=gen)

    def log_prob(self, theta, x):
        mean, std = self._mean_std(x)
        return torch.distributions.Normal(mean.unsqueeze(1), std).log_prob(theta).sum(-1)


@pytest.fixture(scope="module")
def test_set():
    sim = GaussianLinear()
    gen = torch.Generator().manual_seed(11)
    theta = sim.sample_prior(1000, gen)
    return theta, sim.simulate(theta, gen)


def test_exact_posterior_passes_and_reports_contraction(test_set):
    theta, x = test_set
    sim = GaussianLinear()
    out = calibration_checks(AnalyticGL(), theta, x, n_samples=500, seed=1,
                             prior_variance=torch.full((10,), sim.prior_scale**2))
    assert out["failing"] == []
    rows = pd.DataFrame(out["rows"]).set_index(["metric", "parameter"])
    assert rows.loc[("coverage", "all"), "value"] < 0.05
    assert abs(rows.loc[("tarp_atc", "all"), "value"]) < 0.03
    # prior N(0, 0.1 I) per coordinate... contraction = 1 - var_post / var_prior, exact value from the formulas
    sim = GaussianLinear()
    exact = 1 - (1 / (1 / sim.prior_scale**2 + 1 / sim.noise_scale**2)) / sim.prior_scale**2
    for v in out["contraction"].values():
        assert v == pytest.approx(exact, abs=0.01)


@pytest.mark.parametrize(
    "scale, shift, failing, kind",
    [(0.5, 0.0, "coverage", "over-confident"), (2.0, 0.0, "coverage", "under-confident"), (1.0, 1.0, "sbc", None)],
    ids=["over-confident", "under-confident", "biased"],
)
def test_miscalibrated_posteriors_fail(test_set, scale, shift, failing, kind):
    theta, x = test_set
    out = calibration_checks(AnalyticGL(scale, shift), theta, x, n_samples=500, seed=1)
    text = " | ".join(out["failing"])
    assert failing in text
    if kind:
        assert kind in text
    assert any(f.startswith("tarp") for f in out["failing"]) or shift == 0  # TARP sees the bias too


def test_prior_as_posterior_is_calibrated_but_has_no_contraction(test_set):
    theta, x = test_set
    sim = GaussianLinear()

    class Prior(AnalyticGL):
        def _mean_std(self, x):
            return torch.zeros_like(x), sim.prior_scale

    out = calibration_checks(Prior(), theta, x, n_samples=500, seed=2,
                             prior_variance=torch.full((10,), sim.prior_scale**2))
    assert out["failing"] == []
    assert all(abs(v) < 0.05 for v in out["contraction"].values())


def test_rank_uniformity_matches_scipy_chisquare():
    gen = torch.Generator().manual_seed(0)
    ranks = torch.randint(0, 100, (1000, 2), generator=gen)  # L = 99 draws: ranks in 0..99
    p, counts = rank_uniformity(ranks, 99, bins=10)
    for j in range(2):
        ref = stats.chisquare(counts[:, j].numpy())  # equal expected counts: 100 rank values / 10 bins
        assert p[j] == pytest.approx(ref.pvalue, rel=1e-9)
    assert counts.sum() == 2000


def test_sbc_ranks_and_hpd_levels_by_hand():
    samples = torch.tensor([[[0.0], [1.0], [2.0], [3.0]]])  # one test pair, L = 4
    assert sbc_ranks(samples, torch.tensor([[2.5]])).tolist() == [[3]]
    logq = torch.tensor([[-1.0, -2.0, -3.0, -4.0]])
    assert hpd_levels(logq, torch.tensor([-2.5])).tolist() == [0.5]


def test_coverage_deviation_is_the_ks_statistic():
    gen = torch.Generator().manual_seed(3)
    levels = torch.rand(500, generator=gen, dtype=torch.float64) ** 1.3
    _, _, dev, signed = coverage_curve(levels)
    assert dev == pytest.approx(stats.kstest(levels.numpy(), "uniform").statistic, abs=1e-12)
    assert signed == pytest.approx(0.5 - float(levels.mean()), abs=1e-12)


def test_tarp_on_exact_and_overconfident_gaussians():
    gen = torch.Generator().manual_seed(4)
    n, L, d = 1000, 400, 3
    mu = torch.randn(n, d, generator=gen)
    theta = mu + torch.randn(n, d, generator=gen)  # truth ~ N(mu, I): the exact posterior is N(mu, I)
    exact = mu.unsqueeze(1) + torch.randn(n, L, d, generator=gen)
    narrow = mu.unsqueeze(1) + 0.5 * torch.randn(n, L, d, generator=gen)
    good = tarp(exact, theta, torch.Generator().manual_seed(0))
    bad = tarp(narrow, theta, torch.Generator().manual_seed(0))
    assert good["ks_pvalue"] > 0.01 and abs(good["atc"]) < 0.02
    assert bad["ks_pvalue"] < 1e-6 and bad["atc"] < -0.05
    assert np.all(np.diff(good["ecp"].numpy()) >= 0)


def test_gate_widens_coverage_threshold_for_small_test_sets():
    g = Gate()
    assert g.coverage_threshold(5000) == 0.05
    assert g.coverage_threshold(200) == pytest.approx(1.6276 / math.sqrt(200), rel=1e-3)


def test_summary_json_roundtrip_types(test_set):
    theta, x = test_set
    out = calibration_checks(AnalyticGL(), theta[:200], x[:200], n_samples=100, seed=0)
    json.dumps(out["rows"])  # plain numbers and strings only


# -- the command, end to end on a small trained model --------------------------------------------


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    from sbipipe.bank import simulate_bank
    from sbipipe.npe import train_posterior

    root = tmp_path_factory.mktemp("val")
    train = simulate_bank("gaussian_linear", root / "train.h5", 2000, seed=0).path
    test = simulate_bank("gaussian_linear", root / "test.h5", 300, seed=5).path
    train_posterior(train, root / "model", seed=0, max_epochs=10)
    return root, train, test


def test_validate_command_writes_report_and_records_verdict(small_model):
    from sbipipe.observations import save_observation
    from sbipipe.samples import write_samples

    from .conftest import run_cli

    root, _, test = small_model
    sim = GaussianLinear()
    gen = torch.Generator().manual_seed(9)
    theta_o = sim.sample_prior(1, gen)
    x_o = sim.simulate(theta_o, gen)
    save_observation(root / "obs.npy", x_o[0], {"theta": theta_o[0].tolist()})
    # not the stream of validate's seed 0: a near-affine flow (the MAF that auto keeps here)
    # maps the same normals to nearly the same draws, and the C2ST would fall far below 0.5
    with forked_rng(12_345):
        exact = sim.posterior(x_o[0]).sample((500,))
    write_samples(root / "ref.h5", exact, AnalyticGL.parameter_names, {"simulator": "gaussian_linear"},
                  datasets={"observation": x_o[0]})
    proc = run_cli("validate", root / "model", "--bank", test, "-o", root / "report", "--n-sims", 200,
                   "--n-samples", 200, "--reference", root / "ref.h5", "--observation", root / "obs.npy", timeout=300)
    summary = json.loads((root / "report" / "summary.json").read_text())
    assert proc.returncode == (0 if summary["calibrated"] else 4), proc.stderr
    assert ("NOT CALIBRATED" in proc.stdout) == (not summary["calibrated"])
    metrics = pd.read_csv(root / "report" / "metrics.csv")
    assert set(metrics["metric"]) >= {"sbc", "coverage", "tarp", "c2st", "c2st_mean", "contraction", "ppc_pvalue"}
    assert (metrics["metric"] == "sbc").sum() == 10
    c2st_value = float(metrics.loc[metrics["metric"] == "c2st", "value"].iloc[0])
    assert 0.3 <= c2st_value <= 1.0  # 500 vs 500 draws: cross-validated accuracy scatters around 0.5 by ±0.05
    ppc = float(metrics.loc[metrics["metric"] == "ppc_pvalue", "value"].iloc[0])
    assert ppc > 0.01  # the observation was simulated by the model itself
    for plot in summary["plots"].values():
        assert plot.endswith(".png") and (root / "report" / plot.split("/")[-1]).stat().st_size > 1000
    card = json.loads((root / "model" / "card.json").read_text())
    assert card["validation"]["calibrated"] == summary["calibrated"]
    assert card["validation"]["report"] == str((root / "report").resolve())


def test_validate_refuses_the_training_bank_and_foreign_banks(small_model, tmp_path):
    from sbipipe.bank import simulate_bank

    from .conftest import assert_one_line_error, run_cli

    root, train, _ = small_model
    proc = run_cli("validate", root / "model", "--bank", train, "-o", tmp_path / "r")
    assert_one_line_error(proc, "held-out")
    other = simulate_bank("two_moons", tmp_path / "tm.h5", 200, seed=1).path
    assert_one_line_error(run_cli("validate", root / "model", "--bank", other, "-o", tmp_path / "r"), "two_moons")
    assert_one_line_error(run_cli("validate", root / "model", "--bank", tmp_path / "missing.h5", "-o", tmp_path / "r"))


def test_log_prob_of_draws_pairs_each_draw_with_its_observation():
    from sbipipe.posterior import _log_prob_draws

    class Additive:  # not a flow: the draws are flattened into pairs
        def log_prob(self, theta, x):
            return theta.sum(-1) + x.sum(-1)

    theta, x = torch.randn(3, 4, 2), torch.randn(4, 5)
    assert torch.allclose(_log_prob_draws(Additive(), theta, x), theta.sum(-1) + x.sum(-1)[None, :])
