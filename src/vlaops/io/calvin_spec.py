"""CALVIN's action and observation convention, in one place (a leaf module: numpy only).

The simulator that records (``sim/env.py``, ``sim/expert.py``), the canonical episode (``io/episode.py``)
and the CALVIN writer (``io/calvin.py``) import these, so the actions recorded, converted and executed
cannot disagree. Sources, in mees/calvin:

- ``calvin_env/robot/robot.py`` (``relative_to_absolute``): a relative action's first six dims in [-1, 1]
  are scaled by ``max_rel_pos`` 0.02 m and ``max_rel_orn`` 0.05 rad and added to the current TCP pose;
  the seventh is the gripper, 1 open and -1 close.
- ``calvin_env/utils/utils.py`` (``to_relative_action``): rel_actions = [clip(Δpos, ±0.02)/0.02,
  clip(wrap(Δeuler), ±0.05)/0.05, gripper], the euler difference wrapped to [-pi, pi).
- ``dataset/README.md``: robot_obs (15), scene_obs (24), rgb_static 200x200x3, rgb_gripper 84x84x3.
"""

from __future__ import annotations

import numpy as np

REL_POS_SCALE = 0.02  # m per unit relative action (CALVIN max_rel_pos)
REL_ORN_SCALE = 0.05  # rad per unit relative action (CALVIN max_rel_orn)
ACTION_DIM = 7  # tcp xyz, tcp euler xyz (absolute target or relative step), gripper ±1
GRIPPER_OPEN, GRIPPER_CLOSE = 1.0, -1.0
# robot_obs (15): tcp pos (3), tcp euler xyz (3), gripper opening width (1), arm joints (7), last gripper action (1).
ROBOT_OBS_DIM = 15
# scene_obs (24): sliding door, drawer, button, switch, lightbulb, green light (6), then three blocks'
# pos + euler xyz (6 each).
SCENE_OBS_DIM = 24
RGB_STATIC_SIZE = 200  # rgb_static (200, 200, 3) uint8
RGB_GRIPPER_SIZE = 84  # rgb_gripper (84, 84, 3) uint8


def wrap_angle(angle: np.ndarray) -> np.ndarray:
    """Wrap angles to [-pi, pi), so an euler difference across the seam is small, not ~2 pi."""
    return (np.asarray(angle) + np.pi) % (2.0 * np.pi) - np.pi
