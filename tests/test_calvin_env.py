"""eval.env=calvin in CALVIN's own simulator: calvin_env's scene D, its Tasks oracle, CALVIN's chains.

calvin_env is an optional extra (docs/calvin.md): without it every test here is skipped, with the reason.
No camera is rendered except where a test says so (about 0.15 s a frame on a shared 2-core CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CONF, SHRINK_MODEL, path_overrides, tiny_config

from vlaops.cli import main
from vlaops.config import load_config
from vlaops.errors import VlaopsError
from vlaops.model.config import ModelConfig

pytest.importorskip("calvin_env", reason="calvin_env is not installed (pip install 'vlaops[calvin]', docs/calvin.md)")

from vlaops.eval.plan import check_policy, plan_chains  # noqa: E402
from vlaops.eval.runner import ExpertFactory, run_chains  # noqa: E402
from vlaops.sim.calvin.config import CalvinConfig  # noqa: E402
from vlaops.sim.calvin.env import CalvinEnv, check_sequences, to_calvin_action  # noqa: E402
from vlaops.sim.calvin.expert import EXPERT_TASKS, UNCOVERED, CalvinExpert  # noqa: E402
from vlaops.sim.calvin.instructions import instructions  # noqa: E402
from vlaops.sim.calvin.sequences import initial_state, load_sequences  # noqa: E402


@pytest.fixture(scope="module")
def env():
    with CalvinEnv(CalvinConfig(), render=False) as e:
        yield e


def test_reset_puts_the_scene_where_calvin_starts_the_chain(env):
    obs = env.reset(0)
    robot, scene = initial_state(load_sequences(1)[0][0])
    np.testing.assert_allclose(obs["scene_obs"][:6], scene[:6], atol=1e-3)  # slider, drawer, button, switch, lights
    for offset in (6, 12, 18):  # each block where CALVIN places it, at its yaw
        np.testing.assert_allclose(obs["scene_obs"][offset : offset + 3], scene[offset : offset + 3], atol=2e-3)
        assert abs(obs["scene_obs"][offset + 5] - scene[offset + 5]) < 1e-2
    np.testing.assert_allclose(obs["robot_obs"][7:14], robot[7:14], atol=1e-3)  # the arm's joints
    assert obs["rgb_obs"]["rgb_static"].shape == (200, 200, 3) and obs["rgb_obs"]["rgb_gripper"].shape == (84, 84, 3)
    assert not obs["rgb_obs"]["rgb_static"].any()  # render=False: black frames of CALVIN's shapes
    lights = env.get_info()["scene_info"]["lights"]  # sequence 0 starts with both lights on
    assert lights["lightbulb"]["logical_state"] == 1 and lights["led"]["logical_state"] == 1


def test_the_oracle_scores_a_pressed_button_and_nothing_else(env):
    env.reset(0)  # the LED is on
    start = env.get_info()
    off, on = env.get_task("turn_off_led"), env.get_task("turn_on_led")
    assert off.instruction == instructions()["turn_off_led"]
    assert not off.success(start, env.get_info())
    expert = CalvinExpert("turn_off_led", start)
    for _ in range(120):
        env.step(expert.act(env.get_info()))
        if off.success(start, env.get_info()):
            break
    assert off.success(start, env.get_info()) and not on.success(start, env.get_info())


def test_actions_reach_calvin_env_in_its_convention():
    np.testing.assert_array_equal(to_calvin_action([2, -3, 0.5, 0, 0, 0, 0.2]), [1, -1, 0.5, 0, 0, 0, 1])
    assert to_calvin_action(np.zeros(7))[-1] == 1.0 and to_calvin_action([0] * 6 + [-0.1])[-1] == -1.0
    with pytest.raises(ValueError, match="finite"):
        to_calvin_action([0] * 6)


def test_one_worker_or_two_the_expert_scores_the_same_chains(tmp_path):
    chains = [(i, list(tasks)) for i, (_, tasks) in enumerate(load_sequences(3))]
    cfg = CalvinConfig(max_steps_per_subtask=120)
    one = run_chains(ExpertFactory(), cfg, chains, 120, num_workers=1)
    two = run_chains(ExpertFactory(), cfg, chains, 120, num_workers=2)
    assert [(r.completed, r.steps) for r in one] == [(r.completed, r.steps) for r in two]
    for result, (_, tasks) in zip(one, chains):  # a chain ends at its first task the expert does not cover
        first_uncovered = next((i for i, t in enumerate(tasks) if t not in EXPERT_TASKS), len(tasks))
        assert result.completed <= first_uncovered


def test_refusals_come_in_one_line_before_any_chain(tmp_path):
    cfg = load_config([*path_overrides(tmp_path), "eval.env=calvin", "eval.num_chains=3"], CONF)
    assert [i for i, _ in plan_chains(cfg.eval, cfg.sim).chains] == [0, 1, 2]
    with pytest.raises(VlaopsError, match="mobile base"):
        check_policy(cfg.eval, tmp_path, ModelConfig(action_dim=4, action_classes=3))
    with pytest.raises(VlaopsError, match=r"sequence 7 names task\(s\) \['fly_away'\]"):
        check_sequences(cfg.eval.calvin, [(7, ["open_drawer", "fly_away"])])
    with pytest.raises(VlaopsError, match=f"covers 23 of CALVIN's 34 tasks, not '{UNCOVERED[0]}'"):
        CalvinExpert(UNCOVERED[0], {})
    with pytest.raises(VlaopsError, match="eval.env=calvin plays CALVIN.s own chains of 5"):
        load_config([*path_overrides(tmp_path), "eval.env=calvin", "eval.chain_length=2"], CONF)


@pytest.fixture
def calvin_policy_dir(tmp_path: Path, calvin_dir: Path) -> Path:
    """The tiny untrained policy, exported as train exports it, its tokenizer knowing CALVIN's instructions
    and its TCP read-out cut to what the synthetic demonstrations vary (y only)."""
    import torch

    from vlaops.config import to_container
    from vlaops.data.normalization import ActionNormalizer
    from vlaops.model import VLAPolicy, build_offline_processor, save_policy

    cfg = tiny_config(tmp_path, "model.aux_robot_dims=[1]")
    processor = build_offline_processor(
        list(instructions().values()), vocab_size=cfg.model.vocab_size, image_size=cfg.model.image_size
    )
    torch.manual_seed(0)
    policy = VLAPolicy.build(cfg.model, vocab_size=len(processor.tokenizer))
    normalizer = ActionNormalizer(cfg.data.norm_min, cfg.data.norm_max)
    extra = {"train_config": to_container(cfg)}
    return save_policy(tmp_path / "calvin_policy", policy, processor, normalizer, cfg.model, extra=extra)


def test_evaluate_plays_calvins_chains_in_calvin_env(tmp_path, calvin_policy_dir):
    """`vlaops evaluate eval.env=calvin`: the tiny policy, both ablations and the expert on CALVIN's first two
    sequences, three steps a subtask; CALVIN's results.json, vlaops' metrics and a video of CALVIN's scene."""
    code = main(
        [
            "evaluate",
            "--config-dir",
            str(CONF),
            *path_overrides(tmp_path),
            *SHRINK_MODEL,
            f"paths.model_dir={calvin_policy_dir}",
            "model.aux_robot_dims=[1]",
            "eval.env=calvin",
            "eval.num_chains=2",
            "eval.calvin.max_steps_per_subtask=3",
            "eval.references=[expert]",
            "eval.videos=1",
            "eval.num_workers=1",
            "eval.offline_batches=1",
        ]
    )
    assert code == 0
    reports = tmp_path / "reports"
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["env"] == "calvin" and metrics["num_chains"] == 2
    labels = {k for k in metrics if k.startswith(("ablation/", "reference/"))}
    assert labels == {"ablation/blank_images", "ablation/swap_instruction", "reference/expert"}
    results = json.loads((reports / "results.json").read_text())
    (entry,) = results.values()
    assert set(entry) == {"avg_seq_len", "chain_sr", "task_info"} and list(entry["chain_sr"]) == list("12345")
    chains = json.loads((reports / "chains.json").read_text())
    assert [c["seed"] for c in chains] == [0, 1]  # CALVIN's sequence indices
    assert [c["tasks"] for c in chains] == [list(t) for _, t in load_sequences(2)]
    index = json.loads((reports / "videos" / "index.json").read_text())
    assert len(index) == 1 and index[0]["same_as_scored"] and (reports / "videos" / index[0]["file"]).stat().st_size
    assert Path(reports / "plots").is_dir()
