"""One training loop for every estimator: any ``nn.Module`` with ``loss(*batch) -> scalar``.

AdamW, a cosine learning-rate decay (or halving when the validation loss stalls), early stopping on
a held-out split (with the cosine decay, only once the rate has annealed; the best weights are
kept), gradient-norm clipping, bf16 autocast on CUDA, batches by indexing whole tensors (or
streamed from an HDF5 bank), a checkpoint after every epoch that ``resume=True`` continues from,
seeded reproducibility, a progress bar, and the history as CSV.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from .atomic import atomic_path
from .errors import SbipipeError

__all__ = ["TensorData", "TrainConfig", "fit", "resolve_device"]


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SbipipeError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SbipipeError("--device cuda was asked for but no CUDA device is available; use --device auto or cpu")
    return torch.device(device)


#: with the cosine schedule, early stopping waits until this fraction of ``max_epochs`` (the learning
#: rate is then a quarter of its initial value): the validation loss keeps improving while the rate
#: anneals, so a stall at a high rate is noise, not overfitting. (On the 5·10⁴-row cosmo_gaussian
#: bank an NSF stalled for 20 epochs at epoch 48 of 91 with validation loss −0.967 and C2ST 0.607;
#: with this rule the same training ran all 91 epochs and reached −1.022 and C2ST 0.531.)
COSINE_STOP_AFTER = 2 / 3


@dataclass
class TrainConfig:
    max_epochs: int = 500
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-5
    patience: int = 20  # epochs without improvement before stopping (cosine: not before COSINE_STOP_AFTER)
    lr_patience: int = 8  # epochs without improvement before halving the learning rate
    clip: float = 5.0
    schedule: str = "cosine"  # "cosine": anneal to 0 over max_epochs; "plateau": halve when val stalls
    seed: int = 0
    device: str = "auto"
    mixed_precision: bool = True  # bf16 autocast, CUDA only
    threads: int | None = None  # CPU threads while training (small networks run fastest on one)


class TensorData:
    """In-memory tensors batched by indexing a random permutation (no per-sample loader)."""

    def __init__(self, *tensors: Tensor):
        self.tensors = tensors
        self.n = len(tensors[0])

    def __len__(self) -> int:
        return self.n

    def batches(self, batch_size: int, generator: torch.Generator | None, device: torch.device) -> Iterator[tuple[Tensor, ...]]:
        order = torch.randperm(self.n, generator=generator) if generator is not None else torch.arange(self.n)
        for i in range(0, self.n, batch_size):
            idx = order[i : i + batch_size]
            yield tuple(t[idx] for t in self.tensors)  # the loop moves batches to the device


def _to(batch: Iterable[Tensor], device: torch.device) -> tuple[Tensor, ...]:
    return tuple(t.to(device, non_blocking=True) for t in batch)


def fit(
    module: nn.Module,
    train: Any,
    val: Any,
    config: TrainConfig,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    progress: Callable[[dict[str, float]], None] | None = None,
    loss: Callable[..., Tensor] | None = None,
    until: int | None = None,
) -> pd.DataFrame:
    """Train ``module`` in place and return the per-epoch history.

    ``train``/``val`` have ``batches(batch_size, generator, device)`` (:class:`TensorData`, or a
    bank stream). ``loss(module, *batch)`` defaults to ``module.loss(*batch)``. With a
    ``checkpoint`` path the full state is saved after every epoch; ``resume=True`` continues
    from it (the result equals an uninterrupted run). ``until`` pauses after that many epochs of
    the ``max_epochs`` schedule (a later ``resume=True`` call goes on from there)."""
    with _num_threads(config.threads):
        return _fit(module, train, val, config, checkpoint, resume, progress, loss, until)


@contextlib.contextmanager
def _num_threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit(module: nn.Module, train: Any, val: Any, config: TrainConfig, checkpoint: str | os.PathLike | None,
         resume: bool, progress: Callable[[dict[str, float]], None] | None,
         loss: Callable[..., Tensor] | None, until: int | None = None) -> pd.DataFrame:
    device = resolve_device(config.device)
    loss_fn = loss or (lambda m, *b: m.loss(*b))
    torch.manual_seed(config.seed)
    module.to(device)
    # fused: one kernel for all parameters (10 % of a small flow's step on CPU went to the per-tensor loop)
    params = list(module.parameters())  # listed once: walking the modules each step cost ~2 % of a step
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    if config.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.max_epochs)
    elif config.schedule == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=config.lr_patience)
    else:
        raise SbipipeError(f"unknown learning-rate schedule {config.schedule!r}; use cosine or plateau")
    gen = torch.Generator().manual_seed(config.seed)
    state = {"epoch": 0, "best": math.inf, "bad_epochs": 0, "history": [], "best_weights": None, "seconds": 0.0}
    ckpt = Path(checkpoint) if checkpoint else None
    if resume and ckpt is not None and ckpt.exists():
        state = _load_checkpoint(ckpt, module, opt, sched, gen, device)
    amp = config.mixed_precision and device.type == "cuda"
    best_weights = state["best_weights"] or copy.deepcopy(module.state_dict())
    stop = min(config.max_epochs, until or config.max_epochs)
    while state["epoch"] < stop and not _should_stop(state, config):
        t0 = time.perf_counter()
        module.train()
        total, count = 0.0, 0
        for batch in train.batches(config.batch_size, gen, device):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                value = loss_fn(module, *_to(batch, device))
            if not torch.isfinite(value):
                raise SbipipeError(
                    f"the training loss became {value.item()} at epoch {state['epoch'] + 1}; "
                    "lower the learning rate or check the bank for extreme values"
                )
            opt.zero_grad(set_to_none=True)
            value.backward()
            nn.utils.clip_grad_norm_(params, config.clip, foreach=True)
            opt.step()
            total, count = total + float(value.detach()) * len(batch[0]), count + len(batch[0])
        val_loss = evaluate(module, val, config.batch_size * 4, device, loss_fn, amp)
        sched.step(val_loss) if config.schedule == "plateau" else sched.step()
        state["epoch"] += 1
        if val_loss < state["best"] - 1e-4:
            state["best"], state["bad_epochs"] = val_loss, 0
            best_weights = copy.deepcopy(module.state_dict())
        else:
            state["bad_epochs"] += 1
        state["seconds"] += time.perf_counter() - t0
        row = {"epoch": state["epoch"], "train_loss": total / max(count, 1), "val_loss": val_loss,
               "lr": opt.param_groups[0]["lr"], "seconds": state["seconds"]}
        state["history"].append(row)
        state["best_weights"] = best_weights
        if ckpt is not None:
            _save_checkpoint(ckpt, module, opt, sched, gen, state)
        if progress:
            progress(row)
    module.load_state_dict(best_weights)
    module.eval()
    return pd.DataFrame(state["history"])


def _should_stop(state: dict, config: TrainConfig) -> bool:
    """Early stopping: ``patience`` epochs without improvement (cosine: and past :data:`COSINE_STOP_AFTER`)."""
    stalled = state["bad_epochs"] >= config.patience
    return stalled and (config.schedule != "cosine" or state["epoch"] >= COSINE_STOP_AFTER * config.max_epochs)


@torch.no_grad()
def evaluate(module: nn.Module, data: Any, batch_size: int, device: torch.device,
             loss_fn: Callable[..., Tensor], amp: bool = False) -> float:
    """Mean loss over ``data`` in evaluation mode."""
    module.eval()
    total, count = 0.0, 0
    for batch in data.batches(batch_size, None, device):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            total += float(loss_fn(module, *_to(batch, device))) * len(batch[0])
        count += len(batch[0])
    if count == 0:
        raise SbipipeError("the validation split is empty; simulate more rows")
    return total / count


def _save_checkpoint(path: Path, module: nn.Module, opt: Any, sched: Any, gen: torch.Generator, state: dict) -> None:
    payload = {
        "model": module.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "state": {k: v for k, v in state.items() if k != "best_weights"},
        "best_weights": state["best_weights"],
    }
    with atomic_path(path, durable=False) as tmp:  # every epoch: crash-safe, no fsync cost
        torch.save(payload, tmp)


def _load_checkpoint(path: Path, module: nn.Module, opt: Any, sched: Any, gen: torch.Generator, device: torch.device) -> dict:
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
        module.load_state_dict(payload["model"])
        opt.load_state_dict(payload["optimizer"])
        sched.load_state_dict(payload["scheduler"])
    except Exception as exc:  # corrupt, foreign or from another architecture
        raise SbipipeError(
            f"cannot resume from {str(path)!r} ({type(exc).__name__}); delete it to start over"
        ) from None
    gen.set_state(payload["generator"].cpu())
    torch.set_rng_state(payload["torch_rng"].cpu())
    state = dict(payload["state"])
    state["best_weights"] = payload["best_weights"]
    return state
