"""The ``sbipipe`` command line. Errors are printed on one line with a non-zero exit status."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import SbipipeError

try:  # recent typer vendors click; older releases use click itself
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click import ClickException

__all__ = ["app", "main"]

app = typer.Typer(
    name="sbipipe",
    help="Simulation-based inference pipelines: simulators, simulation banks, posteriors.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
bank_app = typer.Typer(help="Inspect simulation banks.", no_args_is_help=True)
app.add_typer(bank_app, name="bank")

out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)


@app.command("simulators")
def simulators_cmd() -> None:
    """List the available simulators with their parameters and priors."""
    from .registry import available_simulators, get_simulator
    from .simulator import has_likelihood

    table = Table("name", "version", "parameters", "prior", "observation", "likelihood", box=None)
    for name in available_simulators():
        try:
            sim = get_simulator(name)
            table.add_row(
                name,
                str(sim.version),
                ", ".join(sim.parameter_names),
                sim.describe_prior(),
                "x".join(map(str, sim.observation_shape)),
                "exact" if has_likelihood(sim) else "-",
            )
        except SbipipeError as exc:
            table.add_row(name, "?", f"(failed to load: {exc})", "", "", "")
    out.print(table)


@app.command("simulate")
def simulate_cmd(
    simulator: Annotated[str, typer.Argument(help="Short name (see `sbipipe simulators`) or package.module:object.")],
    n: Annotated[int, typer.Option("-n", help="Rows the bank should hold (extends an existing bank).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Bank file (.h5).")],
    seed: Annotated[Optional[int], typer.Option(help="Seed; default 0 (an existing bank keeps its own).")] = None,
    chunk_size: Annotated[Optional[int], typer.Option(help="Simulations per chunk (default 10000).")] = None,
    workers: Annotated[int, typer.Option(help="Processes simulating chunks in parallel.")] = 1,
) -> None:
    """Simulate into an HDF5 bank; re-running resumes an interrupted run or extends the bank."""
    from .bank import simulate_bank
    from .progress import row_progress

    with row_progress(f"simulate {simulator}") as update:
        bank = simulate_bank(simulator, output, n, seed=seed, chunk_size=chunk_size, workers=workers, progress=update)
    out.print(f"{bank.path}: {bank.rows} rows of {bank.simulator_name} v{bank.simulator_version} "
              f"(dropped {bank.attrs.get('dropped', 0)} non-finite)")


@bank_app.command("info")
def bank_info_cmd(path: Annotated[Path, typer.Argument(help="Bank file (.h5).")]) -> None:
    """Print a bank's size, provenance and per-parameter ranges."""
    from .bank import SimulationBank

    s = SimulationBank(path).summary()
    head = Table(box=None, show_header=False)
    for key in ("path", "rows", "simulator", "simulator_version", "seed", "dropped", "prior", "created", "updated"):
        head.add_row(key, str(s[key]))
    head.add_row("theta shape", str([s["rows"], *s["theta_shape"]]))
    head.add_row("x shape", str([s["rows"], *s["x_shape"]]))
    out.print(head)
    table = Table("parameter", "min", "mean", "max", box=None)
    for p in s["parameters"]:
        table.add_row(p["name"], f"{p['min']:.4g}", f"{p['mean']:.4g}", f"{p['max']:.4g}")
    out.print(table)


def _version_callback(value: bool) -> None:
    if value:
        from . import __version__

        out.print(f"sbipipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True)] = False,
) -> None:
    """sbipipe: simulation-based inference pipelines for astrophysics and cosmology."""


def _fail(message: str, code: int) -> None:
    print(f"sbipipe: error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors, exit 1 for bad input, 2 for usage, 130 on Ctrl-C."""
    try:
        app(args=argv, standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        _fail("interrupted; run the same command again to resume", 130)
    except ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `sbipipe` or `sbipipe bank`
            print(exc.format_message())
            sys.exit(0)
        _fail(exc.format_message().replace("\n", " "), exc.exit_code)
    except SbipipeError as exc:
        _fail(str(exc).replace("\n", " "), 1)
    except KeyboardInterrupt:
        _fail("interrupted; run the same command again to resume", 130)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        _fail(f"{exc.strerror or exc}{where}", 1)
    except Exception as exc:  # a bug: still one line, traceback on request
        if os.environ.get("SBIPIPE_DEBUG"):
            raise
        _fail(f"internal error {type(exc).__name__}: {exc} (set SBIPIPE_DEBUG=1 for the traceback)", 3)


if __name__ == "__main__":
    main()
