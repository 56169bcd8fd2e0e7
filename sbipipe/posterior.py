"""Amortised posteriors from a model directory: ``load_posterior(DIR).sample(x, n)``.

An ensemble of K estimators is the equal-weight mixture q(θ | x) = (1/K) Σ_k q_k(θ | x)
(Lakshminarayanan et al. 2017): samples are drawn from each member in multinomial proportions
and shuffled; densities are log-mean-exp over members.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor

from .errors import SbipipeError
from .estimators import FLOWS, ConditionalEstimator, FlowPosterior
from .simulator import check_observation, forked_rng
from .store import read_card, read_weights
from .training import resolve_device

__all__ = ["ESTIMATORS", "Posterior", "build_member", "load_posterior"]

#: every estimator name ``sbipipe train --estimator`` accepts: the zuko flows, denoising score
#: matching (:mod:`sbipipe.score_posterior`) and flow matching (:mod:`sbipipe.flow_matching`)
ESTIMATORS = (*FLOWS, "score", "flowmatch")


def build_member(card: dict[str, Any]) -> ConditionalEstimator:
    """An untrained member of the architecture the card describes (its ``estimator`` picks the class;
    ``flow_kwargs`` holds the estimator's options)."""
    arch = card["architecture"]
    args = (
        len(card["parameter_names"]),
        card["observation_shape"],
        torch.tensor(card["prior_bounds"]["lower"], dtype=torch.float64),
        torch.tensor(card["prior_bounds"]["upper"], dtype=torch.float64),
    )
    kwargs = {"embedding": arch["embedding"], **arch.get("flow_kwargs", {})}
    name = arch["estimator"]
    if name == "score":
        from .score_posterior import ScorePosterior

        return ScorePosterior(*args, **kwargs)
    if name == "flowmatch":
        from .flow_matching import FlowMatchingPosterior

        return FlowMatchingPosterior(*args, **kwargs)
    if name in FLOWS:
        return FlowPosterior(*args, flow=name, **kwargs)
    raise SbipipeError(f"unknown estimator {name!r} in the model card; this sbipipe knows {', '.join(ESTIMATORS)}")


class Posterior:
    """q(θ | x) for one simulator, batched over observations."""

    def __init__(self, members: list[ConditionalEstimator], card: dict[str, Any], device: torch.device | str = "cpu"):
        self.members = [m.eval() for m in members]
        self.card = card
        self.parameter_names: list[str] = list(card["parameter_names"])
        self.observation_shape = tuple(card["observation_shape"])
        self.simulator_name: str = card["simulator"]
        self.simulator_version: str = str(card["simulator_version"])
        self.device = torch.device(device)

    def __repr__(self) -> str:
        return (f"<Posterior for {self.simulator_name} v{self.simulator_version}: "
                f"{len(self.members)} x {self.card['architecture']['estimator']}>")

    def _observations(self, x: Any) -> tuple[Tensor, bool]:
        single = tuple(torch.as_tensor(x).shape) == self.observation_shape
        return check_observation(x, self.observation_shape, self.simulator_name).to(self.device), single

    @torch.no_grad()
    def sample(self, x: Any, n: int, seed: int | None = None) -> Tensor:
        """``n`` posterior draws: ``[n, D]`` for one observation, ``[M, n, D]`` for a stack."""
        if n <= 0:
            raise SbipipeError(f"-n must be positive, got {n}")
        obs, single = self._observations(x)
        with forked_rng(seed, [self.device] if self.device.type == "cuda" else []):
            k = len(self.members)
            counts = torch.bincount(torch.randint(k, (n,)), minlength=k) if k > 1 else torch.tensor([n])
            parts = [m.sample(obs, int(c)) for m, c in zip(self.members, counts) if c > 0]
            out = torch.cat(parts, 1)
            if k > 1:
                out = out[:, torch.randperm(n, device=out.device)]
        out = out.cpu()
        return out[0] if single else out

    @torch.no_grad()
    def sample_and_log_prob(self, x: Any, n: int, seed: int | None = None) -> tuple[Tensor, Tensor]:
        """Draws and their log q for a stack ``x [M, ...]``: ``[M, n, D]``, ``[M, n]``. A single
        flow computes both in one pass; otherwise the densities are evaluated afterwards."""
        member = self.members[0]
        if len(self.members) > 1 or not hasattr(member, "sample_and_log_prob"):
            draws = self.sample(x, n, seed)
            return draws, self.log_prob(draws, x)
        obs, _ = self._observations(x)
        with forked_rng(seed, [self.device] if self.device.type == "cuda" else []):
            draws, lp = member.sample_and_log_prob(obs, n)
        return draws.cpu(), lp.cpu()

    @torch.no_grad()
    def log_prob(self, theta: Any, x: Any) -> Tensor:
        """log q(θ | x): ``theta [B, D]`` with ``x`` one observation or ``[B, ...]`` gives ``[B]``;
        ``theta [M, L, D]`` with ``x [M, ...]`` (L draws per observation) gives ``[M, L]``, with
        each observation embedded once."""
        theta = torch.as_tensor(theta, dtype=torch.float32)
        if theta.ndim == 1:
            theta = theta.unsqueeze(0)
        if theta.shape[-1] != len(self.parameter_names) or theta.ndim > 3:
            raise SbipipeError(
                f"expected theta [B, {len(self.parameter_names)}] or [M, L, {len(self.parameter_names)}] for "
                f"{self.parameter_names}, got {list(theta.shape)}"
            )
        obs, _ = self._observations(x)
        if theta.ndim == 3:
            if len(obs) != len(theta):
                raise SbipipeError(f"theta [M, L, D] has M = {len(theta)} but there are {len(obs)} observations")
            pairs = theta.transpose(0, 1).to(self.device)  # [L, M, D]: draws broadcast over observations
            lp = torch.stack([_log_prob_draws(m, pairs, obs) for m in self.members])  # [K, L, M]
            return (torch.logsumexp(lp, 0) - math.log(len(self.members))).transpose(0, 1).cpu()
        if len(obs) == 1:
            obs = obs.expand(len(theta), *self.observation_shape)
        if len(obs) != len(theta):
            raise SbipipeError(f"{len(theta)} parameter sets but {len(obs)} observations; give one or as many")
        theta = theta.to(self.device)
        lp = torch.stack([m.log_prob(theta, obs) for m in self.members])
        return (torch.logsumexp(lp, 0) - math.log(len(self.members))).cpu()


def _log_prob_draws(member: ConditionalEstimator, theta: Tensor, x: Tensor) -> Tensor:
    """log q of draws ``theta [L, M, D]`` for observations ``x [M, ...]``: ``[L, M]``. Flows broadcast
    the draws over the observations (each embedded once); other members get the pairs flattened."""
    if isinstance(member, FlowPosterior):
        return member.log_prob(theta, x)
    n, m = theta.shape[:2]
    return member.log_prob(theta.reshape(n * m, -1), x.repeat(n, *[1] * (x.ndim - 1))).reshape(n, m)


def load_posterior(directory: str | os.PathLike, device: str = "cpu", check_simulator: bool = True) -> Posterior:
    """Load a trained posterior. With ``check_simulator`` the simulator (if it can be loaded) must
    have the version the model was trained on."""
    card = read_card(directory)
    if check_simulator:
        _check_simulator_version(card)
    weights = read_weights(directory)
    members = []
    for k in range(int(card["architecture"]["ensemble"])):
        member = build_member(card)
        prefix = f"member{k}."
        state = {key[len(prefix):]: v for key, v in weights.items() if key.startswith(prefix)}
        try:
            member.load_state_dict(state)
        except RuntimeError as exc:
            raise SbipipeError(
                f"{str(directory)!r}: the weights do not match the card's architecture "
                f"({str(exc).splitlines()[0][:120]}); retrain the model"
            ) from None
        members.append(member)
    dev = resolve_device(device)
    return Posterior([m.to(dev) for m in members], card, dev)


def _check_simulator_version(card: dict[str, Any]) -> None:
    from .registry import get_simulator

    try:
        sim = get_simulator(card["simulator"])
    except SbipipeError:
        return  # e.g. a user simulator not importable here: the card still describes the model
    if str(sim.version) != str(card["simulator_version"]):
        raise SbipipeError(
            f"this model was trained on {card['simulator']} v{card['simulator_version']}, but the simulator is now "
            f"v{sim.version}; retrain it on a bank of the current version"
        )
