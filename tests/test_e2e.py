"""The README's promise, in a temp copy of the repo: `dvc repro` runs the whole pipeline, a second
`dvc repro` does nothing, a fresh clone with nothing pulled compares its own run with main's committed
numbers (`dvc metrics diff main`, `dvc plots diff main`, `dvc exp show`), `dvc exp run -S train...`
re-runs only train and evaluate, leaving one MLflow run per experiment, and a clone pulls what was pushed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import SHRINK_MODEL, SHRINK_PIPELINE, SHRINK_PRETRAIN, conf_file_updates

ROOT = Path(__file__).resolve().parents[1]

# `dvc exp run` commits experiments; a CI machine may have no git identity configured
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "vlaops test",
    "GIT_AUTHOR_EMAIL": "test@vlaops.local",
    "GIT_COMMITTER_NAME": "vlaops test",
    "GIT_COMMITTER_EMAIL": "test@vlaops.local",
}

# conftest's shrink, written into conf/ of the copy (what `vlaops params` and `dvc exp run` compose);
# two demos per task instead of three and five steps per subtask keep the three dvc runs short.
# The policy fine-tunes the shrunk pretrained tiny Kosmos-2 that the pipeline's own `pretrain` writes.
SHRINK = conf_file_updates(
    [
        *(o for o in SHRINK_MODEL if not o.startswith("model.pretrained_dir=")),
        *SHRINK_PRETRAIN,
        *SHRINK_PIPELINE,
        "sim.episodes_per_task=2",
        "eval.max_steps_per_subtask=5",
    ]
)


def _merge(base: dict, update: dict) -> dict:
    for k, v in update.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


def run_env() -> dict[str, str]:
    """The environment the CLI commands of these tests run in: this venv's tools first, a git identity, no
    MLflow store from outside (each repository logs to its own)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **GIT_IDENTITY}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _run(cmd: list[str], cwd: Path, stdout_only: bool = False) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=run_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout if stdout_only else proc.stdout + proc.stderr


def make_repo(repo: Path) -> Path:
    """The project's files (tracked, and untracked but not ignored) copied into ``repo``, conf/ shrunk,
    params.yaml composed, committed to a fresh git repository: a DVC project to run experiments in."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in listed:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    for name, update in SHRINK.items():
        path = repo / name
        path.write_text(yaml.safe_dump(_merge(yaml.safe_load(path.read_text()), update), sort_keys=False))
    _run(["vlaops", "params"], repo)
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        _run(cmd, repo)
    return repo


@pytest.mark.slow
def test_dvc_repro_then_experiment(tmp_path):
    repo = make_repo(tmp_path / "repo")

    out = _run(["dvc", "repro"], repo)
    for stage in ("pretrain", "collect", "ingest", "convert", "normalize", "train", "evaluate"):
        assert f"Running stage '{stage}'" in out
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert {"avg_len", "sr_1", "sr_2"} <= set(metrics)

    again = _run(["dvc", "repro"], repo)
    assert "Running stage" not in again

    # the small reports are git's (cache: false): committed with dvc.lock, as main's are
    small = [
        f"reports/{name}"
        for name in ("metrics.json", "results.json", "collect.json", "pretrain.json", "train_curve.csv")
    ]
    _run(["git", "add", "dvc.lock", *small, "reports/plots"], repo)
    _run(["git", "commit", "-qm", "dvc.lock and reports of the first repro"], repo)
    assert _run(["git", "status", "--porcelain", "--untracked-files=no"], repo, stdout_only=True) == ""
    _compare_with_main_in_a_fresh_clone(repo, tmp_path / "fresh", metrics)

    # the outputs pushed to the default remote (.dvc/config: ../vlaops-dvc-remote beside the
    # repository): another clone pulls data, policy and metrics without running anything
    assert (tmp_path / "vlaops-dvc-remote").resolve() == (repo / ".dvc" / "../../vlaops-dvc-remote").resolve()
    _run(["dvc", "push"], repo)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    _run(["dvc", "pull"], clone)
    assert (clone / "reports" / "metrics.json").read_bytes() == (repo / "reports" / "metrics.json").read_bytes()
    assert (clone / "models" / "policy" / "model.safetensors").read_bytes() == (
        repo / "models" / "policy" / "model.safetensors"
    ).read_bytes()
    pulled = _run(["dvc", "repro", "--dry"], clone)  # pulled outputs match dvc.lock: nothing to run
    assert "Running stage" not in pulled, pulled[-2000:]
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], clone, stdout_only=True))
    assert "avg_len" in json.dumps(shown)
    _run(["dvc", "metrics", "diff", "HEAD"], clone)

    exp = _run(["dvc", "exp", "run", "-S", "train.max_steps=6"], repo)
    ran = {
        s
        for s in ("pretrain", "collect", "ingest", "convert", "normalize", "train", "evaluate")
        if f"Running stage '{s}'" in exp
    }
    assert ran == {"train", "evaluate"}, exp[-2000:]

    # the experiment's metrics come back from its git ref (cache: false), main's from main's commit
    (baseline,) = [
        row
        for row in json.loads(_run(["dvc", "exp", "show", "--json"], repo, stdout_only=True))
        if row.get("experiments")
    ]
    (shown,) = [e["revs"][0] for e in baseline["experiments"]]
    assert shown["data"]["params"]["params.yaml"]["data"]["train"]["max_steps"] == 6
    assert {"avg_len", "sr_1", "sr_2"} <= set(shown["data"]["metrics"]["reports/metrics.json"]["data"])

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "vlaops"]
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'train'")
    # the pretrain stage ran once (the experiment reused its output): its run is beside the two policies'
    assert len(client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'pretrain'")) == 1
    assert sorted(r.data.params["train.max_steps"] for r in runs) == ["4", "6"]
    assert all("eval/avg_len" in r.data.metrics and "train/loss" in r.data.metrics for r in runs)
    (exp_run,) = [r for r in runs if r.data.params["train.max_steps"] == "6"]
    assert exp_run.info.run_name == exp_run.data.tags["dvc.exp_name"] == shown["name"]  # one label in both UIs
    assert len({r.info.run_name for r in runs}) == 2


def _compare_with_main_in_a_fresh_clone(repo: Path, fresh: Path, committed: dict) -> None:
    """A clone with nothing pulled (its default remote does not even exist) runs the pipeline itself, then
    sees main's committed numbers beside its own in all three of DVC's comparisons."""
    _run(["git", "clone", "-q", str(repo), str(fresh)], repo.parent)
    assert not (repo.parent / "vlaops-dvc-remote").exists()
    out = _run(["dvc", "repro"], fresh)  # everything runs: nothing was pulled
    assert "Running stage 'collect'" in out and "Running stage 'evaluate'" in out

    diff = _run(["dvc", "metrics", "diff", "main", "--all", "--json"], fresh, stdout_only=True)
    changes = json.loads(diff)["reports/metrics.json"]
    for key in ("avg_len", "sr_1"):
        assert changes[key]["old"] == committed[key], changes[key]
        assert changes[key]["new"] is not None, changes[key]
    table = _run(["dvc", "metrics", "diff", "main", "--all"], fresh)
    assert "failed to load" not in table and "avg_len" in table

    plots = _run(["dvc", "plots", "diff", "main", "-o", str(fresh / "plots_html")], fresh)
    assert "failed to load" not in plots, plots
    page = (fresh / "plots_html" / "index.html").read_text()
    for name in ("loss.png", "sr_by_chain_length.png"):
        assert page.count(name) >= 2, f"{name}: main's image and the workspace's expected in {page[:2000]}"

    rows = json.loads(_run(["dvc", "exp", "show", "--json"], fresh, stdout_only=True))
    (head,) = [row for row in rows if row["rev"] != "workspace"]
    shown = head["data"]["metrics"]["reports/metrics.json"]["data"]
    assert {k: shown[k] for k in ("avg_len", "sr_1")} == {k: committed[k] for k in ("avg_len", "sr_1")}
    assert "error" not in head["data"]["metrics"]["reports/metrics.json"]
