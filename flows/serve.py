"""``sbipipe serve``: the deployments of a config file (``deploy/serve.yaml``), served by one process.

Most deployments go to Prefect's runner, which starts each run in a fresh subprocess (polling
every ``poll_seconds``). Deployments marked ``in_process`` (``infer``) run in threads of the
serving process instead: their models stay loaded between runs and a run starts within
``poll_seconds`` of its submission, with no interpreter start-up or imports in between.
"""

from __future__ import annotations

import datetime as _dt
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib import import_module
from pathlib import Path
from typing import Any
from uuid import UUID

from sbipipe.errors import SbipipeError

__all__ = ["FLOWS", "InProcessRunner", "build_deployment", "load_config", "serve_config"]

FLOWS = {
    "simulate": "flows.simulate:simulate",
    "train": "flows.train:train",
    "validate": "flows.validate:validate",
    "pipeline": "flows.pipeline:pipeline",
    "infer": "flows.infer:infer",
    "inbox": "flows.inbox:inbox",
    "source-posterior": "flows.source_posterior:source_posterior",
    "compare": "flows.compare:compare",
}
_KEYS = {"flow", "name", "parameters", "cron", "interval", "tags", "description", "in_process", "workers",
         "poll_seconds", "paused", "timezone"}

log = logging.getLogger("sbipipe.serve")


def load_config(path: str | Path) -> dict[str, Any]:
    """The serve config, checked: ``deployments`` is a list of ``{flow, name, ...}``."""
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise SbipipeError(f"cannot read the serve config {str(path)!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SbipipeError(f"{str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    deployments = config.get("deployments") if isinstance(config, dict) else None
    if not isinstance(deployments, list) or not deployments:
        raise SbipipeError(f"{str(path)!r}: expected a list 'deployments' of {{flow, name, ...}}")
    for d in deployments:
        if not isinstance(d, dict) or d.get("flow") not in FLOWS or not d.get("name"):
            raise SbipipeError(f"{str(path)!r}: each deployment needs a 'name' and a 'flow' among {', '.join(FLOWS)}; got {d!r}")
        unknown = set(d) - _KEYS
        if unknown:
            raise SbipipeError(f"{str(path)!r}: deployment {d['name']!r} has unknown keys {sorted(unknown)}")
    return config


def _flow(name: str) -> Any:
    module, _, attr = FLOWS[name].partition(":")
    return getattr(import_module(module), attr)


def build_deployment(spec: dict[str, Any]) -> Any:
    """A ``RunnerDeployment`` from one config entry."""
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

    schedules = []
    if spec.get("cron"):
        schedules.append(CronSchedule(cron=spec["cron"], timezone=spec.get("timezone", "UTC")))
    if spec.get("interval"):
        schedules.append(IntervalSchedule(interval=_dt.timedelta(seconds=float(spec["interval"]))))
    return _flow(spec["flow"]).to_deployment(
        name=spec["name"], parameters=spec.get("parameters") or {}, schedules=schedules or None,
        tags=list(spec.get("tags") or []), description=spec.get("description"), paused=spec.get("paused"))


class InProcessRunner:
    """Runs the scheduled runs of one deployment in threads of this process.

    A run is claimed by proposing ``Pending`` (the server accepts one such transition, so two
    runners never execute the same run), then executed by Prefect's flow engine here."""

    def __init__(self, flow: Any, deployment_id: UUID, workers: int = 2, poll_seconds: float = 0.2):
        self.flow, self.deployment_id, self.poll = flow, deployment_id, poll_seconds
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix=f"{flow.name}-run")
        self.workers = workers
        self.active = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"{flow.name}-poller", daemon=True)

    def start(self) -> InProcessRunner:
        self._thread.start()
        return self

    def stop(self, wait: bool = True) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.pool.shutdown(wait=wait)

    def _loop(self) -> None:
        from prefect.client.orchestration import get_client

        last_ready = 0.0
        with get_client(sync_client=True) as client:
            while not self._stop.is_set():
                try:
                    now = _dt.datetime.now(_dt.timezone.utc)
                    if now.timestamp() - last_ready > 15:  # keeps the deployment "Ready" in the UI
                        client.get_scheduled_flow_runs_for_deployments([self.deployment_id], scheduled_before=now)
                        last_ready = now.timestamp()
                    for run in self._due(client, now):
                        if self._claim(client, run.id):
                            with self._lock:
                                self.active += 1
                            self.pool.submit(self._execute, run.id)
                except Exception:  # the API was unreachable for a moment: keep polling
                    log.exception("polling for %s runs failed", self.flow.name)
                self._stop.wait(self.poll)

    def _due(self, client: Any, now: _dt.datetime) -> list[Any]:
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterDeploymentId,
            FlowRunFilterNextScheduledStartTime,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType
        from prefect.client.schemas.sorting import FlowRunSort

        free = self.workers - self.active
        if free <= 0:
            return []
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[self.deployment_id]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
                next_scheduled_start_time=FlowRunFilterNextScheduledStartTime(before_=now),
            ),
            sort=FlowRunSort.NEXT_SCHEDULED_START_TIME_ASC, limit=free)

    def _claim(self, client: Any, run_id: UUID) -> bool:
        from prefect.exceptions import Abort
        from prefect.states import Pending
        from prefect.utilities.engine import propose_state_sync

        try:
            return propose_state_sync(client, Pending(), flow_run_id=run_id).is_pending()
        except Abort:
            return False

    def _execute(self, run_id: UUID) -> None:
        from prefect.client.orchestration import get_client
        from prefect.flow_engine import run_flow

        try:
            with get_client(sync_client=True) as client:
                flow_run = client.read_flow_run(run_id)
            run_flow(self.flow, flow_run=flow_run, return_type="state")
        except BaseException:  # the engine records failures itself; never let one kill the pool
            log.exception("flow run %s ended with an error outside the engine", run_id)
        finally:
            with self._lock:
                self.active -= 1


def serve_config(config: dict[str, Any]) -> None:
    """Register and serve the config's deployments until interrupted."""
    from prefect import serve

    runner_deps, in_process = [], []
    for spec in config["deployments"]:
        deployment = build_deployment(spec)
        if spec.get("in_process"):
            module = import_module(FLOWS[spec["flow"]].partition(":")[0])
            if hasattr(module, "warm_up"):
                module.warm_up()
            runner = InProcessRunner(_flow(spec["flow"]), deployment.apply(), workers=int(spec.get("workers", 2)),
                                     poll_seconds=float(spec.get("poll_seconds", 0.2)))
            in_process.append(runner.start())
        else:
            runner_deps.append(deployment)
    try:
        if runner_deps:
            serve(*runner_deps, limit=config.get("limit"), pause_on_shutdown=False)
        else:
            threading.Event().wait()
    finally:
        for runner in in_process:
            runner.stop()
