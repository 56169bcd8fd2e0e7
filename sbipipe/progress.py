"""Progress bars on a terminal (rich), silence elsewhere."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["epoch_progress", "row_progress"]


@contextlib.contextmanager
def row_progress(description: str, enabled: bool | None = None) -> Iterator[Callable[[int, int], None]]:
    """Yield ``update(done, total)``; draws a bar with rows/s and ETA when stderr is a terminal."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield lambda done, total: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=None, rate="")

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)
            speed = bar.tasks[0].speed
            bar.update(task, rate=f"{speed:,.0f} rows/s" if speed else "")

        yield update


@contextlib.contextmanager
def epoch_progress(description: str, members: int | None = 1,
                   enabled: bool | None = None) -> Iterator[Callable[[int | str, dict], None]]:
    """Yield ``report(member, row)`` for training epochs (``member``: an ensemble index, or the name
    of a candidate estimator being compared; ``members=None``: a count not known yet); shows the
    losses on a terminal."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield lambda member, row: None
        return
    columns = (TextColumn("[bold]{task.description}"), TextColumn("epoch {task.completed}"),
               TextColumn("{task.fields[losses]}"), TimeElapsedColumn())
    with Progress(*columns) as bar:
        tasks: dict[int | str, int] = {}

        def report(member: int | str, row: dict) -> None:
            if member not in tasks:
                if isinstance(member, str):
                    label = f"{description} [{member}]"
                else:
                    count = f"/{members}" if members else ""
                    label = description + (f" [{member + 1}{count}]" if members != 1 else "")
                tasks[member] = bar.add_task(label, total=None, losses="")
            bar.update(tasks[member], completed=int(row["epoch"]),
                       losses=f"train {row['train_loss']:.4f}  val {row['val_loss']:.4f}  lr {row['lr']:.1e}")

        yield report
