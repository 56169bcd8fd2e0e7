r"""Conditional diffusion emulator p(x | θ) of image-valued simulators (cosmology fields).

* **Data.** The bank's fields x ``[N, H, W]`` become z = (x − m)/c with one mean m and one scale
  c = std(x)/σ_d over the training rows (σ_d = 0.5, EDM's default), optionally after y = log(1 + x)
  (``transform="log1p"``, for fields bounded below by −1 such as lognormal overdensities). The
  parameters θ are standardised, u = (θ − μ_θ)/s_θ, and u is the conditioning vector of the U-Net
  (:class:`sbipipe.diffusion.UNet`: a linear map of u is added to the noise-level embedding and
  every residual block is modulated by it, FiLM; ``circular=True`` for periodic fields).
* **Model** (:mod:`sbipipe.diffusion`, Karras et al. 2022, "EDM"): the denoiser
  D(z; σ, u) = c_skip z + c_out F(c_in z; ¼ ln σ, u), c_skip = σ_d²/(σ² + σ_d²),
  c_out = σ σ_d/√(σ² + σ_d²), c_in = 1/√(σ² + σ_d²), trained by denoising score matching
  E λ(σ) ‖D(z₀ + σ ε; σ, u) − z₀‖², λ = (σ² + σ_d²)/(σ σ_d)², ln σ ~ N(−1.2, 1.2²), through the
  one training loop (:func:`sbipipe.training.fit`, EMA weights kept, checkpoint/resume per epoch).
  Fields on a periodic square grid whose statistics are isotropic are augmented by the eight
  symmetries of the square and random circular shifts (``augment=True``).
* **Sampling** of the probability-flow ODE dz/dσ = (z − D(z; σ, u))/σ from z ~ N(0, σ_max² I)
  (σ_max = 80) to σ = 0 on the noise levels of Karras et al. (ρ = 7, σ_min = 0.002), with at most
  50 network evaluations per field:

  - ``dpm3m`` (default): DPM-Solver++(3M), multistep third order in ln σ, one evaluation per level
    (49 levels → 49 evaluations);
  - ``heun``: Heun's method (EDM Algorithm 1), 2·steps − 1 evaluations (25 → 49);
  - ``pc`` (``stochastic=True``, 150 levels): predictor–corrector on the reverse SDE
    (:func:`sbipipe.diffusion.pc_sample`, score (D − z)/σ² by Tweedie), then one denoising step.

  Why DPM-Solver++(3M) by default: with the *exact* denoiser of a Gaussian field (whose ODE is
  solved per Fourier mode by z ∝ √(λ + σ²)), 25 Heun levels inflate each mode's variance by
  3–12 % for λ ∈ [10⁻³, 10] (standardised units), 49 DPM-Solver++(3M) levels by ≤ 0.3 %
  (tests/test_emulator.py checks both): the Heun budget alone would break a 3 % power target.
  The predictor–corrector sampler needs many more levels: with the exact denoiser its power is
  +45 % at 25 levels (50 evaluations), +3–7 % at 100, ≈ +1–3 % at 300 (one corrector step,
  snr 0.16; the Euler–Maruyama predictor over-disperses at large steps); its default is 150
  levels (300 evaluations).
* **As a simulator.** :func:`load_emulator` returns an object meeting the simulator contract
  (name ``emulator:DIR``, the bank simulator's parameter names, prior and observation shape), and
  the registry resolves ``emulator:DIR`` to it, so banks, NPE training and flows run on it.
* **Check.** :func:`emulator_check` compares emulated and simulated fields over a grid of θ: the
  per-k-bin ratio of mean power spectra (with its sampling error), the one-point PDF (two-sample
  KS distance, next to the KS distance between two independent simulated sets of the same size,
  its noise floor) and the throughput of both.

Model directory: ``weights.safetensors`` (EMA network) + ``card.json`` (architecture, the
standardisation, the bank simulator and how to rebuild it, training record) + ``history.csv``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .atomic import atomic_path, atomic_write_text
from .bank import SimulationBank
from .diffusion import (
    Denoiser,
    ScoreModel,
    UNet,
    denoiser_score,
    karras_sigmas,
    ode_sample,
    pc_sample,
)
from .errors import SbipipeError
from .simulator import Simulator, as_simulator
from .store import WEIGHTS, package_versions, read_card, read_weights, write_model
from .training import TensorData, TrainConfig, fit, resolve_device

__all__ = [
    "Emulator",
    "emulator_check",
    "inference_consistency",
    "load_emulator",
    "reference_simulator",
    "theta_grid",
    "train_emulator",
    "write_emulated",
]

KIND = "emulator"
SIGMA_DATA = 0.5
SIGMA_MIN = 0.002
PREFIX = "emulator:"
TRANSFORMS = ("none", "log1p")


# ---------------------------------------------------------------------------------------------
# The simulator that the bank came from (the reference of the check, and the prior).
# ---------------------------------------------------------------------------------------------


def reference_simulator(name: str, kwargs: Mapping[str, Any] | None = None) -> Simulator:
    """The simulator ``name`` (registry name or import path), built with ``kwargs`` when given
    (e.g. ``{"n": 32}`` for a cosmology field on another grid)."""
    from .registry import _builtins, get_simulator, load_object

    if not kwargs:
        return get_simulator(name)
    builtins = _builtins()
    target = builtins.get(name, name)
    if ":" not in target:
        raise SbipipeError(f"cannot build simulator {name!r} with options {dict(kwargs)}: not a built-in or an import path")
    factory = load_object(target)
    try:
        obj = factory(**kwargs)
    except TypeError as exc:
        raise SbipipeError(f"simulator {name!r} does not take the options {dict(kwargs)} ({exc})") from None
    return as_simulator(obj, name=name)


def _shape_check(sim: Simulator, shape: tuple[int, ...], where: str) -> None:
    if tuple(sim.observation_shape) != tuple(shape):
        raise SbipipeError(
            f"{where} holds fields of shape {list(shape)} but simulator {sim.name!r} makes "
            f"{list(sim.observation_shape)}; pass the simulator's options, e.g. --simulator-kwargs n={shape[-1]}"
        )


def _box(sim: Any, pixels: int) -> float:
    """Side of the field for :func:`simulators.cosmology.binned_power` (the simulator's ``box``,
    else the number of pixels: k in units of 2π per pixel side)."""
    return float(getattr(sim, "box", pixels))


# ---------------------------------------------------------------------------------------------
# The emulator (meets the simulator contract).
# ---------------------------------------------------------------------------------------------


#: samplers: default noise levels (the ODE samplers: ≤ 50 network evaluations per field; the
#: stochastic one needs more levels: 300 evaluations, see the module docstring)
SAMPLERS = {"dpm3m": 49, "heun": 25, "pc": 150}
SAMPLER_NAMES = {"dpm3m": "DPM-Solver++(3M) probability-flow ODE", "heun": "Heun probability-flow ODE",
                 "pc": "stochastic predictor-corrector (reverse SDE)"}


def evaluations(sampler: str, steps: int, corrector_steps: int = 1) -> int:
    """Network evaluations per field: ``steps`` (DPM-Solver++(3M)), 2·steps − 1 (Heun: the step
    to σ = 0 is an Euler step), (c + 1)(steps − 1) + c + 1 (predictor–corrector with c corrector
    steps per level and a final denoising step)."""
    if sampler == "dpm3m":
        return steps
    if sampler == "heun":
        return 2 * steps - 1
    return (corrector_steps + 1) * (steps - 1) + corrector_steps + 1


def _check_sampler(sampler: str, steps: int | None) -> tuple[str, int]:
    if sampler not in SAMPLERS:
        raise SbipipeError(f"unknown sampler {sampler!r}; expected one of {list(SAMPLERS)}")
    steps = SAMPLERS[sampler] if steps is None else int(steps)
    if steps < 2:
        raise SbipipeError(f"the sampler needs at least 2 noise levels, got steps={steps}")
    return sampler, steps


class Emulator(Simulator):
    """A diffusion emulator as a simulator. ``denoiser(z [B, 1, H, W], sigma, u [B, D])`` is any
    callable (the trained EMA network, or an analytic denoiser in tests)."""

    def __init__(self, denoiser: Callable[..., Tensor], *, name: str, version: str, parameter_names: Sequence[str],
                 prior: torch.distributions.Distribution, shape: tuple[int, int], field_mean: float,
                 field_scale: float, theta_mean: Sequence[float], theta_std: Sequence[float],
                 transform: str = "none", sigma_max: float = 80.0, sampler: str = "dpm3m",
                 steps: int | None = None, corrector_steps: int = 1, snr: float = 0.16, batch_size: int = 256,
                 base: Simulator | None = None, card: dict[str, Any] | None = None):
        if transform not in TRANSFORMS:
            raise SbipipeError(f"unknown field transform {transform!r}; expected one of {list(TRANSFORMS)}")
        self.denoiser = denoiser
        self.name, self.version = name, str(version)
        self.parameter_names = list(parameter_names)
        self.prior = prior
        self.shape = (int(shape[0]), int(shape[1]))
        self.field_mean, self.field_scale = float(field_mean), float(field_scale)
        self.theta_mean = torch.tensor(list(theta_mean), dtype=torch.float32)
        self.theta_std = torch.tensor(list(theta_std), dtype=torch.float32)
        self.transform = transform
        self.sigma_max = float(sigma_max)
        self.sampler, self.steps = _check_sampler(sampler, steps)
        self.corrector_steps, self.snr, self.batch_size = int(corrector_steps), float(snr), int(batch_size)
        self.base = base
        self.card = card or {}
        self.evaluations = 0  # network evaluations (per batch) of the last simulate call

    # -- contract ---------------------------------------------------------------------------
    @property
    def observation_shape(self) -> tuple[int, ...]:
        return self.shape

    @property
    def parameter_labels(self) -> list[str]:
        return list(getattr(self.base, "parameter_labels", self.parameter_names))

    @property
    def parameter_units(self) -> list[str]:
        return list(getattr(self.base, "parameter_units", [""] * self.dim))

    @property
    def embedding(self) -> str | None:
        """The simulator's preferred NPE embedding (e.g. ``log-power``), so NPE on emulated banks
        summarises the fields as it would the simulated ones."""
        return getattr(self.base, "embedding", None)

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.base.sample_prior(n, generator) if self.base is not None else super().sample_prior(n, generator)

    @property
    def device(self) -> torch.device:
        params = getattr(self.denoiser, "parameters", None)
        if callable(params):
            for p in params():
                return p.device
        return torch.device("cpu")

    @property
    def stochastic(self) -> bool:
        return self.sampler == "pc"

    @property
    def evaluations_per_sample(self) -> int:
        """Network evaluations per field of the configured sampler (:func:`evaluations`)."""
        return evaluations(self.sampler, self.steps, self.corrector_steps)

    def simulate(self, theta: Tensor, generator: torch.Generator | None = None, steps: int | None = None,
                 sampler: str | None = None, stochastic: bool | None = None) -> Tensor:
        """Fields ``[B, H, W]`` (on θ's device) for ``theta [B, D]``: the start z ~ N(0, σ_max² I)
        is drawn on the generator's device for all rows at once, then the rows run in batches of
        ``batch_size`` through the sampler (default: this emulator's, see :data:`SAMPLERS`;
        ``stochastic=True`` picks the predictor–corrector sampler) on ``steps`` noise levels."""
        theta = self.check_theta(theta)
        sampler = "pc" if stochastic else (sampler or self.sampler)
        if steps is None and sampler == self.sampler:
            steps = self.steps
        sampler, steps = _check_sampler(sampler, steps)
        out_device, dev = theta.device, self.device
        b = theta.shape[0]
        src = generator.device if generator is not None else out_device
        z0 = torch.randn((b, 1, *self.shape), generator=generator, device=src) * self.sigma_max
        u = ((theta.cpu() - self.theta_mean) / self.theta_std).to(dev)
        sigmas = karras_sigmas(steps, SIGMA_MIN, self.sigma_max)
        counter = _Counter(self.denoiser)
        outs = []
        for i in range(0, b, self.batch_size):
            z = z0[i : i + self.batch_size].to(dev)
            c = u[i : i + self.batch_size]
            if sampler == "pc":
                z = pc_sample(denoiser_score(counter, c), z, sigmas, generator, self.corrector_steps, self.snr)
                with torch.no_grad():
                    z = counter(z, float(sigmas[-1]), c)
            elif sampler == "heun":
                z = ode_sample(counter, z, sigmas, c)
            else:
                z = dpm3m_sample(counter, z, sigmas, c)
            outs.append(z[:, 0].float())
        self.evaluations = counter.calls // max(1, len(outs))
        return self._decode(torch.cat(outs)).to(out_device)

    def _decode(self, z: Tensor) -> Tensor:
        y = z * self.field_scale + self.field_mean
        return torch.expm1(y) if self.transform == "log1p" else y

    def __repr__(self) -> str:
        return f"<Emulator {self.name!r} {list(self.shape)} of {list(self.parameter_names)}>"


def dpm3m_sample(denoiser: Callable[..., Tensor], x: Tensor, sigmas: Tensor, cond: Tensor | None = None) -> Tensor:
    r"""Deterministic DPM-Solver++(3M) (Lu et al. 2022, arXiv:2211.01095; the multistep third-order
    data-prediction update, as in k-diffusion's ``sample_dpmpp_3m_sde`` with η = 0) of the
    probability-flow ODE, from ``x`` at ``sigmas[0]`` through the decreasing ``sigmas`` to σ = 0:
    one network evaluation per level (the last one is the denoising step x ← D(x; σ_min)).

    With h = ln(σ_i/σ_{i+1}): x ← e^{−h} x + (1 − e^{−h}) D_i + φ₂ d₁ − φ₃ d₂, with the first and
    second divided differences d₁, d₂ of the last three D's in ln σ, φ₂ = (e^{−h} − 1)/h + 1,
    φ₃ = φ₂/h − ½ (lower order on the first two steps)."""
    sig = [float(s) for s in sigmas] + [0.0]
    d_1 = d_2 = h_1 = h_2 = None
    with torch.no_grad():
        for i in range(len(sig) - 1):
            s, s_next = sig[i], sig[i + 1]
            den = denoiser(x, s, cond)
            if s_next == 0:
                x = den
                break
            h = math.log(s / s_next)
            x = math.exp(-h) * x - math.expm1(-h) * den
            phi2 = math.expm1(-h) / h + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d10, d11 = (den - d_1) / r0, (d_1 - d_2) / r1
                d1 = d10 + (d10 - d11) * r0 / (r0 + r1)
                d2 = (d10 - d11) / (r0 + r1)
                x = x + phi2 * d1 - (phi2 / h - 0.5) * d2
            elif h_1 is not None:
                x = x + phi2 * (den - d_1) / (h_1 / h)
            d_2, d_1, h_2, h_1 = d_1, den, h_1, h
    return x


class _Counter:
    """Counts the calls of a denoiser (each call is one network evaluation of a batch)."""

    def __init__(self, fn: Callable[..., Tensor]):
        self.fn, self.calls = fn, 0

    def __call__(self, *args: Any) -> Tensor:
        self.calls += 1
        return self.fn(*args)


def encode_fields(x: Tensor, transform: str) -> Tensor:
    """The field the network models: x, or log(1 + x) (``log1p``; needs x > −1)."""
    if transform == "log1p":
        if not bool((x > -1).all()):
            raise SbipipeError("transform log1p needs every field value > -1; use --transform none")
        return torch.log1p(x)
    return x


# ---------------------------------------------------------------------------------------------
# Training and loading.
# ---------------------------------------------------------------------------------------------


class _EpochData(TensorData):
    """In-memory rows; with ``per_epoch`` each epoch is a random subset of that many rows; after
    ``deadline`` (a :func:`time.perf_counter` value) epochs yield no batches."""

    def __init__(self, *tensors: Tensor, per_epoch: int | None = None, deadline: float | None = None):
        super().__init__(*tensors)
        self.per_epoch, self.deadline = per_epoch, deadline
        self.epochs_run = 0

    def batches(self, batch_size: int, generator: torch.Generator | None, device: torch.device):
        if self.deadline is not None and time.perf_counter() > self.deadline:
            return  # time budget spent: the remaining epochs are empty
        self.epochs_run += 1
        if self.per_epoch is None or generator is None or self.per_epoch >= self.n:
            yield from super().batches(batch_size, generator, device)
            return
        order = torch.randperm(self.n, generator=generator)[: self.per_epoch]
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            yield tuple(t[idx] for t in self.tensors)


def _augment(z: Tensor) -> Tensor:
    """A random symmetry of the square (flips, transpose) and a random circular shift, per batch
    (global RNG, which :func:`sbipipe.training.fit` seeds and checkpoints)."""
    k = torch.randint(0, 8, (3,))
    if k[0] & 1:
        z = z.flip(-1)
    if k[0] & 2:
        z = z.flip(-2)
    if (k[0] & 4) and z.shape[-1] == z.shape[-2]:
        z = z.transpose(-1, -2)
    return torch.roll(z, (int(k[1]) * z.shape[-2] // 8, int(k[2]) * z.shape[-1] // 8), (-2, -1))


def train_emulator(
    bank_path: str | os.PathLike,
    output: str | os.PathLike,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-3,
    channels: Sequence[int] = (32, 64, 64),
    blocks: int = 1,
    ema_decay: float = 0.999,
    transform: str = "none",
    augment: bool = True,
    max_rows: int | None = None,
    samples_per_epoch: int | None = None,
    val_rows: int = 512,
    max_seconds: float | None = None,
    simulator_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: str = "auto",
    resume: bool = False,
    threads: int | None = 1,
    progress: Callable[[dict[str, float]], None] | None = None,
) -> Emulator:
    """Train a conditional diffusion emulator on the bank at ``bank_path`` and write the model
    directory ``output`` (EMA weights, card, history.csv). The bank's validation split (its first
    ``val_rows`` rows) judges the EMA weights each epoch; ``max_rows`` caps the training rows,
    ``samples_per_epoch`` draws a random subset per epoch (shorter epochs, checkpoints more often);
    ``max_seconds`` is a time budget: epochs that would start after it train on nothing (the
    learning-rate schedule still counts them; the card records ``epochs_trained``).
    ``simulator_kwargs`` rebuild the bank's simulator for its prior and the check (e.g.
    ``{"n": 32}`` when the bank was made on a 32 × 32 grid). ``resume`` continues an interrupted
    run from ``output/checkpoints``."""
    if transform not in TRANSFORMS:
        raise SbipipeError(f"unknown --transform {transform!r}; expected one of {list(TRANSFORMS)}")
    if epochs < 1 or batch_size < 1:
        raise SbipipeError(f"--epochs and --batch-size must be positive, got {epochs}, {batch_size}")
    t0 = time.perf_counter()
    bank = SimulationBank(bank_path)
    if len(bank.x_shape) != 2:
        raise SbipipeError(f"the emulator models images [H, W]; {str(bank_path)!r} holds x of shape {list(bank.x_shape)}")
    sim = reference_simulator(bank.simulator_name, simulator_kwargs)
    _shape_check(sim, bank.x_shape, f"bank {str(bank_path)!r}")
    levels = len(channels)
    if any(s % 2 ** (levels - 1) for s in bank.x_shape):
        raise SbipipeError(f"a U-Net with {levels} levels needs H and W divisible by {2 ** (levels - 1)}, "
                           f"got {list(bank.x_shape)}; use fewer --channels levels")
    theta_tr, x_tr = bank.load("train")
    theta_va, x_va = bank.load("val")
    if max_rows is not None:
        theta_tr, x_tr = theta_tr[:max_rows], x_tr[:max_rows]
    theta_va, x_va = theta_va[:val_rows], x_va[:val_rows]
    if len(x_tr) < 10 or len(x_va) < 1:
        raise SbipipeError(f"{str(bank_path)!r} has {len(x_tr)} training and {len(x_va)} validation rows; simulate more")
    y_tr, y_va = encode_fields(x_tr, transform), encode_fields(x_va, transform)
    field_mean = float(y_tr.double().mean())
    field_scale = float(y_tr.double().std()) / SIGMA_DATA
    th_mean, th_std = theta_tr.double().mean(0), theta_tr.double().std(0).clamp_min(1e-12)
    enc = lambda y: ((y - field_mean) / field_scale).unsqueeze(1).float()
    cond = lambda t: ((t.double() - th_mean) / th_std).float()
    seconds_data = time.perf_counter() - t0

    dev = resolve_device(device)
    out = Path(output)
    ckpt_dir = out / "checkpoints"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SbipipeError(f"cannot create {str(out)!r}: {exc.strerror}") from None
    torch.manual_seed(seed)
    net = UNet(1, 1, tuple(channels), blocks, cond_dim=bank.theta_shape[0], circular=True)
    model = ScoreModel(net, sigma_data=SIGMA_DATA, ema_decay=ema_decay)
    config = TrainConfig(max_epochs=epochs, batch_size=batch_size, lr=lr, patience=epochs + 1, seed=seed,
                         device=str(dev), threads=threads)
    # augment the training batches only: validation keeps its fixed fields (and fixed noise)
    loss = (lambda m, z, u: m.loss(_augment(z) if m.training else z, u)) if augment else None
    deadline = None if max_seconds is None else t0 + float(max_seconds)
    train_data = _EpochData(enc(y_tr), cond(theta_tr), per_epoch=samples_per_epoch, deadline=deadline)
    history = fit(model, train_data, TensorData(enc(y_va), cond(theta_va)), config,
                  checkpoint=ckpt_dir / "emulator.pt", resume=resume, progress=progress, loss=loss)
    seconds = time.perf_counter() - t0
    card: dict[str, Any] = {
        "architecture": {"kind": KIND, "unet": net.config, "sigma_data": SIGMA_DATA, "preconditioning": "edm",
                         "sigma_min": SIGMA_MIN, "sigma_max": 80.0},
        "simulator": {"name": bank.simulator_name, "version": bank.simulator_version,
                      "kwargs": dict(simulator_kwargs or {}), "parameter_names": bank.parameter_names,
                      "observation_shape": list(bank.x_shape), "box": _box(sim, bank.x_shape[-1])},
        "standardisation": {"transform": transform, "field_mean": field_mean, "field_scale": field_scale,
                            "theta_mean": th_mean.tolist(), "theta_std": th_std.tolist()},
        "sampler": {"name": "dpm3m", "steps": SAMPLERS["dpm3m"], "method": SAMPLER_NAMES["dpm3m"]},
        "training": {
            "bank": str(Path(bank_path).resolve()), "bank_rows": len(bank), "train_rows": len(x_tr),
            "validation_rows": len(x_va), "augment": augment, "samples_per_epoch": samples_per_epoch,
            "seed": seed, "config": {**config.__dict__}, "ema_decay": ema_decay, "device": str(dev),
            "seconds": round(seconds, 1), "seconds_data": round(seconds_data, 1),
            "epochs": int(history["epoch"].max()), "epochs_trained": train_data.epochs_run,
            "max_seconds": max_seconds, "best_val_loss": float(history["val_loss"].min()),
            "final_train_loss": float(history["train_loss"].iloc[-1]),
        },
        "packages": package_versions(),
    }
    model = model.cpu()
    write_model(out, {f"net.{k}": v for k, v in model.ema.net.state_dict().items()}, card,
                history=history, checkpoints=ckpt_dir)
    return load_emulator(out)


def _weights_version(directory: Path) -> str:
    h = hashlib.sha256()
    with open(directory / WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def load_emulator(directory: str | os.PathLike, device: str = "cpu", sampler: str = "dpm3m",
                  steps: int | None = None, stochastic: bool = False, batch_size: int = 256) -> Emulator:
    """The emulator in ``directory`` as a simulator named ``emulator:DIR`` (version: a hash of the
    weights), sampling with ``sampler`` (:data:`SAMPLERS`; ``stochastic=True``: ``"pc"``) on
    ``steps`` noise levels (default: ≤ 50 network evaluations per field)."""
    if not str(directory).strip():
        raise SbipipeError("no emulator directory given; use emulator:MODEL_DIR")
    directory = Path(directory)
    if not directory.is_dir():
        raise SbipipeError(f"emulator directory {str(directory)!r} does not exist; train one with `sbipipe emulator train`")
    if not (directory / "card.json").is_file():
        raise SbipipeError(f"{str(directory)!r} is not an emulator directory (no card.json); "
                           "train one with `sbipipe emulator train`")
    card = read_card(directory)
    arch = card.get("architecture", {})
    if arch.get("kind") != KIND:
        raise SbipipeError(f"{str(directory)!r} holds a {arch.get('kind', 'unknown')!r} model, not an emulator; "
                           "train one with `sbipipe emulator train`")
    weights = read_weights(directory)
    try:
        net = UNet(**arch["unet"])
        net.load_state_dict({k[4:]: v for k, v in weights.items() if k.startswith("net.")})
        simc, std = card["simulator"], card["standardisation"]
        shape = tuple(int(s) for s in simc["observation_shape"])
        names = list(simc["parameter_names"])
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise SbipipeError(f"{str(directory)!r}: the card and weights do not match ({type(exc).__name__}); "
                           "retrain the emulator") from None
    base = reference_simulator(simc["name"], simc.get("kwargs"))
    if list(base.parameter_names) != names:
        raise SbipipeError(f"{str(directory)!r} was trained on parameters {names} but simulator {simc['name']!r} "
                           f"now has {list(base.parameter_names)}; retrain the emulator")
    denoiser = Denoiser(net, float(arch["sigma_data"])).eval().requires_grad_(False).to(resolve_device(device))
    return Emulator(denoiser, name=PREFIX + str(directory), version=_weights_version(directory),
                    parameter_names=names, prior=base.prior, shape=shape, field_mean=std["field_mean"],
                    field_scale=std["field_scale"], theta_mean=std["theta_mean"], theta_std=std["theta_std"],
                    transform=std.get("transform", "none"), sigma_max=float(arch.get("sigma_max", 80.0)),
                    sampler="pc" if stochastic else sampler, steps=steps, batch_size=batch_size, base=base,
                    card=card)


def write_emulated(directory: str | os.PathLike, theta: Tensor, n: int, output: str | os.PathLike,
                   sampler: str = "dpm3m", steps: int | None = None, stochastic: bool = False, seed: int = 0,
                   device: str = "cpu", batch_size: int = 256) -> dict[str, Any]:
    """``sbipipe emulator sample`` as a function: ``n`` fields at one θ (``[D]`` or ``[1, D]``,
    checked against the prior), written atomically to HDF5 ``output``: ``x [n, H, W]``,
    ``theta [n, D]``; attributes ``emulator``, ``simulator``, ``parameter_names``, ``sampler``,
    ``steps``, ``evaluations_per_sample``, ``seed``. Returns a JSON-able summary."""
    import h5py

    from .atomic import check_writable

    if n < 1:
        raise SbipipeError(f"-n must be at least 1, got {n}")
    output = check_writable(output)
    emu = load_emulator(directory, device=device, sampler=sampler, steps=steps, stochastic=stochastic,
                        batch_size=batch_size)
    th = emu.check_theta(theta)
    if th.shape[0] != 1:
        raise SbipipeError(f"give one parameter vector, got {th.shape[0]}")
    th = th.expand(n, -1).contiguous()
    t0 = time.perf_counter()
    x = emu.simulate(th, torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - t0
    with atomic_path(output) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("x", data=x.numpy().astype(np.float32), compression="gzip")
        f.create_dataset("theta", data=th.numpy().astype(np.float32))
        f.attrs["emulator"] = emu.name
        f.attrs["emulator_version"] = emu.version
        f.attrs["simulator"] = emu.card["simulator"]["name"]
        f.attrs["parameter_names"] = list(emu.parameter_names)
        f.attrs["sampler"], f.attrs["steps"] = emu.sampler, emu.steps
        f.attrs["evaluations_per_sample"] = emu.evaluations_per_sample
        f.attrs["seed"] = seed
    return {"output": str(output), "n": n, "shape": list(emu.shape), "theta": th[0].tolist(),
            "parameter_names": list(emu.parameter_names), "sampler": emu.sampler, "steps": emu.steps,
            "evaluations_per_sample": emu.evaluations_per_sample, "seconds": round(seconds, 3),
            "mean": float(x.double().mean()), "std": float(x.double().std()) if x.numel() > 1 else 0.0}


# ---------------------------------------------------------------------------------------------
# The check.
# ---------------------------------------------------------------------------------------------


def theta_grid(simulator: Simulator, points: int) -> Tensor:
    """``points``^D parameter values: per parameter the midpoints of ``points`` equal slices of
    the prior's support (bounded priors), else the (i + ½)/points prior quantiles."""
    d = simulator.dim
    support = simulator.prior.support
    base = getattr(support, "base_constraint", support)
    lo, hi = getattr(base, "lower_bound", None), getattr(base, "upper_bound", None)
    frac = (torch.arange(points, dtype=torch.float64) + 0.5) / points
    if lo is not None and hi is not None:
        lo = torch.as_tensor(lo, dtype=torch.float64).expand(d)
        hi = torch.as_tensor(hi, dtype=torch.float64).expand(d)
        axes = [lo[i] + frac * (hi[i] - lo[i]) for i in range(d)]
    else:
        draws = simulator.sample_prior(20_000, torch.Generator().manual_seed(0)).double()
        axes = [torch.quantile(draws[:, i], frac) for i in range(d)]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], 1).float()


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov–Smirnov statistic sup |F_a − F_b| of two samples."""
    a, b = np.sort(np.ravel(a)), np.sort(np.ravel(b))
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / len(a)
    fb = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def _timed(fn: Callable[..., Tensor], *args: Any) -> tuple[Tensor, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def emulator_check(
    directory: str | os.PathLike | Emulator,
    output_dir: str | os.PathLike,
    grid: int = 3,
    n_per_theta: int = 64,
    n_reference: int = 1024,
    sampler: str = "dpm3m",
    steps: int | None = None,
    stochastic: bool = False,
    target: float = 0.03,
    examples: int = 3,
    seed: int = 0,
    device: str = "cpu",
    inference: bool = False,
    inference_options: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Compare the emulator with its simulator over a ``grid``^D grid of θ (:func:`theta_grid`):
    ``n_per_theta`` emulated fields and ``n_reference`` simulated ones per θ. Writes

    * ``metrics.csv``: per θ and k bin the mean power P_sim and P_emu (:func:`binned_power`),
      their ratio and its 1σ sampling error (delta method from the per-field scatter);
    * ``summary.json``: the largest |ratio − 1| over all bins and θ (target ``target``), the same
      in units of the sampling error, per θ the one-point PDF KS distance emulated vs simulated and
      its noise floor (KS between two independent simulated sets of ``n_per_theta`` fields), and
      throughput (fields/s) of emulator and simulator on this machine;
    * ``power_ratio.png``, ``pdf.png``, ``examples.png``;
    * with ``inference``: ``inference.csv`` and a summary entry from :func:`inference_consistency`
      (``inference_options`` are its keyword arguments).

    Returns the summary."""
    from simulators.cosmology import binned_power

    if isinstance(directory, Emulator):
        emu = directory
    else:
        emu = load_emulator(directory, device=device, sampler=sampler, steps=steps, stochastic=stochastic)
    if emu.base is None:
        raise SbipipeError("the check needs the emulator's simulator; load it with load_emulator")
    if grid < 1 or n_per_theta < 2 or n_reference < 2:
        raise SbipipeError(f"need --grid ≥ 1, --n-per-theta ≥ 2 and n_reference ≥ 2; got {grid}, {n_per_theta}, {n_reference}")
    sim = emu.base
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SbipipeError(f"cannot create report directory {str(out)!r}: {exc.strerror}") from None
    box = float(emu.card.get("simulator", {}).get("box", _box(sim, emu.shape[-1])))
    thetas = theta_grid(sim, grid)
    rows, per_theta, pdfs, example_pairs = [], [], [], []
    t_emu = t_sim = 0.0
    n_emu = n_sim = 0
    for i, th in enumerate(thetas):
        gen_e = torch.Generator().manual_seed(seed + 1000 * i)
        gen_s = torch.Generator().manual_seed(seed + 1000 * i + 1)
        x_e, dt = _timed(emu.simulate, th.expand(n_per_theta, -1).contiguous(), gen_e)
        t_emu, n_emu = t_emu + dt, n_emu + n_per_theta
        x_s, dt = _timed(sim.simulate, th.expand(n_reference, -1).contiguous(), gen_s)
        t_sim, n_sim = t_sim + dt, n_sim + n_reference
        x_f = sim.simulate(th.expand(n_per_theta, -1).contiguous(), torch.Generator().manual_seed(seed + 1000 * i + 2))
        k, p_e, counts = binned_power(x_e, box)
        _, p_s, _ = binned_power(x_s, box)
        me, ms = p_e.mean(0), p_s.mean(0)
        ratio = me / ms
        err = ratio * torch.sqrt(p_e.var(0) / (n_per_theta * me**2) + p_s.var(0) / (n_reference * ms**2))
        ks = ks_distance(x_e.numpy(), x_s[:n_per_theta].numpy())
        ks_floor = ks_distance(x_f.numpy(), x_s[:n_per_theta].numpy())
        dev = (ratio - 1).abs()
        for j in range(len(k)):
            rows.append({"theta_index": i, **{n: float(th[d]) for d, n in enumerate(emu.parameter_names)},
                         "k": float(k[j]), "modes": int(counts[j]), "power_sim": float(ms[j]),
                         "power_emu": float(me[j]), "ratio": float(ratio[j]), "ratio_err": float(err[j]),
                         "ks": ks, "ks_floor": ks_floor})
        per_theta.append({"theta": th.tolist(), "max_abs_dev": float(dev.max()),
                          "worst_k": float(k[int(dev.argmax())]),
                          "max_dev_over_err": float((dev / err.clamp_min(1e-30)).max()),
                          "ks": ks, "ks_floor": ks_floor,
                          "mean_emu": float(x_e.double().mean()), "mean_sim": float(x_s.double().mean()),
                          "std_emu": float(x_e.double().std()), "std_sim": float(x_s.double().std())})
        pdfs.append((th, x_e.numpy().ravel(), x_s[:n_per_theta].numpy().ravel()))
        if i in _example_indices(len(thetas), examples):
            example_pairs.append((th, x_e[0], x_s[0]))
        if progress is not None:
            progress(i + 1, len(thetas))
    import pandas as pd

    table = pd.DataFrame(rows)
    with atomic_path(out / "metrics.csv") as tmp:
        table.to_csv(tmp, index=False)
    worst = max(per_theta, key=lambda r: r["max_abs_dev"])
    summary = {
        "emulator": emu.name, "simulator": sim.name, "simulator_kwargs": emu.card.get("simulator", {}).get("kwargs", {}),
        "grid": grid, "thetas": len(thetas), "n_per_theta": n_per_theta, "n_reference": n_reference,
        "sampler": {"method": SAMPLER_NAMES[emu.sampler], "name": emu.sampler, "steps": emu.steps, "evaluations_per_sample": emu.evaluations_per_sample},
        "power": {"target": target, "max_abs_dev": worst["max_abs_dev"], "worst_theta": worst["theta"],
                  "worst_k": worst["worst_k"], "max_dev_over_err": max(r["max_dev_over_err"] for r in per_theta),
                  "bins": int(len(table) // len(thetas)), "meets_target": bool(worst["max_abs_dev"] <= target)},
        "ks": {"max": max(r["ks"] for r in per_theta), "mean": float(np.mean([r["ks"] for r in per_theta])),
               "floor_max": max(r["ks_floor"] for r in per_theta)},
        "throughput": {"device": str(emu.device), "threads": torch.get_num_threads(),
                       "emulator_per_s": n_emu / t_emu, "simulator_per_s": n_sim / t_sim,
                       "emulator_seconds": round(t_emu, 2), "simulator_seconds": round(t_sim, 3)},
        "per_theta": per_theta,
        "files": ["metrics.csv", "summary.json", "power_ratio.png", "pdf.png", "examples.png"],
    }
    _plots(out, table, pdfs, example_pairs, emu.parameter_names, target)
    if inference:
        summary["inference"] = inference_consistency(emu, out / "inference", seed=seed, **dict(inference_options or {}))
        summary["files"].append("inference/inference.csv")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def inference_consistency(
    emulator: Emulator,
    output_dir: str | os.PathLike,
    n_train: int = 5000,
    observations: int = 3,
    n_posterior: int = 1000,
    embedding: str = "auto",
    max_epochs: int | None = None,
    reference_options: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    r"""Does inference on emulated fields agree with inference on simulated ones? Simulate a bank
    of ``n_train`` rows with the simulator and one with the emulator (same θ draws: same seed),
    train one NPE on each (:func:`sbipipe.npe.train_posterior`, same settings), and for
    ``observations`` *simulated* observations at θ drawn from the prior compare both NPEs'
    ``n_posterior`` draws with the exact reference posterior (:func:`sbipipe.reference.reference_posterior`,
    the simulator's likelihood) by C2ST (:func:`sbipipe.c2st.c2st`; 0.5 = indistinguishable).
    Target: the emulator-trained NPE's C2ST within 0.05 of the simulator-trained one's. Writes
    ``output_dir/inference.csv`` (one row per observation) and returns a summary."""
    import pandas as pd

    from .bank import simulate_bank
    from .c2st import c2st
    from .npe import train_posterior
    from .reference import reference_posterior
    from .simulator import has_likelihood

    sim = emulator.base
    if sim is None or not has_likelihood(sim):
        raise SbipipeError("the inference check needs the emulator's simulator with an exact log_likelihood")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    banks = {}
    for label, source in (("simulated", sim), ("emulated", emulator)):
        path = out / f"bank_{label}.h5"
        if path.exists():
            path.unlink()
        # chunks no larger than the bank: simulate_bank draws whole chunks (10,000 rows by default)
        banks[label] = simulate_bank(source, path, n_train, seed=seed, chunk_size=min(n_train, 1000))
    seconds_banks = time.perf_counter() - t0
    posts = {label: train_posterior(banks[label].path, out / f"npe_{label}", embedding=embedding, device="cpu",
                                    max_epochs=max_epochs, seed=seed) for label in banks}
    seconds_npe = time.perf_counter() - t0 - seconds_banks
    gen = torch.Generator().manual_seed(seed + 77)
    theta_obs = sim.sample_prior(observations, gen)
    x_obs = sim.simulate(theta_obs, gen)
    rows = []
    for i in range(observations):
        ref = reference_posterior(sim, x_obs[i], n=n_posterior, seed=seed + i, **dict(reference_options or {}))
        row: dict[str, Any] = {"observation": i, **{n: float(theta_obs[i, d]) for d, n in enumerate(sim.parameter_names)},
                               "reference_converged": bool(ref.diagnostics.get("converged", True))}
        for label, post in posts.items():
            draws = post.sample(x_obs[i], n_posterior, seed=seed + i)
            row[f"c2st_{label}"] = float(c2st(draws, ref.samples, seed=seed + 1))
        row["c2st_difference"] = row["c2st_emulated"] - row["c2st_simulated"]
        rows.append(row)
    table = pd.DataFrame(rows)
    with atomic_path(out / "inference.csv") as tmp:
        table.to_csv(tmp, index=False)
    worst = float(table["c2st_difference"].abs().max())
    return {"n_train": n_train, "observations": observations, "n_posterior": n_posterior,
            "c2st_simulated_mean": float(table["c2st_simulated"].mean()),
            "c2st_emulated_mean": float(table["c2st_emulated"].mean()),
            "max_abs_difference": worst, "target": 0.05, "meets_target": bool(worst <= 0.05),
            "embedding": posts["emulated"].card["architecture"]["embedding"],
            "seconds_banks": round(seconds_banks, 1), "seconds_npe": round(seconds_npe, 1),
            "seconds": round(time.perf_counter() - t0, 1)}


def _example_indices(n: int, k: int) -> set[int]:
    if k <= 0:
        return set()
    return {round(float(v)) for v in np.linspace(0, n - 1, min(k, n))}


def _label(th: Tensor, names: Sequence[str]) -> str:
    return ", ".join(f"{n}={float(v):.3g}" for n, v in zip(names, th))


def _plots(out: Path, table: Any, pdfs: list, examples: list, names: Sequence[str], target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, part in table.groupby("theta_index"):
        th = [part[n].iloc[0] for n in names]
        ax.errorbar(part["k"], part["ratio"], yerr=part["ratio_err"], marker="o", ms=3, capsize=2,
                    label=_label(torch.tensor(th), names))
    ax.axhspan(1 - target, 1 + target, color="0.85", zorder=0, label=f"±{target:.0%}")
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xlabel("k")
    ax.set_ylabel("P_emulated / P_simulated")
    ax.set_title("mean power spectrum ratio per k bin (±1σ sampling error)")
    ax.legend(fontsize=6, ncol=2)
    save(fig, "power_ratio.png")

    cols = min(3, len(pdfs))
    rows = math.ceil(len(pdfs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (th, e, s) in zip(axes.ravel(), pdfs):
        lo, hi = np.quantile(s, [0.0005, 0.9995])
        bins = np.linspace(lo, hi, 60)
        ax.hist(s, bins, density=True, histtype="step", label="simulated", log=True)
        ax.hist(e, bins, density=True, histtype="step", label="emulated", log=True)
        ax.set_title(_label(th, names), fontsize=7)
    for ax in axes.ravel()[len(pdfs):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=6)
    save(fig, "pdf.png")

    fig, axes = plt.subplots(max(1, len(examples)), 2, figsize=(5.5, 2.7 * max(1, len(examples))), squeeze=False)
    for r, (th, e, s) in enumerate(examples):
        v = float(max(s.abs().max(), 1e-12))
        for c, (img, title) in enumerate(((s, "simulated"), (e, "emulated"))):
            im = axes[r, c].imshow(img.numpy(), origin="lower", cmap="RdBu_r", vmin=-v, vmax=v)
            axes[r, c].set_title(f"{title}: {_label(th, names)}", fontsize=7)
            axes[r, c].axis("off")
        fig.colorbar(im, ax=axes[r, 1], fraction=0.046)
    save(fig, "examples.png")
