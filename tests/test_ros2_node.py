"""examples/ros2_policy_node.py without ROS: its logic driven by ``rosbags``' message classes.

The node must publish what the closed-loop evaluation would execute: the same relative action from the
same frames, turned into the absolute target the simulator computes from it.
"""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rosbags.typesys import Stores, get_typestore

ROOT = Path(__file__).resolve().parents[1]
TS = get_typestore(Stores.ROS2_HUMBLE)
T = TS.types
TOPICS = {
    "rgb_static": "/camera/static/image_raw",
    "rgb_gripper": "/camera/gripper/image_raw",
    "instruction": "/instruction",
    "tcp_pose": "/tcp_pose",
}
HZ = 30.0


@pytest.fixture(scope="module")
def node():
    spec = importlib.util.spec_from_file_location("ros2_policy_node", ROOT / "examples" / "ros2_policy_node.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    assert "rclpy" not in sys.modules  # importable where ROS is not installed
    return module


def header(t: float):
    sec = int(t)
    return T["std_msgs/msg/Header"](
        stamp=T["builtin_interfaces/msg/Time"](sec=sec, nanosec=int(round((t - sec) * 1e9))), frame_id="camera"
    )


def image_msg(img: np.ndarray, t: float, encoding: str = "rgb8"):
    pixels = img[..., ::-1] if encoding == "bgr8" else img
    h, w, _ = pixels.shape
    return T["sensor_msgs/msg/Image"](
        header=header(t),
        height=h,
        width=w,
        encoding=encoding,
        is_bigendian=0,
        step=w * 3,
        data=np.ascontiguousarray(pixels).reshape(-1),
    )


def png_msg(img: np.ndarray, t: float):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return T["sensor_msgs/msg/CompressedImage"](
        header=header(t), format="png", data=np.frombuffer(buf.getvalue(), np.uint8)
    )


def pose_msg(pos: np.ndarray, quat_xyzw: np.ndarray, t: float):
    g = "geometry_msgs/msg/"
    return T[g + "PoseStamped"](
        header=header(t),
        pose=T[g + "Pose"](
            position=T[g + "Point"](x=pos[0], y=pos[1], z=pos[2]),
            orientation=T[g + "Quaternion"](x=quat_xyzw[0], y=quat_xyzw[1], z=quat_xyzw[2], w=quat_xyzw[3]),
        ),
    )


def string_msg(text: str):
    return T["std_msgs/msg/String"](data=text)


def rosbags_types(node):
    return node.MultiArrayTypes(
        T["std_msgs/msg/Float64MultiArray"],
        T["std_msgs/msg/MultiArrayLayout"],
        T["std_msgs/msg/MultiArrayDimension"],
        sequence=np.asarray,
    )


class Recorder:
    """A StepPolicy that records what the loop gives it and answers a fixed relative action."""

    def __init__(self) -> None:
        self.calls, self.resets = [], 0

    def reset(self) -> None:
        self.resets += 1

    def step(self, obs, instruction):
        self.calls.append((obs, instruction))
        return np.array([1.0, -0.5, 0.0, 0.0, 0.0, 0.2, -1.0])


def test_closed_loop_in_the_simulator_publishes_what_evaluation_would_execute(node, tiny_policy_dir):
    """Frames from the simulator as ROS messages (rgb8 static, bgr8 gripper, header stamps), the TCP pose as
    PoseStamped: every published target is ``env.rel_to_abs`` of the in-process runtime's action on the
    same frames, and the message serialises as a std_msgs/Float64MultiArray(7)."""
    from vlaops.config import load_config
    from vlaops.model import PolicyRuntime
    from vlaops.sim.env import TabletopEnv
    from vlaops.sim.tasks import get_task

    runtime = PolicyRuntime.load(tiny_policy_dir)
    twin = PolicyRuntime(runtime.model, runtime.processor, runtime.normalizer, runtime.device)
    loop = node.PolicyLoop(runtime, TOPICS, control_hz=HZ, max_age_s=0.05, use_gripper=True)
    sim = load_config(["sim.tasks=[lift_blue]"], ROOT / "conf").sim
    instruction = get_task("lift_blue").instruction
    types = rosbags_types(node)
    with TabletopEnv(sim, render=True) as env:
        obs = env.reset(3)
        loop.on_message("instruction", string_msg(instruction), 0.0)
        twin.reset()
        targets = []
        for k in range(runtime.cfg.window_size + 3):
            t = 100.0 + k / HZ
            pos, quat, _ = env.tcp_pose()
            loop.on_message("rgb_static", image_msg(obs["rgb_static"], t - 0.01), t)
            loop.on_message("rgb_gripper", image_msg(obs["rgb_gripper"], t - 0.01, "bgr8"), t)
            loop.on_message("tcp_pose", pose_msg(pos, quat, t - 0.002), t)
            target = loop.tick(t)
            assert target is not None, loop.skipped
            rel = twin.step(obs, instruction)
            expected = env.rel_to_abs(rel)
            np.testing.assert_allclose(
                target[:6], expected[:6], atol=1e-9
            )  # pose -> euler: quat_to_euler vs PyBullet's
            assert target[6] == expected[6]
            msg = TS.deserialize_cdr(
                TS.serialize_cdr(node.action_message(target, types), "std_msgs/msg/Float64MultiArray"),
                "std_msgs/msg/Float64MultiArray",
            )
            assert np.array_equal(msg.data, target) and msg.layout.dim[0].size == 7
            targets.append(target)
            obs = env.step(rel)
    assert loop.steps == len(targets)
    assert len({tuple(np.round(t, 6)) for t in targets}) > 1


def test_images_are_converted_as_ingest_and_convert_do(node):
    """A 640x480 camera (bgr8 raw, or PNG compressed) becomes the 200x200 RGB frame convert writes."""
    from vlaops.data.convert import _resize

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    want = _resize(rgb[None], 200)[0]
    assert np.array_equal(node.camera_image(image_msg(rgb, 1.0, "bgr8"), "rgb_static", "/cam"), want)
    assert np.array_equal(node.camera_image(png_msg(rgb, 1.0), "rgb_static", "/cam"), want)
    small = rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)
    assert np.array_equal(node.camera_image(image_msg(small, 1.0), "rgb_gripper", "/cam"), small)  # already its size


def _feed(loop, node, t: float, *, static_t: float | None = None, gripper: bool = True) -> None:
    img = np.zeros((200, 200, 3), np.uint8)
    loop.on_message("rgb_static", image_msg(img, t if static_t is None else static_t), t)
    if gripper:
        loop.on_message("rgb_gripper", image_msg(np.zeros((84, 84, 3), np.uint8), t), t)
    loop.on_message("tcp_pose", pose_msg(np.array([0.5, 0.0, 0.3]), np.array([0.0, 0.0, 0.0, 1.0]), t), t)


def test_a_tick_waits_for_an_instruction_and_fresh_messages(node):
    policy = Recorder()
    loop = node.PolicyLoop(policy, TOPICS, control_hz=HZ, max_age_s=0.05, use_gripper=True)
    assert loop.tick(10.0) is None and "/instruction" in loop.skipped
    loop.on_message("instruction", string_msg("lift the blue block"), 10.0)
    _feed(loop, node, 10.1, gripper=False)
    assert loop.tick(10.1) is None and "/camera/gripper/image_raw (rgb_gripper) yet" in loop.skipped
    _feed(loop, node, 10.2, static_t=10.1)  # the static camera's frame is 0.1 s old at the tick
    assert loop.tick(10.2) is None and "rgb_static" in loop.skipped and "0.100 s old" in loop.skipped
    _feed(loop, node, 10.3)
    target = loop.tick(10.3)
    assert not policy.calls[1:] and policy.calls[0][1] == "lift the blue block"
    # the published target: TCP pose + the relative action in CALVIN's units, gripper +-1
    np.testing.assert_allclose(target, [0.5 + 0.02, -0.5 * 0.02, 0.3, 0.0, 0.0, 0.2 * 0.05, -1.0])
    assert set(policy.calls[0][0]) == {"rgb_static", "rgb_gripper"}


def test_a_new_instruction_starts_a_new_episode(node):
    policy = Recorder()
    loop = node.PolicyLoop(policy, TOPICS, control_hz=HZ, max_age_s=0.05, use_gripper=False)
    loop.on_message("instruction", string_msg("lift the blue block"), 0.0)
    loop.on_message("instruction", string_msg("lift the blue block"), 0.5)  # repeated: the same episode
    assert policy.resets == 1
    _feed(loop, node, 1.0, gripper=False)
    assert loop.tick(1.0) is not None and loop.steps == 1
    assert set(policy.calls[0][0]) == {"rgb_static"}  # a policy without the gripper camera gets none
    loop.on_message("instruction", string_msg("place the blue block on the table"), 1.01)
    assert policy.resets == 2 and loop.steps == 0


def test_one_step_per_control_period(node):
    loop = node.PolicyLoop(Recorder(), TOPICS, control_hz=HZ, max_age_s=0.05)
    period = 1 / HZ
    rng = np.random.default_rng(0)
    # a timer at the control rate with +-3 ms of jitter: every call steps
    assert all(loop.due(5.0 + k * period + rng.uniform(-0.003, 0.003)) for k in range(60))
    # a caller five times faster: one step in five (the first two a period less the 25 % allowance apart)
    loop = node.PolicyLoop(Recorder(), TOPICS, control_hz=HZ, max_age_s=0.05)
    stepped = [k for k in range(148) if loop.due(k * period / 5)]
    assert stepped[:2] == [0, 4] and set(np.diff(stepped[1:])) == {5} and len(stepped) == 30
    # a late tick (2.4 periods) steps once, and the schedule goes on from the missed ticks, without a burst
    loop = node.PolicyLoop(Recorder(), TOPICS, control_hz=HZ, max_age_s=0.05)
    assert loop.due(0.0) and loop.due(3.4 * period)
    assert not loop.due(3.7 * period) and loop.due(4.0 * period)


def test_an_undecodable_frame_skips_the_tick(node):
    loop = node.PolicyLoop(Recorder(), TOPICS, control_hz=HZ, max_age_s=0.05, use_gripper=False)
    loop.on_message("instruction", string_msg("lift the blue block"), 0.0)
    _feed(loop, node, 1.0, gripper=False)
    bad = T["sensor_msgs/msg/Image"](
        header=header(1.0), height=2, width=2, encoding="yuv422", is_bigendian=0, step=4, data=np.zeros(8, np.uint8)
    )
    loop.on_message("rgb_static", bad, 1.0)
    assert loop.tick(1.0) is None and "yuv422" in loop.skipped
