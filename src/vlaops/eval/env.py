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
