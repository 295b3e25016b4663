"""The benchmarks run, and what they compare is the same computation (never their timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_policy_step_cache_acts_like_re_encoding_the_window(tmp_path):
    out = tmp_path / "policy_step.json"
    small = ["model.image_size=64", "model.tiny.patch_size=16", "model.window_size=3", "model.lstm_num_layers=1"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "policy_step.py"), "--steps", "6", "--episodes", "2", "--out", str(out), *small],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["steps"] == 12 and result["window_size"] == 3
    assert result["max_action_difference"] < 1e-5  # past the window fill too: steps 4..6 drop frames
    assert result["baseline_ms_per_step"] > 0 and result["speedup"] > 0
