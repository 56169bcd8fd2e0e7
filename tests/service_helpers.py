"""One real local Prefect server for all service tests (started once per test session with
``sbipipe server start``, SQLite, analytics off, its own project home), a tiny registered model,
and a slow simulator for the kill/resume test."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch.distributions import Independent, Uniform

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    root: Path
    home: Path
    api: str
    ui: str
    env: dict[str, str]
    model: str = ""
    observation: Path = field(default_factory=Path)

    def cli(self, *args: str, timeout: float = 300, check: bool = False, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(BIN / "sbipipe"), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                              timeout=timeout, env={**self.env, **(env or {})})
        if check and proc.returncode != 0:
            raise AssertionError(f"sbipipe {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
        return proc

    def popen(self, *args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen([str(BIN / "sbipipe"), *map(str, args)], cwd=REPO, env={**self.env, **(env or {})},
                                stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    @contextlib.contextmanager
    def settings(self):
        """This thread's Prefect (a context variable: new threads need ``contextvars.copy_context()``)
        and this process's sbipipe pointed at the service."""
        from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

        keys = ("SBIPIPE_HOME", "SBIPIPE_OBSERVATION_DIRS", "PREFECT_API_URL", "PREFECT_HOME")
        saved = {k: os.environ.get(k) for k in keys}
        os.environ.update({k: self.env[k] for k in keys})  # for processes started from here
        try:
            with temporary_settings(updates={PREFECT_API_URL: self.api, PREFECT_HOME: str(self.home / "prefect"),
                                             PREFECT_SERVER_EPHEMERAL_ENABLED: False}):
                yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


_SERVICE: Service | None = None


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Service:
    """The session's server with a registered model ``tm`` (import this fixture into a test module)."""
    svc = shared_service(tmp_path_factory)
    request.addfinalizer(stop_shared)
    return svc


def shared_service(tmp_path_factory: pytest.TempPathFactory) -> Service:
    """Start the session's server once, however many modules ask for it."""
    global _SERVICE
    if _SERVICE is not None:
        return _SERVICE
    tmp_root = tmp_path_factory.mktemp("service")
    home = tmp_root / "home"
    env = {**os.environ, "SBIPIPE_HOME": str(home), "SBIPIPE_OBSERVATION_DIRS": str(tmp_root),
           "OMP_NUM_THREADS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_COLORS": "false"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([str(BIN / "sbipipe"), "server", "start", "--port", str(free_port())], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    api = re.search(r"API (\S+)", proc.stdout).group(1)
    ui = re.search(r"UI (\S+)", proc.stdout).group(1)
    env["PREFECT_API_URL"] = api
    env["PREFECT_HOME"] = str(home / "prefect")
    _SERVICE = Service(tmp_root, home, api, ui, env)
    _register_model(_SERVICE)
    return _SERVICE


def stop_shared() -> None:
    global _SERVICE
    if _SERVICE is not None:
        env = {k: v for k, v in _SERVICE.env.items() if k != "PREFECT_API_URL"}
        subprocess.run([str(BIN / "sbipipe"), "server", "stop"], cwd=REPO, env=env, capture_output=True, timeout=60)
        _SERVICE = None


def _register_model(service: Service) -> None:
    """A small two_moons posterior (truncated to the prior) in the registry (name ``tm``) and an
    observation for it."""
    from sbipipe.bank import simulate_bank
    from sbipipe.models import register_model
    from sbipipe.npe import train_posterior
    from sbipipe.observations import save_observation

    work = service.root / "model-work"
    simulate_bank("two_moons", work / "bank.h5", 1000, seed=1, chunk_size=1000)
    # truncated to the prior, so that the served path reports its acceptance rate
    train_posterior(work / "bank.h5", work / "model", max_epochs=2, seed=0, support="truncate")
    entry = register_model("tm", work / "model", calibrated=True, home=service.home)
    service.model = entry["name"]
    service.observation = save_observation(service.root / "obs" / "good.npy", torch.tensor([0.3, -0.2]))


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def wait_for(predicate, timeout: float = 120, every: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class SlowSim:
    """Two parameters, x = θ + noise, ``$SLOW_SIM_SECONDS`` per call; logs each call's generator
    seed to ``$SLOW_SIM_LOG`` (``start SEED`` / ``end SEED``)."""

    parameter_names = ["a", "b"]
    prior = Independent(Uniform(torch.zeros(2), torch.ones(2)), 1)
    observation_shape = (2,)
    version = "1"

    def simulate(self, theta: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        seed = generator.initial_seed() if generator is not None else -1
        _log(f"start {seed}")
        time.sleep(float(os.environ.get("SLOW_SIM_SECONDS", "0.5")))
        x = theta + 0.1 * torch.randn(theta.shape, generator=generator)
        _log(f"end {seed}")
        return x


def _log(line: str) -> None:
    path = os.environ.get("SLOW_SIM_LOG")
    if path:
        with open(path, "a") as fh:
            fh.write(line + "\n")


def finished_run(service: Service, run_id, what: str) -> tuple[object, list, dict[str, dict]]:
    """A finished flow run: the run, its task runs once all are final, and its artifacts by type."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from sbipipe.service import api_request

    with service.settings(), get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)

        def tasks():
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            return runs if runs and all(r.state and r.state.is_final() for r in runs) else None

        runs = wait_for(tasks, timeout=60, what=what)
    artifacts = api_request(service.api, "POST", "/artifacts/filter", {
        "artifacts": {"flow_run_id": {"any_": [str(run_id)]}}, "sort": "CREATED_DESC", "limit": 20, "offset": 0})
    return run, runs, {a["type"]: a for a in artifacts if a["type"]}
