"""The ``sbipipe`` command line. Errors are printed on one line with a non-zero exit status."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .allocator import retain_freed_memory
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


@app.command("observe")
def observe_cmd(
    simulator: Annotated[str, typer.Argument(help="Short name or package.module:object.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Observation file: .npy, .csv or .h5.")],
    theta: Annotated[Optional[str], typer.Option(help="Comma-separated parameter values; default a prior draw.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the prior draw and the simulation.")] = 0,
) -> None:
    """Simulate one synthetic observation; the truth goes beside it as OBS.truth.json."""
    import torch

    from .observations import parse_theta, save_observation, truth_path
    from .registry import get_simulator

    sim = get_simulator(simulator)
    gen = torch.Generator().manual_seed(seed)
    values = parse_theta(theta, sim) if theta is not None else sim.sample_prior(1, gen)
    x = sim.simulate(values, gen)[0]
    truth = {"simulator": sim.name, "simulator_version": str(sim.version), "seed": seed,
             "parameter_names": list(sim.parameter_names), "theta": [float(v) for v in values[0]]}
    save_observation(output, x, truth)
    pairs = ", ".join(f"{n}={v:.4g}" for n, v in zip(sim.parameter_names, truth["theta"]))
    out.print(f"{output}: one {sim.name} observation of shape {list(x.shape)} at {pairs}; truth in {truth_path(output)}")


@app.command("reference")
def reference_cmd(
    simulator: Annotated[str, typer.Argument(help="A simulator with an exact log_likelihood.")],
    observation: Annotated[Path, typer.Option(help="One observation (.npy, .csv or .h5).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Samples file (.h5).")],
    n: Annotated[int, typer.Option("-n", help="Number of posterior samples.")] = 10_000,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation and the chain.")] = 0,
) -> None:
    """Exact reference posterior samples by MCMC (emcee) on the simulator's log-likelihood."""
    from .atomic import check_writable
    from .observations import load_observation
    from .reference import reference_posterior
    from .registry import get_simulator
    from .samples import summary_path, write_samples

    sim = get_simulator(simulator)
    check_writable(output)
    x = load_observation(observation, sim)
    ref = reference_posterior(sim, x, n=n, seed=seed, progress=sys.stderr.isatty())
    diag = ref.diagnostics
    attrs = {k: v for k, v in diag.items() if k != "tau"} | {
        "tau": diag["tau"], "simulator": sim.name, "simulator_version": str(sim.version),
        "observation": str(observation), "kind": "reference",
    }
    table = write_samples(output, ref.samples, list(sim.parameter_names), attrs, datasets={"observation": x[0]})
    if diag["warnings"]:
        print(f"sbipipe: warning: {diag['warnings']}", file=sys.stderr)
    out.print(f"{output}: {n} samples; {diag['walkers']} walkers x {diag['steps']} steps, "
              f"tau_max {diag['tau_max']:.1f} ({diag['steps_over_tau']:.0f} tau), "
              f"acceptance {diag['acceptance_fraction']:.2f}, {diag['seconds']:.1f} s; summary {summary_path(output)}")
    _print_summary(table)


@app.command("train")
def train_cmd(
    bank: Annotated[Path, typer.Argument(help="Simulation bank (.h5).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Model directory to write.")],
    estimator: Annotated[str, typer.Option(help="auto (nsf or maf, whichever has the lower validation loss after a pilot), nsf, maf or naf "
                                                "(flows), score (diffusion, NPSE) or flowmatch (FMPE).")] = "auto",
    embedding: Annotated[str, typer.Option(help="auto, identity, mlp, cnn, cnn-circular, power, log-power, deepset or kinematics.")] = "auto",
    ensemble: Annotated[Optional[int], typer.Option(help="Number of estimators combined as a mixture (default: the "
                                                         "simulator's preference, 2 for dwarf, else 1).")] = None,
    support: Annotated[Optional[str], typer.Option(help="How θ meets a bounded prior: map (through the prior's "
                                                        "support transform) or truncate (the real line, truncated "
                                                        "by rejection, trained with the gradient of log A(x), the "
                                                        "log mass in the box). Default for the flows: the simulator's preference "
                                                        "(truncate for two_moons), else map; see README.")] = None,
    augment: Annotated[Optional[bool], typer.Option("--augment/--no-augment", help="Shuffle the order of the observation's "
                                                    "exchangeable draws in every batch (default: on when the simulator "
                                                    "declares exchangeable_draws, as slcp does).")] = None,
    symmetries: Annotated[Optional[bool], typer.Option("--symmetries/--no-symmetries", help="Average the flow over the "
                                                       "simulator's declared parameter symmetries, so it models one "
                                                       "mirror image (default: on when it declares any, as two_moons "
                                                       "and slcp do).")] = None,
    max_epochs: Annotated[Optional[int], typer.Option(help="Upper bound on epochs (early stopping ends sooner).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Default: 64 to 512 rows, about 16 batches per epoch for the "
                                                          "flows, 50 for score and flowmatch.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted training.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and batching.")] = 0,
) -> None:
    """Train a neural posterior estimator on a bank and write a model directory."""
    from .npe import train_posterior
    from .progress import epoch_progress

    with epoch_progress(f"train {estimator}", ensemble) as report:
        post = train_posterior(bank, output, estimator=estimator, embedding=embedding, ensemble=ensemble,
                               support=support, augment=augment, symmetries=symmetries, max_epochs=max_epochs, batch_size=batch_size, device=device,
                               resume=resume, seed=seed, progress=report)
    tr = post.card["training"]
    losses = ", ".join(f"{f['best_val_loss']:.4f} ({f['epochs']} epochs)" for f in tr["final"])
    out.print(f"{output}: {post!r} trained in {tr['seconds']:.1f} s; best validation loss {losses}")
    if "selection" in tr:
        sel = tr["selection"]
        tried = ", ".join(f"{name} {loss:.4f}" for name, loss in sel["val_loss"].items())
        out.print(f"auto: kept {sel['chosen']} (held-out -log q(θ) after the {sel['pilot_epochs']}-epoch pilot: {tried})")


@app.command("sample")
def sample_cmd(
    model: Annotated[Path, typer.Argument(help="Model directory.")],
    observation: Annotated[Path, typer.Option(help="Observation file (.npy, .csv or .h5): one or a stack.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Samples file (.h5).")],
    n: Annotated[int, typer.Option("-n", help="Samples per observation.")] = 10_000,
    plot: Annotated[Optional[Path], typer.Option(help="Corner plot (.png) of the first observation's samples.")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "cpu",
) -> None:
    """Draw posterior samples for an observation (or a stack) and summarise them."""
    import pandas as pd

    from .inference import infer_observation
    from .samples import summary_path

    result = infer_observation(model, observation, output, n_samples=n, seed=seed, plot_path=plot, device=device)
    shape = "x".join(map(str, result["shape"]))
    out.print(f"{output}: samples [{shape}]; summary {summary_path(output)}" + (f"; plot {plot}" if plot else ""))
    if result["acceptance"] is not None:
        acc = result["acceptance"]
        out.print(f"truncated to the prior: acceptance {min(acc):.3f}" + (f" to {max(acc):.3f}" if len(acc) > 1 else "")
                  + " (fraction of the flow's mass inside the prior's bounds)")
    _print_summary(pd.DataFrame(result["summary"]))


@app.command("validate")
def validate_cmd(
    model: Annotated[Path, typer.Argument(help="Model directory.")],
    bank: Annotated[Path, typer.Option(help="Held-out test bank (.h5) of the model's simulator.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Report directory to write.")],
    reference: Annotated[Optional[list[Path]], typer.Option(help="Reference posterior samples (.h5) from `sbipipe reference`; repeatable.")] = None,
    observation: Annotated[Optional[list[Path]], typer.Option(help="Observation for a posterior predictive check; repeatable.")] = None,
    n_sims: Annotated[int, typer.Option(help="Test simulations used (the bank's first rows).")] = 1000,
    n_samples: Annotated[int, typer.Option(help="Posterior draws per test simulation.")] = 1000,
    c2st_max: Annotated[float, typer.Option(help="Gate: largest mean C2ST against the references.")] = 0.65,
    seed: Annotated[int, typer.Option(help="Seed of the posterior draws.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "cpu",
) -> None:
    """Validate a model (SBC, expected coverage, TARP, C2ST, predictive checks); exit 4 if the gate fails."""
    from .progress import row_progress
    from .validation import Gate, validate_model

    with row_progress("validate") as update:
        summary = validate_model(model, bank, output, references=reference or (), observations=observation or (),
                                 n_sims=n_sims, n_samples=n_samples, seed=seed, gate=Gate(c2st_max=c2st_max),
                                 device=device, progress=update)
    import pandas as pd

    metrics = pd.read_csv(output / "metrics.csv").astype(object).fillna("")  # blanks for missing cells
    view = Table("metric", "parameter", "observation", "value", "threshold", "passed", box=None)
    for _, row in metrics.iterrows():
        thr = "" if row["threshold"] == "" else f"{float(row['threshold']):.3g}"
        view.add_row(row["metric"], row["parameter"], str(row["observation"]), f"{row['value']:.4g}", thr,
                     str(row["passed"]))
    out.print(view)
    for warning in summary["warnings"]:
        print(f"sbipipe: warning: {warning}", file=sys.stderr)
    verdict = "CALIBRATED" if summary["calibrated"] else "NOT CALIBRATED: " + "; ".join(summary["failing"])
    out.print(f"{model}: {verdict} ({summary['n_sims']} test simulations x {summary['n_samples']} draws, "
              f"{summary['seconds']:.1f} s); report in {output}")
    if not summary["calibrated"]:
        raise typer.Exit(4)


# --- command groups of feature modules: one `app.add_typer(...)` line each, below this marker ---
from .cli_source import prior_app as source_prior_app, source_posterior_cmd  # noqa: E402
app.add_typer(source_prior_app, name="source-prior")
app.command("source-posterior")(source_posterior_cmd)
from .cli_compare import compare_app  # noqa: E402
app.add_typer(compare_app, name="compare")
from .cli_emulator import emulator_app  # noqa: E402
app.add_typer(emulator_app, name="emulator")
from .cli_service import service_app  # noqa: E402  (server, flow, models, serve, submit)

app.add_typer(service_app)


def _print_summary(table) -> None:
    many = table["observation"].nunique() > 1
    view = Table(*(["obs"] if many else []), "parameter", "mean", "std", "5%", "50%", "95%", box=None)
    for _, row in table.iterrows():
        view.add_row(*([str(row["observation"])] if many else []), str(row["parameter"]),
                     *(f"{row[c]:.4g}" for c in ("mean", "std", "q05", "q50", "q95")))
    out.print(view)


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
    retain_freed_memory()
    try:
        code = app(args=argv, standalone_mode=False)  # click returns a command's typer.Exit code here
        if isinstance(code, int) and code:
            sys.exit(code)
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
