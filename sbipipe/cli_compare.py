"""``sbipipe compare``: train a model-comparison classifier and compute posterior model probabilities."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import SbipipeError

__all__ = ["compare_app"]

compare_app = typer.Typer(help="Bayesian model comparison: which simulator made the data?", no_args_is_help=True)
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)


@compare_app.command("train")
def train_cmd(
    models: Annotated[list[str], typer.Argument(help="Two or more simulators (names or package.module:object) or banks (.h5).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Model directory to write.")],
    n: Annotated[Optional[int], typer.Option("-n", help="Simulations per model (needed to simulate; banks: default all rows of the smallest).")] = None,
    loss: Annotated[str, typer.Option(help="ce (cross-entropy, any number of models) or evidence (l-POP-Exponential, two models).")] = "ce",
    embedding: Annotated[str, typer.Option(help="auto, identity, mlp, cnn, cnn-circular, power, log-power, deepset or kinematics.")] = "auto",
    ensemble: Annotated[int, typer.Option(help="Classifiers averaged to temper over-confidence.")] = 1,
    augment: Annotated[bool, typer.Option("--augment", help="Train on randomly flipped/transposed images (isotropic fields only).")] = False,
    calibration_rows: Annotated[int, typer.Option(help="Held-out simulations per model for calibration and the misspecification test.")] = 2000,
    max_epochs: Annotated[Optional[int], typer.Option(help="Upper bound on epochs (early stopping ends sooner).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Default: about 50 steps per epoch, 64 to 512.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the simulations, initialisation and batching.")] = 0,
) -> None:
    """Train a classifier over candidate models on a balanced mixture of their simulations."""
    from .comparison import train_comparison
    from .progress import epoch_progress, row_progress

    if len(models) < 2:
        raise SbipipeError(f"model comparison needs at least 2 candidate models, got {len(models)}; name two or more simulators or banks")
    bars = contextlib.ExitStack()  # one live bar at a time: each bank's, then the epochs'
    epochs: dict[str, Callable[[int, dict], None]] = {}

    def bank_progress(name: str) -> Callable[[int, int], None]:
        bars.close()
        return bars.enter_context(row_progress(f"simulate {name}"))

    def report(member: int, row: dict) -> None:
        if "report" not in epochs:
            bars.close()
            epochs["report"] = bars.enter_context(epoch_progress(f"train {loss} classifier", ensemble))
        epochs["report"](member, row)

    with bars:
        comp = train_comparison(models, output, n=n, loss=loss, embedding=embedding, ensemble=ensemble,
                                max_epochs=max_epochs, batch_size=batch_size, device=device, seed=seed,
                                calibration_rows=calibration_rows, augment=augment, progress=report,
                                bank_progress=bank_progress)
    cal, tr = comp.card["calibration"], comp.card["training"]
    out.print(f"{output}: {comp!r} trained in {tr['seconds']:.1f} s on {tr['train_rows_per_model']} simulations per model")
    out.print(f"held-out {cal['source']} ({cal['rows_per_model']} per model): accuracy {cal['accuracy']:.4f}, "
              f"ECE {cal['ece']:.4f} ({cal['bins']} bins; members {', '.join(f'{e:.4f}' for e in cal['ece_members'])}); "
              f"reliability {output / 'calibration.csv'}, confusion {output / 'confusion.csv'}, plot {output / 'calibration.png'}")


@compare_app.command("run")
def run_cmd(
    model: Annotated[Path, typer.Argument(help="Model-comparison directory (from `sbipipe compare train`).")],
    observation: Annotated[Path, typer.Option(help="Observation file (.npy, .csv or .h5): one or a stack.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Probabilities table (.csv).")],
    prior: Annotated[Optional[str], typer.Option(help="Prior model probabilities, comma-separated in the models' order (normalised); default equal.")] = None,
    misspecification_level: Annotated[float, typer.Option(help="Flag observations whose misspecification p-value is below this (0: never).")] = 1e-3,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "cpu",
) -> None:
    """Posterior model probabilities (and the log Bayes factor for two models) per observation."""
    from .comparison import compare_observation

    comp, table = compare_observation(model, observation, output, prior=prior, level=misspecification_level,
                                      device=device)
    view = Table("obs", *comp.names, *(["ln K"] if len(comp.names) == 2 else []), "most probable", "misspec. p", box=None)
    for _, row in table.head(20).iterrows():
        view.add_row(str(row["observation"]), *(f"{row[nm]:.4f}" for nm in comp.names),
                     *([f"{row['log_bayes_factor']:.3f}"] if len(comp.names) == 2 else []),
                     row["most_probable"] or "(flagged)", f"{row['misspecification_pvalue']:.2g}")
    out.print(view)
    if len(table) > 20:
        out.print(f"... {len(table) - 20} more rows in {output}")
    if len(comp.names) == 2:
        out.print(f"ln K = ln p(x | {comp.names[1]}) - ln p(x | {comp.names[0]})")
    flagged = int(table["misspecified"].sum())
    if flagged:
        print(f"sbipipe: warning: {flagged} of {len(table)} observation(s) are unlike the simulations of every candidate "
              f"model (misspecification p < {misspecification_level:g}); their probabilities are left empty", file=sys.stderr)
    out.print(f"{output}: {len(table)} observation(s), {len(comp.names)} models")
