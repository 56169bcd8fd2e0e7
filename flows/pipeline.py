"""``pipeline``: simulate → train → validate → register the model only if the gate passes."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from sbipipe.models import register_model
from sbipipe.service import project_home

from ._artifacts import artifact_key, png_data_uri, publish_markdown
from .simulate import simulate
from .train import train
from .validate import validate

__all__ = ["pipeline", "register"]


@task(name="register-model", task_run_name="register {name}")
def register(name: str, model_dir: str, report_dir: str, calibrated: bool, run_id: str) -> dict[str, Any]:
    """Add the model to the registry as the next version of ``name``."""
    return register_model(name, model_dir, report_dir, calibrated=calibrated, flow_run=run_id)


@flow(name="pipeline", flow_run_name="pipeline {simulator}: {n_sims} simulations")
def pipeline(simulator: str, name: str | None = None, n_sims: int = 20_000, chunk_size: int | None = None,
             seed: int = 0, estimator: str = "auto", ensemble: int | None = None, max_epochs: int | None = None,
             n_validation: int = 1000, n_samples: int = 1000) -> dict[str, Any]:
    """Everything from a simulator to a registered, validated model."""
    name = name or simulator.replace(":", "-").replace(".", "-")
    run_id = str(flow_run.get_id() or "local")
    folder = project_home() / "runs" / f"{name}-{run_id[:8]}"
    chunk_size = chunk_size or min(10_000, max(1_000, -(-n_sims // 8)))  # at least a few chunk tasks
    bank = simulate(simulator, str(folder / "bank.h5"), n_sims, seed=seed, chunk_size=chunk_size)
    model = train(bank["bank"], str(folder / "model"), estimator=estimator, ensemble=ensemble, max_epochs=max_epochs,
                  seed=seed)
    summary = validate(model_dir=model["model"], report_dir=str(folder / "report"), n_sims=n_validation,
                       n_samples=n_samples, seed=seed, label=name)[0]
    entry = None
    if summary["calibrated"]:
        entry = register(name, model["model"], summary["report"], True, run_id)
        get_run_logger().info("registered %s version %d", name, entry["version"])
    else:
        get_run_logger().warning("not registered: the validation gate failed (%s)", "; ".join(summary["failing"]))
    verdict = f"registered as **{name}:{entry['version']}**" if entry else "**not registered** (gate failed)"
    publish_markdown(
        f"# Pipeline {name}\n\nSimulator {bank['simulator']} v{bank['simulator_version']}: {bank['rows']} simulations "
        f"(bank sha256 `{bank['sha256'][:12]}`), estimator {estimator}, trained on {model['device']} in "
        f"{model['seconds']:.1f} s.\n\nValidation: {'passed' if summary['calibrated'] else 'failed'}; {verdict}.\n\n"
        f"Report `{summary['report']}`\n"
        + (f"\n![coverage]({png_data_uri(summary['plots']['coverage'])})\n" if "coverage" in summary["plots"] else ""),
        key=artifact_key("pipeline", name), description="pipeline summary")
    return {"name": name, "registered": entry is not None, "version": entry["version"] if entry else None,
            "calibrated": summary["calibrated"], "failing": summary["failing"], "model": model["model"],
            "report": summary["report"], "bank": bank["bank"]}
