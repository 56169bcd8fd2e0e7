"""``inbox`` (scheduled): run ``infer`` for each observation file dropped into an inbox folder.

With ``model`` the folder is that model's inbox; without, each subfolder named after a registered
model is one (``inbox/cosmo/obs.npy`` → model ``cosmo``). Files move to ``done/`` (result JSON
beside them) or ``failed/`` (the error beside them); see :mod:`sbipipe.inbox` for why overlapping
runs neither lose nor double-process a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from sbipipe.inbox import claims, finish

from .infer import infer

__all__ = ["inbox"]

_RESERVED = {"processing", "done", "failed"}


@flow(name="inbox", flow_run_name="inbox {folder}")
def inbox(folder: str, model: str | None = None, n_samples: int = 10_000, seed: int = 0,
          plot: bool = True) -> dict[str, list[str]]:
    """Process every waiting file once; returns the names done and failed."""
    logger = get_run_logger()
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        logger.info("inbox %s does not exist yet; nothing to do", root)
        return {"done": [], "failed": []}
    boxes = [(root, model)] if model else [
        (sub, sub.name) for sub in sorted(root.iterdir())
        if sub.is_dir() and sub.name not in _RESERVED and not sub.name.startswith(".")]
    outcome: dict[str, list[str]] = {"done": [], "failed": []}
    for box, name in boxes:
        for claim in claims(box):
            if claim.recovered:
                logger.warning("%s was left in processing/ by a reader that stopped; processing it now", claim.name)
            state = infer(name, str(claim.path), n_samples=n_samples, seed=seed, plot=plot, return_state=True)
            result: Any = state.result(raise_on_failure=False)
            if state.is_completed():
                finish(claim, result={"model": result["model"], "samples": result["samples"],
                                      "summary_csv": result["summary_csv"], "flow_run_id": result["flow_run_id"]})
                outcome["done"].append(f"{name}/{claim.name}")
            else:
                error = f"{type(result).__name__}: {result}" if isinstance(result, BaseException) else str(state.message)
                finish(claim, error=f"{error}\nflow run: {state.state_details.flow_run_id}")
                outcome["failed"].append(f"{name}/{claim.name}")
                logger.warning("%s failed: %s", claim.name, error)
    logger.info("done %d, failed %d", len(outcome["done"]), len(outcome["failed"]))
    return outcome
