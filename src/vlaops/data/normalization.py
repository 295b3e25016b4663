"""The one action normalisation, used by training and by the policy runtime alike.

RoboVLMs (robovlms/data/data_utils.py, ``normalize_action`` with ``norm_min=-0.65, norm_max=0.65``)
clips CALVIN's relative arm actions to [-0.65, 0.65] and rescales them to [-1, 1]; the gripper
action {-1, 1} becomes a {0, 1} target for a BCE loss. The inverse maps the network's output back:
arm from [-1, 1], gripper probability thresholded at 0.5 to {-1, 1}.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from vlaops.errors import VlaopsError
from vlaops.utils.atomic import write_json

FORMAT_VERSION = 1
NORMALIZATION_FILE = "normalization.json"

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def _clip(x: ArrayT, low: float, high: float) -> ArrayT:
    return x.clamp(low, high) if isinstance(x, torch.Tensor) else np.clip(x, low, high)


def _cat(parts: list[ArrayT]) -> ArrayT:
    return torch.cat(parts, dim=-1) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts, axis=-1)


@dataclass(frozen=True)
class ActionNormalizer:
    """Maps relative actions (..., 7) to network targets and back; the gripper is the last dim."""

    norm_min: float = -0.65
    norm_max: float = 0.65
    gripper_threshold: float = 0.5
    stats: dict[str, list[float]] | None = None

    def __post_init__(self) -> None:
        if not self.norm_min < self.norm_max:
            raise ValueError(f"norm_min must be < norm_max, got {self.norm_min} and {self.norm_max}")

    def normalize(self, actions: ArrayT) -> ArrayT:
        """(..., A) rel actions, gripper ±1 -> arm in [-1, 1], gripper in {0, 1}."""
        arm = _clip(actions[..., :-1], self.norm_min, self.norm_max)
        arm = 2.0 * (arm - self.norm_min) / (self.norm_max - self.norm_min) - 1.0
        gripper = (actions[..., -1:] > 0) * 1.0
        return _cat([arm, gripper.astype(arm.dtype) if isinstance(arm, np.ndarray) else gripper.to(arm.dtype)])

    def denormalize(self, normalized: ArrayT) -> ArrayT:
        """(..., A) arm in [-1, 1], gripper probability -> rel actions with the gripper at ±1."""
        arm = _clip(normalized[..., :-1], -1.0, 1.0)
        arm = (arm + 1.0) / 2.0 * (self.norm_max - self.norm_min) + self.norm_min
        gripper = normalized[..., -1:] > self.gripper_threshold
        gripper = gripper * 2.0 - 1.0
        return _cat([arm, gripper.astype(arm.dtype) if isinstance(arm, np.ndarray) else gripper.to(arm.dtype)])

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    def save(self, path: str | os.PathLike[str]) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ActionNormalizer:
        path = Path(path)
        if path.is_dir():
            path = path / NORMALIZATION_FILE
        if not path.is_file():
            raise VlaopsError(f"{path}: normalisation file not found; run the normalize stage first")
        try:
            payload = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise VlaopsError(f"{path}: not valid JSON ({exc})") from exc
        version = payload.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise VlaopsError(f"{path}: format_version {version!r}, expected {FORMAT_VERSION}")
        try:
            return cls(**payload)
        except TypeError as exc:
            raise VlaopsError(f"{path}: unexpected normalisation fields ({exc})") from exc


def action_statistics(actions: np.ndarray) -> dict[str, list[float]]:
    """Per-dimension statistics of (N, A) actions, after LeRobot's dataset stats."""
    if actions.ndim != 2 or len(actions) == 0:
        raise ValueError(f"expected a non-empty (N, A) array of actions, got shape {actions.shape}")
    actions = actions.astype(np.float64)
    return {
        "min": actions.min(0).tolist(),
        "max": actions.max(0).tolist(),
        "mean": actions.mean(0).tolist(),
        "std": actions.std(0).tolist(),
        "q01": np.quantile(actions, 0.01, axis=0).tolist(),
        "q99": np.quantile(actions, 0.99, axis=0).tolist(),
        "count": [float(len(actions))] * actions.shape[1],
    }
