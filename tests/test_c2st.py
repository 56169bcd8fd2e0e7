"""C2ST: calibration of the batched PyTorch classifier and agreement with scikit-learn's MLPClassifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sbipipe.c2st import _fit_and_score, c2st


def gaussians(n: int, dim: int, shift: float = 0.0, scale: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), shift + scale * torch.randn(n, dim, generator=g)


def test_identical_distributions_give_one_half():
    a, b = gaussians(2000, 2)
    assert c2st(a, b) == pytest.approx(0.5, abs=0.02)


def test_separated_distributions_are_detected():
    a, b = gaussians(1000, 2, shift=4.0)
    assert c2st(a, b) > 0.95


@pytest.mark.parametrize(
    "dim, shift, scale",
    [(2, 0.3, 1.0), (5, 0.3, 1.0), (2, 0.0, 1.5)],
    ids=["2d-shift", "5d-shift", "2d-scale"],
)
def test_torch_backend_agrees_with_sklearn(dim, shift, scale):
    a, b = gaussians(2000, dim, shift, scale, seed=dim)
    fast, slow = c2st(a, b, backend="torch"), c2st(a, b, backend="sklearn")
    assert 0.52 < slow < 0.75  # a pair that is neither trivial nor indistinguishable
    assert fast == pytest.approx(slow, abs=0.02)


def test_float64_follows_sklearn_step_by_step():
    """Same initial weights, shuffles, Adam steps and stopping rule: in float64 every fold stops at
    the epoch sklearn's MLPClassifier stops at and predicts the held-out fold the same way.
    1001 rows: training folds of 800 and 801 rows, so the last batch (1 row) is empty for fold 0."""
    from sklearn.model_selection import KFold
    from sklearn.neural_network import MLPClassifier

    a, b = gaussians(501, 2, shift=0.5, seed=3)
    data = np.concatenate([a[:500].double().numpy(), b.double().numpy()])
    labels = np.concatenate([np.zeros(500), np.ones(501)])
    score, epochs = _fit_and_score(data, labels, seed=1, folds=5, dtype=torch.float64, device=torch.device("cpu"))
    sk_epochs, sk_scores = [], []
    for train, test in KFold(5, shuffle=True, random_state=1).split(data):
        clf = MLPClassifier(activation="relu", hidden_layer_sizes=(20, 20), max_iter=1000, solver="adam", random_state=1)
        clf.fit(data[train], labels[train])
        sk_epochs.append(clf.n_iter_)
        sk_scores.append(clf.score(data[test], labels[test]))
    assert epochs == sk_epochs
    assert score == pytest.approx(np.mean(sk_scores), abs=1e-9)


def test_unequal_sizes_and_errors():
    a, b = gaussians(503, 3, shift=5.0)
    assert c2st(a[:401], b) > 0.95  # folds of unequal size, ragged last batches
    with pytest.raises(ValueError, match="dimensions"):
        c2st(a[:, :2], b)
    with pytest.raises(ValueError, match="backend"):
        c2st(a, b, backend="jax")
