"""bench/ingest.py at a tiny size: it records its bags, measures both sides and writes its report.

No timing is asserted (the figures are the bench's to report, on whatever machine runs it); the test
keeps the script runnable and its JSON in the shape README and the lead's re-runs read.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "ingest.py"


@pytest.mark.slow  # heavier integration check: the quick loop (-m 'not slow') stays under 5 minutes
def test_ingest_bench_runs_at_a_tiny_size_and_writes_its_report(tmp_path):
    help_text = subprocess.run(
        [sys.executable, str(BENCH), "--help"], cwd=tmp_path, check=True, capture_output=True, text=True
    ).stdout
    assert "--bags" in help_text and "--frames" in help_text

    out = tmp_path / "ingest.json"
    run = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--bags",
            "2",
            "--frames",
            "20",
            "--scenes",
            "1",
            "--repeats",
            "1",
            "--workers",
            "1,2",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ratio" in run.stdout and f"wrote {out}" in run.stdout
    result = json.loads(out.read_text())

    assert result["benchmark"] == "ingest"
    assert result["processes"] == [1, 2]
    assert result["recordings"]["bags"] == 2 and result["recordings"]["frames"] == 40
    assert result["ingest_summary"]["episodes"] == 2 and result["ingest_summary"]["quarantined"] == {}
    assert result["recordings"]["action_messages"] == 40  # the floor read every tick ingest wrote
    assert result["same_output_bytes_across_processes"] is True
    for key in ("frames_per_s", "frames_per_cpu_s"):
        for side in ("floor", "vlaops"):
            assert set(result[key][side]) == {"1", "2"}
            assert set(result[key][side]["1"]) == {"min", "median", "max"}
    for key in ("ratio_vlaops_to_floor", "ratio_vlaops_to_floor_cpu"):
        assert set(result[key]) == {"1", "2"} and result[key]["1"]["median"] > 0
    assert set(result["meets_goal"]) == {"1", "2"} and result["goal"] == 0.5
    assert all(len(result["raw"][side][n]) == 1 for side in ("floor", "vlaops") for n in ("1", "2"))
    machine = result["machine"]
    assert machine["cpu"] and machine["cpu_count"] >= 1 and len(machine["load_average_start"]) == 3
