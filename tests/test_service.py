"""The local server commands, the model registry and the `gpu` tag limit, against a real server."""

from __future__ import annotations

import threading
import time

import pytest

from sbipipe.errors import SbipipeError
from sbipipe.models import get_model, list_models, register_model, set_verdict

from .conftest import assert_one_line_error
from .service_helpers import service  # noqa: F401  (session fixture)


def test_server_start_is_idempotent_and_status_prints_urls(service):
    from sbipipe.service import start_server

    again = start_server(service.home)
    assert again.already_running and again.api_url == service.api
    status = service.cli("server", "status", env={"PREFECT_API_URL": ""}, check=True).stdout
    assert f"UI {service.ui}" in status and f"API {service.api}" in status and "healthy" in status
    assert "tag limit gpu = 1" in status and "sqlite:" in status


def test_flow_commands_without_a_server_say_how_to_start_one(service, tmp_path):
    env = {"SBIPIPE_HOME": str(tmp_path / "nothing-here"), "PREFECT_API_URL": ""}
    proc = service.cli("flow", "infer", "tm", "--observation", service.observation, env=env)
    assert_one_line_error(proc, "no Prefect server", "sbipipe server start")


def test_models_table_and_unknown_model_lists_known_ones(service, tmp_path):
    lines = service.cli("models", check=True).stdout.splitlines()
    assert lines[0].split()[:4] == ["name", "version", "simulator", "verdict"]
    assert any(line.split()[:2] == ["tm", "1"] and "passed" in line for line in lines[1:])
    proc = service.cli("submit", "nosuch", "--observation", service.observation, "--wait")
    assert_one_line_error(proc, "unknown model 'nosuch'", "registered models: tm")


def test_registry_versions_verdicts_and_errors(tmp_path, service):
    home = tmp_path / "home"
    model = service.root / "model-work" / "model"
    first = register_model("m", model, calibrated=True, home=home)
    second = register_model("m", model, calibrated=True, home=home)
    assert (first["version"], second["version"]) == (1, 2)
    assert (home / "models" / "m" / "v2" / "model" / "card.json").is_file()
    assert get_model("m", home)["version"] == 2 and get_model("m:1", home)["version"] == 1
    set_verdict("m", 1, False, "/reports/x", home)
    assert [e["verdict"] for e in list_models(home)] == ["failed", "passed"]
    with pytest.raises(SbipipeError, match="unknown model 'x'; registered models: m"):
        get_model("x", home)
    with pytest.raises(SbipipeError, match="no version 7"):
        get_model("m:7", home)
    with pytest.raises(SbipipeError, match="model name"):
        register_model("../evil", model, home=home)


def test_gpu_tagged_tasks_never_overlap_under_a_limit_of_one(service):
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    spans: list[tuple[float, float]] = []
    lock = threading.Lock()

    @task(tags=["gpu"])
    def on_gpu(i: int) -> int:
        start = time.monotonic()
        time.sleep(0.5)
        with lock:
            spans.append((start, time.monotonic()))
        return i

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=3))
    def two_gpu_tasks() -> list[int]:
        return [f.result() for f in [on_gpu.submit(i) for i in range(3)]]

    with service.settings():
        assert two_gpu_tasks() == [0, 1, 2]
    spans.sort()
    assert len(spans) == 3
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end, spans


def test_api_request_retries_a_busy_server_then_reports_it(monkeypatch):
    """Prefect answers 503 while its SQLite database is locked (seen once as CI's server start failing)."""
    import http.server
    import json

    from sbipipe.service import api_request

    answers = [503, 503, 200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            code = answers.pop(0) if answers else 503
            body = json.dumps({"ok": True} if code == 200 else {"exception_message": "Service Unavailable"}).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/api"
    try:
        assert api_request(url, "POST", "/concurrency_limits/", {"tag": "gpu"}) == {"ok": True}
        assert answers == []
        with pytest.raises(SbipipeError, match="answered 503"):
            api_request(url, "POST", "/concurrency_limits/", {"tag": "gpu"}, retry_for=0.6)
    finally:
        server.shutdown()
