"""Model comparison: losses, calibration metrics, exact evidences, classifier ln K against the
analytic one, misspecification flags, the model store, bad input and the `compare` commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.distributions import Independent, Uniform

from sbipipe import SbipipeError
from sbipipe.comparison import (
    confusion_matrix,
    evidence_loss,
    expected_calibration_error,
    load_comparison,
    log_evidence_grid,
    log_evidence_importance,
    lpop,
    parse_prior_probabilities,
    reliability_table,
    train_comparison,
)
from sbipipe.simulator import Simulator
from sbipipe.store import CARD, write_model


ROOT = Path(__file__).resolve().parents[1]
NOISE = 0.5


class Box(Simulator):
    """x = θ + N(0, 0.5² I) with θ uniform in a box: the evidence is a product of normal CDF differences."""

    parameter_names = ("a", "b")

    def __init__(self, lo: list[float], hi: list[float], name: str):
        self.lo, self.hi, self.name = torch.tensor(lo), torch.tensor(hi), name
        self.prior = Independent(Uniform(self.lo, self.hi), 1)

    def simulate(self, theta, generator=None):
        return theta + NOISE * torch.randn(theta.shape, generator=generator)

    def log_likelihood(self, theta, x):
        theta, x = torch.as_tensor(theta, dtype=torch.float64), torch.as_tensor(x, dtype=torch.float64)
        return (-0.5 * ((x - theta) / NOISE) ** 2 - math.log(NOISE * math.sqrt(2 * math.pi))).sum(-1)

    def log_evidence(self, x):
        """∏_i [Φ((x_i − lo_i)/s) − Φ((x_i − hi_i)/s)] / (hi_i − lo_i), in logs."""
        x, n = torch.as_tensor(x, dtype=torch.float64), torch.distributions.Normal(0.0, 1.0)
        lo, hi = self.lo.double(), self.hi.double()
        return torch.log((n.cdf((x - lo) / NOISE) - n.cdf((x - hi) / NOISE)) / (hi - lo)).sum(-1)


def box_pair() -> tuple[Box, Box]:
    # the boxes overlap on [0, 2] in the first parameter; the second is shared, so ln K depends on x_1
    return Box([-2.0, -2.0], [2.0, 2.0], "box_wide"), Box([0.0, -2.0], [4.0, 2.0], "box_shifted")


def test_data(n: int = 1000, seed: int = 11) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a, b = box_pair()
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([a.simulate(a.sample_prior(n, g), g), b.simulate(b.sample_prior(n, g), g)])
    return x, torch.arange(2).repeat_interleave(n), b.log_evidence(x) - a.log_evidence(x)


test_data.__test__ = False  # a helper, not a test


# a short, fast schedule (12 epochs at a learning rate of 3·10⁻³); the default 1·10⁻³ needs more epochs
FAST = {"batch_size": 128, "max_epochs": 12, "train_options": {"lr": 3e-3}}


@pytest.fixture(scope="module")
def ce_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "ce"
    train_comparison(list(box_pair()), out, n=8000, loss="ce", seed=0, calibration_rows=2000, **FAST)
    return out


@pytest.fixture(scope="module")
def ev_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "evidence"
    train_comparison(list(box_pair()), out, n=8000, loss="evidence", seed=0, calibration_rows=200, **FAST)
    return out


def test_lpop_and_the_exponential_loss_minimiser():
    f = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    assert torch.allclose(lpop(f), torch.tensor([-6.0, -0.75, 0.0, 0.75, 6.0]))  # f + f|f|
    assert torch.allclose(lpop(f, alpha=1.0), 2 * f)
    # expected loss of a point with p(M_1 | x) = 0.8 under balanced classes: minimised at ln K = ln 4
    labels = torch.tensor([0.0] * 20 + [1.0] * 80, dtype=torch.float64)
    at = torch.tensor(math.log(4.0), dtype=torch.float64, requires_grad=True)
    evidence_loss(at.expand(100), labels).backward()
    assert abs(float(at.grad)) < 1e-12
    best = float(evidence_loss(torch.full((100,), math.log(4.0), dtype=torch.float64), labels))
    for off in (-0.1, 0.1):
        assert float(evidence_loss(torch.full((100,), math.log(4.0) + off, dtype=torch.float64), labels)) > best


def test_calibration_metrics_on_hand_made_predictions():
    # 10 predictions at confidence 0.8 of which 8 right, 10 at 0.6 of which 3 right: ECE = 0.5·0 + 0.5·0.3
    probs = torch.tensor([[0.8, 0.2]] * 10 + [[0.4, 0.6]] * 10)
    labels = torch.tensor([0] * 8 + [1] * 2 + [1] * 3 + [0] * 7)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.15, abs=1e-6)
    table = reliability_table(probs, labels)
    assert len(table) == 15 and int(table["count"].sum()) == 20
    row = table[table["count"] == 10]
    assert sorted(row["accuracy"].round(10)) == [0.3, 0.8]
    assert confusion_matrix(probs, labels).tolist() == [[8, 7], [2, 3]]


def test_exact_evidences_match_the_analytic_ones():
    a, b = box_pair()
    x, _, _ = test_data(4, seed=3)
    for sim in (a, b):
        log_z, err = log_evidence_grid(sim, x)
        assert torch.allclose(log_z, sim.log_evidence(x), atol=1e-5, rtol=0)  # Simpson on a smooth integrand
        assert float(err.max()) < 1e-4
        log_z, se = log_evidence_importance(sim, x, n=20_000, seed=1)
        assert float(se.max()) < 0.03
        assert float(((log_z - sim.log_evidence(x)).abs() / se).max()) < 4.0


def test_classifier_log_bayes_factor_matches_the_exact_one(ce_model):
    comp = load_comparison(ce_model)
    x, labels, exact = test_data()
    est = comp.log_bayes_factor(x)
    window = exact.abs() < 5
    diff = (est - exact)[window].abs()
    # measured: median 0.049, 90th percentile 0.17 nats (8,000 simulations per model)
    assert window.sum() > 1200
    assert float(diff.median()) < 0.12 and float(diff.quantile(0.9)) < 0.4
    cal = comp.card["calibration"]
    assert cal["source"] == "fresh simulations" and cal["rows_per_model"] == 2000
    assert cal["ece"] < 0.03 and len(cal["ece_members"]) == 1  # measured 0.011
    assert 0.74 < cal["accuracy"] < 0.80  # the Bayes-optimal accuracy of this pair is 0.77
    assert np.sum(cal["confusion"]) == 4000
    # prior model probabilities enter as p(M_2 | x) = σ(ln K + ln π_2/π_1), for any prior
    p = comp.probabilities(x[:50], prior=[1, 4])
    assert torch.allclose(p[:, 1], torch.sigmoid(est[:50] + math.log(4.0)), atol=1e-9)
    assert torch.allclose(p.sum(-1), torch.ones(50, dtype=torch.float64))
    assert torch.allclose(comp.probabilities(x[:50])[:, 1], torch.sigmoid(est[:50]), atol=1e-9)


def test_evidence_network_loss_learns_the_log_bayes_factor(ev_model):
    comp = load_comparison(ev_model)
    assert comp.card["architecture"]["loss"] == "evidence" and comp.card["architecture"]["lpop_alpha"] == 2.0
    x, _, exact = test_data()
    window = exact.abs() < 5
    diff = (comp.log_bayes_factor(x) - exact)[window].abs()
    assert float(diff.median()) < 0.3  # measured 0.10 (the exponential loss is noisier than cross-entropy)


def test_ensembles_average_the_members_equal_prior_probabilities():
    from sbipipe.comparison import _combine

    logits = torch.tensor([[[0.0, 3.0]], [[0.0, -1.0]]], dtype=torch.float64)  # two members, one observation
    p = torch.softmax(_combine(logits), -1)
    mean = 0.5 * (torch.sigmoid(torch.tensor(3.0)) + torch.sigmoid(torch.tensor(-1.0)))
    assert float(p[0, 1]) == pytest.approx(float(mean), abs=1e-7)
    # the mixture is less confident than its most confident member
    assert float(p[0].max()) < float(torch.sigmoid(torch.tensor(3.0)))


def test_misspecified_observations_are_flagged(ce_model):
    comp = load_comparison(ce_model)
    x, _, _ = test_data(500, seed=5)
    pvalue = comp.misspecification_pvalue(x)
    assert float((pvalue < 0.01).double().mean()) < 0.03  # held-out simulations: the level's false-flag rate
    odd = torch.tensor([[40.0, 40.0], [0.0, 25.0], [1.0, 0.0]])
    table = comp.table(odd, level=1e-3)
    assert table["misspecified"].tolist() == [True, True, False]
    # beyond every reference score of both tests: the smallest p-value, 2 / (1 + 4000) (Bonferroni)
    assert table["misspecification_pvalue"].iloc[0] == pytest.approx(2 / 4001)
    assert table[["box_wide", "box_shifted", "log_bayes_factor"]].iloc[:2].isna().all().all()
    assert table["most_probable"].tolist()[:2] == ["", ""]
    assert table[["box_wide", "box_shifted"]].iloc[2].sum() == pytest.approx(1.0)
    kept = comp.table(odd, blank_misspecified=False)
    assert kept["box_shifted"].notna().all()


def test_summary_statistics_of_sets_and_images():
    from sbipipe.comparison import summary_statistics

    star_set = torch.tensor([[[1.0, -1.0, 1.0], [2.0, 0.0, 1.0], [3.0, 1.0, 1.0], [0.0, 0.0, 0.0]]])
    s = summary_statistics(star_set, "deepset")[0]  # log std ×2, mean/std ×2, skew ×2, kurt ×2, 2 pair terms, log n
    std = math.sqrt(2 / 3)
    assert torch.allclose(s[:2], torch.tensor([math.log(std)] * 2, dtype=torch.float64))
    assert torch.allclose(s[2:4], torch.tensor([2 / std, 0.0], dtype=torch.float64))
    assert torch.allclose(s[4:6], torch.zeros(2, dtype=torch.float64), atol=1e-12)  # symmetric columns
    assert float(s[8]) == pytest.approx(1.0) and float(s[-1]) == pytest.approx(math.log(3))  # corr(R, v) = 1
    g = torch.Generator().manual_seed(0)
    white = torch.randn(200, 32, 32, generator=g, dtype=torch.float64)
    s = summary_statistics(white, "cnn")
    assert s.shape == (200, 12)
    # white noise of unit variance: flat power E|x̂_k|² = 32² in every radial bin; the log of a bin's
    # mean power lies below log 1024 by the bias of averaging few modes (measured 0.4 in the first bins)
    log_power = s[:, 4:].mean(0)
    assert float((log_power - math.log(1024.0)).abs().max()) < 0.5
    assert float((log_power[4:] - math.log(1024.0)).abs().max()) < 0.05


def test_image_augmentation_draws_the_eight_symmetries_of_the_square():
    from sbipipe.comparison import ModelClassifier, random_dihedral

    torch.manual_seed(0)
    x = torch.arange(16.0).reshape(1, 4, 4).expand(400, 4, 4)
    y = random_dihedral(x)
    assert len({tuple(r.flatten().tolist()) for r in y}) == 8
    assert torch.equal(y.flatten(1).sort(1).values, x.flatten(1).sort(1).values)  # pixels are only moved
    with pytest.raises(SbipipeError, match="does not take images"):
        ModelClassifier((2,), 2, augment=True)


def test_model_directory_round_trip_and_refusals(ce_model, tmp_path):
    card = json.loads((ce_model / CARD).read_text())
    assert card["kind"] == "comparison" and [m["name"] for m in card["models"]] == ["box_wide", "box_shifted"]
    assert all(len(m["bank_sha256"]) == 64 for m in card["models"])
    for name in ("calibration.csv", "confusion.csv", "calibration.png", "history.csv"):
        assert (ce_model / name).is_file()
    assert pd.read_csv(ce_model / "calibration.csv")["count"].sum() == 4000
    x, _, _ = test_data(20)
    assert torch.equal(load_comparison(ce_model).log_evidences(x), load_comparison(ce_model).log_evidences(x))
    write_model(tmp_path / "npe", {"w": torch.zeros(1)}, {"architecture": {"kind": "npe"}})
    with pytest.raises(SbipipeError, match="not a model comparison"):
        load_comparison(tmp_path / "npe")


def test_bad_input_is_refused_with_one_line(ce_model, tmp_path):
    a, b = box_pair()
    comp = load_comparison(ce_model)
    cases = [
        (lambda: train_comparison([a], tmp_path / "m", n=100), "at least 2 candidate models"),
        (lambda: train_comparison(["no_such_sim", "two_moons"], tmp_path / "m", n=100), "unknown simulator 'no_such_sim'"),
        (lambda: train_comparison(["cosmo_gaussian", "dwarf_cored"], tmp_path / "m", n=100), "different shapes"),
        (lambda: train_comparison([a, a], tmp_path / "m", n=100), "more than once"),
        (lambda: train_comparison(["two_moons", "slcp", "gaussian_linear"], tmp_path / "m", n=100, loss="evidence"),
         "exactly two models"),
        (lambda: train_comparison([a, b], tmp_path / "m"), "-n (simulations per model)"),
        (lambda: train_comparison([a, b], tmp_path / "m", n=100, loss="hinge"), "unknown comparison loss"),
        (lambda: comp.probabilities(torch.zeros(3, 2), prior=[0.5, 0.0]), "positive and finite"),
        (lambda: comp.probabilities(torch.zeros(3, 2), prior="0.2,0.3,0.5"), "3 prior model probabilities for 2"),
        (lambda: comp.probabilities(torch.zeros(3, 5)), "expected an observation of shape [2]"),
        (lambda: comp.probabilities(torch.tensor([[0.0, math.nan]])), "NaN"),
    ]
    for call, fragment in cases:
        with pytest.raises(SbipipeError) as info:
            call()
        assert fragment in str(info.value) and "\n" not in str(info.value)
    assert parse_prior_probabilities("1,3", ["a", "b"]).tolist() == [0.25, 0.75]


def test_three_models(tmp_path):
    a, b = box_pair()
    c = Box([-2.0, 0.0], [2.0, 4.0], "box_up")
    comp = train_comparison([a, b, c], tmp_path / "three", n=600, seed=0, calibration_rows=100, max_epochs=2)
    x, _, _ = test_data(5)
    table = comp.table(x)
    assert list(table.columns) == ["observation", "box_wide", "box_shifted", "box_up", "most_probable",
                                   "misspecification_pvalue", "misspecified"]
    assert np.allclose(table[["box_wide", "box_shifted", "box_up"]].sum(axis=1), 1.0)
    assert np.array(comp.card["calibration"]["confusion"]).shape == (3, 3)
    with pytest.raises(SbipipeError, match="needs two models"):
        comp.log_bayes_factor(x)


def cli(capsys, *args) -> tuple[int, str, str]:
    """``sbipipe ARGS`` in this process (saves the interpreter start-up of a subprocess)."""
    from sbipipe.cli import main

    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
        raise SystemExit(0)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out, captured.err


def test_compare_commands(tmp_path, capsys):
    out = tmp_path / "clf"
    code, stdout, stderr = cli(capsys, "compare", "train", "dwarf_cored", "dwarf_cusp", "-n", "300", "-o", out,
                               "--max-epochs", "2", "--calibration-rows", "100", "--ensemble", "2", "--seed", "1")
    assert code == 0, stderr
    assert "ECE" in stdout and (out / "banks" / "dwarf_cored.h5").is_file() and (out / "calibration.png").is_file()
    card = json.loads((out / CARD).read_text())
    assert card["architecture"]["ensemble"] == 2 and len(card["calibration"]["ece_members"]) == 2
    from sbipipe import get_simulator

    sim = get_simulator("dwarf_cusp")
    g = torch.Generator().manual_seed(0)
    np.save(tmp_path / "obs.npy", sim.simulate(sim.sample_prior(3, g), g).numpy())
    code, stdout, stderr = cli(capsys, "compare", "run", out, "--observation", tmp_path / "obs.npy",
                               "-o", tmp_path / "p.csv", "--prior", "1,3")
    assert code == 0, stderr
    table = pd.read_csv(tmp_path / "p.csv")
    assert list(table.columns) == ["observation", "dwarf_cored", "dwarf_cusp", "log_bayes_factor", "most_probable",
                                   "misspecification_pvalue", "misspecified"]
    assert len(table) == 3 and np.allclose(table[["dwarf_cored", "dwarf_cusp"]].sum(axis=1), 1.0)
    odds = table["dwarf_cusp"] / table["dwarf_cored"]
    assert np.allclose(np.log(odds), table["log_bayes_factor"] + math.log(3.0), atol=1e-6)
    assert "ln K = ln p(x | dwarf_cusp) - ln p(x | dwarf_cored)" in stdout
    odd = np.load(tmp_path / "obs.npy")
    odd[1, :, 1] += 3 * odd[1, :, 1].std()  # a systemic velocity: no candidate has one
    np.save(tmp_path / "odd.npy", odd)
    code, _, stderr = cli(capsys, "compare", "run", out, "--observation", tmp_path / "odd.npy", "-o", tmp_path / "o.csv",
                          "--misspecification-level", "0.02")  # 200 reference simulations: p >= 2/201
    assert code == 0 and "1 of 3 observation(s) are unlike" in stderr
    flagged = pd.read_csv(tmp_path / "o.csv")
    assert flagged["misspecified"].tolist() == [False, True, False] and np.isnan(flagged["dwarf_cusp"][1])
    code, _, stderr = cli(capsys, "compare", "run", out, "--observation", tmp_path / "obs.npy", "-o", tmp_path / "q.csv",
                          "--prior", "1,0")
    assert code == 1 and stderr.count("\n") == 1 and "positive and finite" in stderr
    code, _, stderr = cli(capsys, "compare", "train", "dwarf_cored", "-n", "100", "-o", tmp_path / "x")
    assert code == 1 and "at least 2 candidate models" in stderr
    bad = sim.simulate(sim.sample_prior(1, g), g).numpy()
    bad[0, 0, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    code, _, stderr = cli(capsys, "compare", "run", out, "--observation", tmp_path / "nan.npy", "-o", tmp_path / "q.csv")
    assert code == 1 and stderr.count("\n") == 1 and "NaN" in stderr and "Traceback" not in stderr
    # banks instead of simulators: their rows (all of the smallest by default); too few for -n is refused
    banks = [out / "banks" / "dwarf_cored.h5", out / "banks" / "dwarf_cusp.h5"]
    comp = train_comparison(banks, tmp_path / "from_banks", max_epochs=1, calibration_rows=50, seed=2)
    assert comp.card["training"]["rows_per_model"] == 300
    assert [m["bank"] for m in comp.card["models"]] == [str(b.resolve()) for b in banks]
    with pytest.raises(SbipipeError, match="fewer than -n 500"):
        train_comparison(banks, tmp_path / "more", n=500)


def test_auto_embedding_is_the_one_sufficient_for_every_candidate():
    from sbipipe.comparison import candidates_embedding
    from sbipipe.registry import get_simulator
    from simulators.cosmology import CosmoGaussian, CosmoLognormal

    fields = (64, 64)
    assert candidates_embedding([CosmoGaussian(), CosmoLognormal()], fields) == "log-power"
    assert candidates_embedding([CosmoGaussian(), CosmoGaussian(n=64, slab_depth=50.0)], fields) == "power"
    assert candidates_embedding([CosmoGaussian(), None], fields) == "cnn"  # a bank whose simulator is unknown
    assert candidates_embedding([get_simulator("dwarf_cored"), get_simulator("dwarf_cusp")], (100, 3)) == "kinematics"
