"""Synthetic HDF5 recordings written with the real ``h5py``, in the layouts teams record: ALOHA/ACT (raw and
JPEG-compressed images) and robomimic, for the ingest tests. Small images, few frames."""

from __future__ import annotations

import io
import json
from pathlib import Path

import h5py
import numpy as np
from bagfactory import PANDA_READY
from PIL import Image

ROBOMIMIC_POS_SCALE, ROBOMIMIC_ROT_SCALE = 0.05, 0.5  # robosuite OSC_POSE output_max (input_max 1)


def _frames(n: int, size: int, offset: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8; frame k holds value (k + offset) % 256 in its lower half."""
    img = np.zeros((n, size, size, 3), dtype=np.uint8)
    img[:, size // 2 :] = ((np.arange(n) + offset) % 256)[:, None, None, None]
    img[:, : size // 2, :, 0] = 200
    return img


def _jpeg_rows(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ACT's compressed layout: each frame JPEG-encoded, zero-padded to the longest -> (T, N) u8, lengths (T,)."""
    encoded = []
    for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=95)
        encoded.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    padded = np.zeros((len(encoded), max(len(e) for e in encoded)), dtype=np.uint8)
    for i, e in enumerate(encoded):
        padded[i, : len(e)] = e
    return padded, np.array([len(e) for e in encoded], dtype=np.float64)


def tcp_path(n: int) -> tuple[np.ndarray, np.ndarray]:
    """A TCP moving 1 cm per frame in -y while yawing 0.01 rad per frame, pointing down:
    (n, 3) positions and (n, 4) quaternions xyzw (yaw about z after roll pi about x)."""
    k = np.arange(n)
    pos = np.stack([np.full(n, 0.4), -0.01 * k, np.full(n, 0.3)], axis=1)
    yaw = 0.01 * k
    # q = Rz(yaw) * Rx(pi): (x, y, z, w) = (cos(yaw/2), sin(yaw/2), 0, 0)
    quat = np.stack([np.cos(yaw / 2), np.sin(yaw / 2), np.zeros(n), np.zeros(n)], axis=1)
    return pos, quat


def write_aloha(
    path: Path,
    n_frames: int = 20,
    size: int = 32,
    compressed: bool = False,
    pose: bool = True,
    instruction: str | None = "fold the towel",
    break_: str | None = None,
) -> Path:
    """An ALOHA/ACT episode file. ``pose=False``: the standard bimanual file (qpos and action 14 joint values,
    no TCP pose); ``pose=True``: a 7-DOF arm recorded in the ALOHA layout with its TCP pose
    (``observations/ee_pos`` xyz, ``observations/ee_quat`` quaternion xyzw) and a pose action
    (xyz + quaternion + gripper, 1 open).
    ``break_``: 'nan_qpos', 'short_action', 'corrupt_jpeg', 'uint16_images'."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pos, quat = tcp_path(n_frames)
    with h5py.File(path, "w") as f:
        f.attrs["sim"] = False
        if instruction is not None:
            f.attrs["instruction"] = instruction
        obs = f.create_group("observations")
        images = obs.create_group("images")
        for i, cam in enumerate(("cam_left_wrist", "top")):
            frames = _frames(n_frames, size, offset=10 * i)
            if compressed:
                rows, lengths = _jpeg_rows(frames)
                if break_ == "corrupt_jpeg" and cam == "top":
                    rows[5, :64] = 7
                images.create_dataset(cam, data=rows, chunks=(1, rows.shape[1]))
            elif break_ == "uint16_images" and cam == "top":
                images.create_dataset(cam, data=frames.astype(np.uint16))
            else:
                images.create_dataset(cam, data=frames, chunks=(1, size, size, 3))
        if compressed:
            f.create_dataset("compress_len", data=np.stack([lengths, lengths]))  # (n_cameras, T)
        if pose:
            qpos = np.concatenate(
                [PANDA_READY + 0.01 * np.arange(n_frames)[:, None], np.full((n_frames, 1), 0.08)], axis=1
            )
            obs.create_dataset("ee_pos", data=pos)
            obs.create_dataset("ee_quat", data=quat)
            grip = np.where(np.arange(n_frames) < n_frames // 2, 1.0, 0.0)[:, None]  # 1 open, 0 closed
            nxt = np.minimum(np.arange(n_frames) + 1, n_frames - 1)
            action = np.concatenate([pos[nxt], quat[nxt], grip], axis=1)  # target: the next pose
        else:
            qpos = np.tile(np.linspace(-0.3, 0.3, 14), (n_frames, 1))
            action = qpos.copy()
        if break_ == "nan_qpos":
            qpos[4, 2] = np.nan
        if break_ == "short_action":
            action = action[:-3]
        obs.create_dataset("qpos", data=qpos)
        obs.create_dataset("qvel", data=np.zeros_like(qpos))
        f.create_dataset("action", data=action)
    return path


ALOHA_POSE_OVERRIDES = [  # how a user maps the pose-recording ALOHA file above
    "data.hdf5.aloha.rgb_gripper=observations/images/cam_left_wrist",
    "data.hdf5.aloha.joint_columns=[0,1,2,3,4,5,6]",
    "data.hdf5.aloha.gripper=observations/qpos",
    "data.hdf5.aloha.gripper_columns=[7]",
    "data.hdf5.aloha.tcp_pos=observations/ee_pos",
    "data.hdf5.aloha.tcp_rot=observations/ee_quat",
    "data.hdf5.aloha.action_expression=absolute_pose",
]


def write_robomimic(
    path: Path,
    n_demos: int = 3,
    n_frames: int = 20,
    size: int = 32,
    control_freq: int = 20,
    broken: dict[int, str] | None = None,
) -> Path:
    """A robomimic file (robosuite Panda, OSC_POSE delta actions, gripper -1 open): ``data/demo_<i>`` with
    obs (agentview and eye-in-hand images, eef pos/quat, joint pos, gripper qpos), actions, states.
    The delta action of frame k leads to the pose of frame k + 1. ``broken`` {demo: 'nan_action' |
    'missing_image' | 'huge_action'}."""
    broken = broken or {}
    path.parent.mkdir(parents=True, exist_ok=True)
    env_args = {
        "env_name": "Lift",
        "type": 1,
        "env_kwargs": {
            "robots": ["Panda"],
            "control_freq": control_freq,
            "controller_configs": {
                "type": "OSC_POSE",
                "input_max": 1,
                "input_min": -1,
                "output_max": [ROBOMIMIC_POS_SCALE] * 3 + [ROBOMIMIC_ROT_SCALE] * 3,
                "output_min": [-ROBOMIMIC_POS_SCALE] * 3 + [-ROBOMIMIC_ROT_SCALE] * 3,
            },
        },
    }
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps(env_args)
        data.attrs["total"] = n_demos * n_frames
        for d in range(n_demos):
            demo = data.create_group(f"demo_{d}")
            demo.attrs["num_samples"] = n_frames
            pos, quat = tcp_path(n_frames)
            pos = pos + np.array([0.0, 0.0, 0.01 * d])
            dpos = np.diff(pos, axis=0, append=pos[-1:]) / ROBOMIMIC_POS_SCALE
            drot = np.zeros((n_frames, 3))
            drot[:-1, 2] = 0.01 / ROBOMIMIC_ROT_SCALE  # the yaw step of tcp_path
            grip = np.where(np.arange(n_frames) < n_frames // 2, -1.0, 1.0)[:, None]  # robosuite: -1 open
            actions = np.concatenate([dpos, drot, grip], axis=1)
            if broken.get(d) == "nan_action":
                actions[7, 1] = np.nan
            if broken.get(d) == "huge_action":
                actions[7, 0] = 1e6
            demo.create_dataset("actions", data=actions)
            demo.create_dataset("states", data=np.zeros((n_frames, 32)))
            demo.create_dataset("rewards", data=np.zeros(n_frames))
            demo.create_dataset("dones", data=np.zeros(n_frames))
            obs = demo.create_group("obs")
            if broken.get(d) != "missing_image":
                obs.create_dataset("agentview_image", data=_frames(n_frames, size, offset=d))
            obs.create_dataset("robot0_eye_in_hand_image", data=_frames(n_frames, size // 2, offset=50 + d))
            obs.create_dataset("robot0_eef_pos", data=pos)
            obs.create_dataset("robot0_eef_quat", data=quat)
            obs.create_dataset("robot0_joint_pos", data=PANDA_READY + 0.01 * np.arange(n_frames)[:, None])
            obs.create_dataset("robot0_gripper_qpos", data=np.tile([0.04, -0.04], (n_frames, 1)))
    return path
