"""Write ``reports/reliability.md``: each reliability guarantee, the tests that prove it, their last result.

    python tests/reliability_report.py                 # runs the tests below (slow ones too), then writes
    python tests/reliability_report.py --junit a.xml   # writes from an existing pytest --junitxml run

The table is made from a JUnit XML file that pytest wrote, never typed by hand: a guarantee whose test
failed, was skipped or did not run says so.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "reports" / "reliability.md"
R = "tests/test_reliability.py::"

# (guarantee, tests that prove it): a test id without parameters covers all its parametrisations
GUARANTEES: list[tuple[str, list[str]]] = [
    (
        "Exact resume: a train SIGKILLed after a checkpoint and rerun ends with torch.equal weights, the same "
        "MLflow run (FINISHED) and the same curve file bytes as an uninterrupted run",
        [
            f"{R}test_a_train_killed_after_a_checkpoint_resumes_to_the_same_bits",
            "tests/test_frame_cache.py::test_augmentation_stays_per_sample_on_cached_frames",
        ],
    ),
    (
        "Under `dvc repro` the checkpoints survive (no stage output, so DVC never deletes them: a killed train can "
        "resume)",
        ["tests/test_dvc_params.py::test_train_checkpoints_survive_dvc_so_a_killed_train_resumes"],
    ),
    (
        "SIGTERM and SIGINT end a stage like an error: exit 128+signal with one line, MLflow run KILLED, "
        "no temporaries, the previous output untouched",
        [
            f"{R}test_a_signalled_train_ends_killed_without_leftovers",
            f"{R}test_a_signalled_convert_keeps_the_old_output_and_no_temporary",
            f"{R}test_a_killed_ingest_keeps_the_old_output_and_the_rerun_matches_a_clean_run[15]",
            f"{R}test_a_killed_evaluate_keeps_the_old_reports_and_no_run_left_running",
            f"{R}test_a_signal_hidden_under_a_library_error_still_ends_the_stage_killed",
            "tests/test_atomic.py::test_a_failing_block_leaves_the_old_output_and_no_temporary",
        ],
    ),
    (
        "After SIGKILL the next run sweeps its output's stale temporaries (and logs it); a live writer's are kept; "
        "the rerun's output is byte-identical to a clean run's",
        [
            f"{R}test_after_sigkill_the_rerun_sweeps_the_stale_temporary_and_matches_a_clean_run",
            f"{R}test_a_killed_ingest_keeps_the_old_output_and_the_rerun_matches_a_clean_run[9]",
            f"{R}test_a_killed_evaluate_keeps_the_old_reports_and_no_run_left_running",
            "tests/test_atomic.py::test_a_live_writers_temporary_is_kept_a_dead_ones_is_swept",
        ],
    ),
    (
        "Only checkpoints vlaops wrote (manifest of sha256) are resumed unless train.trust_checkpoint; no "
        "pickled custom state is saved or loaded",
        ["tests/test_train.py::test_only_checkpoints_vlaops_wrote_are_resumed"],
    ),
    (
        "Concurrency: two trainings starting together on a fresh sqlite store both FINISH; a second trainer on a "
        "checkpoint directory is refused with one line naming the holder (pid, host)",
        [
            f"{R}test_two_trainings_starting_together_on_a_fresh_store_both_finish",
            f"{R}test_a_signalled_train_ends_killed_without_leftovers[15]",
        ],
    ),
    (
        "Validation before cost: output paths, inputs and the tracking store are checked first, the error names "
        "the config key and path; a truncated model.safetensors names the file; experiment=nosuch lists the options",
        ["tests/test_validation.py", "tests/test_model.py::test_a_truncated_weights_file_is_named"],
    ),
    (
        "Deterministic bytes: ingest's, convert's and normalize's outputs and the data fingerprint do not depend on "
        "where the data lives (each stage run into two directories, every byte compared); collect reruns to the same "
        "bytes; "
        "ingest's report, collect's summary and the exported policy hold no wall time",
        [
            "tests/test_convert.py::test_convert_bytes_do_not_depend_on_where_the_data_lives",
            "tests/test_ingest.py::test_reingest_is_byte_identical",
            "tests/test_sim.py::test_collect_writes_readable_bags",
            "tests/test_stages.py::test_export_holds_everything_policy_load_needs",
        ],
    ),
    (
        "Bad input: every recording of the broken-recording corpus is quarantined with its reason (or one line with "
        "on_bad_input=error), never a traceback, and the good episodes beside it are byte-identical",
        ["tests/test_ingest_corpus.py"],
    ),
    (
        "Permissions: outputs get the user's umask permissions, not the temporaries' 0700/0600",
        [
            "tests/test_atomic.py::test_outputs_get_the_umask_permissions_not_the_temporaries",
            "tests/test_frame_cache.py::test_cache_gets_the_umask_permissions",
        ],
    ),
]


def _case_id(case: ET.Element) -> str:
    """A JUnit testcase as a pytest node id: ``tests.test_x`` + ``test_y[p]`` -> ``tests/test_x.py::test_y[p]``."""
    return f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name', '')}"


def _outcome(case: ET.Element) -> str:
    """passed | skipped | FAILED: <the first line of pytest's message> | ERROR: <...>"""
    for tag, word in (("failure", "FAILED"), ("error", "ERROR"), ("skipped", "skipped")):
        found = case.find(tag)
        if found is not None:
            why = (found.get("message") or "").strip().splitlines()
            if not why or word == "skipped":
                return word
            line = why[0] if len(why[0]) <= 160 else f"{why[0][:70]} ... {why[0][-70:]}"  # head and tail
            return f"{word}: {line.replace('|', '/')}"
    return "passed"


def results(junit: Path) -> dict[str, tuple[str, float]]:
    """node id -> (outcome, seconds) for every testcase of a pytest JUnit XML file."""
    root = ET.parse(junit).getroot()
    return {_case_id(c): (_outcome(c), float(c.get("time", 0.0))) for c in root.iter("testcase")}


def _matches(test: str, node: str) -> bool:
    return node == test or node.startswith(test + "[") or (test.endswith(".py") and node.startswith(test + "::"))


def render(found: dict[str, tuple[str, float]], when: str) -> str:
    lines = [
        "# Reliability: what vlaops guarantees, and the test that proves each",
        "",
        f"Written by `python tests/reliability_report.py` from the pytest run of {when}. The tests use real",
        "subprocesses, signals, files and MLflow sqlite stores, no mocks.",
        "",
        "| guarantee | test | last result |",
        "|---|---|---|",
    ]
    for guarantee, tests in GUARANTEES:
        for i, test in enumerate(tests):
            nodes = sorted(n for n in found if _matches(test, n))
            if not nodes:
                result = "not run"
            else:
                outcomes = [found[n][0] for n in nodes]
                worst = next((o for w in ("FAILED", "ERROR", "skipped") for o in outcomes if o.startswith(w)), "passed")
                seconds = sum(found[n][1] for n in nodes)
                result = f"{worst} ({len(nodes)} case{'s' if len(nodes) > 1 else ''}, {seconds:.0f} s)"
            lines.append(f"| {guarantee if i == 0 else ''} | `{test}` | {result} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--junit", type=Path, nargs="*", help="pytest --junitxml files to read instead of running the tests"
    )
    args = parser.parse_args(argv)
    junits = args.junit
    if not junits:
        junit = ROOT / "reports" / "reliability.xml"
        junit.parent.mkdir(parents=True, exist_ok=True)
        tests = sorted({t for _, ts in GUARANTEES for t in ts})
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *tests], cwd=ROOT
        )
        junits = [junit]
    found: dict[str, tuple[str, float]] = {}
    for junit in junits:
        found.update(results(junit))
    stamps = sorted(
        datetime.datetime.fromtimestamp(j.stat().st_mtime, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        for j in junits
    )
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(render(found, ", ".join(stamps)))
    print(f"wrote {REPORT}")
    failed = [n for n, (o, _) in found.items() if o.startswith(("FAILED", "ERROR"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
