"""Record the scripted CALVIN expert in calvin_env's scene as ROS2 bags, along chains as CALVIN's are.

``sim.env=calvin`` makes ``collect`` write what the tabletop's recorder writes (``vlaops.sim.record``'s
``BagWriter``: static 200x200 and gripper 84x84 images, joint states, TCP pose, the 24 numbers of
CALVIN's ``scene_obs``, the absolute action, the instruction), so ingest, convert, normalize, train and
evaluate run unchanged. Each demonstration is one subtask of a chain: a chain starts from one of CALVIN's
initial conditions (its table places and block yaws drawn by the chain's own seed, not the evaluation's),
then the expert does up to five tasks in turn, each feasible from the symbolic state the previous left
(``sequences.next_states``, no two of one category, as CALVIN's chains), every one recorded until CALVIN's
oracle says it is done. Later subtasks therefore start where a chain's do: a drawer left open, a block
held, a light on. The instruction is one of CALVIN's training annotations of the task (new_playtable.yaml),
drawn by the chain's seed; the evaluation instructs with the validation one.

Chains run in rounds of ``ROUND`` (whatever ``num_workers`` is), each round preferring the tasks that still
lack ``episodes_per_task`` successes after the previous rounds, until none does: a seed gives the same
bags with one worker or many.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlaops.io.calvin_spec import GRIPPER_CLOSE, GRIPPER_OPEN, REL_ORN_SCALE, REL_POS_SCALE, wrap_angle
from vlaops.io.geometry import euler_to_quat
from vlaops.sim.calvin.env import CalvinEnv, calvin_root, to_calvin_action
from vlaops.sim.calvin.expert import CalvinExpert
from vlaops.sim.calvin.instructions import training_instructions
from vlaops.sim.calvin.sequences import CHAIN_LENGTH, TASK_CATEGORIES, initial_conditions, initial_state, next_states
from vlaops.sim.config import SimConfig
from vlaops.sim.record import EPISODE_SPACING_NS, EPOCH_NS, BagWriter, EpisodeRecord, Frame
from vlaops.utils.executor import ComputeConfig, map_ordered
from vlaops.utils.logging import get_logger

log = get_logger(__name__)
ROUND = 8  # chains per round: the unit of work whose outcome the next round's task choice depends on
# The TCP moves at most 0.02 m a tick under CALVIN's relative actions; a tick that moves it 2.5 times that is
# the physics glitching (seen once in 293 demonstrations: 11 cm in one tick of a button press, which ingest's
# plausibility check then refused). Such a demonstration is the expert's failure, not recorded.
MAX_TCP_STEP_M = 0.05
CHAIN_STREAM = 0x43484E  # "CHN": a chain's own seed stream


def abs_action(robot_obs: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """The absolute target (7,) CALVIN's relative ``rel`` commands from ``robot_obs``: what calvin_env's
    ``relative_to_absolute`` computes (TCP + a * 0.02 m, euler + a * 0.05 rad) from the action it applies."""
    a = to_calvin_action(rel)
    target = np.empty(7)
    target[:3] = robot_obs[:3] + a[:3] * REL_POS_SCALE
    target[3:6] = wrap_angle(robot_obs[3:6] + a[3:6] * REL_ORN_SCALE)
    target[6] = GRIPPER_OPEN if a[6] > 0 else GRIPPER_CLOSE
    return target


def frame_obs(obs: Mapping[str, Any]) -> dict[str, Any]:
    """CalvinEnv's observation as the bag writer reads a frame (the tabletop env's keys)."""
    robot_obs = np.asarray(obs["robot_obs"], dtype=np.float64)
    return {
        "rgb_static": obs["rgb_obs"]["rgb_static"],
        "rgb_gripper": obs["rgb_obs"]["rgb_gripper"],
        "tcp_pos": robot_obs[:3],
        "tcp_quat": euler_to_quat(robot_obs[3:6]),
        "scene_obs": np.asarray(obs["scene_obs"], dtype=np.float64),
    }


def record_subtask(env: CalvinEnv, cfg: SimConfig, task: str, rec: EpisodeRecord) -> bool:
    """The expert on ``task`` from the current state, every tick into ``rec``, until CALVIN's oracle says it
    is done (True), or ``sim.calvin.max_steps_per_subtask`` ticks pass or the TCP jumps (False)."""
    oracle = env.get_task(task)
    start = env.get_info()
    expert = CalvinExpert(task, start, max_action=cfg.expert_max_action)
    obs = env.observe()
    hz = env.control_hz
    for tick in range(cfg.calvin.max_steps_per_subtask):
        rel = expert.act(env.get_info())
        q, dq = env.joint_state()
        rec.frames.append(Frame(tick, frame_obs(obs), abs_action(obs["robot_obs"], rel)))
        rec.joint_samples.append((tick / hz, q, dq))
        before = np.asarray(obs["robot_obs"][:3])
        obs = env.step(rel)
        jump = float(np.linalg.norm(np.asarray(obs["robot_obs"][:3]) - before))
        if jump > MAX_TCP_STEP_M:
            log.warning("%s: the TCP jumped %.3f m in tick %d; not recorded", rec.episode_id, jump, tick)
            return False
        if oracle.success(start, env.get_info()):
            return True
    return False


def choose_task(
    state: Mapping[str, Any], tasks: Sequence[str], used: set[int], wanted: set[str], rng: np.random.Generator
) -> str | None:
    """The chain's next task: feasible from ``state`` in exactly one way and of a category not yet used;
    among those, the wanted ones (short of their episodes) or the ones after which a wanted one becomes
    feasible (a lift before a place), else any. None when no task is feasible."""
    options = [t for t in tasks if TASK_CATEGORIES[t] not in used and len(next_states(state, t)) == 1]
    if not options:
        return None

    def leads_to_wanted(task: str) -> bool:
        after = next_states(state, task)[0]
        cats = used | {TASK_CATEGORIES[task]}
        return any(TASK_CATEGORIES[u] not in cats and len(next_states(after, u)) == 1 for u in wanted)

    preferred = [t for t in options if t in wanted] or [t for t in options if leads_to_wanted(t)] or options
    return preferred[int(rng.integers(len(preferred)))]


def _chain_job(job: tuple[SimConfig, int, frozenset[str], Path]) -> list[dict[str, Any]]:
    return record_chain(*job)


def record_chain(cfg: SimConfig, index: int, wanted: frozenset[str], out_dir: Path) -> list[dict[str, Any]]:
    """Chain ``index``: its initial scene, then up to five recorded subtasks; a bag per success, written
    atomically to ``out_dir/<task>_<chain>_<k>``. Returns one entry per attempted subtask."""
    rng = np.random.default_rng([cfg.seed, CHAIN_STREAM, index])
    conditions = initial_conditions()
    condition = conditions[int(rng.integers(len(conditions)))]
    robot_obs, scene_obs = initial_state(condition, np.random.RandomState(int(rng.integers(2**31))))
    annotations = training_instructions()
    writer = BagWriter(cfg)
    out: list[dict[str, Any]] = []
    with CalvinEnv(cfg.calvin) as env:
        env.reset_to(robot_obs, scene_obs)
        state, used, previous = dict(condition), set(), None
        for k in range(CHAIN_LENGTH):
            task = choose_task(state, cfg.tasks, used, set(wanted), rng)
            if task is None:
                break
            texts = annotations[task]
            episode_id = f"{task}_{index:04d}_{k}"
            start_ns = EPOCH_NS + (index * CHAIN_LENGTH + k) * EPISODE_SPACING_NS
            rec = EpisodeRecord(
                episode_id, task, texts[int(rng.integers(len(texts)))], index, start_ns, staged_after=previous
            )
            rec.custom["simulator"] = f"calvin_env {cfg.calvin.scene}"
            ok = record_subtask(env, cfg, task, rec)
            out.append({"task": task, "success": ok, "episode": episode_id if ok else None, "steps": len(rec.frames)})
            if not ok:
                log.warning("chain %d: the expert failed %s (subtask %d); the chain ends", index, task, k + 1)
                break
            writer.write(rec, out_dir)
            state, previous = next_states(state, task)[0], task
            used.add(TASK_CATEGORIES[task])
    return out


def collect(
    cfg: SimConfig, out_dir: Path, compute: ComputeConfig | None = None, round_size: int = ROUND
) -> dict[str, Any]:
    """At least ``episodes_per_task`` successful demonstrations of every task in ``cfg.tasks`` (CALVIN's), as
    bags under ``out_dir``; the summary of ``vlaops.sim.record.collect`` (per task attempts, successes, rate)
    plus the chains played. RuntimeError when ``max_attempts_per_task`` x tasks / 5 chains do not get there.
    ``round_size``: chains per round (the result depends on it, not on the workers)."""
    calvin_root(cfg.calvin)  # calvin_env installed with its assets, or one line, before any chain
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    max_chains = -(-cfg.max_attempts_per_task * len(cfg.tasks) // CHAIN_LENGTH)
    log.info(
        "collecting >= %d episodes of each of %d CALVIN tasks along chains in %s (%s) into %s",
        cfg.episodes_per_task,
        len(cfg.tasks),
        cfg.calvin.scene,
        cfg.storage,
        out_dir,
    )
    successes: Counter[str] = Counter()
    attempts: Counter[str] = Counter()
    episodes: list[str] = []
    chains = 0
    while short := frozenset(t for t in cfg.tasks if successes[t] < cfg.episodes_per_task):
        if chains >= max_chains:
            raise RuntimeError(
                f"CALVIN tasks {sorted(short)} have fewer than sim.episodes_per_task={cfg.episodes_per_task} "
                f"successful demonstrations after {chains} chains (sim.max_attempts_per_task="
                f"{cfg.max_attempts_per_task} x {len(cfg.tasks)} tasks / {CHAIN_LENGTH}); the expert or the scene "
                "is broken for them (bench/calvin_expert.py measures the expert per task)"
            )
        jobs = [(cfg, index, short, out_dir) for index in range(chains, chains + round_size)]
        results = map_ordered(
            _chain_job,
            jobs,
            cfg.num_workers,
            desc="collect calvin",
            unit="chain",
            compute=compute,
            label=lambda job: f"chain {job[1]}",
        )
        for entries in results:
            for entry in entries:
                attempts[entry["task"]] += 1
                if entry["success"]:
                    successes[entry["task"]] += 1
                    episodes.append(entry["episode"])
        chains += round_size
    summary: dict[str, Any] = {
        "simulator": f"calvin_env {cfg.calvin.scene}",
        "chains": chains,
        "tasks": {
            task: {
                "attempts": attempts[task],
                "successes": successes[task],
                "success_rate": successes[task] / attempts[task],
            }
            for task in cfg.tasks
        },
        "episodes": sorted(episodes),
    }
    log.info("collected %d episodes along %d chains in %.1f s", len(episodes), chains, time.perf_counter() - start)
    return summary
