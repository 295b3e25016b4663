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


def _tweaked_writer(writer, connections: dict, conns: dict, tweak):
    """write(key, t, msg, k): serialise ``msg`` on ``key``'s connection at time t, after ``tweak(key, k, t, msg)``
    (which returns the (t, msg) to write, or None to drop the message); keys without a connection are skipped."""

    def write(key: str, t: float, msg, k: int) -> None:
        if tweak is not None:
            changed = tweak(key, k, t, msg)
            if changed is None:
                return
            t, msg = changed
        if key in connections:
            writer.write(connections[key], int(round(t * 1e9)), TS.serialize_cdr(msg, conns[key][1]))

    return write


def _header(t: float, frame: str = "panda_link0"):
    sec = int(t)
    return T["std_msgs/msg/Header"](
        stamp=T["builtin_interfaces/msg/Time"](sec=sec, nanosec=int(round((t - sec) * 1e9))), frame_id=frame
    )


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
        header=_header(t, "camera"), format=f"rgb8; {fmt} compressed bgr8", data=np.frombuffer(payload, dtype=np.uint8)
    )


def _image(t: float, size: int, value: int):
    data = _pixels(size, value)
    return T["sensor_msgs/msg/Image"](
        header=_header(t, "camera"),
        height=size,
        width=size,
        encoding="rgb8",
        is_bigendian=0,
        step=size * 3,
        data=data.reshape(-1),
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

        write = _tweaked_writer(writer, c, conns, tweak)

        write("instruction", EPOCH, T["std_msgs/msg/String"](data=instruction), 0)
        pos = np.array([0.4, 0.0, 0.3])
        for k in range(n_frames):
            t = EPOCH + k / hz
            for sub in range(4):  # joint states at 4x the control rate
                ts = t + sub / (4 * hz)
                q = np.concatenate([PANDA_READY + 0.01 * k, [0.04, 0.04]])
                write(
                    "joints",
                    ts,
                    T["sensor_msgs/msg/JointState"](
                        header=_header(ts), name=JOINTS, position=q, velocity=np.zeros(9), effort=np.zeros(9)
                    ),
                    k,
                )
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
            msg = T["sensor_msgs/msg/JointState"](
                header=msg.header, name=names, position=msg.position, velocity=msg.velocity, effort=msg.effort
            )
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
            msg = T["sensor_msgs/msg/JointState"](
                header=msg.header, name=msg.name, position=q, velocity=msg.velocity, effort=msg.effort
            )
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


# ---- a mobile base (data.embodiment=mobile_base) ----------------------------------------------------
BASE_LABELS = ["drive", "turn", "stop"]


def base_commands(n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """What :func:`write_base_bag` commands: (n, 3) [linear_x m/s, linear_y m/s, angular_z rad/s] and (n,)
    class ids into BASE_LABELS: a third driving (vx rising), a third turning (wz), a third stopped."""
    k = np.arange(n_frames)
    phase = np.minimum(3 * k // n_frames, 2)  # 0 drive, 1 turn, 2 stop
    vel = np.zeros((n_frames, 3))
    vel[phase == 0, 0] = 0.2 + 0.01 * k[phase == 0]
    vel[phase == 0, 1] = 0.05 * np.sin(k[phase == 0])
    vel[phase == 1, 0] = 0.1
    vel[phase == 1, 2] = 0.8 - 0.02 * k[phase == 1]
    return vel, phase


def _twist(v, stamped: bool, t: float):
    twist = T["geometry_msgs/msg/Twist"](
        linear=T["geometry_msgs/msg/Vector3"](x=float(v[0]), y=float(v[1]), z=0.0),
        angular=T["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=float(v[2])),
    )
    return T["geometry_msgs/msg/TwistStamped"](header=_header(t, "base_link"), twist=twist) if stamped else twist


def write_base_bag(
    path: Path,
    n_frames: int = 18,
    instruction: str = "drive to the red door",
    stamped: bool = False,
    class_as_int: bool = False,
    storage: str = "sqlite3",
    static_size: int = 48,
    gripper: bool = False,
    hz: float = 10.0,
    tweak: Tweak | None = None,
) -> Path:
    """One synthetic mobile-base episode: a static camera (and a gripper camera with ``gripper``) at ``hz``,
    velocity commands 10 ms after each frame as geometry_msgs/Twist (``stamped``: TwistStamped, its header
    stamp 5 ms before the log time), and the action_type published only when it changes, as std_msgs/String
    labels (``class_as_int``: std_msgs/Int32 class ids). Commands: :func:`base_commands`. ``tweak(key,
    frame, t, msg)`` as for :func:`write_arm_bag`, keys 'static', 'gripper', 'cmd_vel', 'action_type',
    'instruction'."""
    vel, phase = base_commands(n_frames)
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        conns = {
            "static": ("/front_camera/image_raw", "sensor_msgs/msg/Image"),
            "cmd_vel": ("/cmd_vel", f"geometry_msgs/msg/{'TwistStamped' if stamped else 'Twist'}"),
            "action_type": ("/action_type", f"std_msgs/msg/{'Int32' if class_as_int else 'String'}"),
            "instruction": ("/instruction", "std_msgs/msg/String"),
        }
        if gripper:
            conns["gripper"] = ("/camera/gripper/image_raw", "sensor_msgs/msg/Image")
        c = {k: writer.add_connection(topic, typ, typestore=TS) for k, (topic, typ) in conns.items()}

        write = _tweaked_writer(writer, c, conns, tweak)

        write("instruction", EPOCH, T["std_msgs/msg/String"](data=instruction), 0)
        for k in range(n_frames):
            t = EPOCH + k / hz
            if k == 0 or phase[k] != phase[k - 1]:
                data = int(phase[k]) if class_as_int else BASE_LABELS[phase[k]]
                write("action_type", t, T[conns["action_type"][1]](data=data), k)
            write("static", t, _image(t, static_size, (11 * k) % 256), k)
            if gripper:
                write("gripper", t, _image(t, 24, (5 * k) % 256), k)
            write("cmd_vel", t + 0.010, _twist(vel[k], stamped, t + 0.005), k)
    return path


def set_twist(frame: int, values) -> Tweak:
    """The velocity command of ``frame`` is ``values`` (linear_x, linear_y, angular_z): NaN, say."""

    def tweak(key, k, t, msg):
        if key == "cmd_vel" and k == frame:
            msg = _twist(values, hasattr(msg, "header"), t)
        return t, msg

    return tweak


def set_action_type(frame: int, data) -> Tweak:
    """The action_type message of ``frame`` (one exists where the class changes) holds ``data``."""

    def tweak(key, k, t, msg):
        if key == "action_type" and k == frame:
            msg = type(msg)(data=data)
        return t, msg

    return tweak


# ---- other teams' rigs: the TCP pose on /tf, their own message types, one long recording -------------
def rewrite_bag(
    dst: Path,
    sources: list[tuple[Path, float]],
    drop_topics: tuple[str, ...] = (),
    convert: dict[str, tuple[str, Callable[[Any, float], Any]]] | None = None,
    extra: dict[str, tuple[str, list[tuple[float, Any]]]] | None = None,
    typestore=TS,
    storage: str = "sqlite3",
) -> Path:
    """A new bag at ``dst`` from the messages of the rosbag2 bags ``sources`` [(bag, offset s)], each shifted
    by its offset (log times and header stamps): one long recording from several episodes. ``convert``
    {topic: (new type, fn(msg, log time s) -> new msg)} re-types a topic (a team's own message);
    ``extra`` {topic: (type, [(log time s, msg)])} adds topics (/tf); ``typestore`` serialises them all."""
    from rosbags.rosbag2 import Reader

    convert, extra = convert or {}, extra or {}
    types: dict[str, str] = {}
    messages: list[tuple[float, str, Any]] = []
    for src, offset in sources:
        with Reader(src) as reader:
            for conn, stamp_ns, raw in reader.messages():
                if conn.topic in drop_topics:
                    continue
                msg, t = TS.deserialize_cdr(raw, conn.msgtype), stamp_ns * 1e-9 + offset
                if offset and hasattr(msg, "header"):
                    old = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
                    msg.header = _header(old + offset, msg.header.frame_id)
                msgtype = conn.msgtype
                if conn.topic in convert:
                    msgtype, fn = convert[conn.topic]
                    msg = fn(msg, t)
                types[conn.topic] = msgtype
                messages.append((t, conn.topic, msg))
    for topic, (msgtype, stamped) in extra.items():
        types[topic] = msgtype
        messages.extend((t, topic, msg) for t, msg in stamped)
    messages.sort(key=lambda m: m[0])  # stable: the sources' order among equal times
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(dst, version=9, storage_plugin=plugin) as writer:
        conns = {topic: writer.add_connection(topic, msgtype, typestore=typestore) for topic, msgtype in types.items()}
        for t, topic, msg in messages:
            writer.write(conns[topic], int(round(t * 1e9)), typestore.serialize_cdr(msg, types[topic]))
    return dst


def _quat_z(angle: float) -> np.ndarray:
    return np.array([0.0, 0.0, np.sin(angle / 2), np.cos(angle / 2)])


# The transform tree of write_tf_bag, parent -> child: (xyz, quaternion xyzw). world holds the arm's base and
# a table; the arm's last link moves (/tf), the hand and its TCP are fixed to it (/tf_static, as
# robot_state_publisher publishes fixed joints), and a camera hangs off the table.
TF_STATIC = {
    ("world", "panda_link0"): (np.array([0.1, -0.2, 0.75]), _quat_z(0.3)),
    ("world", "table"): (np.array([0.5, 0.0, 0.7]), _quat_z(-0.2)),
    ("panda_link7", "panda_hand"): (np.array([0.0, 0.0, 0.107]), _quat_z(-np.pi / 4)),
    ("panda_hand", "panda_hand_tcp"): (np.array([0.0, 0.0, 0.1034]), np.array([1.0, 0.0, 0.0, 0.0])),
    ("table", "camera_link"): (np.array([0.0, 0.6, 0.5]), _quat_z(1.0)),
}


def tf_link7(k: int) -> tuple[np.ndarray, np.ndarray]:
    """panda_link0 -> panda_link7 at frame ``k``: a moving arm (xyz, quaternion xyzw)."""
    axis = np.array([0.3, -0.5, 1.0]) / np.linalg.norm([0.3, -0.5, 1.0])
    angle = 0.4 + 0.05 * k
    return np.array([0.35 + 0.01 * k, -0.01 * k, 0.45]), np.concatenate([axis * np.sin(angle / 2), [np.cos(angle / 2)]])


def _transform(parent: str, child: str, t: float, xyz, quat):
    return T["geometry_msgs/msg/TransformStamped"](
        header=_header(t, parent),
        child_frame_id=child,
        transform=T["geometry_msgs/msg/Transform"](
            translation=T["geometry_msgs/msg/Vector3"](x=float(xyz[0]), y=float(xyz[1]), z=float(xyz[2])),
            rotation=T["geometry_msgs/msg/Quaternion"](
                x=float(quat[0]), y=float(quat[1]), z=float(quat[2]), w=float(quat[3])
            ),
        ),
    )


def write_tf_bag(
    path: Path,
    n_frames: int = 16,
    static: dict | None = None,
    tf_until: int | None = None,
    tool_parent: str = "panda_link0",
    **kwargs,
) -> Path:
    """The episode of :func:`write_arm_bag` (its knobs in ``kwargs``) with no /tcp_pose: the TCP is on /tf.

    /tf carries ``tool_parent`` -> panda_link7 (:func:`tf_link7`) at 4x the control rate, the joint states'
    rate (frame k's value from the frame's stamp on, stamped like a driver's); /tf_static carries ``static``
    (default TF_STATIC) once, before the episode, with stamp 0 as static transforms often have. ``tf_until``:
    /tf stops after that frame (a driver that died)."""
    import tempfile

    hz = kwargs.get("hz", 30.0)
    static = TF_STATIC if static is None else static
    moving = []
    for k in range(n_frames if tf_until is None else tf_until + 1):
        for sub in range(4):
            ts = EPOCH + k / hz + sub / (4 * hz)
            link7 = _transform(tool_parent, "panda_link7", ts, *tf_link7(k))
            moving.append((ts, T["tf2_msgs/msg/TFMessage"](transforms=[link7])))
    latched = T["tf2_msgs/msg/TFMessage"](transforms=[_transform(p, c, 0.0, *v) for (p, c), v in static.items()])
    with tempfile.TemporaryDirectory() as tmp:
        src = write_arm_bag(Path(tmp) / "src", n_frames=n_frames, omit=("tcp",), **kwargs)
        return rewrite_bag(
            path,
            [(src, 0.0)],
            extra={
                "/tf": ("tf2_msgs/msg/TFMessage", moving),
                "/tf_static": ("tf2_msgs/msg/TFMessage", [(EPOCH - 0.5, latched)] if static else []),
            },
        )


# A team's own messages: the arm command and state of a rig whose driver is not a ROS standard one.
ARM_COMMAND = "std_msgs/Header header\nfloat64[6] target  # tcp xyz, euler xyz\nfloat64 gripper\n"
ARM_STATE = "std_msgs/Header header\nfloat64[7] q\nFingers fingers\n"
FINGERS = "float64 left\nfloat64 right\n"
CUSTOM_MSGS = {"my_pkg/msg/ArmCommand": ARM_COMMAND, "my_pkg/msg/ArmState": ARM_STATE, "my_pkg/msg/Fingers": FINGERS}


def custom_typestore():
    """The standard ROS2 types plus CUSTOM_MSGS: what the team's recorder had."""
    from rosbags.typesys import get_types_from_msg

    store = get_typestore(Stores.ROS2_HUMBLE)
    types = {}
    for name, text in CUSTOM_MSGS.items():
        types.update(get_types_from_msg(text, name))
    store.register(types)
    return store


def write_custom_msg_bag(path: Path, definitions: str = "none", **kwargs) -> Path:
    """The episode of :func:`write_arm_bag` with /action as my_pkg/msg/ArmCommand and /joint_states as
    my_pkg/msg/ArmState. ``definitions``: 'all' (the bag carries every definition), 'standard' (all but the
    team's own: a recorder that lacked the package), 'none' (a recorder older than Iron writes none)."""
    import sqlite3
    import tempfile

    store = custom_typestore()
    c = store.types

    def command(msg, t):
        return c["my_pkg/msg/ArmCommand"](
            header=_header(t, "panda_link0"), target=np.asarray(msg.data[:6]), gripper=float(msg.data[6])
        )

    def state(msg, t):
        fingers = c["my_pkg/msg/Fingers"](left=float(msg.position[7]), right=float(msg.position[8]))
        return c["my_pkg/msg/ArmState"](header=msg.header, q=np.asarray(msg.position[:7]), fingers=fingers)

    with tempfile.TemporaryDirectory() as tmp:
        src = write_arm_bag(Path(tmp) / "src", **kwargs)
        rewrite_bag(
            path,
            [(src, 0.0)],
            typestore=store,
            convert={"/action": ("my_pkg/msg/ArmCommand", command), "/joint_states": ("my_pkg/msg/ArmState", state)},
        )
    if definitions != "all":
        [db] = path.glob("*.db3")
        with sqlite3.connect(db) as con:
            own_only = " WHERE topic_type LIKE 'my_pkg/%'" if definitions == "standard" else ""
            con.execute("DELETE FROM message_definitions" + own_only)
        con.close()
    return path


def write_long_bag(
    path: Path, parts: list[dict], pause_s: float = 0.0, hz: float = 30.0, storage: str = "sqlite3"
) -> Path:
    """One long recording of several episodes of :func:`write_arm_bag` (``parts``: their knobs, n_frames
    and instruction among them), each starting where the one before ended plus ``pause_s`` (the robot
    idle, nothing commanded), each with its instruction message at its start."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        sources, offset = [], 0.0
        for i, part in enumerate(parts):
            src = write_arm_bag(Path(tmp) / f"part{i}", hz=hz, **part)
            sources.append((src, offset))
            offset += part.get("n_frames", 24) / hz + pause_s
        return rewrite_bag(path, sources, storage=storage)
