"""Robot HDF5 recordings -> canonical :class:`Episode`, the layout of each file told by its content.

Teams record HDF5 in one of a few layouts, and the extension says nothing about which:

- **canonical** (``vlaops.io.episode``: ``format_version`` attr, ``obs/rgb_static`` ...): read as it is;
- **ALOHA/ACT** (``/observations/images/<cam>``, ``/observations/qpos``, ``/action``; the compressed variant
  holds each frame as zero-padded JPEG bytes with a ``/compress_len`` dataset): one episode per file;
- **robomimic** (``data/demo_N/obs/<key>``, ``data/demo_N/actions``, ``data.attrs['env_args']``): one
  episode per demo.

ALOHA and robomimic are mapped onto vlaops' streams by ``data.hdf5.<layout>`` (:class:`Hdf5StreamMap`):
which key is the static camera, the gripper camera, the joints, the TCP pose, and how the action is
expressed. The canonical episode holds the TCP pose and a TCP-pose action (CALVIN's), so a file whose
action is a joint target cannot be converted without the robot's kinematics: it is refused with that
reason (check ``needs_kinematics``), never filled with invented poses.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np

from vlaops.errors import RecordingError
from vlaops.io.calvin_spec import GRIPPER_CLOSE, GRIPPER_OPEN, ROBOT_OBS_DIM
from vlaops.io.episode import Episode, read_episode
from vlaops.io.geometry import axis_angle_to_quat, euler_to_quat, quat_multiply, quat_to_euler
from vlaops.io.images import decode_compressed, same_shapes
from vlaops.io.rosbag2 import source_sha256
from vlaops.io.settings import ReaderSettings

N_ARM_JOINTS = 7  # robot_obs[7:14] (CALVIN's order, io/calvin_spec.py)


class StreamMap(Protocol):
    """One layout's key map (``vlaops.data.config.Hdf5StreamMap`` satisfies it)."""

    rgb_static: str
    rgb_gripper: str | None
    joints: str
    joint_columns: list[int] | None
    gripper: str | None
    gripper_columns: list[int] | None
    tcp_pos: str | None
    tcp_rot: str | None
    action: str
    action_expression: str
    action_columns: list[int] | None
    gripper_open_sign: float
    relative_pos_scale: float
    relative_rot_scale: float
    instruction: str | None


def is_hdf5(path: Path) -> bool:
    """Any HDF5 file, whatever its extension (h5py checks the signature)."""
    try:
        return path.is_file() and h5py.is_hdf5(path)
    except OSError:
        return False


def layout(f: h5py.File) -> str | None:
    """'canonical', 'aloha', 'robomimic', or None: what the file's content says it is."""
    if "format_version" in f.attrs and "obs/rgb_static" in f:
        return "canonical"
    if "observations/qpos" in f and "observations/images" in f and "action" in f:
        return "aloha"
    if isinstance(f.get("data"), h5py.Group) and any(k.startswith("demo") for k in f["data"]):
        return "robomimic"
    return None


LAYOUTS = (
    "canonical: format_version attr + obs/rgb_static",
    "ALOHA: observations/images/<cam> + observations/qpos + action",
    "robomimic: data/demo_N",
)


def _open(path: Path) -> tuple[h5py.File, str]:
    where = str(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise RecordingError(where, f"not a readable HDF5 file ({exc})", check="unreadable") from exc
    kind = layout(f)
    if kind is None:
        keys = sorted(f.keys())
        f.close()
        raise RecordingError(
            where,
            f"an HDF5 file in no layout vlaops reads (top-level keys {keys}); expected {'; '.join(LAYOUTS)}",
            check="unknown_layout",
        )
    return f, kind


def _demo_number(key: str) -> tuple[int, str]:
    digits = re.findall(r"\d+", key)
    return (int(digits[-1]) if digits else -1, key)


def hdf5_episodes(path: Path, cfg: ReaderSettings) -> list[str]:
    """Canonical and ALOHA files hold one episode, a robomimic file one per demo (in demo-number order)."""
    f, kind = _open(path)
    with f:
        if kind == "robomimic":
            return sorted((k for k in f["data"] if k.startswith("demo")), key=_demo_number)
        return [path.stem]


def read_hdf5(path: Path, key: str, cfg: ReaderSettings) -> Episode:
    """One episode of an HDF5 recording; ``key`` as :func:`hdf5_episodes` listed it."""
    f, kind = _open(path)
    if kind == "canonical":
        f.close()
        return read_episode(path)  # the contract itself: validated, provenance kept as written
    with f:
        if kind == "aloha":
            return _mapped(f, path, path.stem, cfg.hdf5.aloha, cfg, "hdf5_aloha", str(path), env_args={})
        demo = f["data"][key]
        env_args = _env_args(f["data"].attrs.get("env_args"), str(path))
        return _mapped(
            demo,
            path,
            f"{path.stem}_{key}",
            cfg.hdf5.robomimic,
            cfg,
            "hdf5_robomimic",
            f"{path} episode '{key}'",
            env_args,
        )


def _env_args(raw: Any, where: str) -> dict:
    """robomimic's ``env_args`` attr (JSON): the env, its controller and its control rate."""
    if raw is None:
        return {}
    try:
        return json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordingError(
            where, f"attr 'data.env_args' is not JSON ({exc})", check="unreadable", stream="data.attrs['env_args']"
        ) from exc


@functools.lru_cache(maxsize=8)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    """A file's hash, once per file (a robomimic file's demos share it)."""
    return source_sha256(Path(path))


class _Group:
    """Reads the mapped keys of one episode's group, naming the key in every error."""

    def __init__(self, group: h5py.Group, where: str, layout_name: str) -> None:
        self.group, self.where, self.layout = group, where, layout_name

    def fail(self, key: str, reason: str, check: str) -> RecordingError:
        return RecordingError(self.where, f"key '{key}' {reason}", check=check, stream=key)

    def require(self, key: str, setting: str) -> None:
        """A mapped key that is not there: name it, the setting that maps it, and what its group holds."""
        if isinstance(self.group.get(key), h5py.Dataset):
            return
        parent, _, _ = key.rpartition("/")
        holder = self.group.get(parent) if parent else self.group
        present = sorted(holder.keys()) if isinstance(holder, h5py.Group) else []
        raise RecordingError(
            self.where,
            f"key '{key}' (data.hdf5.{self.layout}.{setting}) is not in the file; "
            f"{parent or 'the episode'} has {present}",
            check="missing_stream",
            stream=key,
        )

    def array(self, key: str, setting: str, columns: list[int] | None = None) -> np.ndarray:
        """(T, C) float64 of dataset ``key`` (its ``columns`` when given)."""
        self.require(key, setting)
        value = np.asarray(self.group[key][()], dtype=np.float64)
        if value.ndim == 1:
            value = value[:, None]
        if value.ndim != 2:
            raise self.fail(key, f"has shape {value.shape}, expected (T, C)", "wrong_shape")
        if columns is not None:
            if any(not -value.shape[1] <= c < value.shape[1] for c in columns):
                raise self.fail(
                    key,
                    f"has {value.shape[1]} columns, data.hdf5.{self.layout}.{setting}_columns asks for {columns}",
                    "wrong_shape",
                )
            value = value[:, columns]
        return value

    def images(self, key: str, setting: str) -> np.ndarray:
        """(T, H, W, 3) uint8: stored as pixels, or as one zero-padded JPEG/PNG byte row per frame."""
        self.require(key, setting)
        data = self.group[key]
        if data.dtype != np.uint8:
            raise self.fail(key, f"holds {data.dtype}, expected uint8 images", "wrong_shape")
        if data.ndim == 4 and data.shape[-1] == 3:
            return data[()]
        if data.ndim != 2:
            raise self.fail(
                key, f"has shape {data.shape}, expected (T, H, W, 3) or (T, N) compressed bytes", "wrong_shape"
            )
        frames = []
        for t, row in enumerate(data[()]):
            try:
                frames.append(decode_compressed(row.tobytes()))
            except (OSError, ValueError) as exc:
                raise self.fail(
                    key, f"frame {t}: cannot decode the compressed image ({exc})", "undecodable_image"
                ) from None
        same_shapes(frames, self.where, key, f"key '{key}'")
        return np.stack(frames)


def _mapped(
    group: h5py.Group,
    path: Path,
    episode_id: str,
    m: StreamMap,
    cfg: ReaderSettings,
    source_format: str,
    where: str,
    env_args: dict,
) -> Episode:
    """An ALOHA episode or a robomimic demo, mapped by ``m``, as a canonical arm episode (T frames)."""
    layout_name = source_format.removeprefix("hdf5_")
    g = _Group(group, where, layout_name)
    setting = f"data.hdf5.{layout_name}"
    if m.action_expression == "absolute_joint":
        raise RecordingError(
            where,
            f"key '{m.action}' is an absolute joint action ({setting}.action_expression); the canonical episode "
            "holds TCP-pose actions (CALVIN's) and converting joints to poses needs the robot's kinematics, which "
            "vlaops does not have: record the TCP pose and a pose action, and map them (tcp_pos, tcp_rot, "
            "action_expression absolute_pose or relative_pose)",
            check="needs_kinematics",
            stream=m.action,
        )
    if m.tcp_pos is None or m.tcp_rot is None:
        raise RecordingError(
            where,
            f"the canonical episode needs the TCP pose: map {setting}.tcp_pos and tcp_rot",
            check="missing_stream",
        )
    control_hz = _control_hz(env_args, cfg, where)
    rgb_static = g.images(m.rgb_static, "rgb_static")
    t = len(rgb_static)
    rgb_gripper = g.images(m.rgb_gripper, "rgb_gripper") if m.rgb_gripper else None
    joints = g.array(m.joints, "joints", m.joint_columns)
    if joints.shape[1] != N_ARM_JOINTS:
        raise g.fail(
            m.joints,
            f"gives {joints.shape[1]} joints; the canonical episode holds {N_ARM_JOINTS} arm joints "
            f"(set {setting}.joint_columns)",
            "wrong_shape",
        )
    width = (
        np.abs(g.array(m.gripper, "gripper", m.gripper_columns)).sum(axis=1, keepdims=True)
        if m.gripper
        else np.zeros((t, 1))
    )
    tcp_pos = g.array(m.tcp_pos, "tcp_pos")
    tcp_quat = _rotation(g, m.tcp_rot, "tcp_rot")
    action = g.array(m.action, "action", m.action_columns)
    streams = {
        m.rgb_static: t,
        m.joints: len(joints),
        m.tcp_pos: len(tcp_pos),
        m.tcp_rot: len(tcp_quat),
        m.action: len(action),
    }
    if rgb_gripper is not None:
        streams[m.rgb_gripper] = len(rgb_gripper)
    if len(set(streams.values())) > 1:
        raise RecordingError(where, f"streams of different lengths: {streams}", check="wrong_shape")
    if tcp_pos.shape[1] != 3:
        raise g.fail(m.tcp_pos, f"has {tcp_pos.shape[1]} columns, expected 3 (x, y, z)", "wrong_shape")
    action_abs = _action_abs(g, m, action, tcp_pos, tcp_quat, env_args, setting)
    prev_gripper = np.concatenate([action_abs[:1, 6], action_abs[:-1, 6]])[:, None]
    robot_obs = np.concatenate([tcp_pos, quat_to_euler(tcp_quat), width, joints, prev_gripper], axis=1)
    assert robot_obs.shape[1] == ROBOT_OBS_DIM
    instruction = _attr(group, "instruction") or m.instruction
    if not instruction or not instruction.strip():
        raise RecordingError(
            where,
            f"no instruction: the file has no 'instruction' attr and {setting}.instruction is null",
            check="no_instruction",
        )
    task = _attr(group, "task") or re.sub(r"[^a-z0-9]+", "_", instruction.lower()).strip("_")
    stat = path.stat()
    return Episode(
        episode_id=episode_id,
        source=where,
        source_sha256=_sha256(str(path), stat.st_mtime_ns, stat.st_size),
        source_format=source_format,
        embodiment="arm",
        instruction=instruction.strip(),
        task=task,
        control_hz=control_hz,
        time=np.arange(t, dtype=np.float64) / control_hz,
        rgb_static=rgb_static,
        rgb_gripper=rgb_gripper,
        robot_obs=robot_obs,
        action_abs=action_abs,
    )


def _attr(group: h5py.Group, name: str) -> str | None:
    """An attr of the episode's group or of the file's root, as text."""
    for node in (group, group.file):
        if name in node.attrs:
            value = node.attrs[name]
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def _control_hz(env_args: dict, cfg: ReaderSettings, where: str) -> float:
    """data.control_hz; a robomimic file states its own (env_kwargs.control_freq), which must agree."""
    recorded = env_args.get("env_kwargs", {}).get("control_freq")
    if recorded is not None and abs(float(recorded) - cfg.control_hz) > 0.2 * cfg.control_hz:
        raise RecordingError(
            where,
            f"env_args control_freq is {recorded} Hz, data.control_hz is {cfg.control_hz}",
            check="wrong_rate",
            stream="data.attrs['env_args']",
        )
    return float(cfg.control_hz)


def _rotation(g: _Group, key: str, setting: str) -> np.ndarray:
    """(T, 4) quaternions xyzw from a (T, 4) quaternion or (T, 3) euler xyz dataset."""
    rot = g.array(key, setting)
    if rot.shape[1] == 4:
        return rot
    if rot.shape[1] == 3:
        return euler_to_quat(rot)
    raise g.fail(key, f"has {rot.shape[1]} columns, expected a quaternion xyzw (4) or euler xyz (3)", "wrong_shape")


def _relative_scales(m: StreamMap, env_args: dict) -> tuple[float, float]:
    """Metres and radians per unit of a relative action: the controller's own (robosuite OSC_POSE:
    output_max / input_max in env_args' controller_configs) when the file says, else the config."""
    ctrl = env_args.get("env_kwargs", {}).get("controller_configs", {})
    out_max, in_max = ctrl.get("output_max"), ctrl.get("input_max", 1)
    if isinstance(out_max, list) and len(out_max) == 6 and isinstance(in_max, (int, float)) and in_max:
        return float(out_max[0]) / in_max, float(out_max[3]) / in_max
    return m.relative_pos_scale, m.relative_rot_scale


def _action_abs(
    g: _Group, m: StreamMap, action: np.ndarray, tcp_pos: np.ndarray, tcp_quat: np.ndarray, env_args: dict, setting: str
) -> np.ndarray:
    """(T, 7) CALVIN absolute action: target xyz, target euler xyz, gripper ±1 (1 open)."""
    pose, grip = action[:, :-1], action[:, -1]
    gripper = np.where(grip * m.gripper_open_sign > 0, GRIPPER_OPEN, GRIPPER_CLOSE)[:, None]
    if m.action_expression == "absolute_pose":
        if pose.shape[1] == 6:
            rot = euler_to_quat(pose[:, 3:6])
        elif pose.shape[1] == 7:
            rot = pose[:, 3:7]
        else:
            raise g.fail(
                m.action,
                f"has {action.shape[1]} columns; an absolute pose action is xyz + euler (6) or + "
                f"quaternion xyzw (7), then the gripper (set {setting}.action_columns)",
                "wrong_shape",
            )
        return np.concatenate([pose[:, :3], quat_to_euler(rot), gripper], axis=1)
    if pose.shape[1] != 6:
        raise g.fail(
            m.action,
            f"has {action.shape[1]} columns; a relative pose action is xyz + axis-angle (6), then "
            f"the gripper (set {setting}.action_columns)",
            "wrong_shape",
        )
    pos_scale, rot_scale = _relative_scales(m, env_args)
    target_pos = tcp_pos + pose[:, :3] * pos_scale
    # robosuite's OSC applies the rotation delta in the world frame: goal = delta @ current
    target_rot = quat_multiply(axis_angle_to_quat(pose[:, 3:6] * rot_scale), tcp_quat)
    return np.concatenate([target_pos, quat_to_euler(target_rot), gripper], axis=1)
