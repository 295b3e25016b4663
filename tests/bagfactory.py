"""Synthetic robot recordings written with the real ``rosbags`` writer, for the ingest tests.

A small arm episode moving along a line, with the multi-rate timing a real rig has (joint states
at 4x the control rate, the command 10 ms after the frame it answers), and knobs to break it.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

TS = get_typestore(Stores.ROS2_HUMBLE)
T = TS.types
EPOCH = 1_700_000_000.0
JOINTS = [f"panda_joint{i}" for i in range(1, 8)] + ["panda_finger_joint1", "panda_finger_joint2"]
PANDA_READY = np.array([0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785])  # a pose inside the Panda's joint limits


def _header(t: float, frame: str = "panda_link0"):
    sec = int(t)
    return T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=sec, nanosec=int(round((t - sec) * 1e9))), frame_id=frame)


def _pixels(size: int, value: int) -> np.ndarray:
    data = np.full((size, size, 3), value, dtype=np.uint8)
    data[: size // 2, :, 0] = 255 - value  # some structure, so a channel swap would show
    return data


def _compressed(t: float, size: int, value: int, fmt: str):
    """sensor_msgs/CompressedImage as a camera driver's image_transport writes it; fmt 'png' or 'jpeg',
    'broken' for bytes no decoder reads."""
    if fmt == "broken":
        payload = b"\x89PNG truncated"
    else:
        buf = io.BytesIO()
        Image.fromarray(_pixels(size, value)).save(buf, format=fmt.upper())
        payload = buf.getvalue()
    return T["sensor_msgs/msg/CompressedImage"](
        header=_header(t, "camera"), format=f"rgb8; {fmt} compressed bgr8", data=np.frombuffer(payload, dtype=np.uint8))


def _image(t: float, size: int, value: int):
    data = _pixels(size, value)
    return T["sensor_msgs/msg/Image"](
        header=_header(t, "camera"), height=size, width=size, encoding="rgb8", is_bigendian=0, step=size * 3, data=data.reshape(-1)
    )


def _array(values) -> object:
    layout = T["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0)
    return T["std_msgs/msg/Float64MultiArray"](layout=layout, data=np.asarray(values, dtype=np.float64))


def write_arm_bag(
    path: Path,
    n_frames: int = 24,
    instruction: str = "push the red block to the left",
    omit: tuple[str, ...] = (),
    storage: str = "sqlite3",
    static_size: int = 64,
    gripper_size: int = 32,
    hz: float = 30.0,
    seed: int = 0,
    empty: bool = False,
    compressed: str | None = None,
    tweak: Callable[[str, int, float, Any], tuple[float, Any] | None] | None = None,
    version: int = 9,
) -> Path:
    """Write one synthetic episode to the rosbag2 directory ``path``; returns ``path``.

    ``compressed`` ('png', 'jpeg' or 'broken') records the static camera as CompressedImage.
    ``tweak(key, frame, t, msg)`` breaks it: it returns the (stamp, message) to write instead, or None to
    drop the message; keys 'static', 'gripper', 'joints', 'tcp', 'scene', 'action', 'instruction'.
    ``version``: the rosbag2 format (8 or 9, what ``rosbags`` writes).
    """
    rng = np.random.default_rng(seed)
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(path, version=version, storage_plugin=plugin) as writer:
        conns = {
            "static": ("/camera/static/image_raw", f"sensor_msgs/msg/{'Compressed' if compressed else ''}Image"),
            "gripper": ("/camera/gripper/image_raw", "sensor_msgs/msg/Image"),
            "joints": ("/joint_states", "sensor_msgs/msg/JointState"),
            "tcp": ("/tcp_pose", "geometry_msgs/msg/PoseStamped"),
            "scene": ("/scene_state", "std_msgs/msg/Float64MultiArray"),
            "action": ("/action", "std_msgs/msg/Float64MultiArray"),
            "instruction": ("/instruction", "std_msgs/msg/String"),
        }
        c = {k: writer.add_connection(topic, typ, typestore=TS) for k, (topic, typ) in conns.items() if k not in omit}
        if empty:
            return path

        def write(key: str, t: float, msg, k: int) -> None:
            if tweak is not None:
                changed = tweak(key, k, t, msg)
                if changed is None:
                    return
                t, msg = changed
            if key in c:
                writer.write(c[key], int(round(t * 1e9)), TS.serialize_cdr(msg, conns[key][1]))

        write("instruction", EPOCH, T["std_msgs/msg/String"](data=instruction), 0)
        pos = np.array([0.4, 0.0, 0.3])
        for k in range(n_frames):
            t = EPOCH + k / hz
            for sub in range(4):  # joint states at 4x the control rate
                ts = t + sub / (4 * hz)
                q = np.concatenate([PANDA_READY + 0.01 * k, [0.04, 0.04]])
                write("joints", ts, T["sensor_msgs/msg/JointState"](
                    header=_header(ts), name=JOINTS, position=q, velocity=np.zeros(9), effort=np.zeros(9)), k)
            static = _compressed(t, static_size, k % 256, compressed) if compressed else _image(t, static_size, k % 256)
            write("static", t, static, k)
            write("gripper", t, _image(t, gripper_size, (3 * k) % 256), k)
            pose = T["geometry_msgs/msg/Pose"](
                position=T["geometry_msgs/msg/Point"](x=pos[0], y=pos[1], z=pos[2]),
                orientation=T["geometry_msgs/msg/Quaternion"](x=1.0, y=0.0, z=0.0, w=0.0),
            )
            write("tcp", t, T["geometry_msgs/msg/PoseStamped"](header=_header(t), pose=pose), k)
            write("scene", t, _array(np.concatenate([np.zeros(6), rng.normal(size=18)])), k)
            step = np.array([0.0, -0.01, 0.0])
            target = np.concatenate([pos + step, [np.pi, 0.0, 0.0], [1.0 if k < n_frames // 2 else -1.0]])
            write("action", t + 0.010, _array(target), k)
            pos = pos + step
    return path


# ---- ways to break a recording (``tweak=`` of write_arm_bag) ----------------------------------------
Tweak = Callable[[str, int, float, Any], tuple[float, Any] | None]


def resize_camera(from_frame: int, size: int) -> Tweak:
    """The static camera switches to ``size`` x ``size`` from ``from_frame`` on (a driver reconfigured)."""
    def tweak(key, k, t, msg):
        return (t, _image(t, size, k % 256)) if key == "static" and k >= from_frame else (t, msg)
    return tweak


def set_array(topic_key: str, frame: int, values) -> Tweak:
    """The Float64MultiArray of ``topic_key`` ('action' or 'scene') at ``frame`` holds ``values``."""
    def tweak(key, k, t, msg):
        return (t, _array(values)) if key == topic_key and k == frame else (t, msg)
    return tweak


def set_action(frame: int, values) -> Tweak:
    """The command at ``frame`` holds ``values`` (7, or another length to break the shape)."""
    return set_array("action", frame, values)


def rename_joints(names: list[str]) -> Tweak:
    """Joint states name their joints ``names`` (a rig whose joints are not data.arm_joint_names)."""
    def tweak(key, k, t, msg):
        if key == "joints":
            msg = T["sensor_msgs/msg/JointState"](header=msg.header, name=names, position=msg.position,
                                                  velocity=msg.velocity, effort=msg.effort)
        return t, msg
    return tweak


def set_instruction(text: str) -> Tweak:
    def tweak(key, k, t, msg):
        return (t, T["std_msgs/msg/String"](data=text)) if key == "instruction" else (t, msg)
    return tweak


def set_joint(frame: int, joint: int, value: float) -> Tweak:
    """Every joint-state message of ``frame`` has joint index ``joint`` at ``value`` (NaN, past a limit)."""
    def tweak(key, k, t, msg):
        if key == "joints" and k == frame:
            q = np.array(msg.position)
            q[joint] = value
            msg = T["sensor_msgs/msg/JointState"](header=msg.header, name=msg.name, position=q,
                                                  velocity=msg.velocity, effort=msg.effort)
        return t, msg
    return tweak


def stamp_back(topic_key: str, frame: int, seconds: float) -> Tweak:
    """The header of the ``topic_key`` message of ``frame`` is stamped ``seconds`` earlier (a driver's clock
    that jumped back); the bag's log time, when the recorder received it, is unchanged."""
    def tweak(key, k, t, msg):
        if key == topic_key and k == frame:
            msg.header = _header(t - seconds, msg.header.frame_id)
        return t, msg
    return tweak


def drop(topic_key: str, from_frame: int = 0, to_frame: int | None = None) -> Tweak:
    """No ``topic_key`` message for frames ``from_frame`` .. ``to_frame`` (a sensor that dropped out)."""
    def tweak(key, k, t, msg):
        if key == topic_key and k >= from_frame and (to_frame is None or k <= to_frame):
            return None
        return t, msg
    return tweak


def chain(*tweaks: Tweak) -> Tweak:
    def tweak(key, k, t, msg):
        for one in tweaks:
            out = one(key, k, t, msg)
            if out is None:
                return None
            t, msg = out
        return t, msg
    return tweak


def strip_to_database(bag: Path, keep_definitions: bool = True) -> Path:
    """What a crashed recorder leaves: the bag's .db3 without metadata.yaml; ``keep_definitions=False``
    also empties the database's message_definitions table (a recorder older than Iron writes none)."""
    import sqlite3

    (bag / "metadata.yaml").unlink()
    [db] = bag.glob("*.db3")
    if not keep_definitions:
        with sqlite3.connect(db) as con:
            con.execute("DELETE FROM message_definitions")
        con.close()
    return db


def write_ros1_bag(path: Path, **kwargs) -> Path:
    """The episode of :func:`write_arm_bag` (same knobs) as a ROS1 ``.bag`` file at ``path``, converted with
    ``rosbags.convert`` (what ``rosbags-convert`` does): ROS1 messages, ROS1 definitions in the bag."""
    import tempfile

    from rosbags.convert import convert

    with tempfile.TemporaryDirectory() as tmp:
        src = write_arm_bag(Path(tmp) / "ros2", **kwargs)
        convert([src], path, "sqlite3", 9, None, "file", TS, get_typestore(Stores.ROS1_NOETIC), [], [], [], [])
    return path
