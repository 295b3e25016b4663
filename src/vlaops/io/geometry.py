"""Rotation helpers in CALVIN's convention: euler angles are extrinsic x-y-z (roll, pitch, yaw),
the convention of PyBullet's ``getEulerFromQuaternion`` that CALVIN's robot_obs uses."""

from __future__ import annotations

import numpy as np


def quat_to_euler(quat_xyzw: np.ndarray) -> np.ndarray:
    """(..., 4) quaternions (x, y, z, w) -> (..., 3) euler (roll, pitch, yaw) in radians."""
    q = np.asarray(quat_xyzw, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    x, y, z, w = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    roll = np.arctan2(2 * (w * x + y * z), 1 - 2 * (x * x + y * y))
    pitch = np.arcsin(np.clip(2 * (w * y - z * x), -1.0, 1.0))
    yaw = np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))
    return np.stack([roll, pitch, yaw], axis=-1)

