r"""Classifier two-sample test (C2ST; Lopez-Paz & Oquab 2017, "Revisiting classifier two-sample
tests", ICLR) with the protocol of the SBI benchmark (Lueckmann et al. 2021, "Benchmarking
simulation-based inference", AISTATS; ``sbibm.metrics.c2st``).

Protocol: both sample sets are z-scored by the *reference's* mean and standard deviation, labelled
0 (``samples``) and 1 (``reference``), and a classifier — scikit-learn's ``MLPClassifier`` with two
hidden layers of 10·D ReLU units, Adam, ``max_iter=1000``, ``random_state=seed`` — is scored by
``folds``-fold cross-validated accuracy (``KFold(folds, shuffle=True, random_state=seed)``).
0.5 means indistinguishable, 1.0 fully separable.

Two backends compute the same thing:

* ``backend="torch"`` (default) re-implements that classifier in PyTorch and trains the classifiers
  of **all folds at once**: weights are batched ``[folds, fan_in, fan_out]`` and every layer is one
  ``torch.baddbmm``. It keeps ``MLPClassifier``'s semantics exactly — Glorot-uniform initialisation
  (bound √(6/(fan_in+fan_out)) for weights and biases, drawn from ``numpy.random.RandomState(seed)``
  in sklearn's order), sigmoid output with log-loss, L2 penalty ``alpha/2·‖W‖²/batch`` (weights only,
  ``alpha=1e-4``), minibatches of ``min(200, n)`` re-shuffled every epoch with the same
  ``RandomState`` stream as sklearn, sklearn's Adam (lr 1e-3, β 0.9/0.999, ε 1e-8, bias correction
  folded into the step size), and its stopping rule (stop once the epoch's mean training loss has
  failed to improve on the best by ``tol=1e-4`` for more than ``n_iter_no_change=10`` consecutive
  epochs, at most 1000 epochs) — applied **per fold**: a fold that stops is frozen and dropped
  from the batch while the others continue. Forward and backward passes are written out by hand
  (no autograd), which is what makes the small-batch loop cheap. With ``dtype=torch.float64`` the
  arithmetic follows sklearn's up to summation order; the float32 default differs from sklearn
  only by round-off (agreement with sklearn is tested to ±0.02).
* ``backend="sklearn"`` runs the original ``sklearn.model_selection.cross_val_score`` of an
  ``MLPClassifier`` (for cross-checking; slow: minutes for 10⁴ vs 10⁴ samples).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["c2st"]

# MLPClassifier defaults (scikit-learn 1.x)
ALPHA = 1e-4
LEARNING_RATE = 1e-3
BETA1, BETA2, EPSILON = 0.9, 0.999, 1e-8
BATCH_SIZE = 200
TOL = 1e-4
N_ITER_NO_CHANGE = 10
MAX_ITER = 1000


def c2st(
    samples: Any,
    reference: Any,
    seed: int = 1,
    folds: int = 5,
    backend: str = "torch",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> float:
    """Mean ``folds``-fold cross-validated accuracy of an MLP telling ``samples`` from ``reference``.

    ``samples [N, D]`` and ``reference [M, D]`` (tensors or arrays). ``backend`` is ``"torch"``
    (fast, all folds trained at once; ``dtype`` and ``device`` apply to it) or ``"sklearn"``."""
    x = _as_2d(samples, "samples")
    y = _as_2d(reference, "reference")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"samples have {x.shape[1]} dimensions but the reference has {y.shape[1]}")
    if len(x) + len(y) < 2 * folds:
        raise ValueError(f"need at least {folds} samples in each set for {folds}-fold cross-validation")
    mean, std = y.mean(0), y.std(0)
    std[std == 0] = 1.0
    data = np.concatenate([(x - mean) / std, (y - mean) / std])
    labels = np.concatenate([np.zeros(len(x)), np.ones(len(y))])
    if backend == "sklearn":
        return _c2st_sklearn(data, labels, seed, folds)
    if backend == "torch":
        return _c2st_torch(data, labels, seed, folds, dtype, torch.device(device))
    raise ValueError(f"unknown backend {backend!r}; choose 'torch' or 'sklearn'")


def _as_2d(a: Any, name: str) -> np.ndarray:
    if torch.is_tensor(a):
        a = a.detach().cpu().double().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name} must be [N, D], got shape {list(a.shape)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contain non-finite values")
    return a


def _splits(n: int, seed: int, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import KFold

    return list(KFold(folds, shuffle=True, random_state=seed).split(np.zeros((n, 1))))


# -- reference implementation ----------------------------------------------------------------------
def _c2st_sklearn(data: np.ndarray, labels: np.ndarray, seed: int, folds: int) -> float:
    from sklearn.model_selection import KFold, cross_val_score
    from sklearn.neural_network import MLPClassifier

    dim = data.shape[1]
    clf = MLPClassifier(
        activation="relu", hidden_layer_sizes=(10 * dim, 10 * dim), max_iter=1000, solver="adam", random_state=seed
    )
    scores = cross_val_score(clf, data, labels, cv=KFold(folds, shuffle=True, random_state=seed), scoring="accuracy")
    return float(np.mean(scores))


# -- batched PyTorch implementation ------------------------------------------------------------------
class _Layout:
    """Offsets of each layer's weights and biases in one flat parameter row per fold.

    All weight matrices come first so that ‖W‖² is one reduction over ``[:, :n_weights]``."""

    def __init__(self, units: list[int]):
        self.units = units
        self.shapes = [(units[i], units[i + 1]) for i in range(len(units) - 1)]
        self.w_off, off = [], 0
        for fi, fo in self.shapes:
            self.w_off.append(off)
            off += fi * fo
        self.n_weights = off
        self.b_off = []
        for _, fo in self.shapes:
            self.b_off.append(off)
            off += fo
        self.size = off

    def views(self, flat: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        a = flat.shape[0]
        ws = [flat[:, o:o + fi * fo].view(a, fi, fo) for o, (fi, fo) in zip(self.w_off, self.shapes)]
        bs = [flat[:, o:o + fo].view(a, 1, fo) for o, (_, fo) in zip(self.b_off, self.shapes)]
        return ws, bs


def _glorot_init(layout: _Layout, rng: np.random.RandomState) -> np.ndarray:
    """sklearn's ``_init_coef`` for every layer in order (ReLU network: factor 6 for all layers)."""
    row = np.empty(layout.size)
    for (fi, fo), wo, bo in zip(layout.shapes, layout.w_off, layout.b_off):
        bound = np.sqrt(6.0 / (fi + fo))
        row[wo:wo + fi * fo] = rng.uniform(-bound, bound, (fi, fo)).ravel()
        row[bo:bo + fo] = rng.uniform(-bound, bound, fo)
    return row


def _forward(ws: list[Tensor], bs: list[Tensor], x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Logits ``[A, 1, B]`` of the one-unit output layer and the inputs of every layer.

    The output layer is computed as a row vector, ``w^T h^T``: a batched matrix–vector product
    with one output column is several times slower on CPU than one with one output row."""
    acts = [x]
    for w, b in zip(ws[:-1], bs[:-1]):
        acts.append(torch.baddbmm(b, acts[-1], w).clamp_min_(0.0))
    z = torch.baddbmm(bs[-1], ws[-1].transpose(1, 2), acts[-1].transpose(1, 2))
    return z, acts


def _c2st_torch(data: np.ndarray, labels: np.ndarray, seed: int, folds: int, dtype: torch.dtype, device: torch.device) -> float:
    return _fit_and_score(data, labels, seed, folds, dtype, device)[0]


class _Batches:
    """Per-batch row counts of the active folds (the same every epoch until a fold stops)."""

    def __init__(self, n_train: np.ndarray, n_max: int, batch: int, dtype: torch.dtype, device: torch.device):
        self.items = []
        nt = torch.as_tensor(n_train, device=device)
        for s in range(0, n_max, batch):
            e = min(s + batch, n_max)
            counts = np.clip(n_train - s, 0, e - s)
            if (counts == e - s).all():  # every fold has a full batch: no masking
                self.items.append((s, e, None, float(e - s), None))
                continue
            valid = (torch.arange(s, e, device=device) < nt[:, None]).unsqueeze(1).to(dtype)  # [A, 1, B]
            size = torch.as_tensor(np.maximum(counts, 1), dtype=dtype, device=device).unsqueeze(1)
            self.items.append((s, e, valid, size, counts > 0))


def _fit_and_score(
    data: np.ndarray, labels: np.ndarray, seed: int, folds: int, dtype: torch.dtype, device: torch.device
) -> tuple[float, list[int]]:
    """Cross-validated accuracy and the number of epochs each fold's classifier trained for."""
    n, dim = data.shape
    splits = _splits(n, seed, folds)
    layout = _Layout([dim, 10 * dim, 10 * dim, 1])
    X = torch.as_tensor(data, dtype=dtype, device=device)
    Y = torch.as_tensor(labels, dtype=dtype, device=device)
    threshold_backward = torch.ops.aten.threshold_backward

    # per-fold state, as sklearn's clone of MLPClassifier(random_state=seed) would have it
    rngs = [np.random.RandomState(seed) for _ in range(folds)]
    init = np.stack([_glorot_init(layout, r) for r in rngs])
    train_idx = [tr for tr, _ in splits]
    order = [np.arange(len(tr)) for tr in train_idx]  # sklearn's sample_idx: composed shuffles
    n_train = np.array([len(tr) for tr in train_idx])
    n_max = int(n_train.max())
    batch = min(BATCH_SIZE, int(n_train.min()))

    final = torch.as_tensor(init, dtype=dtype, device=device)  # parameters of stopped folds land here
    active = list(range(folds))
    params = final.clone()
    m1 = torch.zeros_like(params)
    m2 = torch.zeros_like(params)
    steps = np.zeros(folds, dtype=np.int64)
    best = np.full(folds, np.inf)
    no_improvement = np.zeros(folds, dtype=np.int64)
    epochs = [MAX_ITER] * folds
    batches = _Batches(n_train, n_max, batch, dtype, device)
    n_layers = len(layout.shapes)

    for epoch in range(MAX_ITER):
        a = len(active)
        rows = np.zeros((a, n_max), dtype=np.int64)
        for j, k in enumerate(active):
            perm = np.arange(n_train[k])
            rngs[k].shuffle(perm)  # sklearn.utils.shuffle(sample_idx, random_state=rng)
            order[k] = order[k][perm]
            rows[j, : n_train[k]] = train_idx[k][order[k]]
        rows_t = torch.as_tensor(rows, device=device)
        xe, ye = X[rows_t], Y[rows_t].unsqueeze(1)  # [A, n_max, D], [A, 1, n_max]
        ws, bs = layout.views(params)
        loss_sum = torch.zeros(a, 1, dtype=torch.float64, device=device)

        for s, e, valid, size, update in batches.items:
            xb, yb = xe[:, s:e], ye[:, :, s:e]
            z, acts = _forward(ws, bs, xb)  # z [A, 1, B]
            # binary log-loss from logits (sklearn clips p to [eps, 1 - eps]: identical away from saturation)
            bce = torch.nn.functional.softplus(z).sub_(yb * z)
            delta = torch.sigmoid(z).sub_(yb)  # d(sum of log-losses)/dz
            if valid is not None:
                bce.mul_(valid)
                delta.mul_(valid)
            loss_sum += bce.sum(2)
            # backward pass; the L2 term and the division by the batch size are added on the flat gradient
            gw, gb = [None] * n_layers, [None] * n_layers
            gw[-1] = torch.bmm(delta, acts[-1]).flatten(1)  # [A, 1, H] = (h^T δ)^T
            gb[-1] = delta.sum(2)
            delta = threshold_backward(delta.transpose(1, 2) * ws[-1].transpose(1, 2), acts[-1], 0.0)
            for i in range(n_layers - 2, -1, -1):
                gw[i] = torch.bmm(acts[i].transpose(1, 2), delta).flatten(1)
                gb[i] = delta.sum(1)
                if i > 0:
                    delta = threshold_backward(torch.bmm(delta, ws[i].transpose(1, 2)), acts[i], 0.0)
            grad = torch.cat(gw + gb, 1)
            w = params[:, : layout.n_weights]
            grad[:, : layout.n_weights].add_(w, alpha=ALPHA)
            loss_sum += (0.5 * ALPHA) * w.pow(2).sum(1, keepdim=True)  # sklearn's batch loss × batch size
            grad.div_(size)
            # sklearn's Adam: lr_t = lr·√(1−β2^t)/(1−β1^t); update = −lr_t·m/(√v + ε)
            if update is None:
                steps[active] += 1
                m1.mul_(BETA1).add_(grad, alpha=1 - BETA1)
                m2.mul_(BETA2).addcmul_(grad, grad, value=1 - BETA2)
                t = steps[active]
                if (t == t[0]).all():
                    lr_t = LEARNING_RATE * math.sqrt(1 - BETA2 ** int(t[0])) / (1 - BETA1 ** int(t[0]))
                    params.addcdiv_(m1, m2.sqrt().add_(EPSILON), value=-lr_t)
                else:
                    params.sub_(_lr(t, dtype, device) * m1 / m2.sqrt().add_(EPSILON))
            else:  # some fold has no rows in this last, short batch: leave its state untouched
                steps[active] += update
                keep = torch.as_tensor(update, device=device).unsqueeze(1)
                m1.copy_(torch.where(keep, m1 * BETA1 + (1 - BETA1) * grad, m1))
                m2.copy_(torch.where(keep, m2 * BETA2 + (1 - BETA2) * grad * grad, m2))
                lr = _lr(steps[active], dtype, device) * keep
                params.sub_(lr * m1 / m2.sqrt().add_(EPSILON))

        # end of epoch: sklearn's _update_no_improvement_count on the mean training loss, per fold
        epoch_loss = (loss_sum.flatten().cpu().numpy() / n_train[active]).tolist()
        stopped = []
        for j, k in enumerate(active):
            loss = epoch_loss[j]
            if not math.isfinite(loss):
                raise FloatingPointError(f"c2st: the training loss of fold {k} became {loss}")
            no_improvement[k] = no_improvement[k] + 1 if loss > best[k] - TOL else 0
            best[k] = min(best[k], loss)
            if no_improvement[k] > N_ITER_NO_CHANGE:
                stopped.append(j)
                epochs[k] = epoch + 1
        if stopped:
            final[torch.as_tensor([active[j] for j in stopped], device=device)] = params[torch.as_tensor(stopped, device=device)]
            left = [j for j in range(a) if j not in stopped]
            if not left:
                active = []
                break
            sel = torch.as_tensor(left, device=device)
            params, m1, m2 = params[sel], m1[sel], m2[sel]
            active = [active[j] for j in left]
            batches = _Batches(n_train[active], n_max, batch, dtype, device)
    if active:  # reached MAX_ITER (sklearn warns and keeps the last weights)
        final[torch.as_tensor(active, device=device)] = params

    # accuracy on each held-out fold (sklearn predicts class 1 when p > 0.5, i.e. logit > 0)
    ws, bs = layout.views(final)
    test = [te for _, te in splits]
    rows = np.zeros((folds, max(len(te) for te in test)), dtype=np.int64)
    for k, te in enumerate(test):
        rows[k, : len(te)] = te
    rows_t = torch.as_tensor(rows, device=device)
    z, _ = _forward(ws, bs, X[rows_t])
    correct = ((z.squeeze(1) > 0).to(dtype) == Y[rows_t]).cpu().numpy()
    scores = [correct[k, : len(te)].mean() for k, te in enumerate(test)]
    return float(np.mean(scores)), epochs


def _lr(t: np.ndarray, dtype: torch.dtype, device: torch.device) -> Tensor:
    t = t.astype(np.float64)
    lr = LEARNING_RATE * np.sqrt(1 - BETA2**t) / (1 - BETA1**t)
    return torch.as_tensor(lr, dtype=dtype, device=device).unsqueeze(1)
