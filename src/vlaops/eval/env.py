"""The environment interface evaluation drives: the simulator implements it, and so can an adapter
to CALVIN's own environment or a real robot."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class EvalEnv(Protocol):
    def reset(self, seed: int) -> dict[str, Any]:
        """Start a new scene for ``seed``; returns the first observation."""

    def step(self, action: np.ndarray) -> dict[str, Any]:
        """Apply a (7,) relative action (CALVIN units); returns the next observation."""

    def get_info(self) -> dict[str, Any]:
        """The state a task oracle compares between the start and the end of a subtask."""

    def close(self) -> None: ...


class TaskOracle(Protocol):
    instruction: str

    def success(self, start_info: dict[str, Any], end_info: dict[str, Any]) -> bool: ...


class StepPolicy(Protocol):
    """CALVIN's ``CalvinBaseModel`` interface: ``reset`` per subtask, ``step`` per control tick."""

    def reset(self) -> None: ...

    def step(self, obs: dict[str, Any], instruction: str) -> np.ndarray: ...


def make_env(env_cfg: Any, render: bool, cameras: tuple[str, ...] | None = None) -> Any:
    """The simulator ``env_cfg`` configures: ``TabletopEnv`` for a ``SimConfig``, calvin_env's scene
    (``CalvinEnv``) for an ``eval.calvin`` config. ``render=False`` returns black camera images; ``cameras``
    (CALVIN only): render just these of ("static", "gripper"), the others black (None: both)."""
    from vlaops.sim.calvin.config import CalvinConfig

    if isinstance(env_cfg, CalvinConfig):
        from vlaops.sim.calvin.env import CAMERAS, CalvinEnv

        return CalvinEnv(env_cfg, render=render, cameras=cameras or CAMERAS)
    from vlaops.sim.env import TabletopEnv

    return TabletopEnv(env_cfg, render=render)


def task_lookup(env: Any) -> Any:
    """``name -> TaskOracle`` for ``env``: its own oracle when it has one (CALVIN's), else the tabletop's."""
    own = getattr(env, "get_task", None)
    if own is not None:
        return own
    from vlaops.sim.tasks import get_task

    return get_task


def static_image(obs: dict[str, Any]) -> np.ndarray:
    """The static camera of an observation, flat (``TabletopEnv``) or under ``rgb_obs`` (CALVIN's)."""
    return np.asarray(obs["rgb_static"] if "rgb_static" in obs else obs["rgb_obs"]["rgb_static"])


def control_hz(env_cfg: Any) -> float:
    """Control ticks per second of the configured simulator (CALVIN's and the tabletop's default: 30)."""
    return float(getattr(env_cfg, "control_hz", 30))
