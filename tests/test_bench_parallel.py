"""bench/parallel.py at a tiny size, local pool only: it times chains and ingest on 1 and 2 workers, the
per-task overhead, checks the outputs agree and writes its report.

No timing is asserted (the figures are the bench's to report); the test keeps the script runnable and its
JSON in the shape README and the lead's re-runs read. Ray's rows are measured where Ray is installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "parallel.py"


@pytest.mark.slow  # heavier integration check: the quick loop (-m 'not slow') stays under 5 minutes
def test_parallel_bench_runs_at_a_tiny_size_and_writes_its_report(tmp_path):
    out = tmp_path / "parallel.json"
    run = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--chains",
            "2",
            "--steps",
            "3",
            "--bags",
            "2",
            "--frames",
            "20",
            "--tasks",
            "4",
            "--repeats",
            "1",
            "--no-ray",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 vs 1 local workers, chains" in run.stdout and f"wrote {out}" in run.stdout
    result = json.loads(out.read_text())

    assert result["benchmark"] == "parallel"
    assert set(result["chains"]["per_min"]) == set(result["ingest"]["per_min"]) == {"local-1", "local-2"}
    assert result["chains"]["same_results"] is True and result["ingest"]["same_output_bytes"] is True
    assert (
        result["chains"]["steps_per_chain"] == 3
    )  # an untrained policy plays every chain's first subtask to its limit
    assert set(result["scaling_2_vs_1_local"]) == {"chains", "ingest"}
    cpu = result["ingest"]["cpu_seconds_median"]  # the split that says why 2 workers give less than 2x
    assert set(cpu) == {"local-1", "local-2"} and all(set(c) == {"main", "workers"} for c in cpu.values())
    assert cpu["local-1"]["main"] > 0  # one worker runs in this process
    assert cpu["local-2"]["workers"] > 0
    assert set(result["per_task_overhead_2_workers"]["local-2"]) == {"startup_s", "4_tasks_s", "per_task_ms"}
    assert set(result["projection_calvin_1000_chains"]["hours_by_workers"]) == {"1", "2", "8", "32", "128"}
    assert {"load_average_start", "uptime_start"} <= set(result["machine"])
