"""Predicted against recorded actions along whole validation episodes: what a loss number hides (a policy
that predicts the mean, lags a step, or never opens the gripper shows it at a glance)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from vlaops.data import keys
from vlaops.data.dataset import CalvinWindowDataset
from vlaops.io.episode import BASE_ACTION_NAMES
from vlaops.model import VLAPolicy

ARM_DIMS = ("x", "y", "z", "roll", "pitch", "yaw", "gripper open")


def action_dims(model: VLAPolicy) -> tuple[str, ...]:
    """The names of the dimensions :func:`validation_trajectories` returns for this policy."""
    return tuple(BASE_ACTION_NAMES) if model.cfg.action_classes else ARM_DIMS


@torch.inference_mode()
def validation_trajectories(
    model: VLAPolicy, dataset: CalvinWindowDataset, episodes: int, batch_size: int, device: torch.device
) -> list[dict[str, Any]]:
    """The first ``episodes`` annotated spans of ``dataset``, teacher-forced as in training: at each window,
    the action predicted for its last frame (chunk step 0) next to the recorded one, in the normalised
    space both share: an arm's gripper as the predicted probability of open against 0/1, a mobile base's
    action type as the predicted class id against the recorded one.

    Returns ``[{"label", "predicted" (T, A), "recorded" (T, A)}]``, T the span's windows, A as :func:`action_dims`."""
    model.eval()
    out = []
    for k in range(min(episodes, len(dataset.annotations))):
        rows = [i for i, (span, _) in enumerate(dataset.index) if span == k]
        predicted, recorded = [], []
        for start in range(0, len(rows), batch_size):
            batch = default_collate([dataset[i] for i in rows[start : start + batch_size]])
            batch = {n: (v.to(device) if isinstance(v, torch.Tensor) else v) for n, v in batch.items()}
            result = model(batch)
            arm = result["arm"][:, -1, 0].float()  # (B, A-1): the last frame's next action
            if "class_logits" in result:  # a mobile base: (B, K) -> the class id
                last = result["class_logits"][:, -1, 0].argmax(dim=-1, keepdim=True).float()
            else:
                last = torch.sigmoid(result["gripper_logits"][:, -1, 0].float())  # (B, 1)
            predicted.append(torch.cat([arm, last], dim=-1).cpu().numpy())
            recorded.append(batch[keys.ACTION_CHUNK][:, -1, 0].float().cpu().numpy())  # (B, A)
        ann = dataset.annotations[k]
        out.append(
            {
                "label": f"{ann.instruction} ({ann.start}-{ann.end})",
                "predicted": np.concatenate(predicted),
                "recorded": np.concatenate(recorded),
            }
        )
    return out
