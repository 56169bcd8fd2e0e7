"""Commands of the score-based source prior: ``sbipipe source-prior train`` and
``sbipipe source-posterior`` (registered in :mod:`sbipipe.cli`). Heavy imports happen inside the
commands, so ``sbipipe --help`` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

__all__ = ["prior_app", "source_posterior_cmd"]

prior_app = typer.Typer(help="Score-based priors of lensed-source images.", no_args_is_help=True)


def _say(text: str) -> None:
    print(text, flush=True)


@prior_app.command("train")
def train_prior_cmd(
    output: Annotated[Path, typer.Option("-o", "--output", help="Model directory to write.")],
    images: Annotated[int, typer.Option(help="Synthetic galaxies to draw (10 % held out for validation).")] = 6000,
    epochs: Annotated[int, typer.Option(help="Training epochs (cosine learning-rate decay over them).")] = 4,
    batch_size: Annotated[int, typer.Option(help="Images per optimiser step.")] = 16,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 1e-3,
    channels: Annotated[str, typer.Option(help="U-Net channels per resolution level, comma-separated.")] = "16,32,32,64",
    ema_decay: Annotated[float, typer.Option(help="EMA decay of the kept weights.")] = 0.995,
    pixels: Annotated[int, typer.Option(help="Source grid side (pixels).")] = 64,
    pixel_scale: Annotated[float, typer.Option(help="Source pixel size (arcsec).")] = 0.04,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted training.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the galaxies, the initialisation and the batches.")] = 0,
) -> None:
    """Train a diffusion prior of source galaxies on synthetic images (simulators/galaxies.py)."""
    from .errors import SbipipeError
    from .progress import epoch_progress
    from .source_posterior import train_source_prior

    try:
        chans = tuple(int(c) for c in channels.split(",") if c.strip())
    except ValueError:
        raise SbipipeError(f"--channels must be integers separated by commas, e.g. 16,32,32,64; got {channels!r}") from None
    if not chans or min(chans) < 1:
        raise SbipipeError(f"--channels must be positive integers, e.g. 16,32,32,64; got {channels!r}")
    with epoch_progress("train source prior") as report:
        prior = train_source_prior(output, images=images, epochs=epochs, batch_size=batch_size, lr=lr, channels=chans,
                                   ema_decay=ema_decay, pixels=pixels, pixel_scale=pixel_scale, device=device,
                                   resume=resume, seed=seed, progress=lambda row: report(0, row))
    tr = prior.card["training"]
    _say(f"{output}: source prior ({pixels}x{pixels} of {pixel_scale}\") trained on {images} galaxies in "
         f"{tr['seconds']:.1f} s; best validation loss {tr['best_val_loss']:.4f} ({tr['epochs']} epochs)")


def source_posterior_cmd(
    prior: Annotated[Path, typer.Option(help="Source-prior model directory (`sbipipe source-prior train`).")],
    lens: Annotated[str, typer.Option(help="Lens: theta_E=1.1,e1=..,e2=..,x0=..,y0=..,gamma1=..,gamma2=.. or a JSON file (e.g. OBS.truth.json).")],
    observation: Annotated[Path, typer.Option(help="One 64x64 lensed image (.npy, .csv or .h5), noise sigma = 1.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Samples file (.h5).")],
    n: Annotated[int, typer.Option("-n", help="Number of posterior samples.")] = 16,
    steps: Annotated[int, typer.Option(help="Noise levels of the reverse SDE.")] = 100,
    corrector_steps: Annotated[int, typer.Option(help="Langevin corrector steps per level.")] = 3,
    snr: Annotated[float, typer.Option(help="Signal-to-noise ratio of the Langevin steps.")] = 0.3,
    noise_std: Annotated[float, typer.Option(help="Pixel noise sigma of the observation.")] = 1.0,
    plot: Annotated[Optional[Path], typer.Option(help="PNG: observation, posterior mean, std, a sample, residuals.")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (the prior network).")] = "cpu",
) -> None:
    """Posterior samples of the source image behind a known lens, with a score-based prior."""
    from .progress import row_progress
    from .source_posterior import reconstruct_source

    with row_progress("source posterior") as update:
        r = reconstruct_source(prior, lens, observation, output, n=n, steps=steps, corrector_steps=corrector_steps,
                               snr=snr, noise_std=noise_std, seed=seed, device=device, plot=plot, progress=update)
    chi2 = r["chi2_samples"]
    _say(f"{output}: {n} source samples [{r['pixels']}x{r['pixels']}] of {r['pixel_scale']}\"; "
         f"chi2/pixel of the posterior mean {r['chi2_mean']:.3f}, of the samples {chi2['mean']:.3f} "
         f"(min {chi2['min']:.3f}, max {chi2['max']:.3f}); total flux "
         f"{r['flux']['mean']:.1f} +- {r['flux']['std']:.1f}" + (f"; plot {plot}" if plot else ""))
