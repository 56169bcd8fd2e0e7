"""``infer``: the posterior of a submitted observation under a registered model.

Checks the observation (allowed folder, readable, shape, finite numbers), samples, writes
``samples.h5`` + its CSV summary under ``HOME/results/RUN_ID/``, publishes the summary, the
per-parameter table and a corner plot, and returns (persisted, as JSON) the summary."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.runtime import flow_run

from sbipipe.errors import SbipipeError
from sbipipe.inference import cached_posterior, check_observation_file, infer_observation
from sbipipe.models import get_model, list_models
from sbipipe.service import check_allowed, project_home

from ._artifacts import artifact_key, fmt, markdown_table, png_data_uri, publish_image, publish_markdown, publish_table

__all__ = ["check_observation", "infer", "sample_posterior", "warm_up"]

_COLUMNS = ["parameter", "mean", "std", "q05", "q50", "q95"]


def _check_name() -> str:
    from prefect.runtime import task_run

    return f"check {Path(str(task_run.parameters['observation'])).name}"


@task(name="check-observation", task_run_name=_check_name)
def check_observation(model: str, observation: str) -> dict[str, Any]:
    """The registered model's entry and the checked observation (path, SHA-256, count, shape)."""
    entry = get_model(model)
    path = check_allowed(observation)
    return {"entry": entry, **check_observation_file(entry["model"], path), "observation": str(path)}


@task(name="sample-posterior", task_run_name="sample {n_samples} per observation")
def sample_posterior(model_dir: str, observation: str, output: str, n_samples: int, seed: int,
                     plot: bool) -> dict[str, Any]:
    out = Path(output)
    return infer_observation(model_dir, observation, out / "samples.h5", n_samples=n_samples, seed=seed,
                             plot_path=out / "corner.png" if plot else None)


def _acceptance_row(result: dict[str, Any]) -> str:
    """A table row with a truncated posterior's acceptance (the lowest over a stack), else nothing."""
    acc = result["acceptance"]
    return "" if acc is None else f"| acceptance (truncated to the prior) | {min(acc):.3f} |\n"


def _run_name() -> str:
    p = flow_run.parameters
    return f"infer {p.get('model')}: {Path(str(p.get('observation'))).name}"


@flow(name="infer", flow_run_name=_run_name, persist_result=True, result_serializer="json")
def infer(model: str, observation: str, n_samples: int = 10_000, seed: int = 0, plot: bool = True) -> dict[str, Any]:
    """Posterior samples and summary for an observation file (one observation or a stack)."""
    checked = check_observation(model, observation)
    entry = checked["entry"]
    run_id = str(flow_run.get_id() or uuid.uuid4())
    result = sample_posterior(entry["model"], checked["observation"], str(project_home() / "results" / run_id),
                              n_samples, seed, plot)
    label = f"{entry['name']}:{entry['version']}"
    many = result["observations"] > 1
    columns = (["observation"] if many else []) + _COLUMNS
    rows = [{c: r[c] for c in columns} for r in result["summary"]]
    report = f", report `{entry['report']}`" if entry.get("report") else ""
    publish_markdown(
        f"# Posterior: {Path(checked['observation']).name} with {label}\n\n"
        f"| item | value |\n|---|---|\n| model | {label} ({entry['model']}) |\n"
        f"| simulator | {result['simulator']} v{result['simulator_version']} |\n"
        f"| observation | `{checked['observation']}` ({checked['count']} x {checked['shape']}, "
        f"sha256 `{checked['sha256'][:12]}`) |\n"
        f"| samples | {fmt(n_samples)} per observation: `{result['samples']}` |\n"
        f"{_acceptance_row(result)}"
        f"| validation verdict | **{entry.get('verdict', 'not validated')}**{report} |\n\n"
        f"## Posterior summary\n\n{markdown_table(rows, columns)}\n"
        + (f"\n![corner plot]({png_data_uri(result['corner'])})\n" if result["corner"] else ""),
        key=artifact_key("infer", entry["name"]), description="posterior summary")
    publish_table(rows, key=artifact_key("posterior", entry["name"]), description="per-parameter posterior summary")
    if result["corner"]:
        publish_image(result["corner"], key=artifact_key("corner", entry["name"]), description="corner plot")
    return {**result, "model": label, "observation": checked["observation"], "observation_sha256": checked["sha256"],
            "verdict": entry.get("verdict"), "flow_run_id": run_id}


def warm_up() -> None:
    """Load the latest version of every registered model and the plotting code (a serving
    process does this once, so that the first run is as fast as the next)."""
    import sbipipe.plots  # noqa: F401

    for entry in {e["name"]: e for e in list_models()}.values():
        try:
            cached_posterior(entry["model"])
        except SbipipeError:
            pass
