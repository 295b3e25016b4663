"""Tabletop geometry and constants, free of PyBullet so that tasks and configs import them cheaply.

Robot base frame: ``panda_link0`` at the origin, z up, the robot faces +x; "left" is +y.
"""

from __future__ import annotations

# --- robot --------------------------------------------------------------------------------------
PANDA_URDF = "franka_panda/panda.urdf"  # from pybullet_data
ARM_JOINTS = tuple(range(7))  # panda_joint1..7
FINGER_JOINTS = (9, 10)  # panda_finger_joint1, panda_finger_joint2
TCP_LINK = 11  # panda_grasptarget: the point between the fingertips
HAND_LINK = 8  # panda_hand: the gripper camera is mounted on it
JOINT_NAMES = tuple(f"panda_joint{i}" for i in range(1, 8)) + ("panda_finger_joint1", "panda_finger_joint2")
RECORDED_JOINTS = ARM_JOINTS + FINGER_JOINTS
# Home pose: TCP about 0.3 m above the table, gripper pointing down, fingers opening along x.
HOME_JOINTS = (0.0, -0.25, 0.0, -2.3, 0.0, 2.05, 0.785)
ARM_JOINT_FORCE = 240.0  # N*m; well above what the arm needs, so it tracks the IK target at 30 Hz
FINGER_OPEN = 0.04  # m per finger, the URDF's upper limit
FINGER_FORCE = 40.0  # N per finger; firm enough to lift a 50 g block with friction 1.0
BASE_FRAME = "panda_link0"

# --- table and blocks ---------------------------------------------------------------------------
TABLE_TOP_Z = 0.0
TABLE_CENTER = (0.5, 0.0)
TABLE_HALF_EXTENTS = (0.35, 0.45, 0.02)  # x, y, z half sizes of the table box
BLOCK_HALF = 0.025  # 5 cm cubes, as CALVIN's blocks are a few cm
BLOCK_MASS = 0.05  # kg
BLOCK_FRICTION = 1.0
# CALVIN: scene_obs holds red, blue, pink blocks in that order; ours are red, blue, green.
BLOCK_ORDER = ("red", "blue", "green")
BLOCK_COLORS = {
    "red": (0.85, 0.12, 0.1, 1.0),
    "blue": (0.12, 0.25, 0.85, 1.0),
    "green": (0.1, 0.7, 0.2, 1.0),
}
BLOCK_REST_Z = TABLE_TOP_Z + BLOCK_HALF
# The reachable strip of table that tasks may push blocks into (y bounds, m).
WORKSPACE_Y = (-0.25, 0.25)

# --- cameras ------------------------------------------------------------------------------------
STATIC_EYE = (0.95, 0.3, 0.62)  # in front of the table, to one side, looking down at the robot
STATIC_TARGET = (0.48, 0.0, 0.08)
STATIC_FOV = 50.0
GRIPPER_FOV = 75.0
GRIPPER_CAM_OFFSET = (0.05, 0.0, 0.03)  # in the hand frame: beside the fingers, looking along +z
CAM_NEAR, CAM_FAR = 0.01, 3.0
