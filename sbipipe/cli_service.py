"""The service's commands: ``server start|stop|status``, ``models``, ``serve``, ``submit`` and
``flow ...`` (runs a Prefect flow against the server). Prefect is imported inside the commands."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import SbipipeError

__all__ = ["flow_app", "server_app", "service_app"]

out = Console(highlight=False, markup=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
service_app = typer.Typer()
server_app = typer.Typer(help="The project's local Prefect server (127.0.0.1, SQLite in the project home).",
                         no_args_is_help=True)
flow_app = typer.Typer(help="Run a Prefect flow against the server; prints the run's UI URL.", no_args_is_help=True)
service_app.add_typer(server_app, name="server")
service_app.add_typer(flow_app, name="flow")


# -- server ---------------------------------------------------------------------------------------

@server_app.command("start")
def server_start_cmd(
    port: Annotated[Optional[int], typer.Option(help="Port (default 4200, or a free one if it is taken).")] = None,
    database_url: Annotated[Optional[str], typer.Option(
        help="SQLAlchemy URL of the database, e.g. postgresql+asyncpg://user:pw@host/prefect "
             "(default: PREFECT_API_DATABASE_CONNECTION_URL, else SQLite in the project home).")] = None,
    gpu_limit: Annotated[Optional[int], typer.Option(help="Slots of the `gpu` tag limit (default: visible GPUs, min 1).")] = None,
) -> None:
    """Start the local Prefect server in the background (analytics off) and create the `gpu` limit."""
    from .service import ensure_gpu_limit, project_home, start_server

    info = start_server(project_home(), port=port, database_url=database_url)
    limit = ensure_gpu_limit(info.api_url, gpu_limit)
    state = "already running" if info.already_running else "started"
    out.print(f"Prefect server {state} (pid {info.pid}): UI {info.ui_url}  API {info.api_url}")
    out.print(f"database {info.database}; log {info.log}; tag limit gpu = {limit}")


@server_app.command("stop")
def server_stop_cmd() -> None:
    """Stop the local Prefect server."""
    from .service import project_home, stop_server

    info = stop_server(project_home())
    out.print(f"Prefect server stopped (pid {info.pid})" if info else f"no Prefect server running for {project_home()}")


@server_app.command("status")
def server_status_cmd() -> None:
    """Print the server's UI and API URLs; exit 1 when none is running."""
    from .service import api_request, healthy, project_home, server_status, ui_url

    configured = os.environ.get("PREFECT_API_URL")
    info = server_status(project_home())
    if configured:
        ok = healthy(configured)
        out.print(f"configured server (PREFECT_API_URL): UI {ui_url(configured)}  API {configured}  "
                  f"{'healthy' if ok else 'NOT ANSWERING'}")
        raise SystemExit(0 if ok else 1)  # (typer.Exit's code is lost under cli.main)
    if info is None:
        out.print(f"no Prefect server running for {project_home()}; start one with `sbipipe server start`")
        raise SystemExit(1)
    limit = api_request(info.api_url, "GET", "/concurrency_limits/tag/gpu")
    out.print(f"Prefect server running (pid {info.pid}, since {info.started}): UI {info.ui_url}  API {info.api_url}  "
              f"{'healthy' if healthy(info.api_url) else 'NOT ANSWERING'}")
    out.print(f"database {info.database}; log {info.log}; tag limit gpu = "
              f"{limit['concurrency_limit'] if limit else 'none'}")


# -- registry, serving, submission -----------------------------------------------------------------

@service_app.command("models")
def models_cmd() -> None:
    """The model registry: one row per registered version."""
    from .models import list_models

    table = Table("name", "version", "simulator", "verdict", "created", "report", "model", box=None)
    for e in list_models():
        table.add_row(e["name"], str(e["version"]), f"{e['simulator']} v{e['simulator_version']}", e["verdict"],
                      e["created"], e.get("report") or "-", e["model"])
    out.print(table)


@service_app.command("serve")
def serve_cmd(
    config: Annotated[Path, typer.Option(help="Deployments and schedules (YAML).")] = Path("deploy/serve.yaml"),
) -> None:
    """Serve the config's deployments (pipeline, infer, validate, inbox) until Ctrl-C."""
    from .service import configure_prefect, ensure_gpu_limit

    api = configure_prefect()
    from flows.serve import load_config

    conf = load_config(config)
    os.environ["PREFECT_RUNNER_POLL_FREQUENCY"] = str(max(1, int(conf.get("poll_seconds", 1))))
    limit = ensure_gpu_limit(api)
    from flows.serve import serve_config

    out.print(f"serving {', '.join(d['flow'] + '/' + d['name'] for d in conf['deployments'])} on {api} "
              f"(gpu limit {limit}); Ctrl-C stops")
    serve_config(conf)


@service_app.command("submit")
def submit_cmd(
    model: Annotated[str, typer.Argument(help="Registered model: NAME or NAME:VERSION.")],
    observation: Annotated[Path, typer.Option(help="Observation file (.npy, .csv or .h5) where the service can read it.")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait, print the posterior summary, exit 1 if the run failed.")] = False,
    n: Annotated[int, typer.Option("-n", help="Samples per observation.")] = 10_000,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    plot: Annotated[bool, typer.Option(help="Publish a corner plot.")] = True,
    deployment: Annotated[str, typer.Option(help="The infer deployment (FLOW/NAME).")] = "infer/sbipipe",
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 600.0,
) -> None:
    """Create a run of the infer deployment through the Prefect API; print its UI URL."""
    from .models import get_model, registry_path
    from .service import configure_prefect, run_url

    api = configure_prefect()
    if registry_path().is_file():  # the registry is here: check the name now (a remote service checks it itself)
        get_model(model)
    obs = str(observation.expanduser().resolve()) if observation.expanduser().exists() else str(observation)
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    t0 = time.perf_counter()
    try:
        run = run_deployment(deployment, parameters={"model": model, "observation": obs, "n_samples": n, "seed": seed,
                                                     "plot": plot}, timeout=0)
    except ObjectNotFound:
        raise SbipipeError(f"deployment {deployment!r} does not exist on {api}; start `sbipipe serve` "
                           "(or deploy deploy/prefect.yaml)") from None
    url = run_url(api, run.id)
    out.print(f"submitted {run.name}: {url}")
    if not wait:
        return
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run.id)
            if run.state is not None and run.state.is_final():
                break
            if time.perf_counter() - t0 > timeout:
                raise SbipipeError(f"run {url} is still {run.state.name if run.state else 'unknown'} after {timeout:.0f} s")
            time.sleep(0.1)
        elapsed = time.perf_counter() - t0
        if not run.state.is_completed():
            message = (run.state.message or run.state.name).replace("Flow run encountered an exception: ", "")
            raise SbipipeError(f"run {url} {run.state.name.lower()}: {message}")
        result = _run_result(api, run)
    out.print(f"{run.state.name} in {elapsed:.2f} s after submission")
    if result.get("samples"):
        out.print(f"samples {result['samples']}; summary {result['summary_csv']}")
    _print_rows(result.get("summary", []))


def _run_result(api: str, run: Any) -> dict[str, Any]:
    """The run's persisted result, or (when its storage is not readable here) its table artifact."""
    try:
        result = run.state.result(raise_on_failure=False)
        if isinstance(result, dict):
            return result
    except Exception:  # e.g. a remote service's local result storage
        pass
    import json

    from .service import api_request

    arts = api_request(api, "POST", "/artifacts/filter", {
        "artifacts": {"flow_run_id": {"any_": [str(run.id)]}, "type": {"any_": ["table"]}},
        "sort": "CREATED_DESC", "limit": 1, "offset": 0}) or []
    data = arts[0]["data"] if arts else []
    return {"summary": json.loads(data) if isinstance(data, str) else data}


def _print_rows(rows: list[dict[str, Any]]) -> None:
    if rows:
        import pandas as pd

        from .cli import _print_summary

        frame = pd.DataFrame(rows)
        if "observation" not in frame:
            frame["observation"] = 0
        _print_summary(frame)


# -- flows ----------------------------------------------------------------------------------------

def _connect(gpu: bool = False) -> str:
    from .service import configure_prefect, ensure_gpu_limit

    api = configure_prefect()
    if gpu:
        ensure_gpu_limit(api)
    return api


def _run(api: str, flow: Any, **params: Any) -> Any:
    """Run ``flow`` here against the server; print its UI URL; its result (errors re-raised)."""
    from .service import run_url

    state = flow(**params, return_state=True)
    out.print(f"{flow.name} run: {run_url(api, state.state_details.flow_run_id)}")
    return state.result()


@flow_app.command("simulate")
def flow_simulate_cmd(
    simulator: Annotated[str, typer.Argument(help="Short name or package.module:object.")],
    n: Annotated[int, typer.Option("-n", help="Rows the bank should hold.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Bank file (.h5).")],
    seed: Annotated[Optional[int], typer.Option(help="Seed; default 0 (an existing bank keeps its own).")] = None,
    chunk_size: Annotated[Optional[int], typer.Option(help="Simulations per chunk task (default 10000).")] = None,
    task_runner: Annotated[str, typer.Option(help="thread, process, dask or ray.")] = "thread",
    workers: Annotated[Optional[int], typer.Option(help="Threads, processes or local cluster workers.")] = None,
    address: Annotated[Optional[str], typer.Option(help="Address of a running Dask scheduler or Ray cluster.")] = None,
) -> None:
    """Simulate a bank as chunk tasks (cached; a re-run recomputes nothing already stored)."""
    api = _connect()
    from flows.simulate import make_task_runner, simulate

    runner = make_task_runner(task_runner, workers, address)
    out.print(f"task runner {type(runner).__name__}" + (f" at {address}" if address else ""))
    r = _run(api, simulate.with_options(task_runner=runner), simulator=simulator, bank=str(output.resolve()), n=n,
             seed=seed, chunk_size=chunk_size)
    out.print(f"{r['bank']}: {r['rows']} rows of {r['simulator']} v{r['simulator_version']}; sha256 {r['sha256'][:16]}")


@flow_app.command("train")
def flow_train_cmd(
    bank: Annotated[Path, typer.Argument(help="Simulation bank (.h5).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Model directory to write.")],
    estimator: Annotated[str, typer.Option(help="auto (nsf or maf by validation loss), nsf, maf or naf.")] = "auto",
    ensemble: Annotated[Optional[int], typer.Option(help="Number of estimators (default: the simulator's, else 1).")] = None,
    max_epochs: Annotated[Optional[int], typer.Option(help="Upper bound on epochs.")] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Train an estimator (a `gpu`-tagged task)."""
    api = _connect(gpu=True)
    from flows.train import train

    r = _run(api, train, bank=str(bank.resolve()), output=str(output.resolve()), estimator=estimator,
             ensemble=ensemble, max_epochs=max_epochs, seed=seed, device=device)
    out.print(f"{r['model']}: trained on {r['device']} in {r['seconds']:.1f} s")


@flow_app.command("validate")
def flow_validate_cmd(
    model: Annotated[Optional[str], typer.Argument(help="Registered NAME[:VERSION]; none: every registered model.")] = None,
    model_dir: Annotated[Optional[Path], typer.Option(help="A model directory instead of a registered model.")] = None,
    n_sims: Annotated[int, typer.Option(help="Test simulations.")] = 1000,
    n_samples: Annotated[int, typer.Option(help="Posterior samples per test simulation.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Validate and publish metrics and plots; records the verdict of registered models."""
    api = _connect(gpu=True)
    from flows.validate import validate

    results = _run(api, validate, model=model, model_dir=str(model_dir.resolve()) if model_dir else None,
                   n_sims=n_sims, n_samples=n_samples, seed=seed)
    for r in results:
        out.print(f"{r['label']}: {'passed' if r['calibrated'] else 'FAILED ' + '; '.join(r['failing'])}; report {r['report']}")


@flow_app.command("pipeline")
def flow_pipeline_cmd(
    simulator: Annotated[str, typer.Argument(help="Short name or package.module:object.")],
    name: Annotated[Optional[str], typer.Option(help="Model name in the registry (default: the simulator's).")] = None,
    n: Annotated[int, typer.Option("-n", help="Training simulations.")] = 20_000,
    chunk_size: Annotated[Optional[int], typer.Option(help="Simulations per chunk task.")] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    estimator: Annotated[str, typer.Option(help="auto (nsf or maf by validation loss), nsf, maf or naf.")] = "auto",
    ensemble: Annotated[Optional[int], typer.Option(help="Number of estimators (default: the simulator's, else 1).")] = None,
    max_epochs: Annotated[Optional[int], typer.Option(help="Upper bound on epochs.")] = None,
    n_validation: Annotated[int, typer.Option(help="Test simulations of the validation.")] = 1000,
    n_samples: Annotated[int, typer.Option(help="Posterior samples per test simulation.")] = 1000,
) -> None:
    """Simulate, train, validate, and register the model if the validation gate passes (exit 1 if not)."""
    api = _connect(gpu=True)
    from flows.pipeline import pipeline

    r = _run(api, pipeline, simulator=simulator, name=name, n_sims=n, chunk_size=chunk_size, seed=seed,
             estimator=estimator, ensemble=ensemble, max_epochs=max_epochs, n_validation=n_validation,
             n_samples=n_samples)
    if r["registered"]:
        out.print(f"registered {r['name']}:{r['version']} (validation passed); report {r['report']}")
    else:
        raise SbipipeError(f"model not registered: the validation gate failed ({'; '.join(r['failing'])}); "
                           f"report {r['report']}; train on more simulations (-n) or for longer")


@flow_app.command("infer")
def flow_infer_cmd(
    model: Annotated[str, typer.Argument(help="Registered model: NAME or NAME:VERSION.")],
    observation: Annotated[Path, typer.Option(help="Observation file (.npy, .csv or .h5).")],
    n: Annotated[int, typer.Option("-n", help="Samples per observation.")] = 10_000,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    plot: Annotated[bool, typer.Option(help="Publish a corner plot.")] = True,
) -> None:
    """Posterior samples and summary for an observation, run here."""
    api = _connect()
    from flows.infer import infer

    r = _run(api, infer, model=model, observation=str(observation.expanduser().resolve()), n_samples=n, seed=seed,
             plot=plot)
    out.print(f"samples {r['samples']}; summary {r['summary_csv']}")
    _print_rows(r["summary"])


@flow_app.command("inbox")
def flow_inbox_cmd(
    folder: Annotated[Path, typer.Argument(help="Inbox folder.")],
    model: Annotated[Optional[str], typer.Option(help="Model of every file (default: subfolders named after models).")] = None,
    n: Annotated[int, typer.Option("-n", help="Samples per observation.")] = 10_000,
) -> None:
    """Process the files waiting in an inbox once."""
    api = _connect()
    from flows.inbox import inbox

    r = _run(api, inbox, folder=str(folder.resolve()), model=model, n_samples=n)
    out.print(f"done {len(r['done'])}, failed {len(r['failed'])}")
