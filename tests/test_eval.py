"""Evaluation beyond the chain bookkeeping: bootstrap intervals, ablations, reference policies and
chains spread over worker processes. Real simulator (PyBullet DIRECT, no rendering where no image is
read), real scripted expert; nothing mocked."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CONF

from vlaops.config import load_config
from vlaops.errors import VlaopsError
from vlaops.eval.ablation import AblatedPolicy, blank_images, swap_map
from vlaops.eval.chains import ChainResult, bootstrap_ci, figures, summary_table
from vlaops.eval.config import ABLATIONS, REFERENCES
from vlaops.eval.runner import AblatedFactory, ExpertFactory, run_chains
from vlaops.sim import TASKS, SimConfig, TabletopEnv, get_task, seeded_chains
from vlaops.utils.executor import map_ordered, resolve_workers


# --- bootstrap intervals --------------------------------------------------------------------------
def test_identical_chains_give_a_zero_width_interval() -> None:
    ci = bootstrap_ci([2] * 30, chain_length=5, resamples=200, seed=3)
    assert ci["avg_len"] == [2.0, 2.0]
    assert ci["sr_1"] == ci["sr_2"] == [1.0, 1.0] and ci["sr_3"] == ci["sr_5"] == [0.0, 0.0]


def test_two_chains_span_the_whole_range() -> None:
    # Resampling [0, 1] gives a mean of 0, 0.5 or 1 with probability 1/4, 1/2, 1/4: both tails hold far
    # more than 2.5 %, so the 95 % interval is [0, 1] exactly.
    assert bootstrap_ci([0, 1], chain_length=1, resamples=1000, seed=0)["sr_1"] == [0.0, 1.0]


def test_interval_matches_percentiles_of_the_seeded_resamples() -> None:
    completed = np.array([0, 1, 1, 0, 1, 1, 1, 0, 1, 1])  # SR_1 = 0.7
    ci = bootstrap_ci(completed, chain_length=2, resamples=500, confidence=0.9, seed=11)
    idx = np.random.default_rng(11).integers(0, 10, size=(500, 10))
    sr1 = (completed[idx] >= 1).mean(axis=1)
    assert ci["sr_1"] == pytest.approx(list(np.percentile(sr1, [5.0, 95.0])))
    assert ci["sr_1"][0] < 0.7 < ci["sr_1"][1] and ci["sr_2"] == [0.0, 0.0]
    assert ci["avg_len"] == ci["sr_1"]  # with chains of at most 1 done, Avg. Len is SR_1


def test_interval_width_agrees_with_the_binomial_standard_error() -> None:
    completed = np.array([0, 1] * 200)  # p = 0.5, n = 400: 1.96 * sqrt(p (1 - p) / n) = 0.049
    lo, hi = bootstrap_ci(completed, chain_length=1, resamples=2000, seed=1)["sr_1"]
    assert lo == pytest.approx(0.5 - 0.049, abs=0.012) and hi == pytest.approx(0.5 + 0.049, abs=0.012)


def test_figures_and_table_carry_every_interval() -> None:
    results = [ChainResult(seed=i, tasks=["a", "b"], completed=c) for i, c in enumerate([0, 1, 2, 2])]
    fig = figures(results, chain_length=2, resamples=100, seed=0)
    assert fig["avg_len"] == 1.25 and fig["sr_1"] == 0.75 and fig["sr_2"] == 0.5
    assert set(fig) == {"avg_len", "sr_1", "sr_2", "avg_len_ci", "sr_1_ci", "sr_2_ci"}
    assert fig["avg_len_ci"][0] <= 1.25 <= fig["avg_len_ci"][1]
    table = summary_table({"policy": fig, "reference/expert": fig}, chain_length=2).splitlines()
    assert table[0].split()[:5] == ["run", "Avg.", "Len", "[95%", "CI]"] and table[0].split()[5:] == ["SR_1", "SR_2"]
    assert table[2].split()[0] == "policy" and table[3].split()[-2:] == ["0.75", "0.50"]
    assert f"1.25 [{fig['avg_len_ci'][0]:.2f}, {fig['avg_len_ci'][1]:.2f}]" in table[2]


# --- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "eval.ablations=[blank_images,mute]",
            "eval.ablations: unknown value(s) ['mute']; allowed: blank_images, swap_instruction",
        ),
        ("eval.references=[oracle]", "eval.references: unknown value(s) ['oracle']; allowed: expert, blind"),
        ("eval.ablations=[blank_images,blank_images]", "eval.ablations: each value at most once"),
        ("eval.num_workers=-1", "eval.num_workers must be >= 0"),
        ("eval.confidence=1.5", "eval.confidence must be in (0, 1)"),
    ],
)
def test_config_rejects_bad_eval_values(override: str, message: str) -> None:
    with pytest.raises(VlaopsError) as err:
        load_config([override], CONF)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_defaults_run_every_ablation_and_reference() -> None:
    cfg = load_config([], CONF)
    assert tuple(cfg.eval.ablations) == ABLATIONS and tuple(cfg.eval.references) == REFERENCES
    assert cfg.eval.num_chains >= 50
    assert resolve_workers(None) == resolve_workers(0) >= 1 and resolve_workers(3) == 3


# --- ablations ------------------------------------------------------------------------------------
class Recorder:
    """Keeps what it was given, acts like a no-op."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict, str]] = []
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1

    def step(self, obs: dict, instruction: str) -> np.ndarray:
        self.seen.append((obs, instruction))
        return np.array([0, 0, 0, 0, 0, 0, 1.0])


@pytest.fixture(scope="module")
def rendered_obs() -> dict:
    with TabletopEnv(SimConfig(num_workers=1)) as env:
        return env.reset(5)


def _same(a, b) -> bool:
    return np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b


def test_blank_images_zeroes_both_cameras_and_nothing_else(rendered_obs: dict) -> None:
    assert rendered_obs["rgb_static"].any() and rendered_obs["rgb_gripper"].any()  # a real, rendered frame
    inner = Recorder()
    policy = AblatedPolicy(inner, "blank_images")
    policy.reset()
    policy.step(rendered_obs, "lift the red block")
    obs, instruction = inner.seen[0]
    assert instruction == "lift the red block" and inner.resets == 1
    for key in ("rgb_static", "rgb_gripper"):
        assert obs[key].shape == rendered_obs[key].shape and obs[key].dtype == np.uint8 and not obs[key].any()
        assert rendered_obs[key].any()  # the caller's observation is left as it was
    assert set(obs) == set(rendered_obs)
    assert all(_same(obs[k], rendered_obs[k]) for k in obs if k not in ("rgb_static", "rgb_gripper"))
    nested = blank_images({"rgb_obs": {"rgb_static": np.ones((4, 4, 3), np.uint8)}, "robot_obs": np.ones(15)})
    assert not nested["rgb_obs"]["rgb_static"].any() and nested["robot_obs"].all()  # CALVIN's layout too


def test_swap_instruction_gives_another_tasks_instruction_and_the_same_obs(rendered_obs: dict) -> None:
    instructions = {name: get_task(name).instruction for name in TASKS}
    swaps = swap_map(instructions)
    assert sorted(swaps) == sorted(swaps.values()) == sorted(instructions.values())  # a permutation
    assert all(a != b for a, b in swaps.items())  # never the task's own
    assert swap_map(instructions) == swaps  # and always the same one
    inner = Recorder()
    policy = AblatedPolicy(inner, "swap_instruction", instructions)
    for instruction in instructions.values():
        policy.step(rendered_obs, instruction)
    for (obs, given), original in zip(inner.seen, instructions.values(), strict=True):
        assert obs is rendered_obs and given != original and given in instructions.values()
    with pytest.raises(VlaopsError, match="at least 2 evaluated tasks"):
        AblatedPolicy(inner, "swap_instruction", {"lift_red": "lift the red block"})
    with pytest.raises(VlaopsError, match="not the instruction of an evaluated task"):
        policy.step(rendered_obs, "dance")
    with pytest.raises(VlaopsError, match="eval.ablations: unknown value 'mute'"):
        AblatedPolicy(inner, "mute")


# --- reference policies and workers ---------------------------------------------------------------
@pytest.fixture(scope="module")
def chains() -> list[tuple[int, list[str]]]:
    with TabletopEnv(SimConfig(num_workers=1), render=False) as env:
        return seeded_chains(env, list(TASKS), num_chains=4, length=2, seed=1000)


def test_expert_reference_completes_the_chains_on_any_number_of_workers(chains) -> None:
    cfg = SimConfig(num_workers=1)
    one = run_chains(ExpertFactory(), cfg, chains, max_steps=120, num_workers=1)
    two = run_chains(ExpertFactory(), cfg, chains, max_steps=120, num_workers=2)
    assert [r.completed for r in one] == [2, 2, 2, 2]
    assert [r.__dict__ for r in one] == [r.__dict__ for r in two]  # seeds, tasks, steps: all merged by index
    assert [r.seed for r in two] == [seed for seed, _ in chains]


def test_ablations_act_on_the_input_they_name(chains) -> None:
    """The expert reads the simulator's state, never a camera: blanking images changes nothing; it does
    follow the instruction, so another task's instruction makes it fail the chain's task."""
    cfg = SimConfig(num_workers=1)
    instructions = {name: get_task(name).instruction for name in TASKS}
    blank = AblatedFactory(ExpertFactory(), "blank_images", instructions)
    swap = AblatedFactory(ExpertFactory(), "swap_instruction", instructions)
    assert not blank.needs_images
    assert [r.completed for r in run_chains(blank, cfg, chains, 120, num_workers=2)] == [2, 2, 2, 2]
    assert [r.completed for r in run_chains(swap, cfg, chains, 120, num_workers=2)] == [0, 0, 0, 0]


def _square(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative {x}")
    return x * x


def test_executor_merges_by_index_and_reports_a_worker_failure() -> None:
    items = list(range(7, -1, -1))
    assert map_ordered(_square, items, 1) == map_ordered(_square, items, 3) == [x * x for x in items]
    with pytest.raises(ValueError, match="negative -1"):
        map_ordered(_square, [1, 2, -1, 3], 2)
