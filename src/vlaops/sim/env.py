"""``TabletopEnv``: the Panda tabletop behind CALVIN's interface (relative 7-D actions, CALVIN observations).

The action convention is CALVIN's (calvin_env/robot/robot.py, ``relative_to_absolute``): the first six
dimensions in [-1, 1] are scaled by 0.02 m and 0.05 rad and added to the *current* TCP pose; the last is
the gripper, 1 open and -1 close. Observations follow CALVIN's ``robot_obs`` / ``scene_obs`` layout so the
recordings convert to a CALVIN split without reinterpretation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pybullet as p

from vlaops.io.calvin_spec import (
    ACTION_DIM,
    GRIPPER_CLOSE,
    GRIPPER_OPEN,
    REL_ORN_SCALE,
    REL_POS_SCALE,
    SCENE_OBS_DIM,
    wrap_angle,
)
from vlaops.sim import layout, scene
from vlaops.sim.config import SimConfig

# CALVIN's action and observation convention lives in io/calvin_spec.py. Our scene_obs: the six
# articulated-object states are always zero (this scene has none), then red, blue, green block pos +
# euler xyz (CALVIN's third block is pink, ours green).
# Where the commanded TCP may go (m), like CALVIN's workspace bounds: keeps the fingertips above the table.
TCP_BOUNDS_LOW = np.array([0.15, -0.4, 0.012])
TCP_BOUNDS_HIGH = np.array([0.85, 0.4, 0.6])
SETTLE_PHYSICS_STEPS = 24  # let the blocks come to rest after a reset (0.1 s at 240 Hz)
LIFTED_MARGIN = 0.02  # m above the resting height that counts as "off the table"
IK_ITERATIONS = 100
# PyBullet's default position gain (0.1) tracks a 0.02 m step only halfway in one 30 Hz tick; 0.3 reaches
# about 90 % of it without the overshoot that higher gains show (measured on this scene).
ARM_POSITION_GAIN = 0.3


def validate_action(action: Any) -> np.ndarray:
    """Return ``action`` as a (7,) float64 array clipped to [-1, 1]; ValueError if it is malformed."""
    arr = np.asarray(action, dtype=np.float64)
    if arr.shape != (ACTION_DIM,):
        raise ValueError(f"action must have shape ({ACTION_DIM},), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"action must be finite, got {arr.tolist()}")
    return np.clip(arr, -1.0, 1.0)


MAX_LAYOUT_TRIES = 1000  # rejection-sampling budget for a block layout (a few tries suffice at the defaults)


def sample_block_poses(
    cfg: SimConfig, rng: np.random.Generator
) -> tuple[dict[str, tuple[float, float]], dict[str, float]]:
    """Random start (x, y) and yaw of every block: uniform over ``cfg.block_x_range`` x ``block_y_range``,
    centres at least ``block_min_separation`` apart (rejection sampling), yaw uniform in +-block_yaw_range.

    Nothing about a block's place is fixed, not even which colour is nearest the robot, so a policy has
    to find the block it is told about in the image (CALVIN likewise randomises its block positions).
    """
    (x0, x1), (y0, y1) = cfg.block_x_range, cfg.block_y_range
    for _ in range(MAX_LAYOUT_TRIES):
        xy = rng.uniform([x0, y0], [x1, y1], size=(len(layout.BLOCK_ORDER), 2))  # (3, 2)
        gaps = np.linalg.norm(xy[:, None] - xy[None], axis=-1)[np.triu_indices(len(xy), 1)]
        if gaps.min() >= cfg.block_min_separation:
            break
    else:
        raise ValueError(
            f"no block layout with sim.block_min_separation={cfg.block_min_separation} found in "
            f"{MAX_LAYOUT_TRIES} tries over sim.block_x_range={cfg.block_x_range}, "
            f"sim.block_y_range={cfg.block_y_range}"
        )
    yaw = rng.uniform(-cfg.block_yaw_range, cfg.block_yaw_range, size=len(layout.BLOCK_ORDER))
    names = layout.BLOCK_ORDER
    return (
        {n: (float(x), float(y)) for n, (x, y) in zip(names, xy, strict=True)},
        {n: float(a) for n, a in zip(names, yaw, strict=True)},
    )


class TabletopEnv:
    """A PyBullet Franka Panda in front of a table with red, green and blue blocks.

    Each instance owns its own DIRECT physics client, so several may run side by side in one process.
    """

    def __init__(self, cfg: SimConfig, render: bool = True) -> None:
        """``render=False`` returns black images of the right shapes: for oracle-only runs and fast tests."""
        self.cfg = cfg
        self.render = render
        self.client = p.connect(p.DIRECT)
        self._ids: scene.SceneIds | None = None
        self._tick = 0
        self._last_gripper = GRIPPER_OPEN
        self._joint_samples: list[tuple[float, np.ndarray, np.ndarray]] = []
        self._ll = self._ul = self._jr = None

    # --- lifecycle ------------------------------------------------------------------------------
    def reset(self, seed: int) -> dict[str, Any]:
        """Rebuild the scene for ``seed`` (robot at home, blocks at random poses); return obs.

        The simulation is reset and rebuilt from scratch rather than teleported, so the contact cache of a
        previous episode cannot leak in: the same seed gives bit-identical episodes.
        """
        block_xy, block_yaw = sample_block_poses(self.cfg, np.random.default_rng(seed))
        p.resetSimulation(physicsClientId=self.client)
        p.setPhysicsEngineParameter(
            fixedTimeStep=1.0 / self.cfg.physics_hz,
            numSolverIterations=50,
            deterministicOverlappingPairs=1,
            physicsClientId=self.client,
        )
        self._ids = scene.build_scene(self.client, block_xy, block_yaw)
        robot = self._ids.robot
        infos = [p.getJointInfo(robot, j, physicsClientId=self.client) for j in layout.RECORDED_JOINTS]
        self._ll = [i[8] for i in infos]
        self._ul = [i[9] for i in infos]
        self._jr = [hi - lo for lo, hi in zip(self._ll, self._ul, strict=True)]
        self._rest = list(layout.HOME_JOINTS) + [layout.FINGER_OPEN] * 2
        self._command(np.asarray(layout.HOME_JOINTS), GRIPPER_OPEN)
        for _ in range(SETTLE_PHYSICS_STEPS):
            p.stepSimulation(physicsClientId=self.client)
        self._tick = 0
        self._last_gripper = GRIPPER_OPEN
        self._joint_samples = [(0.0, *self._joint_state())]
        return self._obs()

    def close(self) -> None:
        """Disconnect this env's physics client (idempotent)."""
        if self.client >= 0:
            p.disconnect(physicsClientId=self.client)
            self.client = -1

    def __enter__(self) -> TabletopEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- control --------------------------------------------------------------------------------
    def rel_to_abs(self, rel_action: np.ndarray) -> np.ndarray:
        """The absolute target (7,) a relative action commands from the current TCP pose.

        CALVIN (calvin_env/robot/robot.py, ``relative_to_absolute``): pos + a[:3] * 0.02,
        euler + a[3:6] * 0.05 (wrapped to [-pi, pi)), gripper as given (+-1).
        """
        a = validate_action(rel_action)
        pos, _, euler = self.tcp_pose()
        target = np.empty(ACTION_DIM)
        target[:3] = pos + a[:3] * REL_POS_SCALE
        target[3:6] = wrap_angle(euler + a[3:6] * REL_ORN_SCALE)
        target[6] = GRIPPER_OPEN if a[6] > 0 else GRIPPER_CLOSE
        return target

    def step(self, action: np.ndarray) -> dict[str, Any]:
        """Apply one relative action (7,) for 1 / control_hz seconds and return the new observation."""
        self._require_reset()
        target = self.rel_to_abs(action)
        pos = np.clip(target[:3], TCP_BOUNDS_LOW, TCP_BOUNDS_HIGH)
        orn = p.getQuaternionFromEuler(target[3:6].tolist())
        q = p.calculateInverseKinematics(
            self._ids.robot,
            layout.TCP_LINK,
            pos.tolist(),
            orn,
            lowerLimits=self._ll,
            upperLimits=self._ul,
            jointRanges=self._jr,
            restPoses=self._rest,
            maxNumIterations=IK_ITERATIONS,
            residualThreshold=1e-5,
            physicsClientId=self.client,
        )
        self._command(np.asarray(q[:7]), target[6])
        self._last_gripper = float(target[6])
        substeps = self.cfg.substeps
        every = substeps // self.cfg.joint_state_rate_factor
        t0 = self._tick / self.cfg.control_hz
        for i in range(1, substeps + 1):
            p.stepSimulation(physicsClientId=self.client)
            if i % every == 0:
                self._joint_samples.append((t0 + i / self.cfg.physics_hz, *self._joint_state()))
        self._tick += 1
        return self._obs()

    def _command(self, arm_q: np.ndarray, gripper: float) -> None:
        """Position-control the arm to ``arm_q`` (7,) and the fingers open (gripper > 0) or closed."""
        p.setJointMotorControlArray(
            self._ids.robot,
            list(layout.ARM_JOINTS),
            p.POSITION_CONTROL,
            targetPositions=arm_q.tolist(),
            forces=[layout.ARM_JOINT_FORCE] * 7,
            positionGains=[ARM_POSITION_GAIN] * 7,
            physicsClientId=self.client,
        )
        finger = layout.FINGER_OPEN if gripper > 0 else 0.0
        p.setJointMotorControlArray(
            self._ids.robot,
            list(layout.FINGER_JOINTS),
            p.POSITION_CONTROL,
            targetPositions=[finger] * 2,
            forces=[layout.FINGER_FORCE] * 2,
            physicsClientId=self.client,
        )

    # --- state ----------------------------------------------------------------------------------
    @property
    def tick(self) -> int:
        """Control steps since the last reset."""
        return self._tick

    @property
    def time(self) -> float:
        """Simulated seconds since the last reset (tick / control_hz)."""
        return self._tick / self.cfg.control_hz

    @property
    def joint_samples(self) -> list[tuple[float, np.ndarray, np.ndarray]]:
        """(time s, positions (9,), velocities (9,)) sampled joint_state_rate_factor times per tick."""
        return self._joint_samples

    def tcp_pose(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """TCP (panda_grasptarget) position (3,), quaternion xyzw (4,), euler xyz (3,)."""
        self._require_reset()
        pos, quat = p.getLinkState(
            self._ids.robot, layout.TCP_LINK, computeForwardKinematics=True, physicsClientId=self.client
        )[4:6]
        return np.asarray(pos), np.asarray(quat), np.asarray(p.getEulerFromQuaternion(quat))

    def _joint_state(self) -> tuple[np.ndarray, np.ndarray]:
        states = p.getJointStates(self._ids.robot, list(layout.RECORDED_JOINTS), physicsClientId=self.client)
        return np.array([s[0] for s in states]), np.array([s[1] for s in states])  # (9,), (9,)

    def _block_pose(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        pos, quat = p.getBasePositionAndOrientation(self._ids.blocks[name], physicsClientId=self.client)
        return np.asarray(pos), np.asarray(p.getEulerFromQuaternion(quat))

    def _touching(self, name: str, link: int) -> bool:
        return bool(p.getContactPoints(self._ids.robot, self._ids.blocks[name], link, -1, physicsClientId=self.client))

    def scene_obs(self) -> np.ndarray:
        """CALVIN scene_obs (24,): 6 zeros, then red, blue, green block pos + euler."""
        out = np.zeros(SCENE_OBS_DIM)
        for i, name in enumerate(layout.BLOCK_ORDER):
            pos, euler = self._block_pose(name)
            out[6 + 6 * i : 9 + 6 * i] = pos
            out[9 + 6 * i : 12 + 6 * i] = euler
        return out

    def robot_obs(self) -> np.ndarray:
        """CALVIN robot_obs (15,): tcp pos, tcp euler, gripper width, 7 arm joints, last gripper action."""
        pos, _, euler = self.tcp_pose()
        q, _ = self._joint_state()
        width = q[7] + q[8]
        return np.concatenate([pos, euler, [width], q[:7], [self._last_gripper]])

    def observe(self) -> dict[str, Any]:
        """The current observation, as ``reset`` and ``step`` return it (renders both cameras)."""
        self._require_reset()
        return self._obs()

    def _obs(self) -> dict[str, Any]:
        q, dq = self._joint_state()
        pos, quat, _ = self.tcp_pose()
        s, g = self.cfg.static_camera_size, self.cfg.gripper_camera_size
        if self.render:
            rgb_static = scene.render_static(self.client, s)
            rgb_gripper = scene.render_gripper(self.client, self._ids.robot, g)
        else:
            rgb_static = np.zeros((s, s, 3), np.uint8)
            rgb_gripper = np.zeros((g, g, 3), np.uint8)
        return {
            "rgb_static": rgb_static,  # (200, 200, 3) u8
            "rgb_gripper": rgb_gripper,  # (84, 84, 3) u8
            "robot_obs": self.robot_obs(),  # (15,) f64
            "scene_obs": self.scene_obs(),  # (24,) f64
            "joint_names": layout.JOINT_NAMES,
            "joint_positions": q,  # (9,)
            "joint_velocities": dq,  # (9,)
            "tcp_pos": pos,  # (3,)
            "tcp_quat": quat,  # (4,) xyzw
            "time": self.time,
        }

    def get_info(self) -> dict[str, Any]:
        """The state the task oracle and the scripted expert read (no images).

        ``blocks[name]`` holds ``pos`` (3,), ``euler`` (3,), ``grasped`` (touched by both fingers) and
        ``lifted`` (grasped and more than 2 cm above its resting height); ``held`` is the grasped block's
        name or None.
        """
        self._require_reset()
        blocks = {}
        held = None
        for name in layout.BLOCK_ORDER:
            pos, euler = self._block_pose(name)
            grasped = all(self._touching(name, link) for link in layout.FINGER_JOINTS)
            lifted = grasped and pos[2] > layout.BLOCK_REST_Z + LIFTED_MARGIN
            blocks[name] = {"pos": pos, "euler": euler, "grasped": grasped, "lifted": lifted}
            if grasped:
                held = name
        tcp_pos, tcp_quat, tcp_euler = self.tcp_pose()
        q, _ = self._joint_state()
        return {
            "blocks": blocks,
            "held": held,
            "tcp_pos": tcp_pos,
            "tcp_quat": tcp_quat,
            "tcp_euler": tcp_euler,
            "gripper_width": float(q[7] + q[8]),
            "gripper_action": self._last_gripper,
        }

    def _require_reset(self) -> None:
        if self._ids is None:
            raise RuntimeError("TabletopEnv.reset(seed) must be called before stepping or reading state")
