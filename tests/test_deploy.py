"""deploy/: the serve config, prefect.yaml (registered on the real server), docker-compose and the
Kubernetes notes. Docker cannot run here, so the compose file is checked, not started."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .service_helpers import REPO, service  # noqa: F401  (service: session fixture)

DEPLOY = REPO / "deploy"
GPU_FLOWS = {"pipeline", "validate", "source-posterior", "compare"}  # they train, evaluate or sample networks


def _flow_at(entrypoint: str):
    from importlib import import_module

    from prefect import Flow

    path, _, name = entrypoint.partition(":")
    obj = getattr(import_module(path.removesuffix(".py").replace("/", ".")), name)
    assert isinstance(obj, Flow), entrypoint
    return obj


def test_serve_config_builds_every_deployment_with_its_schedule():
    from flows.serve import build_deployment, load_config

    config = load_config(DEPLOY / "serve.yaml")
    deployments = {f"{d['flow']}/{d['name']}": (d, build_deployment(d)) for d in config["deployments"]}
    assert set(deployments) == {"infer/sbipipe", "pipeline/sbipipe", "validate/nightly", "inbox/sbipipe"}
    assert deployments["infer/sbipipe"][0]["in_process"] is True
    assert deployments["validate/nightly"][1].schedules[0].schedule.cron == "0 3 * * *"
    assert deployments["inbox/sbipipe"][1].schedules[0].schedule.interval.total_seconds() == 60
    assert 1 <= config["poll_seconds"] < 10  # Prefect's default (10 s) is what we tune away from


def test_serve_config_errors_are_one_line(tmp_path):
    from flows.serve import load_config
    from sbipipe.errors import SbipipeError

    bad = tmp_path / "serve.yaml"
    bad.write_text("deployments:\n  - {flow: nosuch, name: x}\n")
    with pytest.raises(SbipipeError, match="'flow' among simulate, train"):
        load_config(bad)
    bad.write_text("deployments:\n  - {flow: infer, name: x, crn: '* * * * *'}\n")
    with pytest.raises(SbipipeError, match="unknown keys"):
        load_config(bad)


def test_prefect_yaml_is_valid_and_routes_training_to_the_gpu_pool():
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(yaml.safe_load((DEPLOY / "prefect.yaml").read_text()))
    names = set()
    for d in model.deployments:
        flow = _flow_at(d.entrypoint)
        names.add(f"{flow.name}/{d.name}")
        assert d.work_pool.name == ("gpu" if flow.name in GPU_FLOWS else "cpu"), d.entrypoint
    serve = {f"{d['flow']}/{d['name']}" for d in yaml.safe_load((DEPLOY / "serve.yaml").read_text())["deployments"]}
    assert serve <= names  # the same deployments as `sbipipe serve`


def test_prefect_yaml_deploys_to_the_server(service):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with service.settings(), get_client(sync_client=True) as client:
        for pool in ("cpu", "gpu"):
            try:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            except ObjectAlreadyExists:
                pass
    prefect = Path(sys.executable).with_name("prefect")
    proc = subprocess.run([str(prefect), "deploy", "--all", "--prefect-file", "deploy/prefect.yaml"], cwd=REPO,
                          env=service.env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with service.settings(), get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("validate/nightly")
        infer = client.read_deployment_by_name("infer/sbipipe")
    assert nightly.work_pool_name == "gpu" and nightly.schedules[0].schedule.cron == "0 3 * * *"
    assert infer.work_pool_name == "cpu" and infer.entrypoint == "flows/infer.py:infer"


def test_docker_compose_has_server_postgres_and_cpu_and_gpu_workers():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "server", "cpu-worker", "gpu-worker"} <= set(services)
    server = services["server"]
    url = server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert re.match(r"postgresql\+asyncpg://\w+:\w+@postgres:5432/\w+$", url)
    assert server["environment"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert "prefect server start" in server["command"]
    for pool in ("cpu", "gpu"):
        worker = services[f"{pool}-worker"]
        assert worker["command"] == f"prefect worker start --pool {pool} --type process"
        assert worker["environment"]["PREFECT_API_URL"] == "http://server:4200/api"
        assert "sbipipe-home:/data/sbipipe" in worker["volumes"]
    gpu = services["gpu-worker"]
    assert gpu["runtime"] == "nvidia"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "prefect deploy --all --prefect-file deploy/prefect.yaml" in " ".join(services["deploy"]["command"])
    assert (DEPLOY / compose["x-sbipipe"]["build"]["dockerfile"].removeprefix("deploy/")).is_file()


def test_kubernetes_notes_cover_pools_gpus_and_shared_state():
    text = (DEPLOY / "kubernetes.md").read_text()
    for fragment in ("prefect-kubernetes", "--type kubernetes", "nvidia.com/gpu", "PREFECT_API_DATABASE_CONNECTION_URL",
                     "ReadWriteMany", "SBIPIPE_HOME", "prefect concurrency-limit create gpu"):
        assert fragment in text, fragment
