"""Offline action error: masked per-step arithmetic, and the constant baseline it is compared to."""

from __future__ import annotations

import pytest
import torch

from vlaops.data import keys
from vlaops.eval.offline import offline_action_metrics

W, C, A = 3, 2, 7


class Replay(torch.nn.Module):
    """Predicts a fixed normalised action (arm, gripper probability) for every window step."""

    def __init__(self, action: torch.Tensor) -> None:
        super().__init__()
        self.action = action

    def forward(self, batch: dict) -> dict:
        shape = batch[keys.CHUNK_MASK].shape
        logit = torch.logit(self.action[-1].clamp(1e-4, 1 - 1e-4))
        return {
            "arm": self.action[:-1].expand(*shape, A - 1),
            "gripper_logits": logit.expand(*shape, 1),
            "loss": torch.tensor(0.5),
        }


def windows(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        chunk = torch.rand(W, C, A, generator=g) * 2 - 1
        chunk[..., -1] = (chunk[..., -1] > 0).float()
        mask = torch.ones(W, C, dtype=torch.bool)
        mask[-1, -1] = False  # past the episode end: must not count
        chunk[-1, -1] = 100.0
        out.append({keys.ACTION_CHUNK: chunk, keys.CHUNK_MASK: mask})
    return out


def test_the_constant_predictor_scores_exactly_its_own_baseline():
    constant = torch.tensor([0.1, -0.2, 0.3, 0.0, 0.0, 0.5, 0.9])
    m = offline_action_metrics(Replay(constant), windows(5), 2, 0, torch.device("cpu"), constant=constant)
    assert m["arm_mae"] == pytest.approx(m["baseline_arm_mae"])
    assert m["gripper_accuracy"] == pytest.approx(m["baseline_gripper_accuracy"])
    assert m["arm_mae"] < 2.0  # the masked step (value 100) is left out
    assert m["windows"] == 5


def test_a_better_predictor_beats_the_baseline():
    data = windows(4)
    target = torch.stack([d[keys.ACTION_CHUNK] for d in data])
    mask = torch.stack([d[keys.CHUNK_MASK] for d in data])
    mean = (target * mask[..., None]).sum((0, 1, 2)) / mask.sum()
    far = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.0])
    m = offline_action_metrics(Replay(mean), data, 4, 0, torch.device("cpu"), constant=far)
    assert m["arm_mae"] < m["baseline_arm_mae"]


def test_without_a_constant_there_is_no_baseline():
    m = offline_action_metrics(Replay(torch.zeros(A)), windows(2), 2, 0, torch.device("cpu"))
    assert "baseline_arm_mae" not in m
