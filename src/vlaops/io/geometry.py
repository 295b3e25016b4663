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


def quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of (..., 4) quaternions (x, y, z, w): the rotation b, then a."""
    ax, ay, az, aw = np.moveaxis(np.asarray(a, dtype=np.float64), -1, 0)
    bx, by, bz, bw = np.moveaxis(np.asarray(b, dtype=np.float64), -1, 0)
    return np.stack(
        [
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
            aw * bw - ax * bx - ay * by - az * bz,
        ],
        axis=-1,
    )


def axis_angle_to_quat(rotvec: np.ndarray) -> np.ndarray:
    """(..., 3) rotation vectors (axis x angle, rad) -> (..., 4) quaternions (x, y, z, w)."""
    v = np.asarray(rotvec, dtype=np.float64)
    angle = np.linalg.norm(v, axis=-1, keepdims=True)
    # sin(angle/2)/angle -> 1/2 as angle -> 0
    scale = np.where(angle > 1e-12, np.sin(angle / 2) / np.where(angle > 1e-12, angle, 1.0), 0.5)
    return np.concatenate([v * scale, np.cos(angle / 2)], axis=-1)


def euler_to_quat(euler: np.ndarray) -> np.ndarray:
    """(..., 3) euler (roll, pitch, yaw), extrinsic x-y-z -> (..., 4) quaternions (x, y, z, w)."""
    e = np.asarray(euler, dtype=np.float64)
    half = e / 2
    cr, cp, cy = np.cos(half[..., 0]), np.cos(half[..., 1]), np.cos(half[..., 2])
    sr, sp, sy = np.sin(half[..., 0]), np.sin(half[..., 1]), np.sin(half[..., 2])
    return np.stack(
        [
            sr * cp * cy - cr * sp * sy,
            cr * sp * cy + sr * cp * sy,
            cr * cp * sy - sr * sp * cy,
            cr * cp * cy + sr * sp * sy,
        ],
        axis=-1,
    )
