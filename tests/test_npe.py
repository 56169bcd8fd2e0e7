"""Neural posterior estimation: accuracy on gaussian_linear, the model store, resume, support, CLI."""

from __future__ import annotations

import json
import math
from typing import Any

import h5py
import pytest
import torch

from sbipipe import SbipipeError, estimators, npe
from sbipipe.bank import simulate_bank
from sbipipe.estimators import FlowPosterior, SupportMap
from sbipipe.npe import FLOW_SCHEDULE, default_batch_size, pilot_epochs, train_posterior
from sbipipe.posterior import load_posterior
from sbipipe.store import CARD, WEIGHTS

from .conftest import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def gl_bank(tmp_path_factory):
    return simulate_bank("gaussian_linear", tmp_path_factory.mktemp("gl") / "bank.h5", 10_000, seed=0).path


@pytest.fixture(scope="module")
def gl_model(gl_bank, tmp_path_factory):
    out = tmp_path_factory.mktemp("glm") / "model"
    train_posterior(gl_bank, out, seed=0, max_epochs=60)
    return out


def test_gaussian_linear_posterior_matches_the_analytic_one(gl_model):
    from sbipipe import get_simulator

    sim = get_simulator("gaussian_linear")
    post = load_posterior(gl_model)
    g = torch.Generator().manual_seed(5)
    x = sim.simulate(sim.sample_prior(3, g), g)
    samples = post.sample(x, 4000, seed=0)  # [3, 4000, 10]
    assert samples.shape == (3, 4000, 10)
    for m in range(3):
        exact = sim.posterior(x[m])
        # analytic posterior: mean x/2, standard deviation √0.05 ≈ 0.224 in every dimension; with
        # 9,000 training simulations the default (auto: the MAF wins here) gets the means to within
        # 0.2 posterior σ (measured worst dimension of three observations: 0.044) and the widths to
        # within 10 % (the NSF alone: 0.095 and 17 %)
        assert torch.allclose(samples[m].mean(0), exact.mean, atol=0.08)
        assert torch.allclose(samples[m].std(0), exact.stddev, rtol=0.15)
        corr = torch.corrcoef(samples[m].T) - torch.eye(10)
        assert corr.abs().max() < 0.1
    theta = exact.sample((200,))
    err = post.log_prob(theta, x[2]) - exact.log_prob(theta)
    # measured: mean -0.02, spread 0.22 nats (the NSF alone: -0.25 and 0.62)
    assert err.mean().abs() < 0.15 and err.std() < 0.4


def test_save_load_round_trip_and_card(gl_model, gl_bank):
    card = json.loads((gl_model / CARD).read_text())
    assert card["simulator"] == "gaussian_linear" and card["simulator_version"] == "1"
    assert card["architecture"]["embedding"] == "identity"
    # auto piloted both candidates and kept the lower held-out −log q(θ | x): on this near-Gaussian
    # posterior the MAF (measured −0.770 against the NSF's −0.589 after the 5-epoch pilot; trained
    # to the end, 10.703 against 10.913 in the standardised space, where the optimum is 10.72 ± 0.01).
    selection = card["training"]["selection"]
    assert selection["chosen"] == card["architecture"]["estimator"] == "maf"
    assert card["architecture"]["support"] == "map"
    assert selection["val_loss"]["maf"] < selection["val_loss"]["nsf"] - 0.1
    assert card["architecture"]["flow_kwargs"] == {"activation": "tanh"} and card["training"]["config"]["lr"] == 5e-4
    assert len(card["training"]["bank_sha256"]) == 64 and card["training"]["seconds"] > 0
    assert card["packages"]["torch"] and math.isfinite(card["training"]["final"][0]["best_val_loss"])
    a, b = load_posterior(gl_model), load_posterior(gl_model)
    theta = torch.randn(50, 10) * 0.3
    x = torch.randn(10) * 0.4
    assert torch.equal(a.log_prob(theta, x), b.log_prob(theta, x))
    assert torch.equal(a.sample(x, 100, seed=3), b.sample(x, 100, seed=3))
    assert (gl_model / "history.csv").read_text().startswith("epoch,train_loss,val_loss")


def test_corrupt_and_mismatched_model_directories(gl_model, tmp_path, monkeypatch):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(gl_model, broken)
    (broken / WEIGHTS).write_bytes(b"\x00" * 100)
    with pytest.raises(SbipipeError, match="corrupt"):
        load_posterior(broken)
    (broken / CARD).write_text("{not json")
    with pytest.raises(SbipipeError, match="corrupt"):
        load_posterior(broken)
    with pytest.raises(SbipipeError, match="not a model directory"):
        load_posterior(tmp_path)
    other = tmp_path / "other"
    shutil.copytree(gl_model, other)
    card = json.loads((other / CARD).read_text())
    card["simulator_version"] = "0"
    (other / CARD).write_text(json.dumps(card))
    with pytest.raises(SbipipeError, match=r"trained on gaussian_linear v0, but the simulator is now v1"):
        load_posterior(other)
    post = load_posterior(gl_model)
    with pytest.raises(SbipipeError, match=r"expected an observation of shape \[10\]"):
        post.sample(torch.zeros(3), 10)
    with pytest.raises(SbipipeError, match="NaN"):
        post.sample(torch.full((10,), float("nan")), 10)


def test_support_map_round_trip_and_jacobian():
    lower = torch.tensor([-1.0, 0.0, -math.inf, -math.inf])
    upper = torch.tensor([1.0, math.inf, 2.0, math.inf])
    smap = SupportMap(lower, upper)
    u = torch.randn(1000, 4, dtype=torch.float64) * 3
    theta = smap(u)
    assert ((theta >= lower) & (theta <= upper)).all()
    back, log_jac = smap.inverse(theta)
    assert torch.allclose(back, u, atol=1e-6)
    jac = torch.autograd.functional.jacobian(lambda v: smap(v.unsqueeze(0))[0], u[0])
    assert torch.allclose(log_jac[0], torch.linalg.slogdet(jac).logabsdet, atol=1e-8)


def test_the_auto_pilot_is_counted_in_optimiser_steps():
    # the flows' batches (~16 an epoch, 64-512 rows): 75 steps are 5 epochs at 10³ and 10⁴
    # simulations (15 and 18 steps an epoch) and one at 10⁵ (176)
    for n_train, epochs in ((900, 5), (9000, 5), (90_000, 1), (45_000, 1), (200, 19)):
        assert pilot_epochs(n_train, default_batch_size(n_train, FLOW_SCHEDULE[0])) == epochs, n_train


def interrupted_at(stop: tuple[str, int], calls: list) -> Any:
    """A progress callback that records each (member, epoch) in ``calls`` and interrupts at ``stop``."""

    def progress(member: str, row: dict) -> None:
        calls.append((member, row["epoch"]))
        if (member, row["epoch"]) == stop:
            raise KeyboardInterrupt

    return progress


def test_samples_never_leave_a_bounded_prior_and_resume_continues(tmp_path):
    bank = simulate_bank("two_moons", tmp_path / "tm.h5", 3000, seed=1).path
    out = tmp_path / "m"
    for support in ("map", "truncate"):  # truncate: two_moons' own preference
        first = train_posterior(bank, out / support, max_epochs=4, seed=0, support=support)
        assert first.card["architecture"]["support"] == support
        samples = first.sample(torch.tensor([[0.9, 0.9], [-0.9, 0.2]]), 20_000, seed=0)
        assert samples.abs().max() <= 1.0  # U[-1, 1]² support
    assert train_posterior(bank, out / "default", max_epochs=1, seed=0).card["architecture"]["support"] == "truncate"
    # an interrupted (mapped) training resumes from its last epoch checkpoint instead of restarting; auto
    # runs both candidates for the 5-epoch pilot, then continues the kept one to its 12 epochs
    uninterrupted = []
    whole = train_posterior(bank, tmp_path / "u", max_epochs=12, seed=0, support="map",
                            progress=lambda k, row: uninterrupted.append((k, row["epoch"])))
    kept = whole.card["training"]["selection"]["chosen"]
    assert whole.card["training"]["selection"]["pilot_epochs"] == 5 and whole.card["architecture"]["support"] == "map"
    assert list(whole.card["training"]["selection"]["val_loss"]) == ["nsf", "maf"]
    assert uninterrupted == [*(("nsf", e) for e in range(1, 6)), *(("maf", e) for e in range(1, 6)),
                             *((kept, e) for e in range(6, 13))]
    theta = torch.rand(20, 2) * 2 - 1
    x = torch.tensor([0.1, 0.2])
    for stop in [("nsf", 2), (kept, 8)]:  # during the pilot, and after it
        calls = []
        out = tmp_path / f"r_{stop[0]}_{stop[1]}"
        with pytest.raises(KeyboardInterrupt):
            train_posterior(bank, out, max_epochs=12, seed=0, support="map", progress=interrupted_at(stop, calls))
        resumed = []
        post = train_posterior(bank, out, max_epochs=12, seed=0, support="map", resume=True,
                               progress=lambda k, row: resumed.append((k, row["epoch"])))
        assert calls + resumed == uninterrupted, (stop, calls, resumed)
        assert post.card["training"]["selection"] == whole.card["training"]["selection"]
        # the same model as the uninterrupted run
        assert torch.allclose(post.log_prob(theta, x), whole.log_prob(theta, x), atol=1e-4)


def test_truncated_posterior_stays_in_the_prior_and_is_normalised(tmp_path, monkeypatch):
    """``support="truncate"``: rejection keeps draws in the box, and q(θ | x) / A(x) integrates to 1
    over it (2-D grid quadrature), with A(x) estimated from 10⁴ draws."""
    from sbipipe.inference import infer_observation
    from sbipipe.validation import calibration_checks

    bank = simulate_bank("two_moons", tmp_path / "tm.h5", 2000, seed=3).path
    # without the mirror symmetry: the observations below were chosen for this model's acceptance rates
    post = train_posterior(bank, tmp_path / "m", estimator="nsf", support="truncate", max_epochs=3, seed=0,
                           symmetries=False)
    assert post.truncated and post.card["architecture"]["support"] == "truncate" and "truncated" in repr(post)
    # members trained (and loaded) with the box their training loss keeps mass against
    for member in (*post.members, *load_posterior(tmp_path / "m").members):
        assert member.box_lower.tolist() == [-1, -1] and member.box_upper.tolist() == [1, 1]
    x = torch.tensor([[-0.9, 0.6], [-0.3, 0.1]])  # the first puts most of its mass beyond the box (measured A 0.30)
    acc = post.acceptance(x)
    assert 0.05 < acc[0] < 0.97 and acc[1] > acc[0]
    draws = post.sample(x, 5000, seed=1)
    assert draws.shape == (2, 5000, 2) and draws.abs().max() <= 1.0
    edges = torch.linspace(-1, 1, 401)
    mid = (edges[1:] + edges[:-1]) / 2
    grid = torch.cartesian_prod(mid, mid)  # cells of 0.005²
    for m in range(2):
        density = post.log_prob(grid, x[m]).exp()
        mass = float(density.sum() * 0.005**2)
        assert abs(mass - 1) < 0.03, (m, mass, float(acc[m]))  # A(x) from 10⁴ draws: ±1 % at A = 0.5
        # the draws fall where the density puts its mass: the fraction with θ₁ > 0 against the grid's
        share = float(density[grid[:, 0] > 0].sum() * 0.005**2) / mass
        assert abs(float((draws[m, :, 0] > 0).double().mean()) - share) < 0.03
    outside = torch.tensor([[1.5, 0.0], [0.0, -1.2]])
    assert torch.isinf(post.log_prob(outside, x[0])).all()
    gap = post.log_prob(grid[:5], x[0]) - post.log_prob(grid[:5], x[0], normalize=False)
    assert torch.allclose(gap, -post.acceptance(x[0]).log().expand(5), atol=1e-9)
    # the same draws, and their densities in one pass, from sample_and_log_prob
    both, lq = post.sample_and_log_prob(x, 300, seed=4)
    assert torch.allclose(lq, post.log_prob(both, x), atol=1e-4)
    # sampling reports the acceptance beside the draws
    import numpy as np

    np.save(tmp_path / "obs.npy", x.numpy())
    result = infer_observation(tmp_path / "m", tmp_path / "obs.npy", tmp_path / "s.h5", n_samples=100)
    with h5py.File(tmp_path / "s.h5") as f:
        assert f["samples"].shape == (2, 100, 2) and np.allclose(f["acceptance"][()], acc.numpy(), atol=0.02)
    assert result["acceptance"] == pytest.approx(acc.tolist(), abs=0.02)
    # validation ranks densities within an observation, so it works without the normaliser
    theta = torch.rand(40, 2) * 2 - 1
    from sbipipe import get_simulator

    checks = calibration_checks(post, theta, get_simulator("two_moons").simulate(theta), n_samples=200)
    assert checks["rows"] and np.isfinite(checks["coverage"][1]).all()
    with pytest.raises(SbipipeError, match="unknown support 'box'"):
        train_posterior(bank, tmp_path / "b", support="box")
    monkeypatch.setattr(type(get_simulator("two_moons")), "support", "box")
    with pytest.raises(SbipipeError, match="two_moons prefers support 'box'.*fix its support attribute or pass --support"):
        train_posterior(bank, tmp_path / "b")
    monkeypatch.undo()
    # an observation whose posterior lies (almost) all outside the prior is refused, not sampled forever
    import sbipipe.posterior as posterior_module

    far = torch.tensor([[-0.3, 0.1], [-3.0, 0.0]])  # measured A below 0.02 for the second
    monkeypatch.setattr(posterior_module, "MIN_ACCEPTANCE", 0.05)
    with pytest.raises(SbipipeError, match=r"observation 1: the posterior puts (9\d|100)\.\d+% of its mass outside the prior"):
        post.sample(far, 2000, seed=0)
    monkeypatch.undo()
    # any estimator can be truncated
    fm = train_posterior(bank, tmp_path / "fm", estimator="flowmatch", support="truncate", max_epochs=1, seed=0)
    assert fm.truncated and fm.sample(x, 200, seed=0).abs().max() <= 1.0


def test_ensemble_is_a_mixture(tmp_path):
    bank = simulate_bank("two_moons", tmp_path / "tm.h5", 2000, seed=2).path
    post = train_posterior(bank, tmp_path / "e", ensemble=2, max_epochs=3, seed=0)
    assert len(post.members) == 2
    theta, x = torch.rand(10, 2) * 2 - 1, torch.tensor([0.0, 0.1])
    each = torch.stack([m.log_prob(theta, x.expand(10, 2)) for m in post.members])
    mixture = torch.logsumexp(each, 0) - math.log(2)  # truncated or not, before the normaliser A(x)
    assert torch.allclose(post.log_prob(theta, x, normalize=False), mixture, atol=1e-6)
    assert load_posterior(tmp_path / "e").sample(x, 50, seed=0).shape == (50, 2)
    with pytest.raises(SbipipeError, match="--ensemble must be at least 1"):
        train_posterior(bank, tmp_path / "z", ensemble=0)


def test_train_and_sample_commands(gl_bank, gl_model, tmp_path):
    obs = tmp_path / "obs.npy"
    run_cli("observe", "gaussian_linear", "-o", obs, "--seed", "3", check=True)
    out = tmp_path / "s.h5"
    proc = run_cli("sample", gl_model, "--observation", obs, "-n", "2000", "-o", out, "--plot", tmp_path / "c.png", check=True)
    assert "theta10" in proc.stdout and "5%" in proc.stdout
    with h5py.File(out) as f:
        assert f["samples"].shape == (2000, 10) and list(f.attrs["parameter_names"])[0] == "theta1"
    assert (tmp_path / "s.summary.csv").exists() and (tmp_path / "c.png").stat().st_size > 10_000
    stack = tmp_path / "stack.npy"
    import numpy as np

    np.save(stack, np.zeros((3, 10), dtype=np.float32))
    run_cli("sample", gl_model, "--observation", stack, "-n", "100", "-o", tmp_path / "m.h5", check=True)
    with h5py.File(tmp_path / "m.h5") as f:
        assert f["samples"].shape == (3, 100, 10)
    np.save(tmp_path / "bad.npy", np.zeros(7, dtype=np.float32))
    assert_one_line_error(run_cli("sample", gl_model, "--observation", tmp_path / "bad.npy", "-o", out), "expected an observation of shape [10]")
    assert_one_line_error(run_cli("sample", tmp_path, "--observation", obs, "-o", out), "not a model directory")
    proc = run_cli("train", gl_bank, "-o", tmp_path / "t", "--max-epochs", "2", check=True)
    assert "trained in" in proc.stdout and "auto: kept" in proc.stdout and "nsf " in proc.stdout and "maf " in proc.stdout
    proc = run_cli("train", gl_bank, "-o", tmp_path / "t1", "--max-epochs", "2", "--estimator", "maf", check=True)
    assert "trained in" in proc.stdout and "auto:" not in proc.stdout
    assert_one_line_error(run_cli("train", gl_bank, "-o", tmp_path / "t2", "--ensemble", "0"), "--ensemble must be at least 1")
    assert_one_line_error(run_cli("train", gl_bank, "-o", tmp_path / "t3", "--estimator", "xyz"), "unknown estimator 'xyz'")
    junk = tmp_path / "junk.h5"
    junk.write_text("no")
    assert_one_line_error(run_cli("train", junk, "-o", tmp_path / "t4"), "corrupt or not a bank")


def test_the_simulator_sets_the_default_ensemble(tmp_path):
    # dwarf asks for two members (one NSF is slightly over-confident there); an explicit value wins
    bank = simulate_bank("dwarf", tmp_path / "d.h5", 200, seed=0).path
    post = train_posterior(bank, tmp_path / "m2", estimator="nsf", max_epochs=1)
    assert post.card["architecture"]["ensemble"] == 2 and len(post.members) == 2
    assert len(train_posterior(bank, tmp_path / "m1", estimator="nsf", ensemble=1, max_epochs=1).members) == 1
    with pytest.raises(SbipipeError, match="--ensemble must be at least 1, got 0"):
        train_posterior(bank, tmp_path / "m0", ensemble=0)


def test_exchangeable_draws_are_shuffled_in_training(tmp_path):
    """slcp's x is four 2-D draws, i.i.d. given θ: training shuffles their order in every batch, so the
    posterior learns that the order carries no information (checked against a training without it)."""
    from sbipipe.npe import shuffle_draws
    from simulators.benchmarks import SLCP

    sim = SLCP()
    assert sim.exchangeable_draws == (4, 2)
    g = torch.Generator().manual_seed(0)
    truth = sim.sample_prior(2000, g)
    x = sim.simulate(truth, g)
    torch.manual_seed(0)
    y = shuffle_draws(x, (4, 2))
    draws, shuffled = x.reshape(-1, 4, 2), y.reshape(-1, 4, 2)

    def ordered(d):  # each row's draws sorted by their first number: the same multiset, the same rows
        return d.gather(1, d[..., :1].argsort(1).expand(-1, -1, 2))

    assert torch.equal(ordered(draws), ordered(shuffled))
    moved = (draws != shuffled).any(-1).any(-1).float().mean().item()
    assert moved == pytest.approx(23 / 24, abs=0.02)  # all but the identity among the 4! orders
    assert shuffle_draws(draws, (4, 2)).shape == (2000, 4, 2)

    bank = simulate_bank("slcp", tmp_path / "slcp.h5", 3000, seed=0).path
    posts = {flag: train_posterior(bank, tmp_path / f"m{flag}", estimator="nsf", augment=flag, max_epochs=15)
             for flag in (None, False)}
    assert posts[None].card["training"]["shuffled_draws"] == [4, 2]
    assert posts[False].card["training"]["shuffled_draws"] is None
    theta, obs = truth[:200], x[:200]  # where the posteriors have their mass
    reversed_obs = obs.reshape(-1, 4, 2).flip(1).reshape(-1, 8)
    gap = {flag: (p.log_prob(theta, obs) - p.log_prob(theta, reversed_obs)).abs().mean().item()
           for flag, p in posts.items()}
    assert gap[None] < 0.75 * gap[False], gap  # measured 0.53 against 0.86 nats
    with pytest.raises(SbipipeError, match="gaussian_linear declares no exchangeable draws"):
        train_posterior(simulate_bank("gaussian_linear", tmp_path / "gl.h5", 100, seed=0).path, tmp_path / "g",
                        augment=True)


@pytest.mark.parametrize("draws", [1, estimators.TRUNCATION_DRAWS, 16])
def test_truncated_member_trains_on_the_gradient_of_its_log_mass_in_the_box(monkeypatch, draws):
    """A truncated member's training loss adds the gradient of log A(x) (A: the flow's mass in the
    prior's box) from K draws for each of B/K rows: over a batch of B = 10⁵ it matches (1 − (1 − A)^K) ∇log A
    computed by quadrature on a 400² grid (A ≈ 0.14 for this untrained flow) to 10 %. A mapped member
    and a truncated one in evaluation mode have no such term."""
    monkeypatch.setattr(estimators, "TRUNCATION_DRAWS", draws)
    torch.manual_seed(0)
    inf = torch.full((2,), math.inf)
    box = (torch.tensor([-0.5, -1.0]), torch.tensor([0.5, 0.3]))
    member = FlowPosterior(2, (1,), -inf, inf, truncation=box, transforms=2).train()
    params = [p for p in member.parameters() if p.requires_grad]
    x1 = torch.ones(1, 1)
    n = 400
    lo, hi = box
    cells = [(torch.arange(n) + 0.5) / n * (hi[i] - lo[i]) + lo[i] for i in range(2)]
    grid = torch.cartesian_prod(*cells)
    log_q = member.flow(member.context(x1.expand(len(grid), 1))).log_prob(grid)  # standardisation: identity
    mass = log_q.exp().sum() * float((hi - lo).prod()) / n**2
    share = 1 - (1 - float(mass.detach())) ** draws
    expected = share * torch.cat([g.flatten() for g in torch.autograd.grad(mass.log(), params)])
    theta, x = torch.zeros(100_000, 2), x1.expand(100_000, 1)

    def gradient() -> torch.Tensor:
        return torch.cat([g.flatten() for g in torch.autograd.grad(member.loss(theta, x), params)])

    with_mass = gradient()
    member.eval()
    estimate = with_mass - gradient()
    assert 0.1 < float(mass.detach()) < 0.2
    assert float((estimate - expected).norm() / expected.norm()) < 0.1
    mapped = FlowPosterior(2, (1,), lo.double(), hi.double(), transforms=2).train()
    assert mapped.box_lower.numel() == 0
    z, _ = mapped.standardize(torch.zeros(5, 2))
    assert torch.equal(mapped.loss(torch.zeros(5, 2), x1.expand(5, 1)),
                       -mapped.flow(mapped.context(x1.expand(5, 1))).log_prob(z).mean())


def test_truncated_member_draws_for_k_steps_at_once_and_afresh_each_epoch(monkeypatch):
    """The draws for ∇log A are made for a whole batch every K = TRUNCATION_DRAWS steps (one flow
    pass instead of K), each step taking the next B/K rows; entering training mode (every epoch)
    or evaluation empties the pool."""
    torch.manual_seed(0)
    inf = torch.full((2,), math.inf)
    box = (torch.tensor([-0.5, -1.0]), torch.tensor([0.5, 0.3]))
    member = FlowPosterior(2, (1,), -inf, inf, truncation=box, transforms=2).train()
    passes = []
    sample = type(member.flow(torch.ones(1, 1))).sample
    monkeypatch.setattr(type(member.flow(torch.ones(1, 1))), "sample",
                        lambda self, shape=(): passes.append(shape) or sample(self, shape))
    theta, x = torch.zeros(40, 2), torch.linspace(0, 1, 40).unsqueeze(-1)
    left = []
    for _ in range(2 * estimators.TRUNCATION_DRAWS + 1):
        member.loss(theta, x).backward()
        left.append(len(member.__dict__["_pool"][2]))
    assert passes == [(estimators.TRUNCATION_DRAWS,)] * 3
    assert left == [30, 20, 10, 0, 30, 20, 10, 0, 30]
    member.train()
    assert "_pool" not in member.__dict__
    member.loss(theta, x)
    member.eval()
    assert "_pool" not in member.__dict__


def test_auto_pilots_a_truncated_nsf_as_it_trains_and_the_other_flows_mapped(tmp_path):
    """``auto`` with ``support="truncate"`` pilots the NSF truncated, as it trains (its held-out
    −log q is an upper bound of its −log q_T), and the MAF mapped (a truncated pilot's density
    hinges on the mass it has yet put outside the box). The NSF, which wins here even so, goes on
    from its pilot: the model is the one ``estimator="nsf"`` trains, and an interrupted run resumes."""
    import pandas as pd
    from safetensors.torch import load_file

    bank = simulate_bank("two_moons", tmp_path / "tm.h5", 2000, seed=3).path
    tags = []
    post = train_posterior(bank, tmp_path / "m", support="truncate", max_epochs=7, seed=0,
                           progress=lambda k, row: tags.append((k, row["epoch"])))
    selection = post.card["training"]["selection"]
    assert list(selection["val_loss"]) == ["nsf/truncate", "maf"] and selection["chosen"] == "nsf/truncate"
    assert selection["val_loss"]["nsf/truncate"] <= selection["val_loss"]["maf"] + npe.AUTO_MARGIN
    assert post.card["architecture"]["support"] == "truncate" and post.truncated
    assert tags == [*(("nsf/truncate", e) for e in range(1, 6)), *(("maf", e) for e in range(1, 6)),
                    ("nsf/truncate", 6), ("nsf/truncate", 7)]
    assert len(pd.read_csv(tmp_path / "m" / "history.csv")) == 7
    alone = train_posterior(bank, tmp_path / "nsf", estimator="nsf", support="truncate", max_epochs=7, seed=0)
    weights = load_file(str(tmp_path / "m" / WEIGHTS))
    nsf_weights = load_file(str(tmp_path / "nsf" / WEIGHTS))
    assert all(torch.equal(t, nsf_weights[k]) for k, t in weights.items())
    assert alone.card["training"]["final"] == post.card["training"]["final"]
    # interrupted during the pilots or after them, it resumes where it stopped
    for stop in [("maf", 3), ("nsf/truncate", 6)]:
        calls = []
        out = tmp_path / f"r_{stop[1]}"
        with pytest.raises(KeyboardInterrupt):
            train_posterior(bank, out, support="truncate", max_epochs=7, seed=0, progress=interrupted_at(stop, calls))
        resumed = train_posterior(bank, out, support="truncate", max_epochs=7, seed=0, resume=True,
                                  progress=lambda k, row: calls.append((k, row["epoch"])))
        assert calls == tags and resumed.card["training"]["selection"] == selection
        resumed_weights = load_file(str(out / WEIGHTS))
        assert all(torch.equal(t, resumed_weights[k]) for k, t in weights.items())


def test_auto_judges_a_beaten_truncated_nsf_mapped(tmp_path, monkeypatch):
    """Where the truncated NSF's pilot loses (forced here by a negative margin), its −log q was only an
    upper bound, so it is piloted mapped too and judged as the MAF is; the kept flow then trains
    truncated from its first epoch (the MAF's pilot was mapped)."""
    monkeypatch.setattr(npe, "AUTO_MARGIN", -100.0)
    bank = simulate_bank("two_moons", tmp_path / "tm.h5", 2000, seed=3).path
    tags = []
    post = train_posterior(bank, tmp_path / "m", support="truncate", max_epochs=7, seed=0,
                           progress=lambda k, row: tags.append((k, row["epoch"])))
    selection = post.card["training"]["selection"]
    assert list(selection["val_loss"]) == ["nsf/truncate", "maf", "nsf"] and selection["chosen"] == "maf/truncate"
    assert tags == [*((k, e) for k in ("nsf/truncate", "maf", "nsf") for e in range(1, 6)),
                    *(("maf/truncate", e) for e in range(1, 8))]
    assert post.card["architecture"]["estimator"] == "maf" and post.truncated
