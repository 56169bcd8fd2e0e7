"""``train``: a neural posterior estimator from a bank, as a ``gpu``-tagged task."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from sbipipe.store import CARD

from ._artifacts import artifact_key, markdown_table, publish_markdown, run_names, short_path

__all__ = ["train", "train_estimator"]


_task_name, _flow_name = run_names(lambda p: f"train {p['estimator']} on {short_path(p['bank'])}")


@task(name="train-estimator", task_run_name=_task_name, tags=["gpu"])
def train_estimator(bank: str, output: str, estimator: str = "auto", embedding: str = "auto", ensemble: int | None = None,
                    max_epochs: int | None = None, seed: int = 0, device: str = "auto") -> dict[str, Any]:
    """Train on CUDA when present (the ``gpu`` tag limit keeps one such task per GPU)."""
    from sbipipe.npe import train_posterior
    from sbipipe.training import resolve_device

    dev = resolve_device(device)
    get_run_logger().info("training %s on %s (device %s)", estimator, bank, dev)
    post = train_posterior(bank, output, estimator=estimator, embedding=embedding, ensemble=ensemble,
                           max_epochs=max_epochs, device=str(dev), seed=seed)
    card = Path(output) / CARD
    tr = post.card["training"]
    return {"model": str(Path(output).resolve()), "card_sha256": hashlib.sha256(card.read_bytes()).hexdigest(),
            "device": str(dev), "seconds": tr["seconds"], "final": tr["final"]}


@flow(name="train", flow_run_name=_flow_name)
def train(bank: str, output: str, estimator: str = "auto", embedding: str = "auto", ensemble: int | None = None,
          max_epochs: int | None = None, seed: int = 0, device: str = "auto") -> dict[str, Any]:
    """Train an estimator and publish its losses."""
    result = train_estimator(bank, output, estimator, embedding, ensemble, max_epochs, seed, device)
    publish_markdown(
        f"# Training: {estimator} on `{bank}`\n\nModel `{result['model']}`, device {result['device']}, "
        f"{result['seconds']:.1f} s.\n\n" + markdown_table(result["final"]),
        key=artifact_key("train", Path(output).name), description="training summary")
    return result
