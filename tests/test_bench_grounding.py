"""bench/grounding.py: the closest-approach measure tells a policy that goes to the instructed block from one
that goes to another, and the script runs and writes its report (the expert as the policy)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vlaops.eval.reference import ExpertPolicy
from vlaops.sim import SimConfig, TabletopEnv, get_task, seeded_chains

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "grounding.py"


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("grounding_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class WrongBlock:
    """The expert, told to lift another block than the one instructed: an ungrounded but able policy."""

    def __init__(self, env: TabletopEnv, other: str) -> None:
        self.expert, self.instruction = ExpertPolicy(env), get_task(f"lift_{other}").instruction

    def reset(self) -> None:
        self.expert.reset()

    def step(self, obs: dict[str, Any], instruction: str) -> np.ndarray:
        return self.expert.step(obs, self.instruction)


@pytest.fixture(scope="module")
def env():
    with TabletopEnv(SimConfig(), render=False) as e:
        yield e


def test_the_expert_comes_closest_to_the_instructed_block_and_a_wrong_block_policy_does_not(env) -> None:
    bench = _bench()
    chains = seeded_chains(env, SimConfig().tasks, 3, 5, 1000)
    right = [bench.approach(env, ExpertPolicy(env), seed, tasks[0], 90) for seed, tasks in chains]
    assert all(r["success"] and r["came_closest_to"] == r["block"] for r in right), right
    # a lift closes on the block's centre, a push stands off behind it (fingertips against its face)
    assert all(r["closest_cm"][r["block"]] < (2.0 if r["task"].startswith("lift") else 7.0) for r in right), right
    wrong = []
    for seed, tasks in chains:
        block = right[len(wrong)]["block"]
        other = next(b for b in ("red", "green", "blue") if b != block)
        wrong.append(bench.approach(env, WrongBlock(env, other), seed, tasks[0], 90))
    assert all(not r["success"] and r["came_closest_to"] != r["block"] for r in wrong), wrong
    summary = bench.summarise(right + wrong)
    assert summary["came_closest_to_instructed"] == 0.5 and summary["chance"] == pytest.approx(1 / 3, abs=1e-3)
    assert summary["success"] == 0.5


@pytest.mark.slow  # a subprocess with the config stack: the quick loop keeps the in-process check above
def test_grounding_bench_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "grounding.json"
    run = subprocess.run(
        [sys.executable, str(BENCH), "--expert", "--chains", "2", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["policy"] == "expert" and report["summary"]["episodes"] == 2
    assert report["summary"]["came_closest_to_instructed"] == 1.0
    assert "came closest to the instructed block" in run.stdout
