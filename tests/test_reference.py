"""Honest data and the reference policies: the expert's demonstrations survive the training
normalisation, and a blind baseline (instruction + robot state, no camera) cannot solve the tabletop.

All in the real simulator, without rendering (``render=False``: the oracle and the expert read the state,
and the blind baseline never looks at images); seeded, so every number here is reproducible.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vlaops.data.normalization import ActionNormalizer
from vlaops.errors import VlaopsError
from vlaops.eval.blind import BlindPolicy
from vlaops.eval.chains import evaluate_chains, summarize
from vlaops.io.calvin import LANG_ANN_JSON, LANG_DIR, CalvinSplit, rel_actions_from_abs
from vlaops.sim import TASKS, SimConfig, TabletopEnv, Task, get_task, run_expert, seeded_chains
from vlaops.sim.record import expert_episodes

NORM = ActionNormalizer()  # RoboVLMs' +-0.65, the data.norm_min / norm_max default
# A value counts as clipped when the normalisation changes it by more than float round-off (the recorded
# rel action is recomputed from the absolute target, io/calvin.rel_actions_from_abs).
CLIP_TOL = 1e-6


@pytest.fixture(scope="module")
def sim_cfg() -> SimConfig:
    return SimConfig(episodes_per_task=2, num_workers=1)


@pytest.fixture(scope="module")
def env(sim_cfg: SimConfig):
    with TabletopEnv(sim_cfg, render=False) as e:
        yield e


@pytest.fixture(scope="module")
def demos(env: TabletopEnv, sim_cfg: SimConfig) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(instruction, robot_obs (T, 15), rel_actions (T, 7)) of the episodes collect would record first,
    with the rel actions computed from the recorded absolute targets as convert computes them."""
    out = []
    for name in TASKS:
        for _, rec in expert_episodes(env, sim_cfg, name):
            robot_obs = np.stack([f.obs["robot_obs"] for f in rec.frames])  # (T, 15)
            action_abs = np.stack([f.action_abs for f in rec.frames])  # (T, 7)
            out.append((rec.instruction, robot_obs, rel_actions_from_abs(action_abs, robot_obs)))
    return out


def clipped_fraction(rel: np.ndarray) -> float:
    """Fraction of arm values (..., :6) that the normalisation round trip changes."""
    arm = rel[..., :6]
    return float(np.mean(np.abs(NORM.denormalize(NORM.normalize(rel))[..., :6] - arm) > CLIP_TOL))


def feasible_seeds(env: TabletopEnv, task: Task, candidates: range, count: int) -> list[int]:
    """The first ``count`` scene seeds in which ``task`` is possible (block poses are random)."""
    seeds = []
    for seed in candidates:
        env.reset(seed)
        if task.precondition(env.get_info()):
            seeds.append(seed)
            if len(seeds) == count:
                return seeds
    raise AssertionError(f"{task.name}: possible in fewer than {count} of the scenes {candidates}")


class RoundTripEnv:
    """The env, but every action first goes through normalize -> denormalize, as a policy's output does."""

    def __init__(self, env: TabletopEnv) -> None:
        self._env = env

    def step(self, action: np.ndarray) -> dict[str, Any]:
        return self._env.step(NORM.denormalize(NORM.normalize(np.asarray(action, dtype=np.float64))))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)


# --- the expert ------------------------------------------------------------------------------------
@pytest.mark.slow  # seconds: the full suite only (the quick loop stays under 5 minutes)
def test_expert_demonstrations_are_not_clipped(demos, env: TabletopEnv) -> None:
    rel = np.concatenate([r for _, _, r in demos])  # (N, 7)
    assert clipped_fraction(rel) <= 0.01
    assert np.abs(rel[:, :3]).max() > 0.6  # the cap slows the expert, it does not make it crawl
    # The measure catches an uncapped expert: at full speed most travel steps lie outside +-0.65.
    env.reset(3)
    fast: list[np.ndarray] = []
    assert run_expert(env, "lift_red", 150, on_step=lambda o, a: fast.append(a), max_action=1.0)[0]
    assert clipped_fraction(np.stack(fast)) > 0.1


def test_expert_episodes_fit_the_step_budgets(demos, sim_cfg: SimConfig) -> None:
    lengths = [len(r) for _, _, r in demos]
    assert max(lengths) < min(sim_cfg.max_episode_steps, 120)  # 120: eval.max_steps_per_subtask


@pytest.mark.parametrize("name", list(TASKS))
def test_expert_succeeds_through_the_normalisation_round_trip(env: TabletopEnv, sim_cfg: SimConfig, name: str) -> None:
    task = get_task(name)
    first = get_task(task.setup) if task.setup is not None else task
    seeds = feasible_seeds(env, first, range(500, 540), 2)
    rt = RoundTripEnv(env)
    for seed in seeds:
        env.reset(seed)
        if task.setup is not None:
            assert run_expert(rt, task.setup, sim_cfg.max_episode_steps)[0]
        ok, steps, _ = run_expert(rt, task, sim_cfg.max_episode_steps)
        assert ok, f"{name} failed through the +-0.65 round trip on seed {seed} after {steps} steps"


def test_expert_reference_moves_as_fast_as_the_recorded_demonstrations() -> None:
    """evaluate's expert reference takes sim.expert_max_action from the env's config, as collect does."""
    from vlaops.eval.reference import ExpertPolicy

    task = get_task("lift_red")
    for cap in (0.3, 0.64):
        with TabletopEnv(SimConfig(expert_max_action=cap, num_workers=1), render=False) as slow:
            arm = ExpertPolicy(slow).step(slow.reset(3), task.instruction)[:6]
            assert np.abs(arm).max() == pytest.approx(cap, abs=1e-6), cap  # full speed towards the first waypoint


# --- the blind baseline ----------------------------------------------------------------------------
def blind_from(demos: list[tuple[str, np.ndarray, np.ndarray]], k: int = 1) -> BlindPolicy:
    return BlindPolicy(
        [i for i, o, _ in demos for _ in range(len(o))],
        np.concatenate([o for _, o, _ in demos]),
        np.concatenate([r for _, _, r in demos]),
        k,
    )


def test_blind_baseline_replays_its_nearest_demonstration(demos) -> None:
    policy = blind_from(demos)
    instruction, robot_obs, rel = demos[0]
    policy.reset()
    for t in (0, len(rel) // 2, len(rel) - 1):
        np.testing.assert_allclose(policy.step({"robot_obs": robot_obs[t]}, instruction), rel[t])
    with pytest.raises(VlaopsError, match="'open the drawer' was never demonstrated"):
        policy.step({"robot_obs": robot_obs[0]}, "open the drawer")


def test_blind_baseline_cannot_solve_the_tabletop(demos, env: TabletopEnv) -> None:
    """Without the camera the blocks' random poses are unknown: SR_1 stays at most 20 %."""
    chains = seeded_chains(env, list(TASKS), num_chains=10, length=5, seed=1000)
    results = evaluate_chains(env, blind_from(demos), chains, get_task, max_steps=120)
    assert summarize(results, 5)["chain_sr"][1] <= 0.2, [r.completed for r in results]


def test_blind_baseline_from_a_calvin_split(calvin_dir: Path, tmp_path: Path) -> None:
    split = CalvinSplit(calvin_dir / "training")
    policy = BlindPolicy.from_split(split)
    ann = split.annotations[0]
    frame = split.load_frame(ann.start + 3, ("robot_obs", "rel_actions"))
    np.testing.assert_allclose(policy.step({"robot_obs": frame["robot_obs"]}, ann.instruction), frame["rel_actions"])
    assert sorted(policy.instructions) == sorted({a.instruction for a in split.annotations})

    empty = tmp_path / "empty_split"
    shutil.copytree(calvin_dir / "training", empty)
    (empty / LANG_DIR / LANG_ANN_JSON).write_text(
        json.dumps({"language": {"ann": [], "task": [], "emb": []}, "info": {"episodes": [], "indx": []}})
    )
    with pytest.raises(VlaopsError, match=f"{empty}: no annotated demonstrations"):
        BlindPolicy.from_split(CalvinSplit(empty))


def test_blind_baseline_keyed_by_task_for_calvins_instructions(calvin_dir: Path) -> None:
    """eval.env=calvin instructs with CALVIN's validation phrasings: the lookup goes by the annotation's task."""
    split = CalvinSplit(calvin_dir / "training")
    ann = split.annotations[0]
    by_task = {ann.task: "an instruction no training annotation uses"}
    policy = BlindPolicy.from_split(split, by_task=by_task)
    assert policy.instructions == ["an instruction no training annotation uses"]
    frame = split.load_frame(ann.start + 3, ("robot_obs", "rel_actions"))
    action = policy.step({"robot_obs": frame["robot_obs"]}, "an instruction no training annotation uses")
    np.testing.assert_allclose(action, frame["rel_actions"])
    with pytest.raises(VlaopsError, match="no annotated demonstrations"):
        BlindPolicy.from_split(split, by_task={"open_drawer": "pull the handle to open the drawer"})
