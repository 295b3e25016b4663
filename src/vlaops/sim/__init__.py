"""The embedded default robot: a PyBullet Franka Panda tabletop, its tasks, a scripted expert, a recorder."""

from vlaops.sim.config import SimConfig, SimTopics
from vlaops.sim.env import TabletopEnv
from vlaops.sim.expert import ScriptedExpert, run_expert
from vlaops.sim.record import collect
from vlaops.sim.tasks import TASKS, Task, get_task, sample_chain

__all__ = [
    "SimConfig",
    "SimTopics",
    "TabletopEnv",
    "TASKS",
    "Task",
    "get_task",
    "sample_chain",
    "ScriptedExpert",
    "run_expert",
    "collect",
]
