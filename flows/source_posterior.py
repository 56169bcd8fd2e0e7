"""``source-posterior``: the source image behind a known lens, sampled with a score-based prior
(``sbipipe source-posterior`` as a flow). The sampling runs in a ``gpu``-tagged task on CUDA when
present; it writes OUT.h5 (and OUT.png, the 5-panel plot) and the flow publishes a summary and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from ._artifacts import (
    artifact_key,
    fmt,
    png_data_uri,
    publish_image,
    publish_markdown,
    run_names,
    short_path,
)

__all__ = ["sample_source", "source_posterior"]


def _name(parameters: dict[str, Any]) -> str:
    return f"source posterior of {short_path(parameters['observation'])}"


_task_name, _flow_name = run_names(_name)


@task(name="sample-source-posterior", task_run_name=_task_name, tags=["gpu"])
def sample_source(prior: str, lens: str, observation: str, output: str, n: int, steps: int, corrector_steps: int,
                  snr: float, noise_std: float, seed: int, device: str, plot: str | None) -> dict[str, Any]:
    """:func:`sbipipe.source_posterior.reconstruct_source` on CUDA when present (``device="auto"``);
    the ``gpu`` tag limit keeps one such task per GPU."""
    from sbipipe.source_posterior import reconstruct_source
    from sbipipe.training import resolve_device

    log = get_run_logger()
    dev = resolve_device(device)
    log.info("sampling %d source images for %s on %s", n, observation, dev)

    def progress(done: int, total: int) -> None:  # noise levels over all batches; log every 10 %
        if 10 * done // total > 10 * (done - 1) // total:
            log.info("%d / %d noise levels", done, total)

    return reconstruct_source(prior, lens, observation, output, n=n, steps=steps, corrector_steps=corrector_steps,
                              snr=snr, noise_std=noise_std, seed=seed, device=str(dev), plot=plot, progress=progress)


@flow(name="source-posterior", flow_run_name=_flow_name)
def source_posterior(prior: str, lens: str, observation: str, output: str, n: int = 16, steps: int = 100,
                     corrector_steps: int = 3, snr: float = 0.3, noise_std: float = 1.0, seed: int = 0,
                     device: str = "auto", plot: bool = True) -> dict[str, Any]:
    """Posterior source samples for one lensed image (``lens``: ``theta_E=1.1,e1=...`` or a JSON
    file such as OBS.truth.json); writes ``output`` (HDF5, as the CLI) and, with ``plot``, the
    PNG beside it (``.png``)."""
    png = str(Path(output).with_suffix(".png")) if plot else None
    r = sample_source(prior, lens, observation, output, n, steps, corrector_steps, snr, noise_std, seed, device, png)
    lens_text = ", ".join(f"{k}={v:g}" for k, v in r["lens"].items())
    chi2 = r["chi2_samples"]
    publish_markdown(
        f"# Source posterior: {Path(observation).name}\n\n| item | value |\n|---|---|\n"
        f"| prior | `{prior}` ({r['pixels']}x{r['pixels']} of {fmt(r['pixel_scale'])}\") |\n"
        f"| lens | {lens_text} |\n| observation | `{observation}` |\n"
        f"| samples | {n}: `{r['output']}` |\n"
        f"| chi2/pixel of the posterior mean | **{r['chi2_mean']:.3f}** |\n"
        f"| chi2/pixel of the samples | {chi2['mean']:.3f} (min {chi2['min']:.3f}, max {chi2['max']:.3f}) |\n"
        f"| total flux | {r['flux']['mean']:.1f} +- {r['flux']['std']:.1f} |\n"
        f"| sampler | {steps} levels x {corrector_steps} corrector steps, snr {snr}, seed {seed}, {r['device']}, "
        f"{r['seconds']:.1f} s |\n"
        + (f"\n![observation, posterior mean, std, a sample, residuals]({png_data_uri(png)})\n" if png else ""),
        key=artifact_key("source-posterior", Path(output).stem), description="source posterior summary")
    if png:
        publish_image(png, key=artifact_key("source-plot", Path(output).stem),
                      description="observation, posterior mean, std, a sample, residuals")
    return r
