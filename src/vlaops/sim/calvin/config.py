"""Settings of CALVIN's simulator, for ``eval.env=calvin`` (``eval.calvin``) and ``sim.env=calvin``
(``sim.calvin``): where calvin_env's assets are, and which of its scenes, robot and task oracle play
CALVIN's protocol or record the expert. A leaf module: nothing imported."""

from __future__ import annotations

from dataclasses import dataclass

# CALVIN's evaluation: EP_LEN steps per subtask (calvin_agent/evaluation/evaluate_policy.py).
CALVIN_EP_LEN = 360


@dataclass
class CalvinConfig:
    # A calvin_env checkout (its conf/ and data/). null: the directory above the installed calvin_env
    # package, as `make install` installs it (editable); a wheel from the git URL has no assets, so there
    # it must name a clone of the same commit.
    root: str | None = None
    scene: str = "calvin_scene_D"  # conf/scene/<scene>.yaml
    robot: str = "panda_longer_finger"  # conf/robot/<robot>.yaml, as CALVIN's datasets were recorded
    tasks: str = "new_playtable_tasks"  # conf/tasks/<tasks>.yaml: the oracle CALVIN scores with
    max_steps_per_subtask: int = CALVIN_EP_LEN

    def __post_init__(self) -> None:
        for key in ("scene", "robot", "tasks"):
            value = getattr(self, key)
            if not value or "/" in value or value.endswith(".yaml"):
                raise ValueError(f"calvin.{key} must be a config name under calvin_env's conf/, got {value!r}")
        if self.max_steps_per_subtask < 1:
            raise ValueError(f"calvin.max_steps_per_subtask must be >= 1, got {self.max_steps_per_subtask!r}")
