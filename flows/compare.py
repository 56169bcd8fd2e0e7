"""``compare``: posterior model probabilities of an observation file with a trained model-comparison
classifier (``sbipipe compare run`` as a flow). The classification runs in a ``gpu``-tagged task on
CUDA when present and writes the CSV through :func:`sbipipe.comparison.compare_observation`; the
flow publishes the probabilities table, a summary and the classifier's calibration plot."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from ._artifacts import (
    artifact_key,
    fmt,
    markdown_table,
    png_data_uri,
    publish_image,
    publish_markdown,
    publish_table,
    run_names,
    short_path,
)

__all__ = ["classify_observations", "compare"]


def _name(parameters: dict[str, Any]) -> str:
    return f"compare {Path(str(parameters['classifier'])).name}: {short_path(parameters['observation'])}"


_task_name, _flow_name = run_names(_name)


@task(name="classify-observations", task_run_name=_task_name, tags=["gpu"])
def classify_observations(classifier: str, observation: str, output: str, prior: str | None, level: float,
                          device: str) -> dict[str, Any]:
    """:func:`sbipipe.comparison.compare_observation` on CUDA when present (``device="auto"``); the
    ``gpu`` tag limit keeps one such task per GPU. Returns the table's rows and the classifier's card facts."""
    from sbipipe.comparison import compare_observation
    from sbipipe.training import resolve_device

    dev = resolve_device(device)
    get_run_logger().info("classifying %s with %s on %s", observation, classifier, dev)
    comp, table = compare_observation(classifier, observation, output, prior=prior, level=level, device=str(dev))
    rows = [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in table.to_dict("records")]
    arch = comp.card["architecture"]
    return {"output": str(Path(output).resolve()), "sha256": hashlib.sha256(Path(output).read_bytes()).hexdigest(),
            "models": comp.names, "rows": rows, "device": str(dev), "calibration": comp.card.get("calibration", {}),
            "classifier": {"loss": arch["loss"], "embedding": arch["embedding"], "ensemble": arch["ensemble"]}}


def _calibration_png(classifier: str, output: str, models: list[str], calibration: dict[str, Any]) -> str | None:
    """The classifier directory's ``calibration.png``, or drawn beside ``output`` from its
    ``calibration.csv`` and the card's confusion matrix; None without a reliability table."""
    folder = Path(classifier)
    if (folder / "calibration.png").is_file():
        return str(folder / "calibration.png")
    if not (folder / "calibration.csv").is_file() or "confusion" not in calibration:
        return None
    import pandas as pd

    from sbipipe.comparison_plots import calibration_plot

    png = Path(output).with_suffix(".calibration.png")
    calibration_plot(pd.read_csv(folder / "calibration.csv"), calibration["confusion"], models, png,
                     ece=calibration.get("ece"))
    return str(png)


@flow(name="compare", flow_run_name=_flow_name)
def compare(classifier: str, observation: str, output: str, prior: str | None = None, misspecification_level: float = 1e-3,
            device: str = "auto", plot: bool = True) -> dict[str, Any]:
    """Probabilities of each candidate model per observation (``observation``: one or a stack in a
    ``.npy``, ``.csv`` or ``.h5`` file), written to the CSV ``output`` as ``sbipipe compare run``
    does; ``prior``: comma-separated prior model probabilities (default equal); observations whose
    misspecification p-value is below ``misspecification_level`` are flagged and left without
    probabilities. ``plot``: publish the classifier's calibration (reliability) plot."""
    r = classify_observations(classifier, observation, output, prior, misspecification_level, device)
    models, rows, cal = r["models"], r["rows"], r["calibration"]
    columns = ["observation", *models, *(["log_bayes_factor"] if len(models) == 2 else []), "most_probable",
               "misspecification_pvalue", "misspecified"]
    png = _calibration_png(classifier, output, models, cal) if plot else None
    flagged = sum(bool(row["misspecified"]) for row in rows)
    finite = [row for row in rows if not row["misspecified"]]
    votes = {m: sum(row["most_probable"] == m for row in finite) for m in models}
    clf = r["classifier"]
    cal_text = (f"ECE {fmt(cal['ece'])} ({cal.get('bins', 15)} bins), accuracy {fmt(cal['accuracy'])} on "
                f"{cal.get('rows_per_model', '?')} held-out simulations per model" if cal else "not recorded")
    key = Path(output).stem
    shown = rows[:50]
    publish_markdown(
        f"# Model comparison: {Path(observation).name}\n\n| item | value |\n|---|---|\n"
        f"| classifier | `{Path(classifier).resolve()}` ({clf['ensemble']} x {clf['loss']}, {clf['embedding']} embedding) |\n"
        f"| models | {', '.join(models)} |\n| prior model probabilities | {prior or 'equal'} |\n"
        f"| observations | {len(rows)} from `{observation}` |\n"
        f"| most probable | {', '.join(f'{m}: {v}' for m, v in votes.items())} |\n"
        f"| flagged as misspecified (p < {misspecification_level:g}) | **{flagged}** |\n"
        f"| calibration | {cal_text} |\n| table | `{r['output']}` (sha256 `{r['sha256'][:12]}`) |\n\n"
        + (f"ln K = ln p(x | {models[1]}) − ln p(x | {models[0]}).\n\n" if len(models) == 2 else "")
        + f"## Probabilities\n\n{markdown_table(shown, columns)}\n"
        + (f"\n_{len(rows) - len(shown)} more rows in the CSV._\n" if len(rows) > len(shown) else "")
        + (f"\n## Calibration\n\n![reliability diagram and confusion matrix]({png_data_uri(png)})\n" if png else ""),
        key=artifact_key("compare", key), description="model comparison summary")
    publish_table([{c: row[c] for c in columns} for row in rows], key=artifact_key("model-probabilities", key),
                  description="posterior model probabilities per observation")
    if png:
        publish_image(png, key=artifact_key("calibration", key), description="reliability diagram and confusion matrix")
    return {**{k: v for k, v in r.items() if k != "rows"}, "observations": len(rows), "flagged": flagged,
            "calibration_plot": png,
            "log_bayes_factor": [None if (v := row.get("log_bayes_factor")) is None or not math.isfinite(v) else v
                                 for row in rows] if len(models) == 2 else None}
