"""The blind baseline: a reference policy that never sees the cameras (the floor of every figure).

It knows the instruction and the robot's own state, nothing else: for each step it looks up the training
frames recorded under the same instruction whose TCP position and last gripper command are nearest to the
robot's, and replays their relative action. A simulator in which this succeeds does not test vision
(it reached 83 % SR_1 with the blocks at fixed places + 3 cm noise); with the blocks' start poses
randomised (sim.block_x_range ...) it should fail, and the trained policy has to beat it by looking.

It runs behind CALVIN's evaluator interface (``reset()``, ``step(obs, instruction)``,
calvin_models/calvin_agent/models/calvin_base_model.py), like ``vlaops.model.Policy``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from vlaops.errors import VlaopsError
from vlaops.io.calvin import CalvinSplit
from vlaops.utils.logging import get_logger

log = get_logger(__name__)

# CALVIN robot_obs (15,): tcp xyz at [0:3], last gripper action (+-1) at [14] (calvin_env/robot/robot.py).
TCP_SLICE = slice(0, 3)
GRIPPER_INDEX = 14
# Metres that one unit of gripper-command difference counts as: larger than any TCP distance on the table,
# so a neighbour with the same gripper command is always preferred (open frames for an open gripper).
GRIPPER_WEIGHT = 1.0
ACTION_DIM = 7


class BlindPolicy:
    """k-nearest-neighbour lookup over (instruction exact match, TCP xyz, gripper command) -> rel action.

    ``instructions`` (N,) str, ``robot_obs`` (N, 15) CALVIN robot state, ``actions`` (N, 7) CALVIN
    rel_actions (arm in [-1, 1], gripper +-1) of the same frames.
    """

    def __init__(self, instructions: list[str], robot_obs: np.ndarray, actions: np.ndarray, k: int = 1) -> None:
        robot_obs = np.asarray(robot_obs, dtype=np.float64)
        actions = np.asarray(actions, dtype=np.float64)
        if robot_obs.ndim != 2 or robot_obs.shape[1] <= GRIPPER_INDEX:
            raise ValueError(f"robot_obs must be (N, 15) CALVIN robot states, got shape {robot_obs.shape}")
        if actions.shape != (len(robot_obs), ACTION_DIM):
            raise ValueError(f"actions must be (N, {ACTION_DIM}) with N={len(robot_obs)}, got shape {actions.shape}")
        if len(instructions) != len(robot_obs) or len(robot_obs) == 0:
            raise ValueError(
                f"need one instruction per frame and at least one frame, got {len(instructions)} "
                f"instructions for {len(robot_obs)} frames"
            )
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        names = np.asarray(instructions, dtype=object)
        # Per instruction: keys (M, 4) = tcp xyz + weighted gripper command, values (M, 7).
        self._index: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for text in sorted(set(instructions)):
            rows = names == text
            self._index[text] = (self._key(robot_obs[rows]), actions[rows])

    @classmethod
    def from_split(cls, split: CalvinSplit, k: int = 1, by_task: Mapping[str, str] | None = None) -> BlindPolicy:
        """Every annotated frame of a CALVIN split (``robot_obs`` and ``rel_actions`` only, never images).

        ``by_task`` ({task: the instruction evaluation gives}): look frames up by their annotation's task
        instead of its text, as under ``eval.env=calvin``, where CALVIN instructs with validation phrasings
        that no training annotation uses; annotations of other tasks are left out."""
        instructions: list[str] = []
        obs: list[np.ndarray] = []
        acts: list[np.ndarray] = []
        for ann in split.annotations:
            if by_task is not None and ann.task not in by_task:
                continue
            key = ann.instruction if by_task is None else by_task[ann.task]
            for frame in range(ann.start, ann.end + 1):
                data = split.load_frame(frame, ("robot_obs", "rel_actions"))
                instructions.append(key)
                obs.append(data["robot_obs"])  # (15,)
                acts.append(data["rel_actions"])  # (7,)
        if not obs:
            raise VlaopsError(
                f"{split.dir}: no annotated demonstrations to build the blind baseline from; "
                "expected a CALVIN split with language annotations (run convert)"
            )
        log.info("blind baseline: %d frames of %d instructions from %s", len(obs), len(set(instructions)), split.dir)
        return cls(instructions, np.stack(obs), np.stack(acts), k)

    @property
    def instructions(self) -> list[str]:
        """The instructions this baseline has demonstrations of."""
        return list(self._index)

    @staticmethod
    def _key(robot_obs: np.ndarray) -> np.ndarray:
        """(..., 15) robot_obs -> (..., 4) lookup key: tcp xyz (m), gripper command x GRIPPER_WEIGHT."""
        return np.concatenate(
            [robot_obs[..., TCP_SLICE], GRIPPER_WEIGHT * robot_obs[..., GRIPPER_INDEX : GRIPPER_INDEX + 1]], axis=-1
        )

    def reset(self) -> None:
        """Nothing to forget: each step is a lookup of the current state."""

    def step(self, obs: dict[str, Any], instruction: str) -> np.ndarray:
        """The mean rel action (7,) of the k nearest demonstration frames; gripper thresholded to +-1."""
        try:
            keys, actions = self._index[instruction]
        except KeyError:
            raise VlaopsError(
                f"blind baseline: instruction {instruction!r} was never demonstrated; expected one of "
                f"{self.instructions}"
            ) from None
        query = self._key(np.asarray(obs["robot_obs"], dtype=np.float64))  # (4,)
        dist = np.linalg.norm(keys - query, axis=1)  # (M,)
        k = min(self.k, len(dist))
        nearest = np.argpartition(dist, k - 1)[:k] if k < len(dist) else np.arange(len(dist))
        action = actions[nearest].mean(axis=0)  # (7,)
        action[-1] = 1.0 if action[-1] > 0 else -1.0
        return action
