"""``simulate``: a bank's chunks fanned out as cached tasks, appended in order as they finish."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from sbipipe.chunks import BankAssembler, chunk_folder, ensure_chunk, read_chunk
from sbipipe.errors import SbipipeError
from sbipipe.service import project_home

from ._artifacts import artifact_key

__all__ = ["TASK_RUNNERS", "make_task_runner", "simulate", "simulate_chunk_task"]

TASK_RUNNERS = ("thread", "process", "dask", "ray")


def _chunk_key(_context: Any, p: dict[str, Any]) -> str:
    ident = f"{p['simulator']}-v{p['version']}-seed{p['seed']}-size{p['chunk_size']}-chunk{p['chunk']}"
    return "sbipipe-chunk-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", ident)


@task(name="simulate-chunk", task_run_name="chunk {chunk}", cache_key_fn=_chunk_key, persist_result=True,
      result_serializer="json", retries=2, retry_delay_seconds=2)
def simulate_chunk_task(simulator: str, version: str, seed: int, chunk: int, chunk_size: int, cache: str) -> dict[str, Any]:
    """One chunk of prior draws and simulations into the chunk cache (path + SHA-256 come back).

    Cached by (simulator, version, seed, chunk size, chunk index): a re-run or retry does not
    recompute it; a chunk file already complete on disk is not recomputed either."""
    return ensure_chunk(simulator, seed, chunk, chunk_size, cache)


def make_task_runner(kind: str = "thread", workers: int | None = None, address: str | None = None) -> TaskRunner:
    """``thread``, ``process``, ``dask`` (prefect-dask; a local cluster, or ``address``) or ``ray``
    (prefect-ray; a local instance, or ``address``)."""
    if kind == "thread":
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "process":
        return ProcessPoolTaskRunner(max_workers=workers)
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise SbipipeError("--task-runner dask needs prefect-dask: pip install 'sbipipe[dask]'") from None
        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers or 2, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    if kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise SbipipeError("--task-runner ray needs prefect-ray: pip install 'sbipipe[ray]'") from None
        return RayTaskRunner(address=address) if address else RayTaskRunner(init_kwargs={"num_cpus": workers or 2})
    raise SbipipeError(f"unknown task runner {kind!r}; choose one of {', '.join(TASK_RUNNERS)}")


@flow(name="simulate", flow_run_name="simulate {simulator}: {n} rows", task_runner=ThreadPoolTaskRunner(max_workers=2))
def simulate(simulator: str, bank: str, n: int, seed: int | None = None, chunk_size: int | None = None,
             cache: str | None = None, keep_chunks: bool = False) -> dict[str, Any]:
    """Create, resume or extend the bank ``bank`` to ``n`` rows (the same bits as ``sbipipe simulate``)."""
    logger = get_run_logger()
    cache = cache or str(project_home() / "cache" / "chunks")
    with BankAssembler(simulator, bank, n, seed, chunk_size) as asm:
        sim = asm.simulator
        folder = chunk_folder(cache, sim, asm.seed, asm.chunk_size)
        progress = create_progress_artifact(100.0 * min(asm.rows, n) / n, key=artifact_key("simulate", Path(bank).stem),
                                            description=f"{sim.name}: rows of {n} in {bank}")
        logger.info("%s v%s into %s: %d of %d rows present; chunks of %d", sim.name, sim.version, bank, asm.rows, n,
                    asm.chunk_size)
        while not asm.done:
            futures = {}
            for i in asm.chunks_needed():
                missing = not (folder / f"chunk-{i:06d}.h5").exists()  # a cached result needs its file
                futures[i] = simulate_chunk_task.with_options(refresh_cache=missing or None).submit(
                    simulator, str(sim.version), asm.seed, i, asm.chunk_size, cache)
            for i, future in futures.items():
                meta = future.result()
                data = read_chunk(meta["path"], meta["sha256"])
                if data is None:  # the file went away after its result was cached
                    meta = ensure_chunk(simulator, asm.seed, i, asm.chunk_size, cache)
                    data = read_chunk(meta["path"], meta["sha256"])
                asm.append(i, *data)
                if not keep_chunks:
                    Path(meta["path"]).unlink(missing_ok=True)
                update_progress_artifact(progress, 100.0 * asm.rows / n)
        result = asm.bank()
        logger.info("%s: %d rows, %s non-finite dropped", bank, result.rows, result.attrs.get("dropped", 0))
        return {"bank": str(Path(bank).resolve()), "rows": result.rows, "simulator": sim.name,
                "simulator_version": str(sim.version), "seed": asm.seed, "sha256": result.content_hash()}
