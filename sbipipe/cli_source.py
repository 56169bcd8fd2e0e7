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
    from .atomic import check_writable
    from .errors import SbipipeError
    from .observations import load_observation
    from .progress import row_progress
    from .source_posterior import (
        ConvolvedLikelihood,
        lens_matrix,
        load_source_prior,
        parse_lens,
        sample_source_posterior,
        write_source_posterior,
    )

    if n < 1:
        raise SbipipeError(f"-n must be at least 1, got {n}")
    if noise_std <= 0:
        raise SbipipeError(f"--noise-std must be positive, got {noise_std}")
    check_writable(output)
    lens_params = parse_lens(lens)
    src_prior = load_source_prior(prior, device=device)
    matrix, _, shape = lens_matrix(lens_params, src_prior.pixels, src_prior.pixel_scale)
    x = load_observation(observation, shape=shape, name="lensed image")
    if len(x) != 1:
        raise SbipipeError(f"{str(observation)!r} holds {len(x)} images; give one observation")
    like = ConvolvedLikelihood(matrix, x[0], noise_std, src_prior.data_scale, device=src_prior.device)
    with row_progress("source posterior") as update:
        post = sample_source_posterior(src_prior, like, n, steps=steps, corrector_steps=corrector_steps, snr=snr,
                                       seed=seed, progress=update)
    attrs = {"prior": str(prior), "observation": str(observation), "noise_std": noise_std,
             "pixel_scale": src_prior.pixel_scale, **{f"lens_{k}": v for k, v in lens_params.items()}}
    write_source_posterior(output, post, x[0], attrs)
    if plot is not None:
        _plot(plot, x[0], post, matrix, src_prior.pixel_scale, noise_std)
    chi2 = post.chi2_per_pixel
    _say(f"{output}: {n} source samples [{src_prior.pixels}x{src_prior.pixels}] of {src_prior.pixel_scale}\"; "
         f"chi2/pixel of the posterior mean {post.chi2_mean:.3f}, of the samples {float(chi2.mean()):.3f} "
         f"(min {float(chi2.min()):.3f}, max {float(chi2.max()):.3f}); total flux "
         f"{float(post.samples.sum((1, 2)).mean()):.1f} +- {float(post.samples.sum((1, 2)).std()):.1f}"
         + (f"; plot {plot}" if plot else ""))


def _plot(path: Path, observation, post, matrix, pixel_scale: float, noise_std: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from .atomic import atomic_path

    model = (matrix.float() @ post.mean.reshape(-1).float()).reshape(observation.shape)
    half = post.mean.shape[-1] * pixel_scale / 2
    panels = [("observation", observation, None), ("posterior mean", post.mean, half),
              ("posterior std", post.std, half), ("sample 1", post.samples[0], half),
              ("residual / sigma", (observation - model) / noise_std, None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    for ax, (title, img, h) in zip(axes, panels):
        kw = {"extent": (-h, h, -h, h)} if h else {}
        if title.startswith("residual"):
            im = ax.imshow(img.numpy(), origin="lower", cmap="RdBu_r", vmin=-3, vmax=3, **kw)
        else:
            im = ax.imshow(torch.as_tensor(img).numpy(), origin="lower", cmap="magma", **kw)
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
