"""A scripted expert: IK waypoints per task, turned into the same relative actions the env consumes.

Each step the expert looks at the current TCP pose and emits CALVIN's relative action towards its
current waypoint: clip(target - tcp, +-0.02) / 0.02 for position, clip(wrap(target - tcp), +-0.05) / 0.05
for euler, and +-1 for the gripper. Recorded actions are therefore exactly what ``TabletopEnv.step``
consumes, and the expert is closed-loop: it corrects whatever the arm failed to track.

Like a teleoperator, the expert does not move at the controller's full speed: position and rotation are
each scaled down, direction kept, so that no arm value exceeds ``max_action`` (``sim.expert_max_action``,
0.65 by default: RoboVLMs clips arm actions to [-0.65, 0.65] before training, robovlms/data/data_utils.py
``normalize_action``, so a faster demonstration is one a policy can never reproduce).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlaops.io.calvin_spec import GRIPPER_CLOSE, GRIPPER_OPEN, REL_ORN_SCALE, REL_POS_SCALE, wrap_angle
from vlaops.sim.config import EXPERT_MAX_ACTION
from vlaops.sim.env import TabletopEnv
from vlaops.sim.layout import BLOCK_REST_Z
from vlaops.sim.tasks import DIRECTIONS, PUSH_STANDOFF, Task, get_task

# Gripper pointing straight down (roll pi), as at the home pose.
DOWN_ROLL, DOWN_PITCH = np.pi, 0.0
SAFE_Z = 0.11  # m: TCP height that clears every block when travelling
PUSH_Z = 0.02  # m: fingertips just above the table, contact below the block's centre
PUSH_THROUGH = 0.065  # m past the block centre: the block ends up about 10 cm from where it was
GRASP_Z = BLOCK_REST_Z - 0.003  # m: TCP slightly below the block centre, for a deep, stable grasp
LIFT_Z = BLOCK_REST_Z + 0.12  # m
PLACE_Z = BLOCK_REST_Z + 0.006  # m: lower the held block until it touches the table
POS_TOLERANCE = 0.006  # m: a waypoint counts as reached within this distance
GRIPPER_WAIT_STEPS = 8  # ticks to let the fingers close or open (0.27 s at 30 Hz)
STALL_STEPS = 4  # a waypoint blocked (e.g. the block touches the table) is given up after this many ticks
STALL_EPS = 0.001  # m of progress per tick below which the TCP is stalled
# A waypoint's yaw counts as reached within this (rad): fingers that come down still turning catch a corner
# of the block (seen in chains, where the previous subtask leaves the hand near the next block).
YAW_TOLERANCE = 0.05
YAW_PROGRESS_WEIGHT = 0.1  # m per rad: a turning wrist is progress, not a stall
FINGERS_CLOSED_WIDTH = 0.01  # m: closed fingers with nothing between them
FINGERS_OPEN_WIDTH = 2 * 0.04 - 0.005  # m: fingers (nearly) fully open (layout.FINGER_OPEN per finger)
REPLAN_DISTANCE = 0.01  # m: the block moved this far since planning (still sliding from the last subtask)


@dataclass
class Waypoint:
    """Move the TCP to ``pos`` with yaw ``yaw`` and the gripper at ``gripper``; then wait ``wait`` ticks.

    ``settle``: also wait until the fingers are shut (gripper closed) or fully open (gripper open), so a
    push never starts with open fingers and a grasp never comes down with half-open ones.
    """

    pos: np.ndarray  # (3,)
    yaw: float
    gripper: float
    wait: int = 0
    tolerance: float = POS_TOLERANCE
    settle: bool = False


def _grasp_yaw(block_yaw: float) -> float:
    """Yaw that aligns the fingers with the block's faces; a cube repeats every pi/2."""
    return float((block_yaw + np.pi / 4) % (np.pi / 2) - np.pi / 4)


def plan(task: Task, info: dict[str, Any]) -> list[Waypoint]:
    """The waypoints that solve ``task`` from the state ``info`` (TabletopEnv.get_info())."""
    tcp = np.asarray(info["tcp_pos"], dtype=float)
    yaw_now = float(info["tcp_euler"][2])
    block = np.asarray(info["blocks"][task.block]["pos"], dtype=float)
    bx, by = block[0], block[1]
    # Rise first, so travelling from wherever the previous subtask ended never sweeps through a block, with
    # the gripper as it is: opening or closing fingers beside a block (a chain's last push) shoves it.
    grip = GRIPPER_CLOSE if info["held"] is not None else float(info["gripper_action"])
    rise = Waypoint(np.array([tcp[0], tcp[1], max(tcp[2], SAFE_Z)]), yaw_now, grip)
    if task.kind == "push":
        sign = DIRECTIONS[task.direction]
        start_y = by - sign * PUSH_STANDOFF
        return [
            rise,
            # The fingers close on the way, and must be shut before they come down behind the block.
            Waypoint(np.array([bx, start_y, SAFE_Z]), 0.0, GRIPPER_CLOSE, settle=True),
            Waypoint(np.array([bx, start_y, PUSH_Z]), 0.0, GRIPPER_CLOSE),
            Waypoint(np.array([bx, by + sign * PUSH_THROUGH, PUSH_Z]), 0.0, GRIPPER_CLOSE),
            Waypoint(np.array([bx, by + sign * PUSH_THROUGH, PUSH_Z + 0.05]), 0.0, GRIPPER_CLOSE, tolerance=0.01),
        ]
    if task.kind == "lift":
        yaw = _grasp_yaw(float(info["blocks"][task.block]["euler"][2]))
        return [
            rise,
            Waypoint(np.array([bx, by, SAFE_Z]), yaw, GRIPPER_OPEN, settle=True),
            Waypoint(np.array([bx, by, GRASP_Z]), yaw, GRIPPER_OPEN),
            Waypoint(np.array([bx, by, GRASP_Z]), yaw, GRIPPER_CLOSE, wait=GRIPPER_WAIT_STEPS, tolerance=1.0),
            Waypoint(np.array([bx, by, LIFT_Z]), yaw, GRIPPER_CLOSE, tolerance=0.01),
        ]
    if task.kind == "place":
        x, y = tcp[0], tcp[1]
        return [
            Waypoint(np.array([x, y, PLACE_Z]), yaw_now, GRIPPER_CLOSE),
            Waypoint(np.array([x, y, PLACE_Z]), yaw_now, GRIPPER_OPEN, wait=GRIPPER_WAIT_STEPS, tolerance=1.0),
            Waypoint(np.array([x, y, SAFE_Z]), yaw_now, GRIPPER_OPEN, tolerance=0.01),
        ]
    raise ValueError(f"no expert for task kind {task.kind!r} (task {task.name!r})")


class ScriptedExpert:
    """Closed-loop waypoint follower for one task; ``act(info)`` returns a relative action (7,)."""

    def __init__(self, task: Task | str, info: dict[str, Any], max_action: float = EXPERT_MAX_ACTION) -> None:
        if not 0.0 < max_action <= 1.0:
            raise ValueError(f"expert max_action must be in (0, 1], got {max_action!r}")
        self.task = get_task(task) if isinstance(task, str) else task
        self.max_action = float(max_action)
        self.waypoints = plan(self.task, info)
        self._planned_block = self._block_xy(info)
        self._index = 0
        self._waited = 0
        self._stalled = 0
        self._last_dist = np.inf

    @property
    def done(self) -> bool:
        """All waypoints reached; the episode can end."""
        return self._index >= len(self.waypoints)

    def _block_xy(self, info: dict[str, Any]) -> np.ndarray:
        return np.asarray(info["blocks"][self.task.block]["pos"], dtype=float)[:2]  # (2,)

    @staticmethod
    def _fingers_settled(gripper: float, width: float) -> bool:
        return width <= FINGERS_CLOSED_WIDTH if gripper < 0 else width >= FINGERS_OPEN_WIDTH

    def act(self, info: dict[str, Any]) -> np.ndarray:
        """The relative action (7,) towards the current waypoint, advancing past reached ones.

        Until the fingers start down towards a push or a grasp (waypoints 0 and 1), the plan follows the
        block: in a chain, the previous subtask may have left it sliding.
        """
        if self.task.kind != "place" and self._index <= 1:
            if np.linalg.norm(self._block_xy(info) - self._planned_block) > REPLAN_DISTANCE:
                self.waypoints = [self.waypoints[0]] + plan(self.task, info)[1:]  # keep the first rise
                self._planned_block = self._block_xy(info)
        tcp = np.asarray(info["tcp_pos"], dtype=float)
        yaw = float(info["tcp_euler"][2])
        while not self.done:
            wp = self.waypoints[self._index]
            dist = float(np.linalg.norm(wp.pos - tcp))
            yaw_err = abs(float(wrap_angle(wp.yaw - yaw)))
            progress = dist + YAW_PROGRESS_WEIGHT * yaw_err
            self._stalled = self._stalled + 1 if self._last_dist - progress < STALL_EPS else 0
            self._last_dist = progress
            reached = (dist <= wp.tolerance and yaw_err <= YAW_TOLERANCE) or self._stalled >= STALL_STEPS
            if wp.settle and not self._fingers_settled(wp.gripper, float(info["gripper_width"])):
                reached = False
            if reached and self._waited >= wp.wait:
                self._index += 1
                self._waited = 0
                self._stalled = 0
                self._last_dist = np.inf
                continue
            if reached:
                self._waited += 1
            return self._action(wp, info, self.max_action)
        wp = self.waypoints[-1]  # finished: hold the last pose
        return self._action(wp, info, self.max_action)

    @staticmethod
    def _action(wp: Waypoint, info: dict[str, Any], max_action: float) -> np.ndarray:
        tcp = np.asarray(info["tcp_pos"], dtype=float)
        euler = np.asarray(info["tcp_euler"], dtype=float)
        target_euler = np.array([DOWN_ROLL, DOWN_PITCH, wp.yaw])
        rel = np.empty(7)
        # CALVIN rel_actions: clip(delta pos, +-0.02) / 0.02 and clip(wrap(delta euler), +-0.05) / 0.05.
        rel[:3] = np.clip(wp.pos - tcp, -REL_POS_SCALE, REL_POS_SCALE) / REL_POS_SCALE
        rel[3:6] = np.clip(wrap_angle(target_euler - euler), -REL_ORN_SCALE, REL_ORN_SCALE) / REL_ORN_SCALE
        # The speed cap: scale the translation (and, separately, the rotation) so its largest component
        # is at most max_action; the direction of motion is unchanged.
        for part in (slice(0, 3), slice(3, 6)):
            peak = float(np.max(np.abs(rel[part])))
            if peak > max_action:
                rel[part] *= max_action / peak
        rel[6] = wp.gripper
        return rel


StepCallback = Callable[[dict[str, Any], np.ndarray], None]


def run_expert(
    env: TabletopEnv,
    task: Task | str,
    max_steps: int,
    obs: dict[str, Any] | None = None,
    on_step: StepCallback | None = None,
    max_action: float | None = None,
    action_noise: float = 0.0,
    rng: np.random.Generator | None = None,
) -> tuple[bool, int, dict[str, Any]]:
    """Run the expert for ``task`` from the env's current state until done or ``max_steps``.

    ``on_step(obs, rel_action)`` is called with each observation and the action chosen from it, before
    the action is applied; ``obs`` is the current observation (e.g. from ``reset``), rendered if omitted.
    ``max_action`` caps the arm actions; None takes the env's ``cfg.expert_max_action``.
    ``action_noise`` > 0 executes the expert's arm action plus Gaussian noise of that standard deviation
    (drawn from ``rng``) while ``on_step`` still sees the expert's own action: DART (Laskey et al. 2017).
    The arm drifts off the expert's path and the closed-loop expert steers it back, so the
    demonstrations show the recoveries that a policy's own small errors will need.
    Returns (success by the task oracle, steps taken, info at the end).
    """
    if action_noise > 0 and rng is None:
        raise ValueError("run_expert: action_noise > 0 needs an rng (the noise must be reproducible)")
    task = get_task(task) if isinstance(task, str) else task
    start = env.get_info()
    expert = ScriptedExpert(task, start, env.cfg.expert_max_action if max_action is None else max_action)
    info = start
    steps = 0
    while steps < max_steps and not expert.done:
        action = expert.act(info)
        if expert.done:
            break
        if on_step is not None:
            obs = obs if obs is not None else env.observe()
            on_step(obs, action)
        executed = action
        if action_noise > 0:
            executed = action.copy()
            executed[:6] = np.clip(action[:6] + rng.normal(0.0, action_noise, 6), -1.0, 1.0)
        obs = env.step(executed)
        info = env.get_info()
        steps += 1
    return task.success(start, info), steps, info
