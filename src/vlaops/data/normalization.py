"""The one action normalisation, used by training and by the policy runtime alike.

RoboVLMs (robovlms/data/data_utils.py, ``normalize_action`` with ``norm_min=-0.65, norm_max=0.65``)
clips CALVIN's relative arm actions to [-0.65, 0.65] and rescales them to [-1, 1]; the gripper
action {-1, 1} becomes a {0, 1} target for a BCE loss. The inverse maps the network's output back:
arm from [-1, 1], gripper probability thresholded at 0.5 to {-1, 1}.

A mobile base (docs/mobile_base.md) has no such unit range: its velocities are m/s and rad/s. Each
continuous dim is mapped by its own bounds (``act_min_bound`` / ``act_max_bound``, the training split's
min and max, as CALVIN's statistics.yaml names them) onto [norm_min, norm_max] = [-0.65, 0.65] and clipped
there; its last dim, the action_type class id, passes through unchanged (a class, never scaled), and the
network's class is its argmax.
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


_BASE_FIELDS = ("act_min_bound", "act_max_bound", "action_classes", "class_labels")  # None / 0 for an arm


@dataclass(frozen=True)
class ActionNormalizer:
    """Maps relative actions (..., 7) to network targets and back; the gripper is the last dim."""

    norm_min: float = -0.65
    norm_max: float = 0.65
    gripper_threshold: float = 0.5
    stats: dict[str, list[float]] | None = None
    # A mobile base (None / 0 for an arm; the normalize stage sets them from the data):
    act_min_bound: list[float] | None = None  # (A-1,) per continuous dim: the value mapped to norm_min
    act_max_bound: list[float] | None = None  # (A-1,) ... and to norm_max
    action_classes: int = 0  # 0: the last dim is a gripper ±1 (BCE); K >= 2: a class id in 0..K-1 (cross-entropy)
    class_labels: list[str] | None = None  # (K,) the class names, class id = index

    def __post_init__(self) -> None:
        if not self.norm_min < self.norm_max:
            raise ValueError(f"norm_min must be < norm_max, got {self.norm_min} and {self.norm_max}")
        if (self.act_min_bound is None) != (self.act_max_bound is None):
            raise ValueError("act_min_bound and act_max_bound must both be lists or both None")
        if (
            self.act_min_bound is not None
            and self.act_max_bound is not None
            and (
                len(self.act_min_bound) != len(self.act_max_bound)
                or any(lo > hi for lo, hi in zip(self.act_min_bound, self.act_max_bound))
            )
        ):
            raise ValueError(
                f"act_min_bound <= act_max_bound expected, one per dim; got {self.act_min_bound}, {self.act_max_bound}"
            )
        if self.action_classes == 1 or self.action_classes < 0:
            raise ValueError(f"action_classes must be 0 (a gripper) or >= 2, got {self.action_classes}")
        if self.class_labels is not None and len(self.class_labels) != self.action_classes:
            raise ValueError(
                f"class_labels holds {len(self.class_labels)} names, action_classes is {self.action_classes}"
            )

    def head_space(self) -> tuple[int, int]:
        """(action_dim A, action_classes K) of the policy head these actions train: A-1 continuous dims and a
        gripper (K = 0) or a K-way class as the last dim. From the data (the bounds, else the statistics)."""
        if self.act_min_bound is not None:
            return len(self.act_min_bound) + 1, self.action_classes
        if self.stats is None or not self.stats.get("min"):
            raise VlaopsError(
                "the normalisation holds no action statistics, so the action space is unknown; "
                "re-run the normalize stage"
            )
        return len(self.stats["min"]), self.action_classes

    def normalize(self, actions: ArrayT) -> ArrayT:
        """(..., A) rel actions, gripper ±1 -> arm in [-1, 1], gripper in {0, 1}.

        A base: (..., A) [continuous dims, class id] -> continuous in [norm_min, norm_max], class id unchanged."""
        if self.act_min_bound is not None or self.action_classes:
            return self._normalize_bounded(actions)
        arm = _clip(actions[..., :-1], self.norm_min, self.norm_max)
        arm = 2.0 * (arm - self.norm_min) / (self.norm_max - self.norm_min) - 1.0
        gripper = (actions[..., -1:] > 0) * 1.0
        return _cat([arm, gripper.astype(arm.dtype) if isinstance(arm, np.ndarray) else gripper.to(arm.dtype)])

    def denormalize(self, normalized: ArrayT) -> ArrayT:
        """(..., A) arm in [-1, 1], gripper probability -> rel actions with the gripper at ±1.

        A base: (..., A) continuous in [norm_min, norm_max], class id -> velocities, class id."""
        if self.act_min_bound is not None or self.action_classes:
            return self._denormalize_bounded(normalized)
        arm = _clip(normalized[..., :-1], -1.0, 1.0)
        arm = (arm + 1.0) / 2.0 * (self.norm_max - self.norm_min) + self.norm_min
        gripper = normalized[..., -1:] > self.gripper_threshold
        gripper = gripper * 2.0 - 1.0
        return _cat([arm, gripper.astype(arm.dtype) if isinstance(arm, np.ndarray) else gripper.to(arm.dtype)])

    def _bounds(self, like: ArrayT) -> tuple[ArrayT, ArrayT, ArrayT]:
        """(A-1,) lower bounds, spans and a constant-dim mask, as ``like``'s kind (array or tensor, dtype,
        device). A constant dim (span 0: a differential drive's linear_y) gets span 1; it normalises to the
        range's middle and denormalises to its one value."""
        if self.act_min_bound is None or self.act_max_bound is None:
            raise ValueError("per-dimension bounds are needed for a class action (normalize sets both)")
        lo = np.asarray(self.act_min_bound, dtype=np.float64)
        span = np.asarray(self.act_max_bound, dtype=np.float64) - lo
        const = span <= 0
        span = np.where(const, 1.0, span)
        if isinstance(like, torch.Tensor):
            return (
                torch.as_tensor(lo, dtype=like.dtype, device=like.device),
                torch.as_tensor(span, dtype=like.dtype, device=like.device),
                torch.as_tensor(const, device=like.device),
            )
        return lo.astype(like.dtype), span.astype(like.dtype), const

    def _class(self, last: ArrayT) -> ArrayT:
        """(..., 1) class ids (float), rounded and kept within 0..K-1."""
        if isinstance(last, torch.Tensor):
            return last.round().clamp(0, self.action_classes - 1)
        return np.clip(np.round(last), 0, self.action_classes - 1)

    def _normalize_bounded(self, actions: ArrayT) -> ArrayT:
        lo, span, const = self._bounds(actions)
        cont = self.norm_min + (actions[..., :-1] - lo) / span * (self.norm_max - self.norm_min)
        cont = _clip(cont, self.norm_min, self.norm_max)  # (..., A-1) in [norm_min, norm_max]
        mid = (self.norm_min + self.norm_max) / 2
        cont = torch.where(const, mid, cont) if isinstance(cont, torch.Tensor) else np.where(const, mid, cont)
        last = self._class(actions[..., -1:]) if self.action_classes else (actions[..., -1:] > 0) * 1.0
        return _cat([cont, last.astype(cont.dtype) if isinstance(cont, np.ndarray) else last.to(cont.dtype)])

    def _denormalize_bounded(self, normalized: ArrayT) -> ArrayT:
        lo, span, const = self._bounds(normalized)
        cont = _clip(normalized[..., :-1], self.norm_min, self.norm_max)
        cont = lo + (cont - self.norm_min) / (self.norm_max - self.norm_min) * span  # (..., A-1) in the data's units
        cont = torch.where(const, lo, cont) if isinstance(cont, torch.Tensor) else np.where(const, lo, cont)
        if self.action_classes:
            last = self._class(normalized[..., -1:])
        else:
            last = (normalized[..., -1:] > self.gripper_threshold) * 2.0 - 1.0
        return _cat([cont, last.astype(cont.dtype) if isinstance(cont, np.ndarray) else last.to(cont.dtype)])

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; an arm's leaves out the unset base fields, so its file is what it always was."""
        fields = {k: v for k, v in asdict(self).items() if k not in _BASE_FIELDS or v not in (None, 0)}
        return {"format_version": FORMAT_VERSION, **fields}

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
