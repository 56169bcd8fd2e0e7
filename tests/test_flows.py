"""The flows against a real local Prefect server: simulate (cache, kill/resume, Dask), the served
infer deployment (submit → completed → samples → artifacts, bad input), overlapping inbox runs."""

from __future__ import annotations

import contextvars
import json
import os
import re
import signal
import threading
from pathlib import Path
from uuid import UUID

import numpy as np
import pytest

from sbipipe.bank import SimulationBank, chunk_generator, simulate_bank
from sbipipe.service import api_request

from .conftest import assert_one_line_error
from .service_helpers import REPO, kill_group, service, wait_for  # noqa: F401  (service: session fixture)


def _run_id(stdout: str) -> UUID:
    return UUID(re.search(r"/runs/flow-run/([0-9a-f-]{36})", stdout).group(1))


def _task_runs(service, flow_run_id: UUID, expected: int) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    def final_runs():
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                         sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)
        return runs if len(runs) >= expected and all(r.state and r.state.is_final() for r in runs) else None

    with service.settings():
        return wait_for(final_runs, timeout=60, what=f"{expected} final task runs")


def test_simulate_flow_gives_the_bank_bits_and_caches_chunks(service, tmp_path):
    from flows.simulate import simulate

    reference = simulate_bank("two_moons", tmp_path / "ref.h5", 2500, seed=5, chunk_size=1000)
    with service.settings():
        first = simulate("two_moons", str(tmp_path / "a.h5"), 2500, seed=5, chunk_size=1000, keep_chunks=True,
                         return_state=True)
        again = simulate("two_moons", str(tmp_path / "b.h5"), 2500, seed=5, chunk_size=1000, return_state=True)
    assert first.result()["sha256"] == again.result()["sha256"] == reference.content_hash()
    progress = api_request(service.api, "POST", "/artifacts/filter", {
        "artifacts": {"flow_run_id": {"any_": [str(first.state_details.flow_run_id)]}, "type": {"any_": ["progress"]}},
        "sort": "CREATED_DESC", "limit": 5, "offset": 0})
    assert [a["data"] for a in progress] == [100.0]  # the progress artifact, updated to the end
    runs = _task_runs(service, again.state_details.flow_run_id, 3)
    assert sorted(r.name for r in runs) == ["chunk 0", "chunk 1", "chunk 2"]
    assert {r.state.name for r in runs} == {"Cached"}  # nothing recomputed


def test_retried_simulate_after_a_killed_worker_recomputes_nothing_stored(service, tmp_path, monkeypatch):
    log = tmp_path / "calls.log"
    env = {"SLOW_SIM_LOG": str(log), "SLOW_SIM_SECONDS": "0.5"}
    args = ("flow", "simulate", "tests.service_helpers:SlowSim", "-n", "800", "--chunk-size", "100", "--seed", "3",
            "-o", tmp_path / "bank.h5", "--workers", "2")
    seed_to_chunk = {chunk_generator(3, i).initial_seed(): i for i in range(20)}

    def calls(kind: str) -> list[int]:
        text = log.read_text() if log.exists() else ""
        return [seed_to_chunk[int(s)] for s in re.findall(rf"^{kind} (\d+)$", text, re.M)]

    worker = service.popen(*args, log=tmp_path / "first.log", env=env)
    wait_for(lambda: len(calls("end")) >= 3 or worker.poll() is not None, timeout=180, what="3 finished chunks")
    kill_group(worker, signal.SIGKILL)
    assert worker.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-2000:]
    in_bank = SimulationBank(tmp_path / "bank.h5").attrs["next_chunk"]
    cached = {int(p.stem.split("-")[1]) for p in (service.home / "cache" / "chunks").rglob("chunk-*.h5")
              if "SlowSim" in str(p)}
    stored = set(range(in_bank)) | cached
    assert 0 < len(stored) < 8, (in_bank, cached)
    recorded = set()  # chunks whose Prefect result record was written whole before the kill
    for record in (service.home / "prefect" / "storage").glob("sbipipe-chunk-*SlowSim*"):
        try:
            json.loads(record.read_text())
        except ValueError:
            continue
        recorded.add(int(re.search(r"chunk(\d+)$", record.name).group(1)))
    log.write_text("")

    again = service.cli(*args, env=env, check=True)
    recomputed = set(calls("start"))
    assert not recomputed & stored, (recomputed, stored)
    assert recomputed | stored == set(range(8))
    monkeypatch.setenv("SLOW_SIM_SECONDS", "0")
    reference = simulate_bank("tests.service_helpers:SlowSim", tmp_path / "ref.h5", 800, seed=3, chunk_size=100)
    resumed = SimulationBank(tmp_path / "bank.h5")
    if resumed.content_hash() != reference.content_hash():  # say which chunks differ (seen once, under load)
        got, want = resumed.load()[0].numpy(), reference.load()[0].numpy()
        bad = [i for i in range(8) if not np.array_equal(got[100 * i:100 * (i + 1)], want[100 * i:100 * (i + 1)])]
        raise AssertionError(f"resumed bank differs: rows {resumed.rows} vs {reference.rows}, chunks {bad} differ; "
                             f"killed at next_chunk {in_bank}, cached {sorted(cached)}, recomputed {sorted(recomputed)}, "
                             f"attrs {dict(resumed.attrs)}; first run log: {(tmp_path / 'first.log').read_text()[-1500:]}")
    runs = _task_runs(service, _run_id(again.stdout), 8 - in_bank)
    # A chunk file is written before its result record, so a kill between the two leaves a file that
    # the retry reuses (nothing recomputed, checked above) under a Completed, not Cached, task run.
    from_cache = {r.name for r in runs if r.state.name == "Cached"}
    with_file = {f"chunk {i}" for i in cached - set(range(in_bank))}
    with_record = {f"chunk {i}" for i in (cached & recorded) - set(range(in_bank))}
    assert with_record <= from_cache <= with_file, (from_cache, with_record, with_file)


def test_dask_task_runner_on_a_local_cluster(service, tmp_path):
    pytest.importorskip("prefect_dask")
    from flows.simulate import make_task_runner, simulate

    runner = make_task_runner("dask", workers=1)
    assert type(runner).__name__ == "DaskTaskRunner"
    with service.settings():
        result = simulate.with_options(task_runner=runner)("two_moons", str(tmp_path / "bank.h5"), 3000, seed=9,
                                                            chunk_size=1000)
    reference = simulate_bank("two_moons", tmp_path / "ref.h5", 3000, seed=9, chunk_size=1000)
    assert result["sha256"] == reference.content_hash()


# -- the served infer deployment ------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(service, tmp_path_factory):
    """``sbipipe serve`` with the infer deployment (in process) running for this module."""
    folder = tmp_path_factory.mktemp("serve")
    config = folder / "serve.yaml"
    config.write_text("poll_seconds: 1\ndeployments:\n"
                      "  - {flow: infer, name: sbipipe, in_process: true, workers: 2, poll_seconds: 0.2}\n"
                      "  - {flow: inbox, name: sbipipe, parameters: {folder: inbox}}\n")
    proc = service.popen("serve", "--config", config, log=folder / "serve.log")

    def ready():
        assert proc.poll() is None, (folder / "serve.log").read_text()[-3000:]
        return "Your deployments are being served" in (folder / "serve.log").read_text()

    wait_for(ready, timeout=180, what="sbipipe serve")
    yield proc
    kill_group(proc, signal.SIGKILL)


def test_submit_wait_completes_with_samples_file_and_artifacts(service, served):
    from prefect.client.orchestration import get_client

    proc = service.cli("submit", service.model, "--observation", service.observation, "-n", "2000", "--wait",
                       check=True)
    assert re.search(r"Completed in \d+\.\d+ s after submission", proc.stdout), proc.stdout
    assert re.search(r"^\s*theta1\s+\S+", proc.stdout, re.M) and re.search(r"^\s*theta2\s+\S+", proc.stdout, re.M)
    run_id = _run_id(proc.stdout)
    samples = Path(re.search(r"samples (\S+samples\.h5)", proc.stdout).group(1))
    assert samples.is_file() and samples.with_name("samples.summary.csv").is_file()
    with service.settings(), get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        assert run.state.is_completed() and run.name.startswith("infer tm")
        result = run.state.result()  # persisted (JSON) for callers
        assert result["samples"] == str(samples) and {r["parameter"] for r in result["summary"]} == {"theta1", "theta2"}
        assert len(result["acceptance"]) == 1 and 0 < result["acceptance"][0] <= 1
    artifacts = api_request(service.api, "POST", "/artifacts/filter", {
        "artifacts": {"flow_run_id": {"any_": [str(run_id)]}}, "sort": "CREATED_DESC", "limit": 20, "offset": 0})
    by_type = {a["type"]: a for a in artifacts if a["type"]}  # (None: the persisted-result record)
    assert set(by_type) == {"markdown", "table", "image"}
    markdown = by_type["markdown"]["data"]
    for fragment in ("model | tm:1", "simulator | two_moons v1", "good.npy", "validation verdict | **passed**",
                     "| theta1 |", "acceptance (truncated to the prior) | ", "data:image/png;base64,"):
        assert fragment in markdown, fragment
    assert [r["parameter"] for r in json.loads(by_type["table"]["data"])] == ["theta1", "theta2"]
    assert by_type["image"]["data"].startswith("data:image/png;base64,")


def test_bad_observations_fail_clearly_and_leave_the_service_running(service, served, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    obs = service.root / "obs"
    np.save(obs / "nan.npy", np.array([0.1, np.nan], dtype=np.float32))
    np.save(obs / "shape.npy", np.zeros((3, 3), dtype=np.float32))
    (obs / "words.csv").write_text("a,b\n")
    outside = tmp_path.parent / "outside.npy"  # not under the allowed folder
    np.save(outside, np.zeros(2, dtype=np.float32))
    expected = {
        "nan.npy": "1 NaN/inf value(s)",
        "shape.npy": "expected an observation of shape [2]",
        "words.csv": "cannot read observation",
        str(outside): "outside the allowed folders",
    }
    with service.settings():
        runs = {name: run_deployment("infer/sbipipe", timeout=0, parameters={
            "model": "tm", "observation": name if name.startswith("/") else str(obs / name)}) for name in expected}
        unknown = run_deployment("infer/sbipipe", timeout=0, parameters={"model": "nosuch",
                                                                        "observation": str(service.observation)})
    proc = service.cli("submit", "tm", "--observation", obs / "nan.npy", "--wait")
    assert_one_line_error(proc, "failed:", "the observation holds 1 NaN/inf value(s)")
    with service.settings(), get_client(sync_client=True) as client:
        def final(run_id):
            run = client.read_flow_run(run_id)
            return run if run.state.is_final() else None

        for name, fragment in expected.items():
            run = wait_for(lambda name=name: final(runs[name].id), timeout=60, what=f"the run for {name}")
            assert run.state.is_failed() and fragment in run.state.message, (name, run.state.message)
        run = wait_for(lambda: final(unknown.id), timeout=60, what="the unknown-model run")
        assert run.state.is_failed() and "unknown model 'nosuch'; registered models: tm" in run.state.message
    # the service is unaffected: `prefect deployment run` (documented) still gets a completed run
    prefect = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "prefect"
    if not prefect.exists():
        prefect = Path(__import__("sys").executable).with_name("prefect")
    import subprocess

    created = subprocess.run([str(prefect), "deployment", "run", "infer/sbipipe", "--param", "model=tm",
                              "--param", f"observation={service.observation}", "--param", "n_samples=500"],
                             env=service.env, capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stdout + created.stderr
    run_id = UUID(re.search(r"UUID: ([0-9a-f-]{36})", created.stdout).group(1))
    with service.settings(), get_client(sync_client=True) as client:
        run = wait_for(lambda: (r := client.read_flow_run(run_id)).state.is_final() and r, timeout=60,
                       what="the prefect-CLI run")
        assert run.state.is_completed(), run.state.message


def test_overlapping_inbox_runs_neither_lose_nor_double_process(service, tmp_path):
    from flows.inbox import inbox

    root = service.root / "inbox-test"
    box = root / "tm"
    (box / "processing").mkdir(parents=True)
    good = [f"obs{i}.npy" for i in range(4)]
    for i, name in enumerate(good):
        np.save(box / name, np.array([0.1 * i, -0.1], dtype=np.float32))
    np.save(box / "processing" / "stale.npy", np.array([0.2, 0.0], dtype=np.float32))  # its reader died
    np.save(box / "bad.npy", np.array([np.inf, 0.0], dtype=np.float32))
    results: list[dict] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(inbox(str(root), n_samples=300, plot=False))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    with service.settings():
        threads = [threading.Thread(target=contextvars.copy_context().run, args=(run,)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    assert not errors and len(results) == 2, errors
    done = [n for r in results for n in r["done"]]
    failed = [n for r in results for n in r["failed"]]
    assert sorted(done) == sorted(f"tm/{n}" for n in [*good, "stale.npy"])  # each exactly once
    assert failed == ["tm/bad.npy"]
    assert not [p for p in box.iterdir() if p.is_file()] and not list((box / "processing").iterdir())
    done_files = sorted(p.name for p in (box / "done").iterdir() if p.suffix == ".npy")
    assert done_files == sorted([*good, "stale.npy"])
    run_ids = {json.loads((box / "done" / f"{n}.result.json").read_text())["flow_run_id"] for n in done_files}
    assert len(run_ids) == len(good) + 1
    assert "NaN/inf" in (box / "failed" / "bad.npy.error.txt").read_text()
