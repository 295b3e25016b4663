"""CALVIN's 1000 evaluation chains and the scene each one starts from, reproduced without mees/calvin.

CALVIN (calvin_models/calvin_agent/evaluation/multistep_sequences.py, ``get_sequences``) samples its
chains from a symbolic world: each task has preconditions and effects on a few state variables (the
drawer, the slider, the two lights, where each block is, whether one is held). It lists every initial
state with one or two blocks on the table, gives each the same share of the chains, draws chains of 5
tasks per state with numpy's legacy generator seeded by the state's index until one is feasible (each
task applicable in turn, no two tasks of one category), and shuffles all (state, chain) pairs with seed
0. The sampler below is this project's own code for the same rules; ``eval_sequences.json`` beside it is
its output, and ``scripts/calvin_sequences.py --calvin DIR`` compares it with CALVIN's own function.

``initial_state`` turns a chain's symbolic initial condition into the 24 numbers of ``scene_obs`` (and
the robot's 15 of ``robot_obs``) as CALVIN's ``get_env_state_for_initial_condition``
(evaluation/utils.py) does: the two table places are shuffled and each block's yaw drawn from numpy's
legacy generator seeded by an FNV-1 hash of the condition's values (pyhash's ``fnv1_32``, see
``fnv1_32``), so the same chain starts from the same scene in every evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from importlib import resources
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from vlaops.errors import VlaopsError

SEQUENCES_FILE = "eval_sequences.json"  # package data beside this module
NUM_SEQUENCES = 1000  # CALVIN's NUM_SEQUENCES (evaluate_policy.py)
CHAIN_LENGTH = 5
BLOCKS = ("red_block", "blue_block", "pink_block")
SLIDER_PLACES = ("slider_right", "slider_left")

# The state variables and their values, in CALVIN's order (the order matters twice: product() enumerates
# the initial states in it, and the initial scene's seed hashes the values in it).
CONDITION_VALUES: dict[str, tuple[Any, ...]] = {
    "led": (0, 1),
    "lightbulb": (0, 1),
    "slider": ("right", "left"),
    "drawer": ("closed", "open"),
    "red_block": ("table", "slider_right", "slider_left"),
    "blue_block": ("table", "slider_right", "slider_left"),
    "pink_block": ("table", "slider_right", "slider_left"),
    "grasped": (0,),
}

Rule = tuple[dict[str, Any], dict[str, Any]]  # (condition, effect); a condition value may be a list of allowed values


def _colour(block: str) -> str:
    return block.split("_")[0]


def _task_rules() -> dict[str, list[Rule]]:
    """Every task's (condition, effect) rules, in CALVIN's task order (the sampler draws by position)."""
    rules: dict[str, list[Rule]] = {}
    for kind in ("rotate", "push"):
        for block in BLOCKS:
            for side in ("right", "left"):
                rules[f"{kind}_{_colour(block)}_block_{side}"] = [({block: "table", "grasped": 0}, {block: "table"})]
    rules["move_slider_left"] = [({"slider": "right", "grasped": 0}, {"slider": "left"})]
    rules["move_slider_right"] = [({"slider": "left", "grasped": 0}, {"slider": "right"})]
    rules["open_drawer"] = [({"drawer": "closed", "grasped": 0}, {"drawer": "open"})]
    rules["close_drawer"] = [({"drawer": "open", "grasped": 0}, {"drawer": "closed"})]
    held = {"grasped": 1}
    for block in BLOCKS:
        c = _colour(block)
        rules[f"lift_{c}_block_table"] = [({block: "table", "grasped": 0}, {block: "grasped", **held})]
        # a block in the cabinet can be reached when the sliding door covers the other half
        rules[f"lift_{c}_block_slider"] = [
            ({block: "slider_left", "slider": "right", "grasped": 0}, {block: "grasped", **held}),
            ({block: "slider_right", "slider": "left", "grasped": 0}, {block: "grasped", **held}),
        ]
        rules[f"lift_{c}_block_drawer"] = [
            ({block: "drawer", "drawer": "open", "grasped": 0}, {block: "grasped", **held})
        ]
    rules["place_in_slider"] = [
        ({block: "grasped", "slider": door, "grasped": 1}, {block: f"slider_{door}", "grasped": 0})
        for block in BLOCKS
        for door in ("right", "left")
    ]
    rules["place_in_drawer"] = [
        ({block: "grasped", "drawer": "open", "grasped": 1}, {block: "drawer", "grasped": 0}) for block in BLOCKS
    ]
    pairs = [(top, bottom) for top in BLOCKS for bottom in BLOCKS if top != bottom]
    rules["stack_block"] = [
        (
            {top: "grasped", bottom: "table", "grasped": 1},
            {top: "stacked_top", bottom: "stacked_bottom", "grasped": 0},
        )
        for top, bottom in pairs
    ]
    rules["unstack_block"] = [
        ({top: "stacked_top", bottom: "stacked_bottom", "grasped": 0}, {top: "table", bottom: "table"})
        for top, bottom in pairs
    ]
    for light in ("lightbulb", "led"):
        rules[f"turn_on_{light}"] = [({light: 0, "grasped": 0}, {light: 1})]
        rules[f"turn_off_{light}"] = [({light: 1, "grasped": 0}, {light: 0})]
    rules["push_into_drawer"] = [
        (
            {
                block: "table",
                **{other: list(SLIDER_PLACES) for other in BLOCKS if other != block},
                "drawer": "open",
                "grasped": 0,
            },
            {block: "drawer", "grasped": 0},
        )
        for block in BLOCKS
    ]
    return rules


TASK_RULES = _task_rules()
# CALVIN's task order (multistep_sequences' ``tasks``; its task oracle lists stack/unstack last): the
# sampler's draws index into it, so it is part of the result.
TASK_ORDER = (
    *(f"rotate_{c}_block_{s}" for c in ("red", "blue", "pink") for s in ("right", "left")),
    *(f"push_{c}_block_{s}" for c in ("red", "blue", "pink") for s in ("right", "left")),
    "move_slider_left",
    "move_slider_right",
    "open_drawer",
    "close_drawer",
    *(f"lift_{c}_block_{p}" for c in ("red", "blue", "pink") for p in ("table", "slider", "drawer")),
    "place_in_slider",
    "place_in_drawer",
    "stack_block",
    "unstack_block",
    "turn_on_lightbulb",
    "turn_off_lightbulb",
    "turn_on_led",
    "turn_off_led",
    "push_into_drawer",
)


def _category(task: str) -> int:
    """CALVIN's task_categories: two tasks of one category never share a chain."""
    if task.startswith(("rotate_", "push_")) and task != "push_into_drawer":
        return 1  # rotating or pushing any block
    if task.startswith("lift_"):
        return {"table": 4, "slider": 5, "drawer": 6}[task.rsplit("_", 1)[1]]
    if task.startswith("turn_"):
        return 8
    kinds = {"move_slider": 2, "open_drawer": 3, "close_drawer": 3, "place_in": 7, "push_into": 9, "stack": 10}
    return next((v for k, v in kinds.items() if task.startswith(k)), 11)  # 11: unstack_block


TASK_CATEGORIES = {task: _category(task) for task in TASK_ORDER}
TASKS = frozenset(TASK_ORDER)


def _holds(state: Mapping[str, Any], condition: Mapping[str, Any]) -> bool:
    return all(state[k] in v if isinstance(v, list) else state[k] == v for k, v in condition.items())


def next_states(state: Mapping[str, Any], task: str) -> list[dict[str, Any]]:
    """The symbolic states ``task`` can lead to from ``state`` (one per rule whose condition holds)."""
    return [{**state, **effect} for condition, effect in TASK_RULES[task] if _holds(state, condition)]


def feasible(state: Mapping[str, Any], tasks: Sequence[str]) -> bool:
    """Each task applicable in exactly one way in turn, and no two tasks of one category."""
    current: Mapping[str, Any] = state
    for task in tasks:
        states = next_states(current, task)
        if len(states) != 1:
            return False
        current = states[0]
    categories = [TASK_CATEGORIES[t] for t in tasks]
    return len(set(categories)) == len(categories)


def initial_conditions() -> list[dict[str, Any]]:
    """Every initial state CALVIN evaluates from: one or two blocks on the table, at most one block on
    each half of the sliding cabinet, nothing held; in ``product`` order of ``CONDITION_VALUES``."""
    out = []
    for values in product(*CONDITION_VALUES.values()):
        places = values[4:7]
        if places.count("table") in (1, 2) and all(places.count(p) < 2 for p in SLIDER_PLACES):
            out.append(dict(zip(CONDITION_VALUES, values, strict=True)))
    return out


def chains_for_state(state: Mapping[str, Any], count: int, seed: int) -> list[tuple[str, ...]]:
    """``count`` feasible chains for ``state``: 5 distinct tasks drawn at random until one is feasible.

    CALVIN draws with ``np.random.choice(tasks, 5, replace=False)``, which in numpy's legacy generator is
    the first 5 of ``permutation(len(tasks))``: drawn here that way (the same stream, half the cost), and
    the category rule checked before the slower walk through the rules."""
    rng = np.random.RandomState(seed)
    categories = [TASK_CATEGORIES[t] for t in TASK_ORDER]
    out: list[tuple[str, ...]] = []
    while len(out) < count:
        drawn = rng.permutation(len(TASK_ORDER))[:CHAIN_LENGTH]
        if len({categories[i] for i in drawn}) < CHAIN_LENGTH:
            continue
        chain = tuple(TASK_ORDER[i] for i in drawn)
        if feasible(state, chain):
            out.append(chain)
    return out


def shares(num_sequences: int, num_states: int) -> list[int]:
    """How many chains each initial state gets: ``np.array_split``'s near-equal parts, larger ones first."""
    return [len(part) for part in np.array_split(np.arange(num_sequences), num_states)]


def shuffle_order(n: int) -> list[int]:
    """Position k of the shuffled list holds item ``shuffle_order(n)[k]`` of the unshuffled one: CALVIN
    shuffles the (state, chain) pairs with numpy's legacy generator seeded 0."""
    order = list(range(n))
    np.random.RandomState(0).shuffle(order)  # a list shuffles in place as np.random.shuffle(list) does
    return order


def sample_sequences(num_sequences: int = NUM_SEQUENCES) -> list[tuple[dict[str, Any], tuple[str, ...]]]:
    """CALVIN's evaluation chains: [(initial condition, 5 task names)], in CALVIN's order (about 40 s for
    1000 on one core: most random draws are infeasible)."""
    states = initial_conditions()
    pairs: list[tuple[dict[str, Any], tuple[str, ...]]] = []
    for index, (state, count) in enumerate(zip(states, shares(num_sequences, len(states)), strict=True)):
        pairs.extend((dict(state), chain) for chain in chains_for_state(state, count, index))
    return [pairs[i] for i in shuffle_order(len(pairs))]


def to_json(pairs: Iterable[tuple[Mapping[str, Any], Sequence[str]]]) -> list[list[list[Any]]]:
    """The committed file's entries: [[the condition's values in ``CONDITION_VALUES`` order], [5 tasks]]."""
    return [[[cond[k] for k in CONDITION_VALUES], list(tasks)] for cond, tasks in pairs]


def sequences_document(pairs: Iterable[tuple[Mapping[str, Any], Sequence[str]]], source: str) -> dict[str, Any]:
    """The JSON document ``eval_sequences.json`` holds: where the chains come from, and the chains."""
    return {"source": source, "condition_keys": list(CONDITION_VALUES), "sequences": to_json(pairs)}


def write_sequences(path: Path, pairs: Iterable[tuple[Mapping[str, Any], Sequence[str]]], source: str) -> None:
    """``eval_sequences.json``, one chain a line (a diff of the file shows which chains changed), atomically."""
    from vlaops.utils.atomic import atomic_file

    document = sequences_document(pairs, source)
    lines = ",\n".join(f"    {json.dumps(entry)}" for entry in document["sequences"])
    with atomic_file(path) as handle:
        handle.write(f'{{\n  "source": {json.dumps(document["source"])},\n')
        handle.write(f'  "condition_keys": {json.dumps(document["condition_keys"])},\n')
        handle.write(f'  "sequences": [\n{lines}\n  ]\n}}\n')


def parse_sequences(document: Mapping[str, Any], source: str) -> list[tuple[dict[str, Any], tuple[str, ...]]]:
    """[(initial condition, tasks)] from an ``eval_sequences.json`` document; ``source`` names it in errors."""
    keys = list(document.get("condition_keys", []))
    if keys != list(CONDITION_VALUES):
        raise VlaopsError(f"{source}: condition_keys must be {list(CONDITION_VALUES)}, got {keys}")
    out = []
    for i, (values, tasks) in enumerate(document["sequences"]):
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or len(tasks) != CHAIN_LENGTH:
            raise VlaopsError(
                f"{source}: sequences[{i}] must name {CHAIN_LENGTH} of CALVIN's tasks, got {tasks} (unknown: {unknown})"
            )
        out.append((dict(zip(keys, values, strict=True)), tuple(tasks)))
    return out


@cache
def _committed() -> tuple[tuple[dict[str, Any], tuple[str, ...]], ...]:
    file = resources.files(__package__).joinpath(SEQUENCES_FILE)
    return tuple(parse_sequences(json.loads(file.read_text()), str(file)))


def load_sequences(count: int | None = None) -> list[tuple[dict[str, Any], tuple[str, ...]]]:
    """The first ``count`` (all when None) of CALVIN's chains from the committed ``eval_sequences.json``."""
    pairs = _committed()
    if count is not None and not 1 <= count <= len(pairs):
        raise VlaopsError(f"eval.num_chains={count}: CALVIN has {len(pairs)} evaluation sequences (1..{len(pairs)})")
    return [(dict(cond), tasks) for cond, tasks in pairs[:count]]


# --- the initial scene of a chain (evaluation/utils.py get_env_state_for_initial_condition) ---------------

FNV1_32_PRIME = 16777619
# robot_obs at every chain's start: TCP pose, gripper width, the seven arm joints, gripper open.
INITIAL_ROBOT_OBS = (
    0.02586889,
    -0.2313129,
    0.5712808,
    3.09045411,
    -0.02908596,
    1.50013585,
    0.07999963,
    -1.21779124,
    1.03987629,
    2.11978254,
    -2.34205014,
    -0.87015899,
    1.64119093,
    0.55344928,
    1.0,
)
BLOCK_YAW_RANGE = (np.pi / 2 - np.pi / 8, np.pi / 2 + np.pi / 8)
SLIDER_LEFT_POS = (-2.40851662e-01, 9.24044687e-02, 4.60990009e-01)
SLIDER_RIGHT_POS = (7.03416330e-02, 9.24044687e-02, 4.60990009e-01)
TABLE_POSITIONS = ((5.00000896e-02, -1.20000177e-01, 4.59990009e-01), (2.29995412e-01, -1.19995140e-01, 4.59990010e-01))
SLIDER_OPEN_LEFT = 0.28  # scene_obs[0] with the sliding door on the left
DRAWER_OPEN = 0.22  # scene_obs[1] with the drawer open
SWITCH_ON = 0.088  # scene_obs[3] with the lightbulb on


def fnv1_32(data: bytes | str, seed: int = 0) -> int:
    """FNV-1 (multiply, then xor each byte), 32 bit, from ``seed`` (pyhash's default 0, not the usual
    offset basis); a str is hashed as its UTF-16 little-endian bytes without a BOM, as pyhash does on
    CPython 3 where wchar_t is 4 bytes (Linux)."""
    raw = data.encode("utf-16-le") if isinstance(data, str) else bytes(data)
    value = seed & 0xFFFFFFFF
    for byte in raw:
        value = ((value * FNV1_32_PRIME) & 0xFFFFFFFF) ^ byte
    return value


def scene_seed(condition: Mapping[str, Any]) -> int:
    """The seed CALVIN derives from a condition: the FNV-1 hash of ``str(condition.values())``."""
    return fnv1_32(str(dict(condition).values()))


def initial_state(
    condition: Mapping[str, Any], rng: np.random.RandomState | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(robot_obs (15,), scene_obs (24,)) a chain with this initial condition starts from.

    ``rng`` (default: CALVIN's, seeded by the condition) draws which table place each block takes and
    its yaw: the collect stage passes its own, so its demonstrations start from CALVIN's kind of scene
    without being the evaluation's scenes."""
    rng = np.random.RandomState(scene_seed(condition)) if rng is None else rng
    table = [np.array(p) for p in TABLE_POSITIONS]
    rng.shuffle(table)
    scene = np.zeros(24)
    scene[0] = SLIDER_OPEN_LEFT if condition["slider"] == "left" else 0.0
    scene[1] = DRAWER_OPEN if condition["drawer"] == "open" else 0.0
    scene[3] = SWITCH_ON if condition["lightbulb"] == 1 else 0.0
    scene[4] = condition["lightbulb"]
    scene[5] = condition["led"]
    slider = {"slider_right": SLIDER_RIGHT_POS, "slider_left": SLIDER_LEFT_POS}
    # CALVIN's rule: red takes the first table place, pink the second, blue the one the others leave
    for block, offset in zip(BLOCKS, (6, 12, 18), strict=True):
        place = condition[block]
        if place in slider:
            scene[offset : offset + 3] = slider[place]
        elif block == "red_block":
            scene[offset : offset + 3] = table[0]
        elif block == "blue_block":
            scene[offset : offset + 3] = table[1] if condition["red_block"] == "table" else table[0]
        else:
            scene[offset : offset + 3] = table[1]
        scene[offset + 5] = rng.uniform(*BLOCK_YAW_RANGE)
    return np.array(INITIAL_ROBOT_OBS), scene
