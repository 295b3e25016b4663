"""Sweeps (`vlaops train -m`, src/vlaops/sweep.py) on tiny data: a grid and an Optuna search, each job an
MLflow run nested under the sweep's parent run, which keeps the best; bad sweeps stop before any job;
and the `dvc exp run --queue -S` grid docs/experiments.md documents, in a temp copy of the repo."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import CONF, SHRINK_MODEL, SHRINK_PIPELINE, path_overrides, tiny_config

from vlaops import sweep, tracking
from vlaops.cli import main

# conftest's shrink, two training steps per job (one validation, one checkpoint)
TINY = [*SHRINK_MODEL, *SHRINK_PIPELINE, "train.max_steps=2", "tracking.system_metrics=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Four synthetic recordings, ingested, converted and normalised once for the module (as conftest's
    calvin_dir), under the paths of path_overrides."""
    from bagfactory import write_arm_bag

    from vlaops.data.action_stats import normalize
    from vlaops.data.convert import convert
    from vlaops.data.ingest import ingest

    tmp = tmp_path_factory.mktemp("sweep_data")
    cfg = tiny_config(tmp)
    for i in range(4):
        write_arm_bag(
            tmp / "raw" / f"ep{i}",
            n_frames=20,
            seed=i,
            storage="mcap" if i % 2 else "sqlite3",
            instruction="push the red block to the left" if i % 2 else "lift the blue block",
        )
    ingest(Path(cfg.data.raw_dir), Path(cfg.data.episodes_dir), cfg.data)
    convert(Path(cfg.data.episodes_dir), Path(cfg.data.calvin_dir), cfg.data)
    normalize(Path(cfg.data.calvin_dir), Path(cfg.data.normalized_dir), cfg.data)
    return tmp


def _sweep(data: Path, out: Path, *extra: str) -> int:
    """``vlaops train -m`` on the module's data, the jobs in ``out/multirun``, the runs in ``out/mlflow.db``."""
    return main(
        [
            "train",
            "-m",
            "--config-dir",
            str(CONF),
            *path_overrides(data),
            *TINY,
            f"tracking.uri=sqlite:///{out}/mlflow.db",
            f"hydra.sweep.dir={out}/multirun",
            *extra,
        ]
    )


def _runs(out: Path) -> tuple[mlflow.MlflowClient, object, list]:
    """(client, the sweep's parent run, its child runs by job number)."""
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    (exp,) = [e for e in client.search_experiments() if e.name == "vlaops"]
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = sorted(
        (r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
        key=lambda r: int(r.data.tags["sweep.job"]),
    )
    assert len(children) == len(runs) - 1  # every other run is a child of the sweep's
    return client, parent, children


@pytest.fixture(scope="module")
def grid(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grid")
    assert _sweep(data, out, "train.learning_rate=1e-3,3e-3") == 0
    return out


@pytest.mark.slow  # heavier integration check: the quick loop (-m 'not slow') stays under 5 minutes
def test_a_grid_is_one_nested_run_per_setting_and_the_parent_keeps_the_best(grid):
    client, parent, children = _runs(grid)
    assert [c.data.params["train.learning_rate"] for c in children] == ["0.001", "0.003"]
    assert [c.data.tags["sweep.settings"] for c in children] == [
        "train.learning_rate=0.001",
        "train.learning_rate=0.003",
    ]
    assert all(r.info.status == "FINISHED" for r in (parent, *children))
    assert parent.data.tags["sweep.sweeper"] == "basic" and parent.data.tags["sweep.swept"] == "train.learning_rate"
    assert "train.learning_rate=1e-3,3e-3" in parent.data.tags["sweep.overrides"]
    losses = [c.data.metrics[tracking.VAL_LOSS] for c in children]
    best = min(range(2), key=losses.__getitem__)
    assert parent.data.metrics[tracking.BEST_VAL_LOSS] == min(losses)
    assert parent.data.tags["best.run_id"] == children[best].info.run_id
    assert parent.data.tags["best.settings"] == children[best].data.tags["sweep.settings"]
    history = client.get_metric_history(parent.info.run_id, tracking.SWEEP_VAL_LOSS)
    assert sorted((m.step, m.value) for m in history) == [(0, losses[0]), (1, losses[1])]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")} == {
        "sweep/sweep.json",
        "sweep/multirun.yaml",
    }
    # every job logged its policy, only the best one is registered
    (version,) = client.search_model_versions("name='vlaops-policy'")
    assert version.run_id == children[best].info.run_id and parent.data.tags["best.registered_version"] == str(
        version.version
    )


@pytest.mark.slow  # heavier integration check: the quick loop (-m 'not slow') stays under 5 minutes
def test_each_job_writes_under_its_own_directory(grid, data):
    for job, lr in ((0, 0.001), (1, 0.003)):
        job_dir = grid / "multirun" / str(job)
        exported = json.loads((job_dir / "models" / "policy" / "train_config.json").read_text())
        assert exported["train"]["learning_rate"] == lr
        assert (job_dir / "models" / "checkpoints" / "step_0000002").is_dir()
        assert (job_dir / "reports" / "train_curve.csv").is_file()
        assert f"train.learning_rate={lr}" in yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
    assert (
        not (data / "models").exists() and not (data / "reports").exists()
    )  # paths.* of the command line: per job instead
    summary = json.loads((grid / "multirun" / sweep.SUMMARY_FILE).read_text())
    assert [j["settings"] for j in summary["jobs"]] == [["train.learning_rate=0.001"], ["train.learning_rate=0.003"]]
    assert summary["best"] == min(summary["jobs"], key=lambda j: j[tracking.VAL_LOSS])


@pytest.mark.slow  # heavier integration check: the quick loop (-m 'not slow') stays under 5 minutes
def test_a_failed_job_fails_the_sweep_and_keeps_the_jobs_that_finished(data, tmp_path):
    """The stage of job #1 raises: the sweep stops with that error, job #1's run and the parent end FAILED,
    job #0's run stays FINISHED and the parent still holds it as the best (nothing registered). The stage
    is a stand-in that opens its run as train does, so no model is trained."""
    from vlaops.errors import VlaopsError

    def stage(name: str, cfg) -> None:
        with tracking.run(cfg.tracking, tags={"stage": name}) as run:
            if cfg.train.learning_rate == 0.003:
                raise VlaopsError("train.learning_rate=0.003: the loss diverged")
            tracking.log_metrics(run, {tracking.VAL_LOSS: 0.5}, step=2)
            model_dir = Path(cfg.paths.model_dir)
            model_dir.mkdir(parents=True)
            (model_dir / sweep.TRAIN_RESULT_FILE).write_text(json.dumps({"last_val_loss": 0.5}))
            (model_dir / tracking.RUN_FILE).write_text(json.dumps({"run_id": tracking.active_run_id(run)}))

    overrides = [
        *path_overrides(data),
        *TINY,
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"hydra.sweep.dir={tmp_path}/multirun",
        "train.learning_rate=1e-3,3e-3",
    ]
    with pytest.raises(VlaopsError, match="the loss diverged"):
        sweep.run_sweep("train", overrides, CONF, stage)
    client, parent, children = _runs(tmp_path)
    assert [c.info.status for c in children] == ["FINISHED", "FAILED"] and parent.info.status == "FAILED"
    assert (
        parent.data.metrics[tracking.BEST_VAL_LOSS] == 0.5
        and parent.data.tags["best.run_id"] == children[0].info.run_id
    )
    assert client.search_model_versions("name='vlaops-policy'") == []
    summary = json.loads((tmp_path / "multirun" / sweep.SUMMARY_FILE).read_text())
    assert [j["job"] for j in summary["jobs"]] == [0] and summary["best"]["job"] == 0


@pytest.mark.parametrize(
    ("sweep_args", "named"),
    [
        (["train.lerning_rate=1e-3,3e-3"], "config key 'train.lerning_rate' does not exist"),
        (["train.batch_size=2,many"], "train.batch_size=many"),
        (["train.learning_rate=1e-3,,3e-3"], "Error parsing override 'train.learning_rate=1e-3,,3e-3'"),
        (["train.learning_rate=interval(1e-4,1e-2)"], "does not support sweep type"),
        pytest.param(  # Optuna's import and study alone take seconds: in make test, out of the quick loop
            ["hparams_search=train_lr", "train.batch_size=2", "train.warmup_ratio=interval(0,2)"],
            "train.warmup_ratio=2",
            marks=pytest.mark.slow,
        ),
        (["tracking.experiment_name=a,b"], "tracking.experiment_name=a,b: tracking.* cannot be swept"),
    ],
)
def test_a_bad_sweep_is_one_line_and_runs_nothing(data, tmp_path, capsys, sweep_args, named):
    assert _sweep(data, tmp_path, *sweep_args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vlaops train: error: ") and named in err[0], err
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "mlflow.db").exists()


def test_help_lists_the_searches(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help", "--config-dir", str(CONF)])
    out = capsys.readouterr().out
    assert "hparams_search: train_lr" in out and "-m, --multirun" in out


def test_only_train_sweeps(capsys):
    assert main(["evaluate", "-m", "--config-dir", str(CONF), "eval.num_chains=2,4"]) == 1
    assert "-m sweeps train only" in capsys.readouterr().err


@pytest.mark.slow  # heavier integration check: the quick loop (-m 'not slow') stays under 5 minutes
def test_an_optuna_search_is_seeded_and_nests_its_trials(data, tmp_path):
    """conf/hparams_search/train_lr.yaml through hydra-optuna-sweeper: two trials (the batch size fixed
    on the command line, so the learning rate alone is searched), drawn by the seeded TPE sampler."""
    import optuna
    from optuna.distributions import LogUniformDistribution

    assert _sweep(data, tmp_path, "hparams_search=train_lr", "hydra.sweeper.n_trials=2", "train.batch_size=2") == 0
    _, parent, children = _runs(tmp_path)
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in (parent, *children))
    assert parent.data.tags["sweep.sweeper"] == "optuna" and parent.data.tags["sweep.swept"] == "train.learning_rate"
    # the trials the plugin asks a TPESampler(seed=0, n_startup_trials=4) for: the same every time
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=4))
    expected = []
    for _ in range(2):
        trial = study.ask()
        expected.append(trial._suggest("train.learning_rate", LogUniformDistribution(1e-4, 1e-2)))
        study.tell(trial, 1.0)
    assert [float(c.data.params["train.learning_rate"]) for c in children] == pytest.approx(expected)
    assert all(c.data.params["train.batch_size"] == "2" for c in children)
    losses = [c.data.metrics[tracking.VAL_LOSS] for c in children]
    assert parent.data.metrics[tracking.BEST_VAL_LOSS] == min(losses)
    results = yaml.safe_load((tmp_path / "multirun" / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(min(losses))


# ---- the DVC queue grid of docs/experiments.md ------------------------------------------------------
def _queued(repo: Path) -> dict[str, dict]:
    """`dvc exp show --json`: experiment name -> {"state", "learning_rate", "metrics"}."""
    from test_e2e import _run

    rows = json.loads(_run(["dvc", "exp", "show", "--json"], repo, stdout_only=True))
    out = {}
    for row in rows:
        for exp in row.get("experiments") or []:
            data = exp["revs"][0]["data"]
            out[exp["name"]] = {
                "state": (exp.get("executor") or {}).get("state"),
                "learning_rate": data["params"]["params.yaml"]["data"]["train"]["learning_rate"],
                "metrics": data.get("metrics", {}),
            }
    return out


@pytest.mark.slow  # heavier integration check: the quick loop (-m 'not slow') stays under 5 minutes
def test_a_dvc_queue_grid_holds_one_experiment_per_setting(tmp_path):
    from test_e2e import _run, make_repo

    repo = make_repo(tmp_path / "repo")
    out = _run(["dvc", "exp", "run", "--queue", "-S", "train.learning_rate=3e-4,3e-3"], repo)
    assert out.count("Queued experiment") == 2
    status = _run(["dvc", "queue", "status"], repo)
    assert status.count("Queued") == 2
    queued = _queued(repo)
    assert sorted(e["learning_rate"] for e in queued.values()) == [0.0003, 0.003]
    assert {e["state"] for e in queued.values()} == {"queued"}


@pytest.mark.slow
def test_a_dvc_queue_grid_runs_and_each_experiment_is_an_mlflow_run(tmp_path):
    """The whole recipe of docs/experiments.md: a baseline `dvc repro`, the grid queued, `dvc queue start`, then both
    experiments in `dvc exp show` with their metrics and in the project's MLflow store (queued experiments
    run in copies under .dvc/tmp/exps and log to the parent repository's store)."""
    from test_e2e import _run, make_repo, run_env

    repo = make_repo(tmp_path / "repo")
    _run(["dvc", "repro"], repo)
    # neither value is the baseline's 1e-3: that experiment would change no stage, and DVC would run nothing
    _run(["dvc", "exp", "run", "--queue", "-S", "train.learning_rate=3e-4,3e-3"], repo)
    # `dvc queue start` returns once its worker runs, but the worker inherits its stdout and stderr and holds
    # them until the queue is empty: into a file, not a pipe that a capturing run would wait on to close
    log = tmp_path / "queue_start.log"
    with log.open("w") as out:
        start = subprocess.run(
            ["dvc", "queue", "start", "-j", "1"],
            cwd=repo,
            env=run_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    assert start.returncode == 0, log.read_text()
    # polled through `dvc queue status`: `dvc exp show` can fail while a queued experiment's copy is being made
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        if not re.search(r"\b(Queued|Running)\b", _run(["dvc", "queue", "status"], repo)):
            break
        time.sleep(5)
    queued = _queued(repo)
    assert {e["state"] for e in queued.values()} == {"success"}, _run(["dvc", "queue", "status"], repo)
    assert sorted(e["learning_rate"] for e in queued.values()) == [0.0003, 0.003]
    assert all({"avg_len", "sr_1"} <= set(e["metrics"]["reports/metrics.json"]["data"]) for e in queued.values())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "vlaops"]
    runs = {r.data.tags.get("dvc.exp_name"): r for r in client.search_runs([experiment.experiment_id])}
    assert set(queued) <= set(runs)
    assert {runs[name].data.params["train.learning_rate"] for name in queued} == {"0.0003", "0.003"}
