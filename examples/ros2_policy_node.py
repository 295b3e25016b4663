"""A ROS2 node (rclpy) that drives an arm with a vlaops policy, in process or through ``vlaops serve``.

    python examples/ros2_policy_node.py paths.model_dir=models/policy           # PolicyRuntime in this process
    python examples/ros2_policy_node.py --server http://gpu-box:8000            # a policy served elsewhere
    python examples/ros2_policy_node.py --compressed data.topics.rgb_static=/cam/image_raw/compressed

It reads the same topic map ingest reads (``data.topics``, conf/data/default.yaml), so the node sees the
robot as the recordings the policy was trained on did:

- subscribes to ``rgb_static`` and ``rgb_gripper`` (sensor_msgs/Image, or CompressedImage with
  ``--compressed``), ``instruction`` (std_msgs/String) and ``tcp_pose`` (geometry_msgs/PoseStamped),
  keeping the newest message of each;
- at ``data.control_hz`` takes the newest of each, if none is older than ``data.sync_tolerance_s`` (ingest's
  zero-order hold to the control ticks), converts the images as ingest + convert do (decoded to RGB,
  resized to CALVIN's 200x200 / 84x84), and steps the policy; a new instruction starts a new episode
  (``reset``);
- publishes on ``action`` a std_msgs/Float64MultiArray(7): the absolute target TCP pose (xyz, euler xyz)
  and gripper +-1, the convention of the recorded action topic, computed from the policy's relative
  action and the current TCP pose as CALVIN's robot does (calvin_env/robot/robot.py, ``relative_to_absolute``).

Not run in CI (no ROS there): the logic (``PolicyLoop`` and the conversions) imports no rclpy and is
tested with ``rosbags``' message classes (tests/test_ros2_node.py); ``main`` imports rclpy.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from vlaops.errors import RecordingError
from vlaops.eval.env import StepPolicy
from vlaops.io.calvin_spec import (
    ACTION_DIM,
    GRIPPER_CLOSE,
    GRIPPER_OPEN,
    REL_ORN_SCALE,
    REL_POS_SCALE,
    RGB_GRIPPER_SIZE,
    RGB_STATIC_SIZE,
    wrap_angle,
)
from vlaops.io.geometry import quat_to_euler
from vlaops.io.rosbag2 import decode_image

CAMERA_SIZES = {"rgb_static": RGB_STATIC_SIZE, "rgb_gripper": RGB_GRIPPER_SIZE}
STREAMS = ("rgb_static", "rgb_gripper", "instruction", "tcp_pose")


# ---- message -> observation -----------------------------------------------------------------------
def msg_stamp(msg: Any, received_s: float) -> float:
    """Capture time in seconds: the header stamp when the message has one, else when it arrived (as ingest)."""
    header = getattr(msg, "header", None)
    if header is not None and (header.stamp.sec or header.stamp.nanosec):
        return header.stamp.sec + header.stamp.nanosec * 1e-9
    return received_s


def camera_image(msg: Any, key: str, topic: str) -> np.ndarray:
    """sensor_msgs Image / CompressedImage -> (S, S, 3) uint8 at CALVIN's size for ``key``, converted as
    ingest decodes (``vlaops.io.rosbag2.decode_image``) and convert resizes (PIL bilinear, data/convert.py)."""
    img = decode_image(msg, "ros2_policy_node", topic)  # (H, W, 3) RGB
    size = CAMERA_SIZES[key]
    if img.shape[:2] == (size, size):
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))


def tcp_pose(msg: Any) -> tuple[np.ndarray, np.ndarray]:
    """geometry_msgs/PoseStamped -> (xyz (3,), euler xyz (3,)), as ingest reads the TCP pose."""
    p, q = msg.pose.position, msg.pose.orientation
    return np.array([p.x, p.y, p.z]), quat_to_euler(np.array([q.x, q.y, q.z, q.w]))


# ---- action -> message ----------------------------------------------------------------------------
def absolute_target(rel_action: np.ndarray, pos: np.ndarray, euler: np.ndarray) -> np.ndarray:
    """(7,) relative action (CALVIN units) + the current TCP pose -> (7,) absolute target: pos + a[:3] x 0.02,
    euler + a[3:6] x 0.05 (wrapped to [-pi, pi)), gripper +-1 (calvin_env/robot/robot.py, as the simulator)."""
    a = np.clip(np.asarray(rel_action, dtype=np.float64), -1.0, 1.0)
    if a.shape != (ACTION_DIM,):
        raise ValueError(f"action must have shape ({ACTION_DIM},), got {a.shape}")
    target = np.empty(ACTION_DIM)
    target[:3] = pos + a[:3] * REL_POS_SCALE
    target[3:6] = wrap_angle(euler + a[3:6] * REL_ORN_SCALE)
    target[6] = GRIPPER_OPEN if a[6] > 0 else GRIPPER_CLOSE
    return target


@dataclass(frozen=True)
class MultiArrayTypes:
    """The std_msgs classes to build the action message from: rclpy's (``std_msgs.msg``) on a robot,
    rosbags' typestore in the tests. ``sequence`` turns the (7,) array into what the class stores: a list
    for rclpy, the numpy array itself for rosbags."""

    Float64MultiArray: Any
    MultiArrayLayout: Any
    MultiArrayDimension: Any
    sequence: Callable[[np.ndarray], Any] = list


def action_message(target: np.ndarray, types: MultiArrayTypes) -> Any:
    """(7,) absolute target -> std_msgs/Float64MultiArray with one dimension labelled "action"."""
    data = np.asarray(target, dtype=np.float64)
    layout = types.MultiArrayLayout(
        dim=[types.MultiArrayDimension(label="action", size=data.size, stride=data.size)], data_offset=0
    )
    return types.Float64MultiArray(layout=layout, data=types.sequence(data))


# ---- the loop -------------------------------------------------------------------------------------
class PolicyLoop:
    """The node without ROS: newest message per stream in, at most one step per control tick out.

    ``on_message(name, msg, now)`` for each subscription (``name`` one of STREAMS), ``tick(now)`` from the
    control timer: returns the (7,) absolute target to publish, or None with ``skipped`` saying why (a
    stream never seen or older than ``max_age_s``, no instruction yet, or the tick not due).
    """

    def __init__(
        self, policy: StepPolicy, topics: dict[str, str], control_hz: float, max_age_s: float, use_gripper: bool = True
    ) -> None:
        self.policy, self.topics, self.max_age_s = policy, topics, max_age_s
        self.period = 1.0 / control_hz
        self.needed = ["rgb_static", *(["rgb_gripper"] if use_gripper else []), "tcp_pose"]
        self.latest: dict[str, tuple[float, Any]] = {}  # name -> (capture time s, message)
        self.instruction: str | None = None
        self.next_tick: float | None = None
        self.skipped: str | None = None
        self.steps = 0

    def on_message(self, name: str, msg: Any, now: float) -> None:
        if name not in STREAMS:
            raise ValueError(f"unknown stream {name!r}; expected one of {STREAMS}")
        if name == "instruction":
            text = str(msg.data).strip()
            if text and text != self.instruction:  # a new task: a new episode, a new window
                self.instruction = text
                self.policy.reset()
                self.steps = 0
            return
        self.latest[name] = (msg_stamp(msg, now), msg)

    def due(self, now: float) -> bool:
        """One step per control period. A timer's jitter does not drop a tick (a call up to a quarter period
        before the schedule counts), a faster caller steps at the control rate, and a late tick steps once:
        the schedule skips the periods it missed instead of catching up in a burst."""
        if self.next_tick is None:
            self.next_tick = now + self.period
            return True
        if now < self.next_tick - self.period / 4:
            return False
        missed = max(0, round((now - self.next_tick) / self.period))
        self.next_tick += (missed + 1) * self.period
        return True

    def observation(self, now: float) -> dict[str, np.ndarray] | None:
        for name in self.needed:
            if name not in self.latest:
                self.skipped = f"no message on {self.topics[name]} ({name}) yet"
                return None
            age = now - self.latest[name][0]
            if age > self.max_age_s:
                self.skipped = (
                    f"{self.topics[name]} ({name}) is {age:.3f} s old (data.sync_tolerance_s={self.max_age_s})"
                )
                return None
        try:
            return {
                name: camera_image(self.latest[name][1], name, self.topics[name])
                for name in self.needed
                if name in CAMERA_SIZES
            }
        except RecordingError as exc:  # an undecodable frame: skip the tick, keep the node alive
            self.skipped = str(exc)
            return None

    def tick(self, now: float) -> np.ndarray | None:
        self.skipped = None
        if not self.due(now):
            self.skipped = "not due"
            return None
        if self.instruction is None:
            self.skipped = f"no instruction on {self.topics['instruction']} yet"
            return None
        obs = self.observation(now)
        if obs is None:
            return None
        rel = self.policy.step(obs, self.instruction)  # (7,) relative
        self.steps += 1
        pos, euler = tcp_pose(self.latest["tcp_pose"][1])
        return absolute_target(rel, pos, euler)


# ---- rclpy ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    import rclpy
    from geometry_msgs.msg import PoseStamped
    from rclpy.node import Node
    from sensor_msgs.msg import CompressedImage
    from sensor_msgs.msg import Image as ImageMsg
    from std_msgs.msg import Float64MultiArray, MultiArrayDimension, MultiArrayLayout, String

    from vlaops.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--server",
        metavar="URL",
        help="step a policy served by `vlaops serve` at URL instead of loading paths.model_dir",
    )
    parser.add_argument("--compressed", action="store_true", help="the camera topics carry sensor_msgs/CompressedImage")
    parser.add_argument("--device", default="cpu", help="torch device of the in-process policy")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides of conf/, e.g. data.topics.rgb_static=/cam paths.model_dir=..."
    )
    args = parser.parse_args(argv)
    cfg = load_config(args.overrides)
    topics = {name: getattr(cfg.data.topics, name) for name in STREAMS}

    if args.server:
        from vlaops.serve.client import PolicyClient

        policy: Any = PolicyClient(args.server)
        use_gripper = bool(policy.health()["use_hand_rgb"])
    else:
        from vlaops.model import PolicyRuntime

        policy = PolicyRuntime.load(cfg.paths.model_dir, args.device)
        use_gripper = policy.cfg.use_hand_rgb
    loop = PolicyLoop(policy, topics, cfg.data.control_hz, cfg.data.sync_tolerance_s, use_gripper)
    types = MultiArrayTypes(Float64MultiArray, MultiArrayLayout, MultiArrayDimension, sequence=list)

    rclpy.init()
    node = Node("vlaops_policy")
    now = lambda: node.get_clock().now().nanoseconds * 1e-9  # noqa: E731
    camera_type = CompressedImage if args.compressed else ImageMsg
    msg_types = {"rgb_static": camera_type, "rgb_gripper": camera_type, "instruction": String, "tcp_pose": PoseStamped}
    for name in ["instruction", *loop.needed]:
        node.create_subscription(
            msg_types[name], topics[name], lambda msg, name=name: loop.on_message(name, msg, now()), 10
        )
    publisher = node.create_publisher(Float64MultiArray, cfg.data.topics.action, 10)

    def on_timer() -> None:
        target = loop.tick(now())
        if target is not None:
            publisher.publish(action_message(target, types))
        elif loop.skipped != "not due":
            node.get_logger().warning(loop.skipped, throttle_duration_sec=2.0)

    node.create_timer(loop.period, on_timer)
    node.get_logger().info(f"stepping the policy at {cfg.data.control_hz} Hz; publishing on {cfg.data.topics.action}")
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
        if args.server:
            policy.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
