"""The task registry: language instruction, precondition and success oracle of every tabletop task.

Tasks are built explicitly in this module (no registration as an import side effect elsewhere), so
``TASKS`` is complete as soon as the module is imported. Like CALVIN's ``Tasks`` oracle
(calvin_env/envs/tasks.py), success compares the state at the start of a subtask with the state at its
end, so the same oracle scores single demonstrations and every step of a 5-task chain.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from vlaops.sim.layout import BLOCK_HALF, BLOCK_ORDER, BLOCK_REST_Z, TABLE_CENTER, TABLE_HALF_EXTENTS, WORKSPACE_Y

Info = dict[str, Any]  # TabletopEnv.get_info()

# A push succeeds once the block moved this far along y (m) in the instructed direction.
PUSH_SUCCESS_DISTANCE = 0.06
# The expert pushes about this far; the chain sampler assumes it when predicting where a block ends up.
PUSH_NOMINAL_DISTANCE = 0.10
# The expert lowers its closed fingers this far (m) behind the block centre before pushing (expert.py).
PUSH_STANDOFF = BLOCK_HALF + 0.05
# Blocks start anywhere (env.sample_block_poses), so a push is only feasible when nothing stands in its way:
# no other block within PUSH_CORRIDOR_X (m) across the push line, from PUSH_CORRIDOR_BEHIND behind the block
# (where the fingers come down) to PUSH_CORRIDOR_AHEAD in front of it (where the pushed block ends up). Two
# block half-diagonals (7 cm) plus 2 cm for fingers and drift.
PUSH_CORRIDOR_X = 2 * BLOCK_HALF * np.sqrt(2) + 0.02
PUSH_CORRIDOR_BEHIND = PUSH_STANDOFF + BLOCK_HALF * np.sqrt(2) + 0.02
PUSH_CORRIDOR_AHEAD = PUSH_NOMINAL_DISTANCE + 2 * BLOCK_HALF * np.sqrt(2) + 0.02
# The open fingers (8 cm apart) come down around the block: no other block's centre may be this close (m).
LIFT_CLEARANCE = 0.09
# A lift succeeds once the block is held this far (m) above where it started; the expert lifts 12 cm.
LIFT_SUCCESS_HEIGHT = 0.05
LIFT_NOMINAL_HEIGHT = 0.12
# "On the table": resting height within this tolerance (m) and inside the table top.
ON_TABLE_Z_TOL = 0.01
# Left is +y, the robot's left (see scene.py).
DIRECTIONS = {"left": 1.0, "right": -1.0}


@dataclass(frozen=True)
class Task:
    """One instructed subtask.

    ``success(start_info, end_info)`` is the oracle; ``precondition(info)`` says whether the task makes
    sense from a state; ``predict(info)`` is the nominal state after success, used to sample chains.
    ``setup`` names the task that, run from a freshly reset scene, makes the precondition hold (a block
    must be lifted before it can be placed); None when a reset scene already satisfies it.
    """

    name: str
    instruction: str
    kind: str  # "push" | "lift" | "place"
    block: str
    direction: str | None
    success: Callable[[Info, Info], bool]
    precondition: Callable[[Info], bool]
    predict: Callable[[Info], Info]
    setup: str | None = None


def on_table(block: dict[str, Any]) -> bool:
    """The block rests on the table top (not held up, not pushed off)."""
    x, y, z = (float(v) for v in block["pos"])
    inside = abs(x - TABLE_CENTER[0]) <= TABLE_HALF_EXTENTS[0] and abs(y - TABLE_CENTER[1]) <= TABLE_HALF_EXTENTS[1]
    return inside and abs(z - BLOCK_REST_Z) <= ON_TABLE_Z_TOL and not block.get("grasped", False)


def _others(info: Info, block: str) -> list[np.ndarray]:
    """(x, y) of every other block (2,) each."""
    return [np.asarray(b["pos"], dtype=float)[:2] for name, b in info["blocks"].items() if name != block]


def _push_blocked(info: Info, block: str, sign: float) -> bool:
    """Another block stands in the corridor the fingers and the pushed block sweep."""
    bx, by = (float(v) for v in info["blocks"][block]["pos"][:2])
    for ox, oy in _others(info, block):
        ahead = (oy - by) * sign
        if abs(ox - bx) < PUSH_CORRIDOR_X and -PUSH_CORRIDOR_BEHIND <= ahead <= PUSH_CORRIDOR_AHEAD:
            return True
    return False


def _push(block: str, direction: str) -> Task:
    sign = DIRECTIONS[direction]

    def success(start: Info, end: Info) -> bool:
        moved = (float(end["blocks"][block]["pos"][1]) - float(start["blocks"][block]["pos"][1])) * sign
        return moved >= PUSH_SUCCESS_DISTANCE and on_table(end["blocks"][block])

    def precondition(info: Info) -> bool:
        b = info["blocks"][block]
        after = float(b["pos"][1]) + sign * PUSH_NOMINAL_DISTANCE
        return (
            info["held"] is None
            and on_table(b)
            and WORKSPACE_Y[0] <= after <= WORKSPACE_Y[1]
            and not _push_blocked(info, block, sign)
        )

    def predict(info: Info) -> Info:
        out = copy.deepcopy(info)
        out["blocks"][block]["pos"] = np.asarray(out["blocks"][block]["pos"], dtype=float)
        out["blocks"][block]["pos"][1] += sign * PUSH_NOMINAL_DISTANCE
        return out

    return Task(
        f"push_{block}_{direction}",
        f"push the {block} block to the {direction}",
        "push",
        block,
        direction,
        success,
        precondition,
        predict,
    )


def _lift(block: str) -> Task:
    def success(start: Info, end: Info) -> bool:
        b = end["blocks"][block]
        rise = float(b["pos"][2]) - float(start["blocks"][block]["pos"][2])
        return rise >= LIFT_SUCCESS_HEIGHT and bool(b["grasped"])

    def precondition(info: Info) -> bool:
        b = info["blocks"][block]
        xy = np.asarray(b["pos"], dtype=float)[:2]
        clear = all(np.linalg.norm(o - xy) >= LIFT_CLEARANCE for o in _others(info, block))
        return info["held"] is None and on_table(b) and clear

    def predict(info: Info) -> Info:
        out = copy.deepcopy(info)
        b = out["blocks"][block]
        b["pos"] = np.asarray(b["pos"], dtype=float)
        b["pos"][2] += LIFT_NOMINAL_HEIGHT
        b["grasped"] = b["lifted"] = True
        out["held"] = block
        return out

    return Task(f"lift_{block}", f"lift the {block} block", "lift", block, None, success, precondition, predict)


def _place(block: str) -> Task:
    def success(start: Info, end: Info) -> bool:
        return bool(start["blocks"][block]["lifted"]) and on_table(end["blocks"][block])

    def precondition(info: Info) -> bool:
        return info["held"] == block and bool(info["blocks"][block]["lifted"])

    def predict(info: Info) -> Info:
        out = copy.deepcopy(info)
        b = out["blocks"][block]
        b["pos"] = np.asarray(b["pos"], dtype=float)
        b["pos"][2] = BLOCK_REST_Z
        b["grasped"] = b["lifted"] = False
        out["held"] = None
        return out

    return Task(
        f"place_{block}",
        f"place the {block} block on the table",
        "place",
        block,
        None,
        success,
        precondition,
        predict,
        setup=f"lift_{block}",
    )


def _build_registry() -> dict[str, Task]:
    tasks: list[Task] = []
    for block in ("red", "green", "blue"):
        tasks += [_push(block, "left"), _push(block, "right"), _lift(block), _place(block)]
    assert {t.block for t in tasks} == set(BLOCK_ORDER)
    return {t.name: t for t in tasks}


#: Every task of the tabletop, by name.
TASKS: dict[str, Task] = _build_registry()


def get_task(name: str) -> Task:
    """The registered task ``name``; ValueError listing the known names otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None


def sample_chain(rng: np.random.Generator, length: int, task_names: Sequence[str], start_info: Info) -> list[str]:
    """A chain of ``length`` distinct tasks, each feasible once the ones before it have succeeded.

    CALVIN evaluates chains of 5 subtasks whose conditions hold in sequence
    (calvin_models/calvin_agent/evaluation/multistep_sequences.py). Here each task's ``predict`` gives the
    nominal state after it, and a randomised depth-first search returns the first feasible chain, so a
    chain is found whenever one exists. ValueError if none does.
    """
    for name in task_names:
        get_task(name)
    if length < 1:
        raise ValueError(f"chain length must be >= 1, got {length}")

    def search(state: Info, chain: list[str]) -> list[str] | None:
        if len(chain) == length:
            return chain
        options = [n for n in task_names if n not in chain and TASKS[n].precondition(state)]
        for i in rng.permutation(len(options)):
            found = search(TASKS[options[i]].predict(state), chain + [options[i]])
            if found is not None:
                return found
        return None

    chain = search(start_info, [])
    if chain is None:
        raise ValueError(f"no feasible chain of {length} tasks from this state among {list(task_names)}")
    return chain


class SceneEnv(Protocol):
    """What :func:`seeded_chains` needs of an environment (``TabletopEnv`` has it)."""

    def reset(self, seed: int) -> dict[str, Any]: ...

    def get_info(self) -> Info: ...


def seeded_chains(
    env: SceneEnv, task_names: Sequence[str], num_chains: int, length: int, seed: int, max_scenes: int | None = None
) -> list[tuple[int, list[str]]]:
    """``num_chains`` (scene seed, task chain) pairs: the same seed gives the same scenes and chains.

    Scenes are tried in order from ``env.reset(seed)``, ``env.reset(seed + 1)``, ...; each chain's tasks are
    sampled (one generator seeded by ``seed`` for the whole list) from the state its reset gives, so every
    chain is feasible from its own scene. With block start poses random, a scene can admit no chain of
    ``length`` (blocks in each other's way): it is skipped, as CALVIN samples only feasible sequences
    (calvin_models/calvin_agent/evaluation/multistep_sequences.py). Only ``get_info`` is read: an env
    built with ``render=False`` samples them as well. ValueError when fewer than ``num_chains`` of the first
    ``max_scenes`` scenes (default 10 x num_chains) admit a chain.
    """
    rng = np.random.default_rng(seed)
    limit = max_scenes if max_scenes is not None else 10 * num_chains
    chains: list[tuple[int, list[str]]] = []
    last_error = ""
    for scene_seed in range(seed, seed + limit):
        if len(chains) == num_chains:
            break
        env.reset(scene_seed)
        try:
            chains.append((scene_seed, sample_chain(rng, length, task_names, env.get_info())))
        except ValueError as exc:
            last_error = str(exc)
    if len(chains) < num_chains:
        raise ValueError(
            f"only {len(chains)} of {limit} scenes from seed {seed} admit a chain of {length} tasks, "
            f"{num_chains} needed ({last_error})"
        )
    return chains
