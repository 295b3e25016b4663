"""bench/lift_precision.py: a grasp moved off the block by a known amount is measured as that far off and
fails past the lift's tolerance; the script writes its report (the expert, no rendering)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np

from vlaops.eval.reference import ExpertPolicy
from vlaops.sim import SimConfig, TabletopEnv

BENCH = Path(__file__).resolve().parents[1] / "bench" / "lift_precision.py"


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("lift_precision_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_grasp_error_is_the_offset_and_a_wide_miss_fails() -> None:
    bench = _bench()
    with TabletopEnv(SimConfig(), render=False) as env:
        exact = bench.lift(env, ExpertPolicy(env), 5000, "lift_red", 90)
        assert exact["success"] and exact["grasp"]["xy_cm"] < 0.5 and exact["grasp"]["yaw_deg"] < 2
        off = bench.lift(env, bench.OffsetGrasp(env, np.array([0.0, 0.06]), 0.0), 5000, "lift_red", 90)
        assert not off["success"] and 5.0 < off["grasp"]["xy_cm"] < 7.0
        turned = bench.lift(env, bench.OffsetGrasp(env, np.zeros(2), np.radians(30)), 5001, "lift_green", 90)
        assert 25 < turned["grasp"]["yaw_deg"] < 35
    summary = bench.summarise([exact, off, turned, {**off, "grasp": None}])
    assert summary["success"] == 1 + turned["success"] and summary["never_closed"] == 1
    assert summary["median_xy_cm"]["failure"] == off["grasp"]["xy_cm"]


def test_the_expert_tolerance_report_is_written(tmp_path: Path) -> None:
    out = tmp_path / "lift.json"
    _bench().main(["--expert", "--offsets", "0:0,0:6", "--episodes", "2", "--out", str(out)])
    report = json.loads(out.read_text())
    assert [(r["xy_off_cm"], r["success"]) for r in report["tolerance"]] == [(0.0, 2), (6.0, 0)]
