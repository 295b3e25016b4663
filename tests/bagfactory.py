"""Synthetic robot recordings written with the real ``rosbags`` writer, for the ingest tests.

A small arm episode moving along a line, with the multi-rate timing a real rig has (joint states
at 4x the control rate, the command 10 ms after the frame it answers), and knobs to break it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

TS = get_typestore(Stores.ROS2_HUMBLE)
T = TS.types
EPOCH = 1_700_000_000.0
JOINTS = [f"panda_joint{i}" for i in range(1, 8)] + ["panda_finger_joint1", "panda_finger_joint2"]


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
) -> Path:
    """Write one synthetic episode to the rosbag2 directory ``path``; returns ``path``.

    ``compressed`` ('png', 'jpeg' or 'broken') records the static camera as CompressedImage.
    """
    rng = np.random.default_rng(seed)
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(path, version=9, storage_plugin=plugin) as writer:
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

        def write(key: str, t: float, msg) -> None:
            if key in c:
                writer.write(c[key], int(round(t * 1e9)), TS.serialize_cdr(msg, conns[key][1]))

        write("instruction", EPOCH, T["std_msgs/msg/String"](data=instruction))
        pos = np.array([0.4, 0.0, 0.3])
        for k in range(n_frames):
            t = EPOCH + k / hz
            for sub in range(4):  # joint states at 4x the control rate
                ts = t + sub / (4 * hz)
                q = np.concatenate([np.linspace(-0.5, 0.5, 7) + 0.01 * k, [0.04, 0.04]])
                write("joints", ts, T["sensor_msgs/msg/JointState"](
                    header=_header(ts), name=JOINTS, position=q, velocity=np.zeros(9), effort=np.zeros(9)))
            static = _compressed(t, static_size, k % 256, compressed) if compressed else _image(t, static_size, k % 256)
            write("static", t, static)
            write("gripper", t, _image(t, gripper_size, (3 * k) % 256))
            pose = T["geometry_msgs/msg/Pose"](
                position=T["geometry_msgs/msg/Point"](x=pos[0], y=pos[1], z=pos[2]),
                orientation=T["geometry_msgs/msg/Quaternion"](x=1.0, y=0.0, z=0.0, w=0.0),
            )
            write("tcp", t, T["geometry_msgs/msg/PoseStamped"](header=_header(t), pose=pose))
            write("scene", t, _array(np.concatenate([np.zeros(6), rng.normal(size=18)])))
            step = np.array([0.0, -0.01, 0.0])
            target = np.concatenate([pos + step, [np.pi, 0.0, 0.0], [1.0 if k < n_frames // 2 else -1.0]])
            write("action", t + 0.010, _array(target))
            pos = pos + step
    return path
