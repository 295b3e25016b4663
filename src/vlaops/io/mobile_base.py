"""A mobile base's rosbag2 recording -> a canonical ``mobile_base`` :class:`Episode` (``data.embodiment=mobile_base``).

The seed's robot car (RoboVLMs ``configs/k_project/ros2_automotive.json``: ``action_dim`` 4 = linear_x,
linear_y, angular_z, action_type) recorded as ROS2 bags:

- the velocity command, ``geometry_msgs/Twist`` or ``TwistStamped`` on ``data.base.cmd_vel``, is the action
  (linear.x m/s, linear.y m/s, angular.z rad/s, in the base's own frame) and sets the control ticks, as the
  arm's command topic does. A Twist has no header: its stamp is the bag's log time (when the recorder
  received it); a TwistStamped's is its header stamp (the log time when that is zero);
- the action_type class, on ``data.base.action_type``: ``std_msgs/String`` holding one of
  ``data.base.action_types`` (its class id is the label's index) or an std_msgs integer holding the class id.
  It is a mode the rig switches, often published only on change, so it is held from its last message at
  every tick with no age limit (it must have been published once before the first tick kept);
- cameras (``data.topics.rgb_static``, optional ``rgb_gripper``) held within ``data.sync_tolerance_s``,
  and the instruction (``data.topics.instruction``, else a sidecar ``<recording>.json``, else
  ``data.default_instruction``), as for an arm.

A base records no arm state and none is made up: the episode has no ``robot_obs`` (the policy reads only
the cameras and the instruction). ``action/base`` (T, 4) holds [linear_x, linear_y, angular_z, class id];
the label list travels with the episode as its ``extra/action_types`` attribute (JSON), so a class id is
never read against another rig's labels.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.highlevel import AnyReader

from vlaops.errors import RecordingError
from vlaops.io import rosbag2
from vlaops.io.episode import BASE_ACTION_NAMES, Episode
from vlaops.io.images import same_shapes
from vlaops.io.settings import ReaderSettings
from vlaops.io.sync import SyncError, common_start, hold_last

CLASS_ID_TYPES = tuple(
    f"std_msgs/msg/{t}" for t in ("Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64")
)
ACTION_TYPE_TYPES = ("std_msgs/msg/String", *CLASS_ID_TYPES)
ACTION_TYPES_ATTR = "action_types"  # Episode.extra_attrs key: the JSON list of labels, class id = index

# stream -> (where its topic is configured, the message types it may have, optional)
_STREAMS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "rgb_static": ("data.topics.rgb_static", rosbag2.IMAGE_TYPES, False),
    "rgb_gripper": ("data.topics.rgb_gripper", rosbag2.IMAGE_TYPES, True),
    "instruction": ("data.topics.instruction", ("std_msgs/msg/String",), False),
    "task": ("data.topics.task", ("std_msgs/msg/String",), True),
    "cmd_vel": ("data.base.cmd_vel", rosbag2.CMD_VEL_TYPES, False),
    "action_type": ("data.base.action_type", ACTION_TYPE_TYPES, False),
}


def _topic(name: str, cfg: ReaderSettings) -> str | None:
    return getattr(cfg.base, name) if name in ("cmd_vel", "action_type") else getattr(cfg.topics, name)


def episode_labels(episode: Episode) -> list[str] | None:
    """The action_type labels a base episode's class ids index, or None when it carries none."""
    raw = episode.extra_attrs.get(ACTION_TYPES_ATTR)
    return None if raw is None else list(json.loads(raw))


def _velocity(msg: Any, where: str, topic: str, index: int) -> np.ndarray:
    """Twist / TwistStamped -> (3,) [linear.x, linear.y, angular.z]; a non-finite value is an error."""
    twist = msg.twist if hasattr(msg, "twist") else msg
    v = np.array([twist.linear.x, twist.linear.y, twist.angular.z], dtype=np.float64)
    if not np.all(np.isfinite(v)):
        bad = BASE_ACTION_NAMES[int(np.flatnonzero(~np.isfinite(v))[0])]
        raise RecordingError(
            where,
            f"topic '{topic}': message {index} has a non-finite velocity ({bad} = {v[BASE_ACTION_NAMES.index(bad)]})",
            check="non_finite",
            stream=topic,
        )
    return v


def _class_id(msg: Any, where: str, topic: str, labels: list[str]) -> int:
    """std_msgs/String label or integer class id -> class id in [0, len(labels))."""
    if isinstance(msg.data, str):
        label = msg.data.strip()
        if label not in labels:
            raise RecordingError(
                where,
                f"topic '{topic}': action_type '{label}' is not one of data.base.action_types {labels}",
                check="unknown_action_type",
                stream=topic,
            )
        return labels.index(label)
    value = int(msg.data)
    if not 0 <= value < len(labels):
        raise RecordingError(
            where,
            f"topic '{topic}': action_type class id {value} is outside [0, {len(labels)}) "
            f"(data.base.action_types {labels})",
            check="unknown_action_type",
            stream=topic,
        )
    return value


def read_base_bag(path: Path, cfg: ReaderSettings) -> Episode:
    """Read one rosbag2 recording of a mobile base into an Episode synchronised to the cmd_vel ticks.

    Every problem with the data is a :class:`RecordingError` naming the bag, the topic and the check."""
    where = str(path)
    labels = list(cfg.base.action_types)
    wanted = {name: topic for name in _STREAMS if (topic := _topic(name, cfg))}
    streams = {name: rosbag2._Stream(topic) for name, topic in wanted.items()}
    custom = rosbag2._custom_data(path)
    sidecar = rosbag2.read_sidecar(path)
    fallback = sidecar.get("instruction") or cfg.default_instruction  # when the instruction topic says nothing
    store = rosbag2.typestore(cfg.typestore, tuple(sorted(cfg.custom_msgs.items())))
    with contextlib.ExitStack() as stack:
        try:
            reader = AnyReader(rosbag2.bag_paths(path) or [path], default_typestore=store)
            reader.open()
        except Exception as exc:  # as in read_rosbag2: anything that stops the bag opening makes it unreadable
            raise RecordingError(
                where, f"not a readable rosbag2 recording ({type(exc).__name__}: {exc})", check="unreadable"
            ) from exc
        stack.callback(reader.close)
        if reader.message_count == 0:
            raise RecordingError(where, "the bag has no messages", check="empty")
        present = {c.topic: c.msgtype for c in reader.connections}
        for name, topic in wanted.items():
            key, types, optional = _STREAMS[name]
            if topic not in present:
                if optional or (name == "instruction" and fallback is not None):
                    continue
                raise RecordingError(
                    where,
                    f"mapped topic '{topic}' ({key}) is not in the bag; topics present: {sorted(present)}",
                    check="missing_stream",
                    stream=topic,
                )
            if present[topic] not in types:
                raise RecordingError(
                    where,
                    f"topic '{topic}' ({key}) has type {present[topic]}, expected {' or '.join(types)}",
                    check="wrong_type",
                    stream=topic,
                )
            if present[topic] not in reader.typestore.types:
                raise RecordingError(
                    where,
                    f"topic '{topic}' ({key}): the bag holds no definition of {present[topic]} "
                    f"and data.typestore '{cfg.typestore}' has none either",
                    check="unknown_type",
                    stream=topic,
                )
        by_topic = {topic: name for name, topic in wanted.items()}
        connections = [c for c in reader.connections if c.topic in by_topic]
        for conn, log_time, raw in reader.messages(connections=connections):
            name = by_topic[conn.topic]
            try:
                msg = reader.deserialize(raw, conn.msgtype)
            except Exception as exc:  # a truncated message
                raise RecordingError(
                    where,
                    f"topic '{conn.topic}': undecodable message ({type(exc).__name__}: {exc})",
                    check="undecodable",
                    stream=conn.topic,
                ) from exc
            stream = streams[name]
            if name in ("rgb_static", "rgb_gripper"):
                value: Any = rosbag2.decode_image(msg, where, conn.topic)
            elif name == "cmd_vel":
                value = _velocity(msg, where, conn.topic, len(stream.values))
            elif name == "action_type":
                value = _class_id(msg, where, conn.topic, labels)
            else:
                value = str(msg.data)
            stream.stamps.append(rosbag2._stamp(msg, log_time))  # header stamp, else the log time (a Twist)
            stream.values.append(value)
    return _assemble(path, streams, cfg, custom, labels, sidecar, fallback)


def _assemble(
    path: Path,
    streams: dict[str, Any],
    cfg: ReaderSettings,
    custom: dict[str, str],
    labels: list[str],
    sidecar: dict[str, str],
    fallback: str | None,
) -> Episode:
    where = str(path)
    for name in ("rgb_static", "cmd_vel", "action_type", "instruction"):
        if name == "instruction" and fallback is not None:
            continue
        if not streams[name].stamps:
            topic = _topic(name, cfg)
            raise RecordingError(
                where, f"topic '{topic}' ({_STREAMS[name][0]}) has no messages", check="missing_stream", stream=topic
            )
    monotonic = cfg.checks.monotonic_stamps
    for name in ("rgb_static", "rgb_gripper"):
        if name in streams and streams[name].values:
            same_shapes(streams[name].values, where, streams[name].topic, f"topic '{streams[name].topic}'")
    ticks, velocities = streams["cmd_vel"].arrays(where, monotonic)
    velocity = np.stack(velocities)  # (M, 3)
    topic = cfg.base.cmd_vel
    rosbag2.check_rate(ticks, cfg.control_hz, where, topic, f"topic '{topic}' (data.base.cmd_vel)")
    held_names = [n for n in ("rgb_static", "rgb_gripper", "action_type") if n in streams and streams[n].stamps]
    sorted_streams = {n: streams[n].arrays(where, monotonic) for n in held_names}
    start = common_start({n: s[0][0] for n, s in sorted_streams.items()}, ticks)
    ticks, velocity = ticks[start:], velocity[start:]
    if len(ticks) < cfg.min_episode_len:
        raise RecordingError(
            where, f"{len(ticks)} synchronised frames, data.min_episode_len is {cfg.min_episode_len}", check="too_short"
        )
    held: dict[str, np.ndarray] = {}
    for name, (stamps, values) in sorted_streams.items():
        # the class is a mode held until changed: no age limit; a camera older than the tolerance is a dropout
        tolerance = float("inf") if name == "action_type" else cfg.sync_tolerance_s
        try:
            idx = hold_last(stamps, ticks, tolerance, streams[name].topic)
        except SyncError as exc:
            raise RecordingError(where, str(exc), check="out_of_sync", stream=streams[name].topic) from exc
        held[name] = np.stack([values[i] for i in idx]) if name != "action_type" else np.array([values[i] for i in idx])
    action_base = np.concatenate([velocity, held["action_type"].astype(np.float64)[:, None]], axis=1)  # (T, 4)
    # topic > sidecar > data.default_instruction, as for an arm
    said = streams["instruction"].values if "instruction" in streams else []
    instruction = (said[0] if said else fallback or "").strip()
    task_values = streams["task"].values if "task" in streams else []
    task = (
        (task_values[0] if task_values else None)
        or sidecar.get("task")
        or custom.get("task")
        or rosbag2._slug(instruction)
    )
    return Episode(
        episode_id=rosbag2.episode_id(path),
        source=str(path),
        **rosbag2.bag_provenance(path),
        embodiment="mobile_base",
        instruction=instruction,
        task=task,
        control_hz=float(cfg.control_hz),
        time=ticks - ticks[0],
        rgb_static=held["rgb_static"],
        rgb_gripper=held.get("rgb_gripper"),
        action_base=action_base,
        extra_attrs={ACTION_TYPES_ATTR: json.dumps(labels)},
    )
