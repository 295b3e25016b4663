"""bench/lookup_probe.py: the probe's targets are the block the instruction names, the others and the TCP,
taken on each span's first frames only, and an instruction naming no block (or two) is refused."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vlaops.errors import VlaopsError
from vlaops.io.calvin import CalvinSplit
from vlaops.model import PolicyRuntime

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench() -> Any:
    sys.path.insert(0, str(BENCH))  # as when run as a script: it imports perception_probe beside it
    try:
        spec = importlib.util.spec_from_file_location("lookup_probe_bench", BENCH / "lookup_probe.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_named_block_finds_the_one_colour_word() -> None:
    bench = _bench()
    assert [bench.named_block(t) for t in ("push the red block to the left", "Lift the BLUE block.", "green")] == [
        0,
        1,
        2,
    ]
    for text, n in (("lift the block", 0), ("put red on green", 2), ("lift the reddish block", 0)):
        with pytest.raises(VlaopsError, match=f"names {n} of the blocks"):
            bench.named_block(text)


@pytest.mark.slow  # seconds: the full suite only (the quick loop stays under 5 minutes)
def test_the_targets_are_the_named_block_the_others_and_the_tcp_on_the_first_frames(
    calvin_dir, tiny_policy_dir
) -> None:
    bench = _bench()
    split = CalvinSplit(calvin_dir / "training")
    tokens, targets = bench.features(PolicyRuntime.load(tiny_policy_dir), split, frames=2)
    assert tokens.shape == (2 * len(split.annotations), PolicyRuntime.load(tiny_policy_dir).model.backbone.hidden_size)
    for k, ann in enumerate(split.annotations):
        first = split.load_frame(ann.start, ("scene_obs", "robot_obs"))
        named = 0 if "red" in ann.instruction else 1  # the test bags: push the red block / lift the blue block
        others = [o for o in range(3) if o != named]
        row = 2 * k  # each span's first frame
        np.testing.assert_array_equal(targets["named_block"][row], first["scene_obs"][6 + 6 * named : 8 + 6 * named])
        np.testing.assert_array_equal(
            targets["other_block_1"][row], first["scene_obs"][6 + 6 * others[0] : 8 + 6 * others[0]]
        )
        np.testing.assert_array_equal(
            targets["other_block_2"][row], first["scene_obs"][6 + 6 * others[1] : 8 + 6 * others[1]]
        )
        np.testing.assert_array_equal(targets["tcp"][row], first["robot_obs"][:2])
