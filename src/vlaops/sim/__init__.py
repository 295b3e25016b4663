"""The embedded default robot: a PyBullet Franka Panda tabletop, its tasks, a scripted expert, a recorder.

Names resolve lazily, so validating a config (``vlaops.sim.config``) does not load PyBullet.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SimConfig": "config",
    "SimTopics": "config",
    "TabletopEnv": "env",
    "ScriptedExpert": "expert",
    "run_expert": "expert",
    "collect": "record",
    "TASKS": "tasks",
    "Task": "tasks",
    "get_task": "tasks",
    "sample_chain": "tasks",
    "seeded_chains": "tasks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"vlaops.sim.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'vlaops.sim' has no attribute {name!r}")
