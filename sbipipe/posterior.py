"""Amortised posteriors from a model directory: ``load_posterior(DIR).sample(x, n)``.

An ensemble of K estimators is the equal-weight mixture q(θ | x) = (1/K) Σ_k q_k(θ | x)
(Lakshminarayanan et al. 2017): samples are drawn from each member in multinomial proportions
and shuffled; densities are log-mean-exp over members.

A model trained with ``support = "truncate"`` models θ on the real line and is truncated to the
prior's box: draws outside it are rejected and redrawn, and the density is

    q_T(θ | x) = q(θ | x) 1[θ ∈ box] / A(x),   A(x) = P_q(θ ∈ box | x),

with the acceptance rate A(x) estimated from :data:`ACCEPTANCE_DRAWS` draws (as sbi's
``DirectPosterior`` does for its leakage correction).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor

from .errors import SbipipeError
from .estimators import FLOWS, ConditionalEstimator, FlowPosterior, inside_box
from .simulator import check_observation, forked_rng
from .store import read_card, read_weights
from .training import resolve_device

__all__ = ["ESTIMATORS", "SUPPORTS", "Posterior", "build_member", "load_posterior"]

#: every estimator name ``sbipipe train --estimator`` accepts: the zuko flows, denoising score
#: matching (:mod:`sbipipe.score_posterior`) and flow matching (:mod:`sbipipe.flow_matching`)
ESTIMATORS = (*FLOWS, "score", "flowmatch")

#: how θ meets a bounded prior: through the prior's support map (samples can't leave the box) or
#: on the real line with the posterior truncated to the box (rejection; see the module docstring)
SUPPORTS = ("map", "truncate")

ACCEPTANCE_DRAWS = 10_000  # draws per observation that estimate a truncated posterior's A(x)
MIN_ACCEPTANCE = 1e-4  # below this the observation is far outside what the model learned
#: the first round of rejection draws this fraction more than asked: most observations lose a few
#: draws in 10⁴ to the box (two_moons at 10⁴ simulations: A(x) = 0.9995), and a second round for
#: them cost 7 ms where the first took 45 (a flow pass is mostly per-operation overhead at that size)
FIRST_ROUND_MARGIN = 0.01


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
    name, support = arch["estimator"], arch.get("support", "map")
    if support not in SUPPORTS:
        raise SbipipeError(f"unknown support {support!r} in the model card; this sbipipe knows {', '.join(SUPPORTS)}")
    box = None
    if support == "truncate":  # θ on the real line; the posterior is truncated to the box afterwards
        box = args[2:]
        args = (*args[:2], torch.full_like(args[2], -math.inf), torch.full_like(args[3], math.inf))
    if name == "score":
        from .score_posterior import ScorePosterior

        return ScorePosterior(*args, **kwargs)
    if name == "flowmatch":
        from .flow_matching import FlowMatchingPosterior

        return FlowMatchingPosterior(*args, **kwargs)
    if name in FLOWS:
        return FlowPosterior(*args, flow=name, symmetries=arch.get("symmetries", ()), truncation=box, **kwargs)
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
                f"{len(self.members)} x {self.card['architecture']['estimator']}"
                f"{', truncated to the prior' if self.truncated else ''}>")

    def _observations(self, x: Any) -> tuple[Tensor, bool]:
        single = tuple(torch.as_tensor(x).shape) == self.observation_shape
        return check_observation(x, self.observation_shape, self.simulator_name).to(self.device), single

    @property
    def truncated(self) -> bool:
        """Whether the members model θ on the real line, truncated to the prior's box."""
        return self.card["architecture"].get("support", "map") == "truncate"

    def _inside(self, theta: Tensor) -> Tensor:
        """Whether each of ``theta [..., D]`` lies in the prior's box: ``[...]``."""
        bounds = self.card["prior_bounds"]
        lo = torch.tensor(bounds["lower"], dtype=theta.dtype, device=theta.device)
        hi = torch.tensor(bounds["upper"], dtype=theta.dtype, device=theta.device)
        return inside_box(theta, lo, hi)

    def _mixture_draws(self, obs: Tensor, n: int, with_log_prob: bool) -> tuple[Tensor, Tensor | None]:
        """``n`` untruncated draws ``[M, n, D]`` for each of ``obs``, with their log q if asked (in the
        same pass for a single flow)."""
        member, k = self.members[0], len(self.members)
        if with_log_prob and k == 1 and hasattr(member, "sample_and_log_prob"):
            return member.sample_and_log_prob(obs, n)
        counts = torch.bincount(torch.randint(k, (n,)), minlength=k) if k > 1 else torch.tensor([n])
        out = torch.cat([m.sample(obs, int(c)) for m, c in zip(self.members, counts) if c > 0], 1)
        if k > 1:
            out = out[:, torch.randperm(n, device=out.device)]
        return out, (self._mixture_log_prob(out.transpose(0, 1), obs).transpose(0, 1) if with_log_prob else None)

    def _mixture_log_prob(self, theta: Tensor, obs: Tensor) -> Tensor:
        """log q of draws ``theta [L, M, D]`` for ``obs [M, ...]`` (untruncated): ``[L, M]``."""
        lp = torch.stack([_log_prob_draws(m, theta, obs) for m in self.members])  # [K, L, M]
        return torch.logsumexp(lp, 0) - math.log(len(self.members))

    def _draws(self, obs: Tensor, n: int, with_log_prob: bool) -> tuple[Tensor, Tensor | None]:
        """``n`` draws per observation from q, or from q_T by rejection: each observation keeps its
        first ``n`` draws inside the box; those still short are redrawn, in batches sized by their
        acceptance so far."""
        if n <= 0:
            raise SbipipeError(f"-n must be positive, got {n}")
        if not self.truncated:
            return self._mixture_draws(obs, n, with_log_prob)
        m, dim = len(obs), len(self.parameter_names)
        out = torch.empty(m, n, dim, device=obs.device)
        logq = torch.empty(m, n, dtype=torch.float64, device=obs.device) if with_log_prob else None
        filled = torch.zeros(m, dtype=torch.long, device=obs.device)
        accepted = torch.zeros(m, dtype=torch.long, device=obs.device)
        drawn = torch.zeros(m, dtype=torch.long, device=obs.device)
        want = n + math.ceil(FIRST_ROUND_MARGIN * n)
        while True:
            rows = torch.nonzero(filled < n).squeeze(1)
            d, lp = self._mixture_draws(obs[rows], want, with_log_prob)
            inside = self._inside(d)
            slot = filled[rows, None] + inside.cumsum(1) - 1  # where each accepted draw goes
            take = inside & (slot < n)
            at = (rows[:, None].expand_as(take)[take], slot[take])
            out[at] = d[take].to(out.dtype)
            if logq is not None and lp is not None:
                logq[at] = lp[take].double()
            accepted[rows] += inside.sum(1)
            drawn[rows] += want
            filled[rows] = torch.clamp(accepted[rows], max=n)
            short = filled < n
            if not bool(short.any()):
                return out, logq
            rate = accepted[short].double() / drawn[short]
            worst = int(torch.argmin(rate))
            if int(drawn[short][worst]) >= max(n, ACCEPTANCE_DRAWS) and float(rate[worst]) < MIN_ACCEPTANCE:
                index = int(torch.nonzero(short).squeeze(1)[worst])
                raise SbipipeError(
                    f"observation {index}: the posterior puts {1 - float(rate[worst]):.4%} of its mass outside "
                    "the prior, so the observation is unlike the training simulations; check it, or retrain on a "
                    "bank that covers it"
                )
            missing = int((n - filled[short]).max())
            floor = 1 / float(drawn[short].max())  # none accepted yet counts as one; rounds grow at most 16x
            want = max(1, min(int(1.2 * missing / max(float(rate.min()), floor)) + 1, 16 * want,
                              2**24 // int(short.sum())))

    @torch.no_grad()
    def sample(self, x: Any, n: int, seed: int | None = None) -> Tensor:
        """``n`` posterior draws: ``[n, D]`` for one observation, ``[M, n, D]`` for a stack."""
        obs, single = self._observations(x)
        with forked_rng(seed, [self.device] if self.device.type == "cuda" else []):
            out = self._draws(obs, n, with_log_prob=False)[0].cpu()
        return out[0] if single else out

    @torch.no_grad()
    def acceptance(self, x: Any, n: int = ACCEPTANCE_DRAWS, seed: int | None = 0) -> Tensor:
        """A(x): the fraction of the untruncated posterior's mass inside the prior's box, estimated
        from ``n`` draws per observation (exactly 1 for a model that maps θ into the box):
        a scalar for one observation, ``[M]`` for a stack."""
        obs, single = self._observations(x)
        if not self.truncated:
            out = torch.ones(len(obs), dtype=torch.float64)
        else:
            with forked_rng(seed, [self.device] if self.device.type == "cuda" else []):
                per_chunk = max(1, 2**20 // n)
                out = torch.cat([self._inside(self._mixture_draws(obs[i:i + per_chunk], n, False)[0]).double().mean(1)
                                 for i in range(0, len(obs), per_chunk)]).cpu()
        return out[0] if single else out

    def _truncate(self, lp: Tensor, theta: Tensor, obs: Tensor, normalize: bool) -> Tensor:
        """log q_T from untruncated log q ``lp [..., M]`` of ``theta [..., M, D]`` for ``obs [M, ...]``."""
        if not self.truncated:
            return lp
        lp = torch.where(self._inside(theta), lp, -math.inf)
        if normalize:
            unique, index = torch.unique(obs.flatten(1), dim=0, return_inverse=True)
            acc = self.acceptance(unique.reshape(-1, *self.observation_shape)).to(lp.device)
            lp = lp - acc.clamp_min(MIN_ACCEPTANCE).log()[index]
        return lp

    @torch.no_grad()
    def sample_and_log_prob(self, x: Any, n: int, seed: int | None = None,
                            normalize: bool = True) -> tuple[Tensor, Tensor]:
        """Draws and their log q for a stack ``x [M, ...]``: ``[M, n, D]``, ``[M, n]``. A single flow
        computes both in one pass. ``normalize=False`` leaves a truncated posterior's densities
        without their per-observation constant −log A(x) (enough to rank draws, as HPD levels do)."""
        obs, _ = self._observations(x)
        with forked_rng(seed, [self.device] if self.device.type == "cuda" else []):
            draws, lp = self._draws(obs, n, with_log_prob=True)
        assert lp is not None
        lp = self._truncate(lp.transpose(0, 1), draws.transpose(0, 1), obs, normalize).transpose(0, 1)
        return draws.cpu(), lp.cpu()

    @torch.no_grad()
    def log_prob(self, theta: Any, x: Any, normalize: bool = True) -> Tensor:
        """log q(θ | x): ``theta [B, D]`` with ``x`` one observation or ``[B, ...]`` gives ``[B]``;
        ``theta [M, L, D]`` with ``x [M, ...]`` (L draws per observation) gives ``[M, L]``, with
        each observation embedded once. A truncated posterior gives −inf outside the prior and, with
        ``normalize``, subtracts log A(x) (estimated; see :meth:`acceptance`)."""
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
            return self._truncate(self._mixture_log_prob(pairs, obs), pairs, obs, normalize).transpose(0, 1).cpu()
        if len(obs) == 1:  # the draws broadcast over the one observation, embedded once
            draws = theta.unsqueeze(1).to(self.device)  # [B, 1, D]
            return self._truncate(self._mixture_log_prob(draws, obs), draws, obs, normalize)[:, 0].cpu()
        if len(obs) != len(theta):
            raise SbipipeError(f"{len(theta)} parameter sets but {len(obs)} observations; give one or as many")
        theta = theta.to(self.device)
        lp = torch.stack([m.log_prob(theta, obs) for m in self.members])
        lp = torch.logsumexp(lp, 0) - math.log(len(self.members))
        return self._truncate(lp, theta, obs, normalize).cpu()


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
