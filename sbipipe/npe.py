"""Train a neural posterior estimator (an ensemble of conditional flows, score or flow-matching
estimators) from a simulation bank."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .atomic import atomic_path
from .bank import SimulationBank
from .errors import SbipipeError
from .estimators import FLOWS, prior_bounds, symmetry_group
from .nets import SINGLE_THREAD_EMBEDDINGS, auto_embedding, check_embedding
from .posterior import ESTIMATORS, SUPPORTS, Posterior, build_member
from .registry import get_simulator
from .simulator import describe_distribution, forked_rng, parameter_symmetries
from .store import package_versions, write_model
from .training import TensorData, TrainConfig, fit, resolve_device

__all__ = ["default_batch_size", "default_max_epochs", "pilot_epochs", "shuffle_draws", "train_posterior"]

IN_MEMORY_BYTES = 4 * 2**30  # banks larger than this are streamed from disk
MIN_ROWS = 50


class BankStream:
    """Shuffled batches of one split of a bank read from disk (for banks larger than memory)."""

    def __init__(self, bank: SimulationBank, split: str):
        self.bank, self.split = bank, split

    def batches(self, batch_size: int, generator: torch.Generator | None, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
        seed = int(torch.randint(0, 2**31, (1,), generator=generator)) if generator is not None else 0
        yield from self.bank.batches(batch_size, split=self.split, shuffle=generator is not None, seed=seed)


def shuffle_draws(x: Tensor, draws: tuple[int, int]) -> Tensor:
    """Observations ``x [B, n·F]`` (or ``[B, n, F]``) made of n exchangeable draws of F numbers, with
    the draws of each row in a random order (torch's global RNG). Training on these teaches the
    estimator that the order carries no information, as if the bank were n! times larger."""
    n, f = draws
    b = x.shape[0]
    order = torch.rand(b, n, device=x.device).argsort(-1)
    return x.reshape(b, n, f).gather(1, order.unsqueeze(-1).expand(b, n, f)).reshape(x.shape)


def check_prior_symmetries(simulator: Any, generators: list[list[list[int]]]) -> None:
    """Raise unless every element of the group the signed permutations generate leaves the
    simulator's prior density unchanged (checked on 1,024 prior draws)."""
    perms, signs = symmetry_group(generators, simulator.dim)
    with forked_rng(0):
        theta = simulator.prior.sample((1024,))
    log_p = simulator.prior.log_prob(theta)
    for perm, sign in zip(perms[1:], signs[1:]):
        try:
            same = torch.allclose(simulator.prior.log_prob(theta[:, perm] * sign), log_p, atol=1e-4)
        except ValueError:  # an image outside the prior's support
            same = False
        if not same:
            raise SbipipeError(f"{simulator.name}'s prior is changed by its declared parameter symmetry "
                               f"(permutation {perm.tolist()}, signs {sign.int().tolist()}); fix parameter_symmetries")


#: (batches per epoch, rows of the training set per optimiser step) of the engine's first schedule,
#: which the score, flow-matching and classifier trainings keep
FIRST_SCHEDULE = (50, 2)


def default_batch_size(n_train: int, batches_per_epoch: int = FIRST_SCHEDULE[0]) -> int:
    """About ``batches_per_epoch`` batches per epoch, of 64 to 512 rows."""
    return int(min(512, max(64, n_train // batches_per_epoch)))


#: optimiser-step budget relative to the flows'. The score and flow-matching losses are regressions
#: on one random (t, noise) draw per row, so they need more steps, each 2-4x cheaper than an NSF
#: step; and they train through the whole cosine decay (no early stopping: the validation loss
#: plateaus at a high learning rate and only improves as it decays), keeping the best weights.
STEP_FACTOR = {"score": 3, "flowmatch": 3}

#: a flow's share of the flows' step budget where it is not 1. The affine MAF, which ``auto`` keeps
#: for close-to-Gaussian posteriors, converges in a fifth of it (20 epochs at 10³, 10⁴ and 10⁵
#: simulations, the floor of 20 at 10⁵): on gaussian_linear the MAF trained for 25 epochs at 10³, 20
#: or 30 at 10⁴ and 12 at 10⁵ scored C2ST 0.544, 0.513 or 0.511 and 0.504, against 0.542, 0.512 and
#: 0.502 with the whole schedule (at 10³ and 10⁴ early stopping ended it after 67 epochs); at 10⁴
#: its validation loss was within 0.003 nats of its best by epoch 12. A quarter (25 epochs at 10³
#: and 10⁴) against a fifth, same banks and observations (``/tmp/bench24b``, ``/tmp/bench24m*``):
#: C2ST 0.541 / 0.542 and 0.511 / 0.512, training 2.4-3.0 / 2.1-2.5 s and 5.3-6.7 / 4.8-4.9 s.
FLOW_STEP_SHARE = {"maf": 0.2}


#: what ``estimator="auto"`` trains and chooses between by validation loss: the spline flow fits
#: curved and multimodal posteriors, while the affine MAF overfits less when the posterior is close
#: to Gaussian (on gaussian_linear with 10⁴ simulations the NSF's best validation loss is 0.21 nats
#: worse than the MAF's; on two_moons and slcp the NSF's is 0.9 and 1.9 nats better)
AUTO_CANDIDATES = ("nsf", "maf")

#: where an estimator's defaults differ from the engine's: the MAF takes sbi's tanh hidden units
#: and learning rate 5·10⁻⁴ (with ReLU and 10⁻³ it overfits gaussian_linear within 4 epochs:
#: best validation loss 10.758 against 10.707, the optimum being 10.72 ± 0.01)
#: The NSF takes 2·10⁻³: with the flows' schedule it beat 10⁻³ at every budget tried on the benchmark
#: tasks (two_moons −1.983 against −1.917 at 10⁴ simulations, −2.247 against −2.191 at 10⁵, −1.92
#: against −1.60 at 10³; slcp 2.86 against 3.14). On the 5·10⁴-row dwarf bank its members' losses were
#: worse (3.762 and 3.731 against 3.695 and 3.702) while early stopping could still end a training at a
#: high rate, yet the two-member default there was better calibrated and closer to the exact posteriors
#: (coverage deviation 0.028 against 0.038, C2ST 0.593 against 0.604); now that early stopping waits for
#: the decay, both members reach 3.736 (C2ST 0.588).
ESTIMATOR_DEFAULTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "maf": ({"activation": "tanh"}, {"lr": 5e-4}),
    "nsf": ({}, {"lr": 2e-3}),
}


def default_max_epochs(n_train: int, batch_size: int, factor: float = 1, rows_per_step: int = FIRST_SCHEDULE[1]) -> int:
    """Epochs for a budget of ``factor`` × n/``rows_per_step`` optimiser steps (n/``rows_per_step``
    clipped to 1,500–8,000), over which the learning rate decays to zero on a cosine; early stopping
    may end sooner."""
    steps = factor * min(8000, max(1500, n_train // rows_per_step))
    return int(min(500 * factor, max(20, math.ceil(steps / math.ceil(n_train / batch_size)))))


#: the flows' schedule: ~16 batches per epoch (≤ 512 rows) and n/5 steps, i.e. ~100 epochs at 10⁴
#: simulations, where the first schedule (50 batches, n/2 steps) took 89 epochs of 180 rows: as good a
#: validation loss in half the time (two_moons NSF −1.983 against −1.978 in 31 s against 57 s; slcp
#: 2.856 and 2.856 against 2.775 and 2.894 over two seeds; gaussian_linear MAF 10.704 against
#: 10.707). The step cost on CPU is mostly per-operation overhead, so 512 rows cost 1.35× 180 rows.
FLOW_SCHEDULE = (16, 5)

#: ``auto`` trains each candidate for the epochs that hold this many optimiser steps (at least one
#: epoch: 5 at 10³ and 10⁴ simulations, 1 at 10⁵), keeps the one with the lower validation loss
#: then, and continues it from its checkpoint: the kept model is the one a single-estimator run
#: trains, and the other candidate costs a few percent of a training. The rankings settle early: on
#: all ten banks checked (two_moons, slcp and gaussian_linear at 10³ and 10⁴; cosmo_gaussian,
#: cosmo_lognormal and dwarf at 5·10⁴) the leader after 5 epochs was the leader after 10, by
#: 0.18-2.1 nats (0.13-2.5 after 10). What settles it is the number of steps, not of epochs: at 10⁵
#: simulations (176 steps an epoch) the leader after the first epoch was the leader after 5 on the
#: three benchmark tasks with two seeds each (gaussian_linear: the MAF by 0.078-0.084 nats after 1,
#: 0.075-0.081 after 5; two_moons and slcp: the NSF by 0.32-0.33 and 3.0-3.1, then 0.19-0.32 and
#: 2.3-2.5), where the earlier pilot of 5 epochs cost ~1,800 steps, a fifth of the training.
PILOT_STEPS = 75


def pilot_epochs(n_train: int, batch_size: int) -> int:
    """The epochs of ``auto``'s pilot: those that hold :data:`PILOT_STEPS` optimiser steps (at least one)."""
    return max(1, math.ceil(PILOT_STEPS / math.ceil(n_train / batch_size)))


#: the lead in held-out nats that the MAF needs over the NSF after the pilot. The affine MAF learns
#: the Gaussian part of a posterior faster, so it can lead early where the NSF ends far better: on
#: two_moons at 10³ simulations, with its mirror symmetry folded (one crescent to learn), the MAF once
#: led by 0.045 nats after 5 epochs and was kept, and scored C2ST 0.80 where the NSF scores 0.63 (the
#: NSF now leads there by 0.41). Where the MAF is the better model (gaussian_linear) it led by 0.33
#: (10³), 0.18 (10⁴) and 0.079 nats (10⁵): with a margin of 0.1 the NSF was kept at 10⁵ and scored
#: C2ST 0.528 where sbi's MAF scores 0.507; the MAF kept with this margin scores ~0.50 (``/tmp/bench20``).
AUTO_MARGIN = 0.05


def train_posterior(
    bank_path: str | os.PathLike,
    output: str | os.PathLike,
    estimator: str = "auto",
    embedding: str = "auto",
    ensemble: int | None = None,
    support: str | None = None,
    augment: bool | None = None,
    symmetries: bool | None = None,
    max_epochs: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    resume: bool = False,
    seed: int = 0,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    stream: bool | None = None,
    train_options: dict[str, Any] | None = None,
    **flow_kwargs: Any,
) -> Posterior:
    """Train ``ensemble`` members of ``estimator`` (see :data:`sbipipe.posterior.ESTIMATORS`) on the bank
    and write the model directory ``output``; ``flow_kwargs`` are the estimator's options. ``ensemble``
    defaults to the simulator's ``ensemble`` attribute if it has one, else 1.

    ``estimator="auto"`` pilots a first member of each of :data:`AUTO_CANDIDATES` with the same seed
    (the others mapped to the prior's box, whatever ``support``; the first, the NSF, as it trains,
    and mapped too where it is truncated and that pilot loses) and keeps the one with the lowest
    held-out negative log density of θ (an estimate of the expected KL divergence up to a
    constant), trains it on from its pilot (afresh where that was mapped and the model is
    truncated) and the other ensemble members as it; the card records every pilot's loss.
    ``support`` says how θ meets a bounded prior: ``"map"`` into its box, or ``"truncate"`` the
    real line to it (:data:`sbipipe.posterior.SUPPORTS`); by default, for the
    flows, the simulator's ``support`` attribute if it has one, else the map (README, "Bounded
    priors", says why). ``augment`` shuffles the order of the observation's
    exchangeable draws in every training batch (:func:`shuffle_draws`); by default it is on when the
    simulator declares ``exchangeable_draws``. ``symmetries`` makes the flows average over the
    simulator's declared parameter symmetries (:func:`sbipipe.simulator.parameter_symmetries`,
    :class:`sbipipe.estimators.FlowPosterior`); by default it is on when there are any."""
    if estimator not in ESTIMATORS and estimator != "auto":
        raise SbipipeError(f"unknown estimator {estimator!r}; choose auto or one of {', '.join(ESTIMATORS)}")
    check_embedding(embedding)
    if ensemble is not None and ensemble < 1:
        raise SbipipeError(f"--ensemble must be at least 1, got {ensemble}")
    dev = resolve_device(device)
    bank = SimulationBank(bank_path)
    if bank.rows < MIN_ROWS:
        raise SbipipeError(f"{str(bank_path)!r} holds {bank.rows} rows; train on at least {MIN_ROWS} (simulate more)")
    sim = get_simulator(bank.simulator_name)
    ensemble = ensemble or int(getattr(sim, "ensemble", 1))
    if support is not None and support not in SUPPORTS:
        raise SbipipeError(f"unknown support {support!r}; choose one of {', '.join(SUPPORTS)}")
    draws = getattr(sim, "exchangeable_draws", None)
    if augment and draws is None:
        raise SbipipeError(f"{bank.simulator_name} declares no exchangeable draws (exchangeable_draws), so there is "
                           "nothing to shuffle; leave --augment out")
    if draws is not None and math.prod(draws) != math.prod(bank.x_shape):
        raise SbipipeError(f"{bank.simulator_name} declares {draws[0]} exchangeable draws of {draws[1]} numbers, but its "
                           f"observations have shape {list(bank.x_shape)}; fix exchangeable_draws")
    draws = tuple(draws) if draws is not None and augment is not False else None
    declared = parameter_symmetries(sim)
    is_flow = estimator == "auto" or estimator in FLOWS
    support = support or (getattr(sim, "support", "map") if is_flow else "map")  # measured for the flows
    if support not in SUPPORTS:
        raise SbipipeError(f"{bank.simulator_name} prefers support {support!r}, which is not one of "
                           f"{', '.join(SUPPORTS)}; fix its support attribute or pass --support")
    if symmetries and not declared:
        raise SbipipeError(f"{bank.simulator_name} declares no parameter symmetries (parameter_symmetries or "
                           "sign_symmetries), so there is nothing to average over; leave --symmetries out")
    if symmetries and not is_flow:
        raise SbipipeError(f"--symmetries applies to the flows (auto, {', '.join(FLOWS)}), not to {estimator}; leave it out")
    generators = declared if symmetries is not False and is_flow else []
    if generators:
        check_prior_symmetries(sim, generators)
    # the shuffled batches train; validation keeps the bank's order
    loss = (lambda m, theta, x: m.loss(theta, shuffle_draws(x, draws) if m.training else x)) if draws else None
    if str(sim.version) != bank.simulator_version:
        raise SbipipeError(
            f"{str(bank_path)!r} was simulated with {bank.simulator_name} v{bank.simulator_version} but the simulator "
            f"is now v{sim.version}; simulate a new bank"
        )
    out = Path(output)
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    nbytes = bank.rows * 4 * (sim.dim + int(torch.tensor(bank.x_shape).prod()))
    stream = nbytes > IN_MEMORY_BYTES if stream is None else stream
    if stream:
        train, val = BankStream(bank, "train"), BankStream(bank, "val")
        n_train = len(bank.split_indices("train"))
        theta_fit, x_fit = next(iter(bank.batches(min(bank.rows, 100_000), split="train", seed=seed)))
        theta_val = bank.parameters("val")[:100_000]  # θ only: the observations may be large
    else:
        theta_t, x_t = bank.load("train")
        theta_v, x_v = bank.load("val")
        train, val, n_train = TensorData(theta_t, x_t), TensorData(theta_v, x_v), len(theta_t)
        theta_fit, x_fit, theta_val = theta_t[:100_000], x_t[:100_000], theta_v[:100_000]
    lower, upper = prior_bounds(sim.prior, sim.dim)
    # "auto": the simulator's preferred embedding if it names one (e.g. the power spectrum of the
    # cosmology fields), else one chosen from the observation shape
    kind = (getattr(sim, "embedding", None) or auto_embedding(bank.x_shape)) if embedding == "auto" else embedding
    per_epoch, per_step = FLOW_SCHEDULE if is_flow else FIRST_SCHEDULE
    batch_size = batch_size or default_batch_size(n_train, per_epoch)
    epochs_given = max_epochs is not None
    max_epochs = max_epochs or default_max_epochs(n_train, batch_size, STEP_FACTOR.get(estimator, 1), per_step)
    config = TrainConfig(**{
        "max_epochs": max_epochs, "batch_size": batch_size, "device": str(dev), "seed": seed,
        "threads": 1 if kind in SINGLE_THREAD_EMBEDDINGS else None,
        **({"patience": max_epochs} if estimator in STEP_FACTOR else {}),
    })
    card: dict[str, Any] = {
        "simulator": bank.simulator_name,
        "simulator_version": bank.simulator_version,
        "parameter_names": bank.parameter_names,
        "observation_shape": list(bank.x_shape),
        "prior": describe_distribution(sim.prior),
        "prior_bounds": {"lower": lower.tolist(), "upper": upper.tolist()},
        "architecture": {
            "kind": "npe",
            "estimator": estimator,
            "embedding": kind,
            "ensemble": ensemble,
            "flow_kwargs": flow_kwargs,
            "symmetries": generators,
        },
        "training": {
            "bank": str(Path(bank_path).resolve()),
            "bank_sha256": bank.content_hash(),
            "rows": bank.rows,
            "train_rows": n_train,
            "streamed": stream,
            "device": str(dev),
            "shuffled_draws": list(draws) if draws else None,
        },
        "packages": package_versions(),
    }
    bounded = bool(torch.isfinite(torch.cat([lower, upper])).any())
    mode = support if bounded else "map"  # on the real line the two are the same
    # auto judges the other flows as mapped members even for a truncated model: a truncated pilot's
    # density hinges on how much mass it has yet put outside the box (on two_moons at 10³ simulations
    # the truncated MAF led by 0.12 nats after the pilot and scored C2ST 0.80, the NSF 0.62)
    candidates = [(name, "map") for name in AUTO_CANDIDATES] if estimator == "auto" else [(estimator, mode)]

    def label(candidate: tuple[str, str]) -> str:
        name, sup = candidate
        return name if sup == "map" else f"{name}/{sup}"

    def settings(candidate: tuple[str, str]) -> tuple[dict[str, Any], TrainConfig]:
        """The architecture and training options of a candidate (the user's override its defaults)."""
        name, sup = candidate
        arch_kw, train_kw = ESTIMATOR_DEFAULTS.get(name, ({}, {}))
        if name in FLOW_STEP_SHARE and not epochs_given:
            train_kw = {**train_kw, "max_epochs": default_max_epochs(n_train, batch_size, FLOW_STEP_SHARE[name], per_step)}
        if sup == "truncate":  # no early stopping: its validation −log q is not the loss it trains on
            train_kw = {**train_kw, "patience": train_kw.get("max_epochs", config.max_epochs)}
        arch = {**card["architecture"], "estimator": name, "support": sup, "flow_kwargs": {**arch_kw, **flow_kwargs}}
        return arch, TrainConfig(**{**config.__dict__, **train_kw, **(train_options or {})})

    def train_member(candidate: tuple[str, str], k: int, until: int | None = None,
                     going_on: bool = False) -> tuple[Any, pd.DataFrame]:
        """Member ``k`` of a candidate, to the end of its schedule or paused after ``until`` epochs;
        ``going_on`` continues this run's own checkpoint (a paused candidate)."""
        arch, name_config = settings(candidate)
        torch.manual_seed(seed + k)  # seeded initial weights: the same command trains the same model
        member = build_member({**card, "architecture": arch})
        stem = f"{label(candidate).replace('/', '.')}.member{k}"
        done, hist_path = ckpt_dir / f"{stem}.safetensors", ckpt_dir / f"{stem}.history.csv"
        if resume and done.exists() and hist_path.exists():
            member.load_state_dict(load_file(str(done)))
            return member, pd.read_csv(hist_path)
        member.fit_standardization(theta_fit, x_fit)
        cfg = TrainConfig(**{**name_config.__dict__, "seed": seed + k})
        tag = label(candidate) if len(candidates) > 1 and k == 0 else k
        report = (lambda row: progress(tag, row)) if progress else None
        history = fit(member, train, val, cfg, checkpoint=ckpt_dir / f"{stem}.pt", resume=resume or going_on,
                      progress=report, loss=loss, until=until)
        if until is None:
            with atomic_path(done) as tmp:
                save_file({n: t.detach().cpu().contiguous() for n, t in member.state_dict().items()}, str(tmp))
            with atomic_path(hist_path) as tmp:
                history.to_csv(tmp, index=False)
        return member, history

    def heldout_nll(member: Any, history: pd.DataFrame, epochs: int) -> float:
        """The best validation loss of the first ``epochs`` epochs as a negative log density of θ:
        the loss is −log q_z(z), and log q(θ) = log q_z(z) + log |dz/dθ| (with parameter symmetries:
        of θ folded, i.e. −log q(θ) − log |G| where the flow does not leak)."""
        with torch.no_grad():
            log_dz_dtheta = float(member.standardize(theta_val.to(member.u_mean.device))[1].mean())
        return float(history["val_loss"][:epochs].min()) - log_dz_dtheta

    t0 = time.perf_counter()
    if len(candidates) > 1:
        pilot = pilot_epochs(n_train, batch_size)

        def judge(candidate: tuple[str, str]) -> float:
            # a resumed run may find the kept candidate's checkpoint past the pilot: judge its first epochs
            return heldout_nll(*train_member(candidate, 0, until=pilot), pilot)

        # the first candidate (the NSF) unless another leads it by more than AUTO_MARGIN nats. It is
        # piloted as it would train: truncated, its −log q is an upper bound of its −log q_T, so where
        # it wins even so it is kept and goes on from its pilot; else it is judged mapped, as the others
        first, others = candidates[0], candidates[1:]
        own = (first[0], mode)
        losses = {own: judge(own), **{c: judge(c) for c in others}}
        rival = min(losses[c] for c in others) + AUTO_MARGIN
        if losses[own] > rival and own != first:
            own = first
            losses[own] = judge(own)
        kept = own if losses[own] <= rival else min(others, key=losses.__getitem__)
        chosen = (kept[0], mode)  # goes on from its pilot, unless that was mapped and the model is truncated
        card["training"]["selection"] = {
            "rule": f"lowest held-out negative log density of θ of member 0 after {pilot} epochs, the "
                    f"{first[0]} unless a mapped {', '.join(label(c) for c in others)} leads it by more than "
                    f"{AUTO_MARGIN} nats (the {first[0]} judged as it trains; where truncated and so beaten, "
                    "judged mapped); then trained on",
            "pilot_epochs": pilot,
            "val_loss": {label(c): loss for c, loss in losses.items()},
            "chosen": label(chosen),
        }
        first = train_member(chosen, 0, going_on=True)
    else:
        chosen = candidates[0]
        first = train_member(chosen, 0)
    card["architecture"], chosen_config = settings(chosen)
    card["training"]["config"] = {**chosen_config.__dict__}
    trained = [first, *(train_member(chosen, k) for k in range(1, ensemble))]
    members = [m.cpu().eval() for m, _ in trained]
    histories = [h.assign(member=k) for k, (_, h) in enumerate(trained)]
    history = pd.concat(histories, ignore_index=True)
    card["training"]["seconds"] = round(time.perf_counter() - t0, 3)
    card["training"]["final"] = [
        {"member": k, "epochs": int(h["epoch"].max()), "best_val_loss": float(h["val_loss"].min()),
         "final_train_loss": float(h["train_loss"].iloc[-1])}
        for k, h in enumerate(histories)
    ]
    card["standardization"] = {
        "theta_unconstrained_mean": members[0].u_mean.tolist(),
        "theta_unconstrained_std": members[0].u_std.tolist(),
        "x_mean": members[0].x_mean.flatten()[:64].tolist(),
        "x_std": members[0].x_std.flatten()[:64].tolist(),
    }
    tensors = {f"member{k}.{name}": t for k, m in enumerate(members) for name, t in m.state_dict().items()}
    write_model(out, tensors, card, history=history, checkpoints=ckpt_dir)
    return Posterior(members, {"format": "sbipipe.model/1", **card})
