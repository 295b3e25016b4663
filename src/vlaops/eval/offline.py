"""Offline action metrics on the validation split: what real-robot data without a simulator gets.

Teacher-forced windows, as in training: how far the predicted action chunks are from the
recorded ones, in the normalised action space both share. Next to each error stands the error of
a constant prediction (the training split's mean action): a policy that does not beat it has not
learned to use what it sees.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vlaops.data import keys
from vlaops.data.normalization import ActionNormalizer
from vlaops.io.episode import BASE_ACTION_NAMES
from vlaops.model import VLAPolicy

# the units of a mobile base's continuous dims (vlaops.io.mobile_base): per-dimension errors carry them in their names
BASE_UNITS = {"linear_x": "m_s", "linear_y": "m_s", "angular_z": "rad_s"}


@torch.inference_mode()
def offline_action_metrics(
    model: VLAPolicy,
    dataset: Dataset,
    batch_size: int,
    max_batches: int,
    device: torch.device,
    constant: torch.Tensor | None = None,
    normalizer: ActionNormalizer | None = None,
) -> dict[str, float]:
    """Masked arm MSE / MAE (normalised units), first-step arm MAE, gripper accuracy, and the loss (the
    policy's own: an auxiliary read-out's term, model.aux_weight, left out so runs with and without compare).

    ``constant`` (A,) is a normalised action predicted for every step; with it come
    ``baseline_arm_mae`` and ``baseline_gripper_accuracy``. ``max_batches`` 0 means the whole dataset.
    A mobile base's policy (``model.cfg.action_classes`` > 0) gets :func:`offline_base_metrics` instead.
    """
    if getattr(getattr(model, "cfg", None), "action_classes", 0):
        return offline_base_metrics(model, dataset, batch_size, max_batches, device, constant, normalizer)
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    sums: dict[str, float] = {
        "sq": 0.0,
        "abs": 0.0,
        "abs_first": 0.0,
        "grip_ok": 0.0,
        "loss": 0.0,
        "abs_const": 0.0,
        "grip_const": 0.0,
    }
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
        sums["loss"] += float(out.get("policy_loss", out["loss"]))  # without the auxiliary read-outs' term
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


@torch.inference_mode()
def offline_base_metrics(
    model: VLAPolicy,
    dataset: Dataset,
    batch_size: int,
    max_batches: int,
    device: torch.device,
    constant: torch.Tensor | None = None,
    normalizer: ActionNormalizer | None = None,
) -> dict[str, float]:
    """A mobile base's policy on teacher-forced windows: continuous MSE / MAE (normalised units, all dims and
    the first chunk step), the MAE of each continuous dim (``linear_x_mae`` ..., normalised; with
    ``normalizer`` also in the recording's units, ``linear_x_mae_m_s``, ``angular_z_mae_rad_s``), the
    action_type accuracy (argmax of the class logits), and the loss.

    ``constant`` (A,) normalised [continuous dims, class id] predicted for every step gives
    ``baseline_continuous_mae`` and ``baseline_action_type_accuracy`` (see :func:`base_constant_action`).
    """
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    names = BASE_ACTION_NAMES[:-1]
    dims = len(names)
    per_dim = torch.zeros(dims, dtype=torch.float64)
    per_dim_native = torch.zeros(dims, dtype=torch.float64)
    sums = {"sq": 0.0, "abs": 0.0, "abs_first": 0.0, "class_ok": 0.0, "loss": 0.0, "abs_const": 0.0, "class_const": 0.0}
    steps, first_steps, batches = 0.0, 0.0, 0
    const = None if constant is None else constant.to(device)
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        out: dict[str, Any] = model(batch)
        mask = batch[keys.CHUNK_MASK]  # (B, W, C)
        target = batch[keys.ACTION_CHUNK].float()  # (B, W, C, A): continuous dims, class id
        pred = out["arm"].float()  # (B, W, C, A-1)
        if pred.shape[-1] != dims:
            raise ValueError(
                f"a mobile base's policy predicts {dims} continuous dims ({', '.join(names)}), this one "
                f"{pred.shape[-1]}"
            )
        err = (pred - target[..., :-1]) * mask[..., None]  # (B, W, C, A-1)
        cls = out["class_logits"].argmax(-1)  # (B, W, C)
        truth = target[..., -1].round().long()  # (B, W, C)
        sums["sq"] += float(err.pow(2).sum())
        sums["abs"] += float(err.abs().sum())
        sums["abs_first"] += float(err[:, :, 0].abs().sum())
        sums["class_ok"] += float(((cls == truth) & mask).sum())
        sums["loss"] += float(out.get("policy_loss", out["loss"]))  # without the auxiliary read-outs' term
        per_dim += err.abs().sum(dim=(0, 1, 2)).double().cpu()
        if normalizer is not None:  # errors in m/s and rad/s: both sides denormalised (the class column aside)
            zeros = torch.zeros_like(pred[..., :1])
            native = normalizer.denormalize(torch.cat([pred, zeros], -1))[..., :-1]
            native_target = normalizer.denormalize(torch.cat([target[..., :-1], zeros], -1))[..., :-1]
            per_dim_native += ((native - native_target).abs() * mask[..., None]).sum(dim=(0, 1, 2)).double().cpu()
        if const is not None:
            sums["abs_const"] += float(((const[:-1] - target[..., :-1]).abs() * mask[..., None]).sum())
            sums["class_const"] += float(((const[-1].round().long() == truth) & mask).sum())
        steps += float(mask.sum())
        first_steps += float(mask[:, :, 0].sum())
        batches += 1
    if not batches:
        return {}
    metrics = {
        "continuous_mse": sums["sq"] / (steps * dims),
        "continuous_mae": sums["abs"] / (steps * dims),
        "continuous_mae_first_step": sums["abs_first"] / (first_steps * dims),
        **{f"{name}_mae": float(per_dim[d]) / steps for d, name in enumerate(names)},
        "action_type_accuracy": sums["class_ok"] / steps,
        "loss": sums["loss"] / batches,
        "windows": float(len(dataset) if not max_batches else min(len(dataset), max_batches * batch_size)),
    }
    if normalizer is not None:
        metrics.update(
            {f"{name}_mae_{BASE_UNITS[name]}": float(per_dim_native[d]) / steps for d, name in enumerate(names)}
        )
    if constant is not None:
        metrics["baseline_continuous_mae"] = sums["abs_const"] / (steps * dims)
        metrics["baseline_action_type_accuracy"] = sums["class_const"] / steps
    return metrics


def mean_action(normalizer: ActionNormalizer) -> torch.Tensor | None:
    """(A,) the constant an arm's offline errors are compared to: the training split's mean action,
    normalised; None without statistics."""
    if not normalizer.stats:
        return None
    return torch.as_tensor(normalizer.normalize(np.asarray(normalizer.stats["mean"], dtype=np.float32)))


def base_constant_action(normalizer: ActionNormalizer) -> torch.Tensor | None:
    """(A,) the constant a base's offline errors are compared to: the training split's mean continuous
    action and its most frequent action_type, normalised; None without statistics."""
    stats = normalizer.stats
    if not stats or "class_counts" not in stats:
        return None
    mean = torch.tensor(stats["mean"], dtype=torch.float32)
    mean[-1] = float(torch.tensor(stats["class_counts"]).argmax())
    return normalizer.normalize(mean)
