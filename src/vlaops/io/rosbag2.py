"""Read a ROS2 bag (rosbag2, sqlite3 or mcap) or a ROS1 bag into a canonical :class:`Episode` with ``rosbags``.

No ROS install is needed. Which topic is which stream comes from ``data.topics``; every stream is
synchronised to the ticks of the action topic (the control rate) by a zero-order hold.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_typestore
from rosbags.typesys.store import Typestore

from vlaops.errors import RecordingError
from vlaops.io.calvin_spec import SCENE_OBS_DIM
from vlaops.io.episode import Episode
from vlaops.io.geometry import quat_to_euler
from vlaops.io.images import decode_compressed, same_shapes
from vlaops.io.settings import ReaderSettings
from vlaops.io.sync import SyncError, common_start, hold_last

SOURCE_FORMAT = "rosbag2"
ROS1_SOURCE_FORMAT = "rosbag1"

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


@functools.cache
def typestore(name: str) -> Typestore:
    """The message definitions for bags recorded without them (data.typestore, e.g. 'ros2_humble')."""
    return get_typestore(Stores(name))


STORAGE_SUFFIXES = (".db3", ".mcap")
ROS1_SUFFIX = ".bag"  # ROS1 bags carry their message definitions; rosbags reads them without ROS


def bag_paths(path: Path) -> list[Path] | None:
    """What ``AnyReader`` opens for the recording at ``path``, or None when it is not a rosbag2 recording.

    A directory with ``metadata.yaml`` is opened as a bag. Without it (the recorder writes it on close, so a
    crashed recorder leaves only the database), or for a lone ``.db3`` / ``.mcap`` file, the storage files
    are opened themselves: ``rosbags`` then reads topics, types and counts from the database's own
    ``topics`` / ``messages`` tables (an mcap from its channels), and the message definitions from the
    database where it has them (sqlite3 schema 4+, mcap), else from ``data.typestore``. A directory of split
    files (``<name>_0.db3``, ``<name>_1.db3`` ...) is read as one recording. A ROS1 ``.bag`` file is read
    the same way (its types are normalised to the ROS2 names, so ``data.topics`` and the streams are the same)."""
    if path.is_file():  # a lone rosbag2 storage file, or a ROS1 .bag (AnyReader reads both)
        return [path] if path.suffix in (*STORAGE_SUFFIXES, ROS1_SUFFIX) else None
    if not path.is_dir():
        return None
    if (path / "metadata.yaml").is_file():
        return [path]
    files = [p for p in path.iterdir() if p.is_file() and p.suffix in STORAGE_SUFFIXES]
    if not files or len({p.suffix for p in files}) > 1:
        return None
    return sorted(files, key=lambda p: (_split_index(p), p.name))  # _10 after _9, not after _1


def _split_index(path: Path) -> int:
    tail = path.stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def is_rosbag2(path: Path) -> bool:
    return bag_paths(path) is not None


def episode_id(path: Path) -> str:
    """A bag directory's name, or a lone storage file's name without its suffix."""
    return path.name if path.is_dir() else path.stem


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
    topic: str
    stamps: list[float] = field(default_factory=list)  # in the bag's (log time) order
    values: list[Any] = field(default_factory=list)

    def arrays(self, where: str, monotonic: bool) -> tuple[np.ndarray, list[Any]]:
        """(M,) stamps sorted, and the values in that order.

        monotonic: a stamp earlier than the one before it (a clock that jumped back, a driver that
        restamped) is an error (data.checks.monotonic_stamps); else the messages are sorted by stamp."""
        stamps = np.asarray(self.stamps, dtype=np.float64)
        back = np.flatnonzero(np.diff(stamps) < 0)
        if monotonic and back.size:
            i = int(back[0]) + 1
            raise RecordingError(
                where, f"topic '{self.topic}': message {i} is stamped {stamps[i] - stamps[i - 1]:.3f} s before the one "
                f"before it (stamps go back in time; data.checks.monotonic_stamps)", check="non_monotonic_stamps",
                stream=self.topic)
        order = np.argsort(stamps, kind="stable")
        return stamps[order], [self.values[i] for i in order]


def _stamp(msg: Any, log_time_ns: int) -> float:
    """Capture time: the header stamp when the message has one, else the bag's log time."""
    header = getattr(msg, "header", None)
    if header is not None and (header.stamp.sec or header.stamp.nanosec):
        return header.stamp.sec + header.stamp.nanosec * 1e-9
    return log_time_ns * 1e-9


def decode_image(msg: Any, where: str, topic: str) -> np.ndarray:
    """sensor_msgs Image (rgb8/bgr8/rgba8/bgra8/mono8) or CompressedImage -> (H, W, 3) uint8."""
    def fail(reason: str) -> RecordingError:
        return RecordingError(where, f"topic '{topic}': {reason}", check="undecodable_image", stream=topic)

    if hasattr(msg, "format"):  # CompressedImage
        try:
            return decode_compressed(bytes(msg.data))
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            raise fail(f"cannot decode the compressed image (format '{msg.format}': {exc})") from None
    channels = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}
    enc = msg.encoding.lower()
    if enc not in channels:
        raise fail(f"image encoding '{msg.encoding}', expected one of {sorted(channels)}")
    c = channels[enc]
    data = np.asarray(msg.data, dtype=np.uint8)
    if data.size != msg.step * msg.height or msg.step < msg.width * c:
        raise fail(f"image data of {data.size} bytes does not match {msg.height}x{msg.step}")
    img = data.reshape(msg.height, msg.step)[:, : msg.width * c].reshape(msg.height, msg.width, c)
    if enc.startswith("bgr"):
        img = img[..., [2, 1, 0]]
    elif enc == "mono8":
        img = np.repeat(img, 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def _custom_data(path: Path) -> dict[str, str]:
    """The bag's ``custom_data`` (rosbag2 metadata v6+): recorders put episode facts such as the task there."""
    try:
        # libyaml's parser where PyYAML has it: the pure-Python one cost ~5 ms a bag, 4 % of ingesting a 40-frame one
        info = yaml.load((path / "metadata.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
        return dict(info.get("rosbag2_bagfile_information", {}).get("custom_data") or {})
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError):
        return {}  # a malformed metadata.yaml is reported by the reader itself


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def rosbag2_episodes(path: Path, cfg: ReaderSettings) -> list[str]:
    """A rosbag2 recording holds one episode."""
    return [episode_id(path)]


def read_rosbag2(path: Path, key: str, cfg: ReaderSettings) -> Episode:
    """Read one rosbag2 recording (or ROS1 bag) into an arm :class:`Episode` synchronised to the action ticks.

    Every problem with the data is a :class:`RecordingError` naming the bag, the topic and the check."""
    where = str(path)
    wanted = {name: topic for name in EXPECTED_TYPES if (topic := getattr(cfg.topics, name))}
    streams: dict[str, _Stream] = {name: _Stream(topic) for name, topic in wanted.items()}
    custom = _custom_data(path)
    with contextlib.ExitStack() as stack:
        try:
            reader = AnyReader(bag_paths(path) or [path], default_typestore=typestore(cfg.typestore))
            reader.open()
        except Exception as exc:  # AnyReaderError, a malformed metadata.yaml, a truncated database: all unreadable
            raise RecordingError(where, f"not a readable rosbag2 recording ({type(exc).__name__}: {exc})",
                                 check="unreadable") from exc
        stack.callback(reader.close)
        if reader.message_count == 0:
            raise RecordingError(where, "the bag has no messages", check="empty")
        present = {c.topic: c.msgtype for c in reader.connections}
        for name, topic in wanted.items():
            if topic not in present:
                optional = name in ("rgb_gripper", "scene_obs", "task")
                if optional:
                    continue
                raise RecordingError(
                    where, f"mapped topic '{topic}' (data.topics.{name}) is not in the bag; topics present: {sorted(present)}",
                    check="missing_stream", stream=topic)
            if present[topic] not in EXPECTED_TYPES[name]:
                raise RecordingError(
                    where, f"topic '{topic}' (data.topics.{name}) has type {present[topic]}, "
                    f"expected {' or '.join(EXPECTED_TYPES[name])}", check="wrong_type", stream=topic)
            if present[topic] not in reader.typestore.types:
                raise RecordingError(
                    where, f"topic '{topic}' (data.topics.{name}): the bag holds no definition of {present[topic]} "
                    f"and data.typestore '{cfg.typestore}' has none either", check="unknown_type", stream=topic)
        by_topic = {topic: name for name, topic in wanted.items()}
        connections = [c for c in reader.connections if c.topic in by_topic]
        for conn, log_time, raw in reader.messages(connections=connections):
            name = by_topic[conn.topic]
            try:
                msg = reader.deserialize(raw, conn.msgtype)
            except Exception as exc:  # AnyReaderError, or a struct/index error on a truncated message
                raise RecordingError(where, f"topic '{conn.topic}': undecodable message ({type(exc).__name__}: {exc})",
                                     check="undecodable", stream=conn.topic) from exc
            stream = streams[name]
            stream.stamps.append(_stamp(msg, log_time))
            stream.values.append(_payload(name, msg, where, conn.topic, cfg))
    return _assemble(path, streams, cfg, custom)


def _payload(name: str, msg: Any, where: str, topic: str, cfg: ReaderSettings) -> Any:
    if name in ("rgb_static", "rgb_gripper"):
        return decode_image(msg, where, topic)
    if name == "joint_states":
        positions = dict(zip(msg.name, np.asarray(msg.position, dtype=np.float64)))
        needed = [*cfg.arm_joint_names, *cfg.gripper_joint_names]
        missing = [j for j in needed if j not in positions]
        if missing:
            raise RecordingError(
                where, f"topic '{topic}': joints {missing} missing (data.arm_joint_names / data.gripper_joint_names); "
                f"message has {list(msg.name)}", check="missing_joints", stream=topic)
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
            topic = getattr(cfg.topics, name)
            raise RecordingError(where, f"topic '{topic}' (data.topics.{name}) has no messages", check="missing_stream",
                                 stream=topic)
    monotonic = cfg.checks.monotonic_stamps
    for stream in streams.values():
        if stream.values and not isinstance(stream.values[0], str):
            same_shapes(stream.values, where, stream.topic, f"topic '{stream.topic}'")
    ticks, actions = streams["action"].arrays(where, monotonic)
    action_abs = np.stack(actions)
    if action_abs.ndim != 2 or action_abs.shape[1] != 7:
        raise RecordingError(where, f"topic '{cfg.topics.action}' holds arrays of shape {action_abs.shape[1:]}, expected (7,)",
                             check="wrong_shape", stream=cfg.topics.action)
    if len(ticks) > 1:
        rate = 1.0 / float(np.median(np.diff(ticks))) if np.median(np.diff(ticks)) > 0 else float("inf")
        if abs(rate - cfg.control_hz) > 0.2 * cfg.control_hz:
            raise RecordingError(where, f"topic '{cfg.topics.action}' runs at {rate:.1f} Hz, data.control_hz is {cfg.control_hz}",
                                 check="wrong_rate", stream=cfg.topics.action)
    obs_names = [n for n in ("rgb_static", "rgb_gripper", "joint_states", "tcp_pose", "scene_obs") if streams.get(n) and streams[n].stamps]
    sorted_streams = {n: streams[n].arrays(where, monotonic) for n in obs_names}
    start = common_start({n: s[0][0] for n, s in sorted_streams.items()}, ticks)
    ticks, action_abs = ticks[start:], action_abs[start:]
    if len(ticks) < cfg.min_episode_len:
        raise RecordingError(where, f"{len(ticks)} synchronised frames, data.min_episode_len is {cfg.min_episode_len}",
                             check="too_short")
    held: dict[str, np.ndarray] = {}
    for name, (stamps, values) in sorted_streams.items():
        topic = getattr(cfg.topics, name)
        try:
            idx = hold_last(stamps, ticks, cfg.sync_tolerance_s, topic)
        except SyncError as exc:
            raise RecordingError(where, str(exc), check="out_of_sync", stream=topic) from exc
        held[name] = np.stack([values[i] for i in idx])
    if held.get("scene_obs") is not None and held["scene_obs"].shape[1:] != (SCENE_OBS_DIM,):
        raise RecordingError(where, f"topic '{cfg.topics.scene_obs}' holds arrays of shape {held['scene_obs'].shape[1:]}, "
                             f"expected ({SCENE_OBS_DIM},)", check="wrong_shape", stream=cfg.topics.scene_obs)
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
    return Episode(
        episode_id=episode_id(path),
        source=str(path),
        source_sha256=source_sha256(path),
        source_format=ROS1_SOURCE_FORMAT if path.suffix == ROS1_SUFFIX else SOURCE_FORMAT,
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
