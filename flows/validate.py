"""``validate``: the validation suite on a held-out bank; metrics table, verdict and plots in the UI.

Validates a model directory (as the pipeline does), a registered model (``NAME`` or
``NAME:VERSION``; the verdict is recorded in the registry), or with neither every registered
model's latest version (the nightly re-validation)."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task

from sbipipe.models import get_model, list_models, set_verdict
from sbipipe.service import project_home

from ._artifacts import artifact_key, markdown_table, publish_image, publish_markdown, publish_table

__all__ = ["publish_validation", "test_bank", "validate", "validate_model_task"]

TEST_SEED_OFFSET = 1_000_003  # the test bank's seed is the training seed plus this


@task(name="simulate-test-bank", task_run_name="test bank: {n} rows of {simulator}")
def test_bank(simulator: str, n: int, seed: int) -> str:
    """A held-out bank (reused by later validations of the same simulator and seed)."""
    from sbipipe.bank import simulate_bank
    from sbipipe.registry import get_simulator

    sim = get_simulator(simulator)
    path = project_home() / "banks" / "test" / f"{sim.name}-v{sim.version}-seed{seed}.h5"
    simulate_bank(simulator, path, n, seed=seed)
    return str(path)


@task(name="validate-model", task_run_name="validate {label}", tags=["gpu"])
def validate_model_task(model_dir: str, bank: str, report_dir: str, n_sims: int, n_samples: int, seed: int,
                        label: str, device: str = "auto") -> dict[str, Any]:
    """Run the suite on CUDA when present; returns the report's summary."""
    from sbipipe.training import resolve_device
    from sbipipe.validation import validate_model

    dev = resolve_device(device)
    get_run_logger().info("validating %s on %s (device %s)", model_dir, bank, dev)
    summary = validate_model(model_dir, bank, report_dir, n_sims=n_sims, n_samples=n_samples, seed=seed,
                             device=str(dev))
    return {**summary, "report": str(Path(report_dir).resolve())}


def publish_validation(label: str, summary: dict[str, Any]) -> None:
    """The verdict as markdown, the metrics as a table, the plots as images."""
    report = Path(summary["report"])
    verdict = "PASSED" if summary["calibrated"] else "FAILED"
    failing = "".join(f"\n- {f}" for f in summary.get("failing", [])) or "\n- none"
    contraction = summary.get("contraction") or {}
    rows = [{"parameter": k, "contraction": v} for k, v in contraction.items()] if isinstance(contraction, dict) else []
    publish_markdown(
        f"# Validation of {label}: {verdict}\n\nSimulator {summary.get('simulator')} v{summary.get('simulator_version')}, "
        f"{summary.get('n_sims')} test simulations x {summary.get('n_samples')} posterior samples; report `{report}`.\n\n"
        f"## Failing checks{failing}\n\n## Posterior contraction\n\n{markdown_table(rows)}\n",
        key=artifact_key("validation", label), description=f"validation verdict: {verdict}")
    metrics = report / "metrics.csv"
    if metrics.is_file():
        publish_table(pd.read_csv(metrics).to_dict("records"), key=artifact_key("metrics", label),
                      description=f"validation metrics of {label}")
    for name, path in sorted(summary.get("plots", {}).items()):
        if Path(path).is_file():
            publish_image(path, key=artifact_key(name.replace("_", "-"), label), description=f"{name} plot of {label}")


def _run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    what = p.get("model") or (Path(p["model_dir"]).parent.name if p.get("model_dir") else "all registered models")
    return f"validate {what}"


@flow(name="validate", flow_run_name=_run_name)
def validate(model: str | None = None, model_dir: str | None = None, report_dir: str | None = None,
             n_sims: int = 1000, n_samples: int = 1000, seed: int = 0, label: str | None = None) -> list[dict[str, Any]]:
    """Validate and publish; registered models get their verdict recorded. ``label`` names a
    ``model_dir`` in the UI (default: its run folder)."""
    from sbipipe.store import read_card

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    if model_dir is not None:
        jobs = [(label or Path(model_dir).resolve().parent.name, model_dir,
                 report_dir or str(Path(model_dir).parent / "report"), None)]
    else:
        entries = [get_model(model)] if model else list({e["name"]: e for e in list_models()}.values())
        jobs = [(f"{e['name']}:{e['version']}", e["model"], str(Path(e["model"]).parent / f"report-{stamp}"), e)
                for e in entries]
    if not jobs:
        get_run_logger().info("no registered models to validate")
    results = []
    for name, directory, report, entry in jobs:
        card = read_card(directory)
        bank = test_bank(card["simulator"], n_sims, seed + TEST_SEED_OFFSET)
        summary = validate_model_task(directory, bank, report, n_sims, n_samples, seed, name)
        publish_validation(name, summary)
        if entry is not None:
            set_verdict(entry["name"], entry["version"], summary["calibrated"], summary["report"])
        results.append({**summary, "label": name})
    return results
