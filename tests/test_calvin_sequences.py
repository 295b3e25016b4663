"""CALVIN's 1000 evaluation chains and their initial scenes, as vlaops keeps and reproduces them.

The committed ``eval_sequences.json`` was written from mees/calvin's own ``get_sequences`` by
scripts/calvin_sequences.py; these tests hold vlaops' sampler to it (the whole list in the slow test, a
sample of the initial states and the shuffle here), and the scene seeds to pyhash's FNV-1 rules.
Set VLAOPS_CALVIN_REPO to a mees/calvin checkout to compare with CALVIN's code itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vlaops.errors import VlaopsError
from vlaops.sim.calvin import sequences
from vlaops.sim.calvin.instructions import instructions, training_instructions

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "calvin_sequences.py"
FIRST = (
    {
        "led": 1,
        "lightbulb": 1,
        "slider": "left",
        "drawer": "open",
        "red_block": "slider_left",
        "blue_block": "table",
        "pink_block": "slider_right",
        "grasped": 0,
    },
    ("rotate_blue_block_right", "move_slider_right", "lift_red_block_slider", "place_in_slider", "turn_off_lightbulb"),
)


def test_the_committed_chains_start_as_calvins_do() -> None:
    pairs = sequences.load_sequences()
    assert len(pairs) == 1000
    assert pairs[0] == FIRST  # CALVIN's first chain, as its own get_sequences(1000) returns it
    assert list(pairs[0][0]) == list(sequences.CONDITION_VALUES)  # the key order the scene seed hashes
    for cond, tasks in pairs:
        assert sequences.feasible(cond, tasks)


def test_the_committed_chains_are_what_the_sampler_draws_for_each_state() -> None:
    """Undo CALVIN's shuffle, then redraw the chains of a spread of initial states and compare."""
    pairs = sequences.load_sequences()
    states = sequences.initial_conditions()
    assert len(states) == 192
    order = sequences.shuffle_order(len(pairs))
    unshuffled = [None] * len(pairs)
    for k, i in enumerate(order):
        unshuffled[i] = pairs[k]
    start = 0
    for index, (state, count) in enumerate(zip(states, sequences.shares(1000, len(states)), strict=True)):
        block = unshuffled[start : start + count]
        assert all(cond == state for cond, _ in block), f"state {index}"
        if index % 24 == 0:
            assert [tasks for _, tasks in block] == sequences.chains_for_state(state, count, index)
        start += count
    assert start == 1000


@pytest.mark.slow
def test_the_sampler_reproduces_the_committed_file() -> None:
    assert sequences.sample_sequences(1000) == sequences.load_sequences()


def test_fnv1_32_follows_pyhash() -> None:
    assert sequences.fnv1_32(b"hello world") == 2805756500  # pyhash's README vector
    assert sequences.fnv1_32(b"") == 0  # seed 0, not the offset basis
    assert sequences.fnv1_32("ab") == sequences.fnv1_32(b"a\x00b\x00")  # a str as UTF-16-LE, no BOM
    assert sequences.fnv1_32(b"\x01", seed=1) == (1 * 16777619) ^ 1


def test_initial_state_places_the_blocks_as_the_condition_says() -> None:
    cond = FIRST[0]
    robot, scene = sequences.initial_state(cond)
    assert robot.shape == (15,) and scene.shape == (24,)
    assert scene[0] == sequences.SLIDER_OPEN_LEFT and scene[1] == sequences.DRAWER_OPEN
    assert scene[3] == sequences.SWITCH_ON and scene[4] == 1 and scene[5] == 1
    np.testing.assert_array_equal(scene[6:9], sequences.SLIDER_LEFT_POS)  # red
    np.testing.assert_array_equal(scene[18:21], sequences.SLIDER_RIGHT_POS)  # pink
    assert tuple(scene[12:15]) in sequences.TABLE_POSITIONS  # blue, on one of the two table places
    for yaw in scene[[11, 17, 23]]:
        assert sequences.BLOCK_YAW_RANGE[0] <= yaw <= sequences.BLOCK_YAW_RANGE[1]
    again = sequences.initial_state(dict(cond))
    np.testing.assert_array_equal(again[1], scene)  # the same chain, the same scene
    both = dict(cond, red_block="table", pink_block="slider_left")
    _, scene2 = sequences.initial_state(both)
    assert {tuple(scene2[6:9]), tuple(scene2[12:15])} == set(sequences.TABLE_POSITIONS)


def test_load_sequences_refuses_more_than_calvin_has() -> None:
    assert len(sequences.load_sequences(3)) == 3
    with pytest.raises(VlaopsError, match="1000 evaluation sequences"):
        sequences.load_sequences(1001)


def test_parse_names_the_bad_entry() -> None:
    doc = sequences.sequences_document([FIRST], "x")
    doc["sequences"][0][1][2] = "fly_away"
    with pytest.raises(VlaopsError, match=r"bad\.json: sequences\[0\].*fly_away"):
        sequences.parse_sequences(doc, "bad.json")


def test_every_task_has_an_instruction() -> None:
    assert set(instructions()) == sequences.TASKS
    assert len(set(instructions().values())) == 34
    assert instructions()["open_drawer"] == "pull the handle to open the drawer"


def test_every_task_has_training_annotations_that_are_not_the_evaluations() -> None:
    training = training_instructions()
    assert set(training) == sequences.TASKS
    assert sum(len(texts) for texts in training.values()) == 389  # new_playtable.yaml at fa03f01
    assert "open the drawer" in training["open_drawer"]
    for task, texts in training.items():  # the evaluation instructs with a phrasing training never saw
        assert instructions()[task] not in texts, task


def test_write_then_parse_round_trips(tmp_path: Path) -> None:
    pairs = sequences.load_sequences(5)
    sequences.write_sequences(tmp_path / "s.json", pairs, "test")
    assert sequences.parse_sequences(json.loads((tmp_path / "s.json").read_text()), "s.json") == pairs


@pytest.mark.skipif(
    not os.environ.get("VLAOPS_CALVIN_REPO"), reason="VLAOPS_CALVIN_REPO (a mees/calvin checkout) not set"
)
def test_calvins_own_code_writes_the_committed_files() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--calvin", os.environ["VLAOPS_CALVIN_REPO"], "--check"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
