"""Offline action metrics on the validation split: what real-robot data without a simulator gets.

Teacher-forced windows, as in training: how far the predicted action chunks are from the
recorded ones, in the normalised action space both share. Next to each error stands the error of
a constant prediction (the training split's mean action): a policy that does not beat it has not
learned to use what it sees.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from vlaops.data import keys
from vlaops.model import VLAPolicy


@torch.inference_mode()
def offline_action_metrics(
    model: VLAPolicy,
    dataset: Dataset,
    batch_size: int,
    max_batches: int,
    device: torch.device,
    constant: torch.Tensor | None = None,
) -> dict[str, float]:
    """Masked arm MSE / MAE (normalised units), first-step arm MAE, gripper accuracy, and the loss.

    ``constant`` (A,) is a normalised action predicted for every step; with it come
    ``baseline_arm_mae`` and ``baseline_gripper_accuracy``. ``max_batches`` 0 means the whole dataset.
    """
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    sums: dict[str, float] = {"sq": 0.0, "abs": 0.0, "abs_first": 0.0, "grip_ok": 0.0, "loss": 0.0,
                              "abs_const": 0.0, "grip_const": 0.0}
    counts = {"arm": 0.0, "first": 0.0, "grip": 0.0, "batches": 0}
    const = None if constant is None else constant.to(device)
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        out: dict[str, Any] = model(batch)
        mask = batch[keys.CHUNK_MASK]  # (B, W, C)
        target = batch[keys.ACTION_CHUNK].float()  # (B, W, C, A)
        arm_err = (out["arm"].float() - target[..., :-1]) * mask[..., None]  # (B, W, C, A-1)
        pred_open = out["gripper_logits"][..., 0] > 0  # (B, W, C)
        grip_ok = (pred_open == (target[..., -1] > 0.5)) & mask
        sums["sq"] += float(arm_err.pow(2).sum())
        sums["abs"] += float(arm_err.abs().sum())
        sums["abs_first"] += float(arm_err[:, :, 0].abs().sum())
        sums["grip_ok"] += float(grip_ok.sum())
        sums["loss"] += float(out["loss"])
        if const is not None:
            sums["abs_const"] += float(((const[:-1] - target[..., :-1]).abs() * mask[..., None]).sum())
            sums["grip_const"] += float((((const[-1] > 0.5) == (target[..., -1] > 0.5)) & mask).sum())
        arm_dims = arm_err.shape[-1]
        counts["arm"] += float(mask.sum()) * arm_dims
        counts["first"] += float(mask[:, :, 0].sum()) * arm_dims
        counts["grip"] += float(mask.sum())
        counts["batches"] += 1
    if not counts["batches"]:
        return {}
    metrics = {
        "arm_mse": sums["sq"] / counts["arm"],
        "arm_mae": sums["abs"] / counts["arm"],
        "arm_mae_first_step": sums["abs_first"] / counts["first"],
        "gripper_accuracy": sums["grip_ok"] / counts["grip"],
        "loss": sums["loss"] / counts["batches"],
        "windows": float(len(dataset) if not max_batches else min(len(dataset), max_batches * batch_size)),
    }
    if constant is not None:
        metrics["baseline_arm_mae"] = sums["abs_const"] / counts["arm"]
        metrics["baseline_gripper_accuracy"] = sums["grip_const"] / counts["grip"]
    return metrics
