"""What the Prefect UI shows of a run: markdown summaries, tables and plots as data-URI images."""

from __future__ import annotations

import base64
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

__all__ = ["artifact_key", "fmt", "markdown_table", "png_data_uri", "publish_image", "publish_markdown",
           "publish_table", "run_names", "short_path"]


def artifact_key(*parts: Any) -> str:
    """A key the API accepts: lowercase letters, digits and dashes."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", "-".join(map(str, parts)).lower())).strip("-")[:120]


def run_names(name: Callable[[dict[str, Any]], str]) -> tuple[Callable[[], str], Callable[[], str]]:
    """``(task_run_name, flow_run_name)`` callables that name a run from its parameters with ``name``
    (a task and its flow share the parameters that name them)."""

    def task_name() -> str:
        from prefect.runtime import task_run

        return name(task_run.parameters)

    def flow_name() -> str:
        from prefect.runtime import flow_run

        return name(flow_run.parameters)

    return task_name, flow_name


def short_path(path: Any) -> str:
    """``.../run-1/bank.h5`` → ``run-1/bank.h5`` (names that read well in the UI)."""
    p = Path(str(path))
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(rows: Iterable[Mapping[str, Any]], columns: list[str] | None = None) -> str:
    rows = list(rows)
    if not rows:
        return "_(empty)_"
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def png_data_uri(path: str | os.PathLike) -> str:
    """A PNG as ``data:image/png;base64,...`` (the UI renders these in image and markdown artifacts)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def publish_markdown(markdown: str, key: str | None = None, description: str | None = None) -> None:
    create_markdown_artifact(markdown, key=key, description=description)


def publish_table(rows: list[dict[str, Any]], key: str | None = None, description: str | None = None) -> None:
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows]
    create_table_artifact(clean, key=key, description=description)


def publish_image(path: str | os.PathLike, key: str | None = None, description: str | None = None) -> None:
    create_image_artifact(png_data_uri(path), key=key, description=description)
