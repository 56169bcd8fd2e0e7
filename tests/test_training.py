"""The one training loop: early stopping."""

import pytest
import torch
from torch import nn

from sbipipe.training import TensorData, TrainConfig, fit


class Stalled(nn.Module):
    """A loss that never improves: every epoch after the first is a bad one."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w * 0).sum() + x.mean() * 0 + 1.0


@pytest.mark.parametrize(("schedule", "epochs"), [("plateau", 6), ("cosine", 20)])
def test_early_stopping_waits_for_the_cosine_decay(schedule, epochs):
    data = TensorData(torch.randn(64, 1))
    config = TrainConfig(max_epochs=30, batch_size=16, patience=5, schedule=schedule, device="cpu")
    history = fit(Stalled(), data, data, config)
    # plateau: the first epoch sets the best, 5 bad ones stop it; cosine: not before 2/3 of 30 epochs
    assert len(history) == epochs
