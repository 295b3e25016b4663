"""Reference policies run on the same chains as the trained policy: the ceiling and the floor.

``ExpertPolicy`` is the scripted expert that recorded the demonstrations (``vlaops.sim.expert``) behind
the ``reset()`` / ``step(obs, instruction)`` interface: what a policy that imitated it perfectly would
score. The blind baseline (``vlaops.eval.blind.BlindPolicy``: instruction and robot state, never the
cameras) is what the simulator gives away to a policy that does not look. Neither reads an image, so
both run on a simulator that skips rendering.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vlaops.errors import VlaopsError
from vlaops.eval.blind import BlindPolicy
from vlaops.eval.config import REFERENCES
from vlaops.eval.env import StepPolicy
from vlaops.io.calvin import CalvinSplit
from vlaops.sim.expert import ScriptedExpert
from vlaops.sim.tasks import TASKS


class ExpertPolicy:
    """The scripted expert as a policy: it reads the simulator's state (``env.get_info()``), not ``obs``.

    A new ``ScriptedExpert`` is planned from the state at the first step after ``reset()`` (the start of
    a subtask) and whenever the instruction changes; the instruction is mapped back to its task by the
    registry in ``vlaops.sim.tasks``.
    """

    def __init__(self, env: Any) -> None:
        """``env``: a ``TabletopEnv`` (anything with its ``get_info()``)."""
        self.env = env
        self.tasks = {task.instruction: name for name, task in TASKS.items()}
        self._expert: ScriptedExpert | None = None
        self._instruction: str | None = None

    def reset(self) -> None:
        self._expert = None
        self._instruction = None

    def step(self, obs: dict[str, Any], instruction: str) -> np.ndarray:
        """(7,) relative action towards the expert's current waypoint."""
        info = self.env.get_info()
        if self._expert is None or instruction != self._instruction:
            try:
                task = self.tasks[instruction]
            except KeyError:
                raise VlaopsError(
                    f"expert reference: {instruction!r} is not the instruction of a simulator task"
                ) from None
            self._expert = self.plan(task, info)
            self._instruction = instruction
        return self._expert.act(info)

    def plan(self, task: str, info: dict[str, Any]) -> ScriptedExpert:
        """The expert for ``task`` from the state ``info``; a subclass may alter its waypoints (e.g. a grasp
        moved off by a known amount, bench/lift_precision.py). It moves no faster than the demonstrations
        were recorded (``sim.expert_max_action`` of the env's config)."""
        cfg = getattr(self.env, "cfg", None)
        return ScriptedExpert(task, info) if cfg is None else ScriptedExpert(task, info, cfg.expert_max_action)


def blind_policy(train_dir: Path, trust_pickles: bool, by_task: dict[str, str] | None = None) -> StepPolicy:
    """The blind baseline fitted on the training split's demonstrations at ``train_dir`` (``by_task``: keyed by
    the annotations' tasks, see ``BlindPolicy.from_split``)."""
    if not Path(train_dir).is_dir():
        raise VlaopsError(
            f"eval.references=blind needs the training demonstrations; {train_dir} does not exist "
            f"(run convert, or drop blind from eval.references)"
        )
    return BlindPolicy.from_split(CalvinSplit(Path(train_dir), trust_pickles), by_task=by_task)


__all__ = ["REFERENCES", "ExpertPolicy", "blind_policy"]
