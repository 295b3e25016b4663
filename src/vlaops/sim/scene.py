"""The tabletop scene: a fixed-base Franka Panda, a table and three coloured blocks, plus its cameras.

Geometry is in the robot base frame (``panda_link0`` at the origin, z up, the robot faces +x).
"Left" is +y, the robot's own left, which is also how the instructions are phrased. Everything here is
built into an explicit PyBullet client id so that several environments can coexist in one process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pybullet as p
import pybullet_data

from vlaops.sim.layout import (
    ARM_JOINTS,
    BLOCK_COLORS,
    BLOCK_FRICTION,
    BLOCK_HALF,
    BLOCK_MASS,
    BLOCK_ORDER,
    BLOCK_REST_Z,
    CAM_FAR,
    CAM_NEAR,
    FINGER_JOINTS,
    FINGER_OPEN,
    GRIPPER_CAM_OFFSET,
    GRIPPER_FOV,
    HAND_LINK,
    HOME_JOINTS,
    PANDA_URDF,
    STATIC_EYE,
    STATIC_FOV,
    STATIC_TARGET,
    TABLE_CENTER,
    TABLE_HALF_EXTENTS,
    TABLE_TOP_Z,
)


@dataclass
class SceneIds:
    """Body ids of one built scene."""

    robot: int
    table: int
    blocks: dict[str, int]


def build_tabletop(client: int) -> tuple[int, int]:
    """Load the robot (at its home pose) and the table into a freshly reset client: (robot, table) body ids."""
    p.setAdditionalSearchPath(pybullet_data.getDataPath(), physicsClientId=client)
    p.setGravity(0, 0, -9.81, physicsClientId=client)
    robot = p.loadURDF(PANDA_URDF, [0, 0, TABLE_TOP_Z], useFixedBase=True, physicsClientId=client)
    for joint, q in zip(ARM_JOINTS, HOME_JOINTS, strict=True):
        p.resetJointState(robot, joint, q, physicsClientId=client)
    for joint in FINGER_JOINTS:
        p.resetJointState(robot, joint, FINGER_OPEN, physicsClientId=client)
        p.changeDynamics(robot, joint, lateralFriction=BLOCK_FRICTION, spinningFriction=0.001, physicsClientId=client)

    table_col = p.createCollisionShape(p.GEOM_BOX, halfExtents=TABLE_HALF_EXTENTS, physicsClientId=client)
    table_vis = p.createVisualShape(
        p.GEOM_BOX, halfExtents=TABLE_HALF_EXTENTS, rgbaColor=(0.72, 0.6, 0.45, 1.0), physicsClientId=client
    )
    table = p.createMultiBody(
        0.0,
        table_col,
        table_vis,
        [TABLE_CENTER[0], TABLE_CENTER[1], TABLE_TOP_Z - TABLE_HALF_EXTENTS[2]],
        physicsClientId=client,
    )
    p.changeDynamics(table, -1, lateralFriction=0.5, physicsClientId=client)
    return robot, table


def build_scene(client: int, block_xy: dict[str, tuple[float, float]], block_yaw: dict[str, float]) -> SceneIds:
    """Load robot, table and blocks into a freshly reset client and put the arm at its home pose."""
    robot, table = build_tabletop(client)
    blocks = {}
    half = [BLOCK_HALF] * 3
    for name in BLOCK_ORDER:
        col = p.createCollisionShape(p.GEOM_BOX, halfExtents=half, physicsClientId=client)
        vis = p.createVisualShape(p.GEOM_BOX, halfExtents=half, rgbaColor=BLOCK_COLORS[name], physicsClientId=client)
        x, y = block_xy[name]
        orn = p.getQuaternionFromEuler((0.0, 0.0, block_yaw[name]))
        body = p.createMultiBody(BLOCK_MASS, col, vis, [x, y, BLOCK_REST_Z], orn, physicsClientId=client)
        p.changeDynamics(
            body,
            -1,
            lateralFriction=BLOCK_FRICTION,
            spinningFriction=0.001,
            rollingFriction=0.0,
            physicsClientId=client,
        )
        blocks[name] = body
    return SceneIds(robot=robot, table=table, blocks=blocks)


def _rgb(client: int, size: int, view: list[float], proj: list[float]) -> np.ndarray:
    """Render one (size, size, 3) uint8 image with the CPU TinyRenderer (no GPU/EGL needed)."""
    _, _, rgba, _, _ = p.getCameraImage(
        size, size, view, proj, renderer=p.ER_TINY_RENDERER, flags=p.ER_NO_SEGMENTATION_MASK, physicsClientId=client
    )
    return np.asarray(rgba, dtype=np.uint8).reshape(size, size, 4)[:, :, :3].copy()  # (H, W, 3)


def static_camera(client: int) -> tuple[list[float], list[float]]:
    """The fixed camera over the table: its (view, projection) matrices, column-major as PyBullet gives them."""
    view = p.computeViewMatrix(STATIC_EYE, STATIC_TARGET, (0, 0, 1), physicsClientId=client)
    proj = p.computeProjectionMatrixFOV(STATIC_FOV, 1.0, CAM_NEAR, CAM_FAR, physicsClientId=client)
    return view, proj


def gripper_camera(client: int, robot: int) -> tuple[list[float], list[float]]:
    """The wrist camera, moving with the hand and looking along the gripper: its (view, projection) matrices."""
    pos, orn = p.getLinkState(robot, HAND_LINK, computeForwardKinematics=True, physicsClientId=client)[4:6]
    rot = np.asarray(p.getMatrixFromQuaternion(orn)).reshape(3, 3)
    eye = np.asarray(pos) + rot @ np.asarray(GRIPPER_CAM_OFFSET)
    target = eye + rot[:, 2] * 0.2  # hand z axis points out between the fingers
    view = p.computeViewMatrix(eye.tolist(), target.tolist(), (-rot[:, 0]).tolist(), physicsClientId=client)
    proj = p.computeProjectionMatrixFOV(GRIPPER_FOV, 1.0, CAM_NEAR, CAM_FAR, physicsClientId=client)
    return view, proj


def render_static(client: int, size: int) -> np.ndarray:
    """The fixed camera over the table: (size, size, 3) uint8."""
    return _rgb(client, size, *static_camera(client))


def render_gripper(client: int, robot: int, size: int) -> np.ndarray:
    """The wrist camera: (size, size, 3) uint8."""
    return _rgb(client, size, *gripper_camera(client, robot))
