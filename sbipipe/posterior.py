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
from .estimators import FlowPosterior
from .simulator import check_observation
from .store import read_card, read_weights
from .training import resolve_device

__all__ = ["Posterior", "build_member", "load_posterior"]


def build_member(card: dict[str, Any]) -> FlowPosterior:
    arch = card["architecture"]
    return FlowPosterior(
        len(card["parameter_names"]),
        card["observation_shape"],
        torch.tensor(card["prior_bounds"]["lower"], dtype=torch.float64),
        torch.tensor(card["prior_bounds"]["upper"], dtype=torch.float64),
        flow=arch["estimator"],
        embedding=arch["embedding"],
        **arch.get("flow_kwargs", {}),
    )


class Posterior:
    """q(θ | x) for one simulator, batched over observations."""

    def __init__(self, members: list[FlowPosterior], card: dict[str, Any], device: torch.device | str = "cpu"):
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
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            k = len(self.members)
            counts = torch.bincount(torch.randint(k, (n,)), minlength=k) if k > 1 else torch.tensor([n])
            parts = [m.sample(obs, int(c)) for m, c in zip(self.members, counts) if c > 0]
            out = torch.cat(parts, 1)
            if k > 1:
                out = out[:, torch.randperm(n, device=out.device)]
        out = out.cpu()
        return out[0] if single else out

    @torch.no_grad()
    def log_prob(self, theta: Any, x: Any) -> Tensor:
        """log q(θ | x) for ``theta [B, D]`` and ``x`` one observation or ``[B, ...]``."""
        theta = torch.as_tensor(theta, dtype=torch.float32)
        if theta.ndim == 1:
            theta = theta.unsqueeze(0)
        if theta.shape[-1] != len(self.parameter_names):
            raise SbipipeError(
                f"expected theta [B, {len(self.parameter_names)}] for {self.parameter_names}, got {list(theta.shape)}"
            )
        obs, _ = self._observations(x)
        if len(obs) == 1:
            obs = obs.expand(len(theta), *self.observation_shape)
        if len(obs) != len(theta):
            raise SbipipeError(f"{len(theta)} parameter sets but {len(obs)} observations; give one or as many")
        theta = theta.to(self.device)
        lp = torch.stack([m.log_prob(theta, obs) for m in self.members])
        return (torch.logsumexp(lp, 0) - math.log(len(self.members))).cpu()


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
