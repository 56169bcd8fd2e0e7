"""``sbipipe emulator``: train, sample and check a conditional diffusion emulator p(x | θ)
(:mod:`sbipipe.emulator`; registered in :mod:`sbipipe.cli`). Heavy imports happen inside the
commands, so ``sbipipe --help`` stays fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .errors import SbipipeError

__all__ = ["emulator_app", "parse_options"]

emulator_app = typer.Typer(help="Conditional diffusion emulators p(x | theta) that stand in for image simulators.",
                           no_args_is_help=True)


def _say(text: str) -> None:
    print(text, flush=True)


def parse_options(text: str | None) -> dict[str, Any]:
    """``"n=32,box=125"`` → ``{"n": 32, "box": 125}`` (values read as JSON, else kept as text)."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise SbipipeError(f"--simulator-kwargs: bad item {part!r}; expected name=value, e.g. n=32")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out


def _channels(text: str) -> tuple[int, ...]:
    try:
        chans = tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise SbipipeError(f"--channels must be integers separated by commas, e.g. 16,32,64; got {text!r}") from None
    if not chans or min(chans) < 1:
        raise SbipipeError(f"--channels must be positive integers, e.g. 16,32,64; got {text!r}")
    return chans


@emulator_app.command("train")
def train_cmd(
    bank: Annotated[Path, typer.Argument(help="Simulation bank (.h5) of image fields [N, H, W].")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Model directory to write.")],
    epochs: Annotated[int, typer.Option(help="Epochs (cosine learning-rate decay over them).")] = 20,
    batch_size: Annotated[int, typer.Option(help="Fields per optimiser step.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 1e-3,
    channels: Annotated[str, typer.Option(help="U-Net channels per resolution level, comma-separated.")] = "32,64,64",
    ema_decay: Annotated[float, typer.Option(help="EMA decay of the kept weights.")] = 0.999,
    transform: Annotated[str, typer.Option(help="none, or log1p (model log(1+x); fields > -1, e.g. lognormal).")] = "none",
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Random flips, transposes and circular shifts (periodic isotropic fields).")] = True,
    samples_per_epoch: Annotated[Optional[int], typer.Option(help="Random rows per epoch (default: all training rows).")] = None,
    max_rows: Annotated[Optional[int], typer.Option(help="Use at most this many training rows.")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(help="Time budget: later epochs train on nothing.")] = None,
    simulator_kwargs: Annotated[Optional[str], typer.Option(help="Options that rebuild the bank's simulator, e.g. n=32 for a 32x32 cosmology bank.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted training.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation, the batches and the noise.")] = 0,
) -> None:
    """Train a conditional diffusion emulator on a bank (circular U-Net, EDM preconditioning, EMA)."""
    from .emulator import train_emulator
    from .progress import epoch_progress

    if max_minutes is not None and max_minutes <= 0:
        raise SbipipeError(f"--max-minutes must be positive, got {max_minutes}")
    with epoch_progress("train emulator") as report:
        emu = train_emulator(bank, output, epochs=epochs, batch_size=batch_size, lr=lr, channels=_channels(channels),
                             ema_decay=ema_decay, transform=transform, augment=augment,
                             samples_per_epoch=samples_per_epoch, max_rows=max_rows,
                             max_seconds=None if max_minutes is None else 60 * max_minutes,
                             simulator_kwargs=parse_options(simulator_kwargs), seed=seed, device=device,
                             resume=resume, progress=lambda row: report(0, row))
    tr = emu.card["training"]
    _say(f"{output}: emulator of {emu.card['simulator']['name']} {list(emu.shape)} trained on {tr['train_rows']} "
         f"fields in {tr['seconds']:.1f} s; best validation loss {tr['best_val_loss']:.4f} ({tr['epochs_trained']} "
         f"epochs); use it as simulator emulator:{output}")


@emulator_app.command("sample")
def sample_cmd(
    model: Annotated[Path, typer.Argument(help="Emulator directory (`sbipipe emulator train`).")],
    theta: Annotated[str, typer.Option(help="Parameters, comma-separated, e.g. 0.3,0.8.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="HDF5 file: x [N, H, W] and theta [N, D].")],
    n: Annotated[int, typer.Option("-n", help="Number of fields.")] = 16,
    sampler: Annotated[str, typer.Option(help="dpm3m (DPM-Solver++(3M) ODE), heun (Heun ODE) or pc (stochastic).")] = "dpm3m",
    steps: Annotated[Optional[int], typer.Option(help="Noise levels (default 49 dpm3m, 25 heun/pc: <= 50 network evaluations).")] = None,
    stochastic: Annotated[bool, typer.Option("--stochastic", help="Stochastic predictor-corrector sampler (= --sampler pc).")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
) -> None:
    """Draw fields from a trained emulator at one parameter value."""
    from .emulator import load_emulator, write_emulated
    from .observations import parse_theta

    values = parse_theta(theta, load_emulator(model))
    r = write_emulated(model, values, n, output, sampler=sampler, steps=steps, stochastic=stochastic, seed=seed,
                       device=device)
    _say(f"{output}: {n} emulated fields {r['shape']} at {', '.join(f'{k}={v:.6g}' for k, v in zip(r['parameter_names'], r['theta']))} "
         f"({r['sampler']}, {r['evaluations_per_sample']} network evaluations each, {r['seconds']:.2f} s); "
         f"mean {r['mean']:.4g}, std {r['std']:.4g}")


@emulator_app.command("check")
def check_cmd(
    model: Annotated[Path, typer.Argument(help="Emulator directory (`sbipipe emulator train`).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Report directory.")],
    grid: Annotated[int, typer.Option(help="Grid points per parameter over the prior.")] = 3,
    n_per_theta: Annotated[int, typer.Option(help="Emulated fields per grid point.")] = 64,
    n_reference: Annotated[int, typer.Option(help="Simulated fields per grid point.")] = 1024,
    sampler: Annotated[str, typer.Option(help="dpm3m, heun or pc.")] = "dpm3m",
    steps: Annotated[Optional[int], typer.Option(help="Noise levels of the sampler (default: <= 50 evaluations).")] = None,
    stochastic: Annotated[bool, typer.Option("--stochastic", help="Check the stochastic sampler (= --sampler pc).")] = False,
    target: Annotated[float, typer.Option(help="Tolerance on |P_emu/P_sim - 1| in every k bin.")] = 0.03,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    inference: Annotated[bool, typer.Option("--inference", help="Also train NPEs on emulated and on simulated banks and compare their C2ST against exact reference posteriors (slow).")] = False,
    inference_sims: Annotated[int, typer.Option(help="Rows of each bank of the inference check.")] = 5000,
    inference_observations: Annotated[int, typer.Option(help="Simulated observations of the inference check.")] = 3,
) -> None:
    """Compare emulated and simulated fields: power spectrum ratio per k bin, one-point PDF, throughput."""
    from .emulator import emulator_check
    from .progress import row_progress

    with row_progress("emulator check") as update:
        s = emulator_check(model, output, grid=grid, n_per_theta=n_per_theta, n_reference=n_reference, sampler=sampler,
                           steps=steps, stochastic=stochastic, target=target, seed=seed, device=device, inference=inference,
                           inference_options={"n_train": inference_sims, "observations": inference_observations},
                           progress=update)
    p, ks, tp = s["power"], s["ks"], s["throughput"]
    verdict = "meets" if p["meets_target"] else "does NOT meet"
    _say(f"{output}: max |P_emu/P_sim - 1| = {p['max_abs_dev']:.4f} over {s['thetas']} thetas x {p['bins']} k bins "
         f"({verdict} the {p['target']:.0%} target; {p['max_dev_over_err']:.1f} sigma); one-point KS max "
         f"{ks['max']:.4f} (noise floor {ks['floor_max']:.4f}); {tp['emulator_per_s']:.1f} emulated vs "
         f"{tp['simulator_per_s']:.0f} simulated fields/s on {tp['device']}")
    if inference:
        inf = s["inference"]
        _say(f"inference: C2ST against the exact posterior {inf['c2st_emulated_mean']:.3f} (NPE on emulated fields) vs "
             f"{inf['c2st_simulated_mean']:.3f} (on simulated), largest difference {inf['max_abs_difference']:.3f} "
             f"({'meets' if inf['meets_target'] else 'does NOT meet'} the 0.05 target)")
