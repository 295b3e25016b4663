"""Read a ROS2 bag (rosbag2, sqlite3 or mcap) into a canonical :class:`Episode` with ``rosbags``.

No ROS install is needed. Which topic is which stream comes from ``data.topics``; every stream is
synchronised to the ticks of the action topic (the control rate) by a zero-order hold.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image
from rosbags.highlevel import AnyReader, AnyReaderError
from rosbags.typesys import Stores, get_typestore

from vlaops.errors import VlaopsError
from vlaops.io.episode import Episode
from vlaops.io.geometry import quat_to_euler
from vlaops.io.settings import ReaderSettings
from vlaops.io.sync import SyncError, common_start, hold_last

SOURCE_FORMAT = "rosbag2"

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
ARRAY_TYPES = ("std_msgs/msg/Float64MultiArray", "std_msgs/msg/Float32MultiArray")
EXPECTED_TYPES: dict[str, tuple[str, ...]] = {
    "rgb_static": IMAGE_TYPES,
    "rgb_gripper": IMAGE_TYPES,
    "joint_states": ("sensor_msgs/msg/JointState",),
    "tcp_pose": ("geometry_msgs/msg/PoseStamped",),
    "scene_obs": ARRAY_TYPES,
    "action": ARRAY_TYPES,
    "instruction": ("std_msgs/msg/String",),
    "task": ("std_msgs/msg/String",),
}
# Bags recorded without message definitions are read with the Humble definitions.
_DEFAULT_TYPESTORE = get_typestore(Stores.ROS2_HUMBLE)


def is_rosbag2(path: Path) -> bool:
    return path.is_dir() and (path / "metadata.yaml").is_file()


def source_sha256(path: Path) -> str:
    """Content hash of a recording (file or directory), stable across machines."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass
class _Stream:
    stamps: list[float] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)

    def arrays(self) -> tuple[np.ndarray, list[Any]]:
        order = np.argsort(np.asarray(self.stamps), kind="stable")
        return np.asarray(self.stamps)[order], [self.values[i] for i in order]


def _stamp(msg: Any, log_time_ns: int) -> float:
    """Capture time: the header stamp when the message has one, else the bag's log time."""
    header = getattr(msg, "header", None)
    if header is not None and (header.stamp.sec or header.stamp.nanosec):
        return header.stamp.sec + header.stamp.nanosec * 1e-9
    return log_time_ns * 1e-9


def decode_image(msg: Any, where: str) -> np.ndarray:
    """sensor_msgs Image (rgb8/bgr8/rgba8/bgra8/mono8) or CompressedImage -> (H, W, 3) uint8."""
    if hasattr(msg, "format"):  # CompressedImage
        try:
            with Image.open(io.BytesIO(bytes(msg.data))) as img:
                return np.asarray(img.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            raise VlaopsError(f"{where}: cannot decode the compressed image (format '{msg.format}': {exc})") from None
    channels = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}
    enc = msg.encoding.lower()
    if enc not in channels:
        raise VlaopsError(f"{where}: image encoding '{msg.encoding}', expected one of {sorted(channels)}")
    c = channels[enc]
    data = np.asarray(msg.data, dtype=np.uint8)
    if data.size != msg.step * msg.height or msg.step < msg.width * c:
        raise VlaopsError(f"{where}: image data of {data.size} bytes does not match {msg.height}x{msg.step}")
    img = data.reshape(msg.height, msg.step)[:, : msg.width * c].reshape(msg.height, msg.width, c)
    if enc.startswith("bgr"):
        img = img[..., [2, 1, 0]]
    elif enc == "mono8":
        img = np.repeat(img, 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def _custom_data(path: Path) -> dict[str, str]:
    """The bag's ``custom_data`` (rosbag2 metadata v6+): recorders put episode facts such as the task there."""
    try:
        info = yaml.safe_load((path / "metadata.yaml").read_text()) or {}
        return dict(info.get("rosbag2_bagfile_information", {}).get("custom_data") or {})
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError):
        return {}  # a malformed metadata.yaml is reported by the reader itself


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def read_rosbag2(path: Path, cfg: ReaderSettings) -> Episode:
    """Read one rosbag2 directory into an arm :class:`Episode` synchronised to the action ticks."""
    where = str(path)
    wanted = {name: topic for name in EXPECTED_TYPES if (topic := getattr(cfg.topics, name))}
    try:
        reader = AnyReader([path], default_typestore=_DEFAULT_TYPESTORE)
        reader.open()
    except (AnyReaderError, FileNotFoundError) as exc:
        raise VlaopsError(f"{where}: not a readable rosbag2 recording ({exc})") from exc
    streams: dict[str, _Stream] = {name: _Stream() for name in wanted}
    custom = _custom_data(path)
    try:
        if reader.message_count == 0:
            raise VlaopsError(f"{where}: the bag has no messages")
        present = {c.topic: c.msgtype for c in reader.connections}
        for name, topic in wanted.items():
            if topic not in present:
                optional = name in ("rgb_gripper", "scene_obs", "task")
                if optional:
                    continue
                raise VlaopsError(
                    f"{where}: mapped topic '{topic}' (data.topics.{name}) is not in the bag; "
                    f"topics present: {sorted(present)}"
                )
            if present[topic] not in EXPECTED_TYPES[name]:
                raise VlaopsError(
                    f"{where}: topic '{topic}' (data.topics.{name}) has type {present[topic]}, "
                    f"expected {' or '.join(EXPECTED_TYPES[name])}"
                )
        by_topic = {topic: name for name, topic in wanted.items()}
        connections = [c for c in reader.connections if c.topic in by_topic]
        for conn, log_time, raw in reader.messages(connections=connections):
            name = by_topic[conn.topic]
            try:
                msg = reader.deserialize(raw, conn.msgtype)
            except AnyReaderError as exc:
                raise VlaopsError(f"{where}: topic '{conn.topic}': undecodable message ({exc})") from exc
            stream = streams[name]
            stream.stamps.append(_stamp(msg, log_time))
            stream.values.append(_payload(name, msg, f"{where}: topic '{conn.topic}'", cfg))
    finally:
        reader.close()
    return _assemble(path, streams, cfg, custom)


def _payload(name: str, msg: Any, where: str, cfg: ReaderSettings) -> Any:
    if name in ("rgb_static", "rgb_gripper"):
        return decode_image(msg, where)
    if name == "joint_states":
        positions = dict(zip(msg.name, np.asarray(msg.position, dtype=np.float64)))
        needed = [*cfg.arm_joint_names, *cfg.gripper_joint_names]
        missing = [j for j in needed if j not in positions]
        if missing:
            raise VlaopsError(
                f"{where}: joints {missing} missing (data.arm_joint_names / data.gripper_joint_names); "
                f"message has {list(msg.name)}"
            )
        return np.array([positions[j] for j in needed])
    if name == "tcp_pose":
        p, q = msg.pose.position, msg.pose.orientation
        return np.concatenate([[p.x, p.y, p.z], quat_to_euler(np.array([q.x, q.y, q.z, q.w]))])
    if name in ("scene_obs", "action"):
        return np.asarray(msg.data, dtype=np.float64)
    return str(msg.data)  # instruction, task


def _assemble(path: Path, streams: dict[str, _Stream], cfg: ReaderSettings, custom: dict[str, str]) -> Episode:
    where = str(path)
    for name in ("rgb_static", "joint_states", "tcp_pose", "action", "instruction"):
        if not streams[name].stamps:
            raise VlaopsError(f"{where}: topic '{getattr(cfg.topics, name)}' (data.topics.{name}) has no messages")
    ticks, actions = streams["action"].arrays()
    action_abs = np.stack(actions) if actions else np.zeros((0, 7))
    if action_abs.ndim != 2 or action_abs.shape[1] != 7:
        raise VlaopsError(f"{where}: topic '{cfg.topics.action}' holds arrays of shape {action_abs.shape[1:]}, expected (7,)")
    if len(ticks) > 1:
        rate = 1.0 / float(np.median(np.diff(ticks)))
        if abs(rate - cfg.control_hz) > 0.2 * cfg.control_hz:
            raise VlaopsError(
                f"{where}: topic '{cfg.topics.action}' runs at {rate:.1f} Hz, data.control_hz is {cfg.control_hz}"
            )
    obs_names = [n for n in ("rgb_static", "rgb_gripper", "joint_states", "tcp_pose", "scene_obs") if streams.get(n) and streams[n].stamps]
    sorted_streams = {n: streams[n].arrays() for n in obs_names}
    start = common_start({n: s[0][0] for n, s in sorted_streams.items()}, ticks)
    ticks, action_abs = ticks[start:], action_abs[start:]
    if len(ticks) < cfg.min_episode_len:
        raise VlaopsError(
            f"{where}: {len(ticks)} synchronised frames, data.min_episode_len is {cfg.min_episode_len}"
        )
    held: dict[str, np.ndarray] = {}
    for name, (stamps, values) in sorted_streams.items():
        try:
            idx = hold_last(stamps, ticks, cfg.sync_tolerance_s, getattr(cfg.topics, name))
        except SyncError as exc:
            raise VlaopsError(f"{where}: {exc}") from exc
        held[name] = np.stack([values[i] for i in idx])
    n_arm = len(cfg.arm_joint_names)
    joints = held["joint_states"]  # (T, 7 + n_fingers)
    gripper_width = joints[:, n_arm:].sum(axis=1, keepdims=True)
    # CALVIN's robot_obs[14] is the gripper action in force when the frame was taken: the previous command.
    prev_gripper = np.concatenate([action_abs[:1, 6], action_abs[:-1, 6]])[:, None]
    robot_obs = np.concatenate([held["tcp_pose"], gripper_width, joints[:, :n_arm], prev_gripper], axis=1)
    instruction = streams["instruction"].values[0].strip()
    task_values = streams["task"].values if "task" in streams else []
    # the task name: a mapped task topic, else the bag's custom_data 'task', else the instruction
    task = task_values[0] if task_values else custom.get("task") or _slug(instruction)
    for name in ("rgb_static", "rgb_gripper"):
        if name in held and len({img.shape for img in held[name]}) > 1:
            raise VlaopsError(f"{where}: topic '{getattr(cfg.topics, name)}' changes image size mid-episode")
    return Episode(
        episode_id=path.name,
        source=str(path),
        source_sha256=source_sha256(path),
        source_format=SOURCE_FORMAT,
        embodiment="arm",
        instruction=instruction,
        task=task,
        control_hz=float(cfg.control_hz),
        time=ticks - ticks[0],
        rgb_static=held["rgb_static"],
        rgb_gripper=held.get("rgb_gripper"),
        robot_obs=robot_obs,
        scene_obs=held.get("scene_obs"),
        action_abs=action_abs,
    )
