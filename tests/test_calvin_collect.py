"""collect with sim.env=calvin: the scripted CALVIN expert recorded along chains in calvin_env's scene D as
ROS2 bags that ingest reads unchanged. The recording tests need calvin_env (skipped with the reason without
it); the settings' refusals and the action arithmetic do not."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import CONF, path_overrides

from vlaops.data.config import DataConfig
from vlaops.data.ingest import ingest
from vlaops.io.calvin import rel_actions_from_abs
from vlaops.io.episode import read_episode
from vlaops.sim.calvin.instructions import training_instructions
from vlaops.sim.calvin.record import abs_action, choose_task
from vlaops.sim.calvin.sequences import TASK_CATEGORIES, initial_conditions
from vlaops.sim.config import SimConfig

needs_calvin = pytest.mark.skipif(
    importlib.util.find_spec("calvin_env") is None,
    reason="calvin_env is not installed (pip install 'vlaops[calvin]', docs/calvin.md)",
)
TASKS = ["turn_on_led", "turn_off_led", "open_drawer", "close_drawer"]


def test_calvin_tasks_must_be_ones_the_expert_covers():
    assert SimConfig(env="calvin", tasks=TASKS).calvin.scene == "calvin_scene_D"
    with pytest.raises(ValueError, match=r"does not cover \['unstack_block'\]"):
        SimConfig(env="calvin", tasks=["turn_on_led", "unstack_block"])
    with pytest.raises(ValueError, match=r"unknown calvin task\(s\) \['lift_red'\]"):
        SimConfig(env="calvin", tasks=["lift_red"])
    with pytest.raises(ValueError, match=r"unknown tabletop task\(s\) \['open_drawer'\]"):
        SimConfig(tasks=["open_drawer"])
    with pytest.raises(ValueError, match="sim.env must be one of"):
        SimConfig(env="mujoco")


def test_the_recorded_absolute_action_gives_back_the_expert_action():
    rng = np.random.default_rng(0)
    robot_obs = np.concatenate([[0.1, -0.2, 0.55, 3.1, -0.03, 1.5], rng.uniform(-1, 1, 9)])
    for _ in range(20):
        rel = np.concatenate([rng.uniform(-0.64, 0.64, 6), [rng.choice([-1.0, 1.0])]])
        back = rel_actions_from_abs(abs_action(robot_obs, rel)[None], robot_obs[None])[0]
        np.testing.assert_allclose(back, rel, atol=1e-9)


def test_a_chain_goes_for_the_wanted_tasks_and_never_repeats_a_category():
    state = next(c for c in initial_conditions() if c["led"] == 0 and c["drawer"] == "closed")
    rng = np.random.default_rng(0)
    assert choose_task(state, TASKS, set(), {"open_drawer"}, rng) == "open_drawer"
    # nothing wanted is feasible now, but a lift makes the wanted place feasible: the lift is chosen
    tasks = ["lift_red_block_table", "lift_blue_block_table", "lift_pink_block_table", "turn_on_led", "place_in_drawer"]
    opened = dict(state, drawer="open")
    on_table = [b for b in ("red", "blue", "pink") if opened[f"{b}_block"] == "table"]
    assert choose_task(opened, tasks, set(), {"place_in_drawer"}, rng) in {f"lift_{b}_block_table" for b in on_table}
    assert (
        choose_task(state, TASKS, {TASK_CATEGORIES["turn_on_led"], TASK_CATEGORIES["open_drawer"]}, set(), rng) is None
    )


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    from vlaops.sim.calvin.record import collect

    out = tmp_path_factory.mktemp("calvin_bags")
    cfg = SimConfig(env="calvin", tasks=TASKS, episodes_per_task=1, max_attempts_per_task=10, num_workers=1)
    return cfg, out, collect(cfg, out, round_size=2)


@needs_calvin
def test_collect_records_every_task_along_chains(recorded):
    cfg, out, summary = recorded
    assert summary["simulator"] == "calvin_env calvin_scene_D"
    assert set(summary["tasks"]) == set(TASKS)
    for task, row in summary["tasks"].items():
        assert row["successes"] >= 1 and row["successes"] <= row["attempts"], task
    bags = sorted(p.name for p in out.iterdir())
    assert bags == summary["episodes"]
    assert sum(r["successes"] for r in summary["tasks"].values()) == len(bags)
    later = [b for b in bags if not b.endswith("_0")]
    assert later, "no chain recorded a second subtask"
    custom = yaml.safe_load((out / later[0] / "metadata.yaml").read_text())["rosbag2_bagfile_information"][
        "custom_data"
    ]
    assert custom["simulator"] == "calvin_env calvin_scene_D"
    assert custom["staged_after"] in TASKS and custom["task"] == later[0].rsplit("_", 2)[0]


@needs_calvin
def test_ingest_reads_the_calvin_bags_and_later_subtasks_start_where_the_chain_is(recorded, tmp_path):
    cfg, out, summary = recorded
    report = ingest(out, tmp_path / "episodes", DataConfig())
    assert sorted(report["episodes"]) == summary["episodes"] and report["quarantined"] == []
    episodes = {p.stem: read_episode(p) for p in sorted((tmp_path / "episodes").glob("*.h5"))}
    for name, ep in episodes.items():
        assert ep.scene_obs.shape == (len(ep), 24) and ep.rgb_static.shape[1:] == (200, 200, 3)
        assert ep.rgb_gripper.shape[1:] == (84, 84, 3)
        assert ep.instruction in training_instructions()[ep.task], name
        assert np.all(np.abs(rel_actions_from_abs(ep.action_abs, ep.robot_obs)[:, :6]) <= 0.64 + 1e-6)
    # a chain's second subtask starts from the state its first left: the LED on after turn_on_led, ...
    effects = {"turn_on_led": (5, 1.0), "turn_off_led": (5, 0.0), "open_drawer": (1, None), "close_drawer": (1, None)}
    for name, ep in episodes.items():
        task, chain, k = name.rsplit("_", 2)
        if k == "0":
            continue
        before = next(n for n in episodes if n.startswith(tuple(TASKS)) and n.endswith(f"_{chain}_{int(k) - 1}"))
        index, value = effects[episodes[before].task]
        first, last_before = ep.scene_obs[0, index], episodes[before].scene_obs[-1, index]
        if value is None:  # the drawer moved by more than the oracle's 12 cm, and stays where it was left
            assert abs(first - episodes[before].scene_obs[0, index]) > 0.12
        else:
            assert first == value and last_before != value


@needs_calvin
def test_a_chain_records_the_same_bytes_again(recorded, tmp_path):
    from vlaops.sim.calvin.record import record_chain

    cfg, out, summary = recorded
    entries = record_chain(cfg, 0, frozenset(TASKS), tmp_path)
    names = [e["episode"] for e in entries if e["success"]]
    assert names and all(n in summary["episodes"] for n in names)

    def digest(bag: Path) -> str:
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(bag.iterdir()))).hexdigest()

    assert {n: digest(tmp_path / n) for n in names} == {n: digest(out / n) for n in names}


@needs_calvin
def test_the_collect_stage_records_calvin_with_one_override(tmp_path):
    from vlaops.cli import main

    overrides = ["sim.env=calvin", "sim.tasks=[turn_on_led]", "sim.episodes_per_task=1", "sim.max_attempts_per_task=8"]
    assert main(["collect", "--config-dir", str(CONF), *path_overrides(tmp_path), *overrides]) == 0
    summary = json.loads((tmp_path / "reports" / "collect.json").read_text())
    assert summary["tasks"]["turn_on_led"]["successes"] >= 1
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == summary["episodes"]


@needs_calvin
def test_a_demonstration_whose_tcp_jumps_is_not_recorded():
    """A glitch of the physics (the TCP 11 cm away in one tick) makes a bag ingest refuses: the recorder drops it."""
    from vlaops.sim.calvin.config import CalvinConfig
    from vlaops.sim.calvin.env import CalvinEnv
    from vlaops.sim.calvin.record import record_subtask
    from vlaops.sim.calvin.sequences import INITIAL_ROBOT_OBS, initial_state
    from vlaops.sim.record import EpisodeRecord

    class GlitchingEnv(CalvinEnv):
        ticks = 0

        def step(self, action):
            out = super().step(action)
            self.ticks += 1
            if self.ticks == 3:  # the arm swung about its base: the TCP lands far from where it was
                far = np.array(INITIAL_ROBOT_OBS)
                far[7] += 0.6
                return self.reset_to(far, self.observe()["scene_obs"])
            return out

    cfg = SimConfig(env="calvin", tasks=["turn_on_led"])
    condition = next(c for c in initial_conditions() if c["led"] == 0)
    with GlitchingEnv(CalvinConfig()) as env:
        env.reset_to(*initial_state(condition))
        rec = EpisodeRecord("turn_on_led_0000_0", "turn_on_led", "press the button", 0, 0)
        assert record_subtask(env, cfg, "turn_on_led", rec) is False
        assert len(rec.frames) == 3
