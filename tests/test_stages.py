"""Every stage through the CLI on tiny data, with a real MLflow sqlite store: what `dvc repro` runs."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import CONF, SHRINK_MODEL, SHRINK_PIPELINE, path_overrides

from vlaops import plots, tracking
from vlaops.cli import main
from vlaops.errors import VlaopsError


def _stage(name: str, tmp_path: Path, *extra: str) -> int:
    return main([name, "--config-dir", str(CONF), *path_overrides(tmp_path), *SHRINK_MODEL, *SHRINK_PIPELINE, *extra])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("pipeline")
    with pytest.MonkeyPatch.context() as mp:  # system metrics sampled often enough for a short training
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
        for stage in ("collect", "ingest", "convert", "normalize", "train", "evaluate"):
            assert _stage(stage, tmp_path) == 0, stage
    return tmp_path


@pytest.mark.slow  # the module fixture runs the whole pipeline through the CLI (47 s): out of the quick loop
def test_collect_reports_expert_success(pipeline):
    summary = json.loads((pipeline / "reports" / "collect.json").read_text())
    assert set(summary["tasks"]) == {"push_red_left", "lift_blue", "place_blue"}
    assert all(v["successes"] == 3 for v in summary["tasks"].values())
    assert sorted(p.name for p in (pipeline / "raw").iterdir()) == [
        "lift_blue_0000",
        "lift_blue_0001",
        "lift_blue_0002",
        "place_blue_0000",
        "place_blue_0001",
        "place_blue_0002",
        "push_red_left_0000",
        "push_red_left_0001",
        "push_red_left_0002",
    ]


@pytest.mark.slow  # the module fixture runs the whole pipeline through the CLI (47 s): out of the quick loop
def test_ingest_keeps_the_sim_task_names(pipeline):
    report = json.loads((pipeline / "episodes" / "ingest_report.json").read_text())
    assert {e["task"] for e in report["episodes"].values()} == {"push_red_left", "lift_blue", "place_blue"}


@pytest.mark.slow  # the module fixture runs the whole pipeline through the CLI (47 s): out of the quick loop
def test_export_holds_everything_policy_load_needs(pipeline):
    from vlaops.model import PolicyRuntime

    export = pipeline / "models" / "policy"
    cfg = json.loads((export / "train_config.json").read_text())
    assert cfg["train"]["max_steps"] == 4 and cfg["model"]["window_size"] == 3
    assert json.loads((export / "data_fingerprint.json").read_text())["calvin"]
    result = json.loads((export / "train_result.json").read_text())
    assert result["steps"] == 4 and not {"wall_time_s", "steps_per_s"} & set(result)  # a DVC output: no wall time
    policy = PolicyRuntime.load(export)
    assert policy.cfg.fwd_pred_next_n == 4


@pytest.mark.slow  # the module fixture runs the whole pipeline through the CLI (47 s): out of the quick loop
def test_metrics_and_results_follow_calvin(pipeline):
    metrics = json.loads((pipeline / "reports" / "metrics.json").read_text())
    assert {"avg_len", "sr_1", "sr_2", "offline", "task_sr", "subtask_sr"} <= set(metrics)
    assert set(metrics["subtask_sr"]) == {"first", "later"} and 0.0 <= metrics["subtask_sr"]["first"] <= 1.0
    assert 0.0 <= metrics["avg_len"] <= 2 and metrics["num_chains"] == 2
    assert {"arm_mae", "gripper_accuracy", "baseline_arm_mae", "baseline_gripper_accuracy"} <= set(metrics["offline"])
    figure_keys = {"avg_len", "sr_1", "sr_2", "avg_len_ci", "sr_1_ci", "sr_2_ci"}
    assert figure_keys <= set(metrics) and metrics["avg_len_ci"][0] <= metrics["avg_len"] <= metrics["avg_len_ci"][1]
    # each ablation and reference under its one label, as in the log and MLflow
    others = {k for k in metrics if k.startswith(("ablation/", "reference/"))}
    assert others == {"ablation/blank_images", "ablation/swap_instruction", "reference/expert", "reference/blind"}
    assert all(set(metrics[label]) == figure_keys for label in others)
    results = json.loads((pipeline / "reports" / "results.json").read_text())
    (entry,) = results.values()
    assert set(entry) == {"avg_seq_len", "chain_sr", "task_info"} and set(entry["chain_sr"]) == {"1", "2"}
    curve = (pipeline / "reports" / "train_curve.csv").read_text().splitlines()
    assert curve[0] == "step,train_loss,val_loss,lr" and len(curve) == 3  # steps 2 and 4


@pytest.mark.slow  # the module fixture runs the whole pipeline through the CLI (47 s): out of the quick loop
def test_one_mlflow_run_holds_training_and_evaluation(pipeline):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{pipeline}/mlflow.db")
    (exp,) = [e for e in client.search_experiments() if e.name == "vlaops"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "4" and run.data.params["model.window_size"] == "3"
    assert {"train/loss", "val/loss", "eval/avg_len", "eval/sr_1", "eval/sr_2", "offline/arm_mae"} <= set(
        run.data.metrics
    )
    assert {
        "eval/avg_len_ci_low",
        "eval/sr_2_ci_high",
        "ablation/blank_images/avg_len",
        "ablation/swap_instruction/sr_1_ci_low",
        "reference/expert/sr_2",
        "eval_time_s/policy",
        "eval_time_s/ablation/blank_images",
    } <= set(run.data.metrics)
    assert {"reference/expert/avg_len_ci_high", "reference/blind/avg_len_ci_high"} <= set(run.data.metrics)
    # MLflow's chart view: one section per prefix; every metric has one (none in the catch-all section)
    sections = {m.rsplit("/", 1)[0] for m in run.data.metrics if "/" in m and not m.startswith("system/")}
    assert {"eval", "ablation/blank_images", "reference/blind"} <= sections
    assert not [m for m in run.data.metrics if "/" not in m]
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 2
    assert run.data.tags["data_fingerprint"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "train_config.json", "metrics.json", "plots"} <= artifacts
    logged = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "plots")}
    assert logged == {*plots.TRAIN_PLOTS, *plots.EVAL_PLOTS}
    assert all((pipeline / "reports" / plots.PLOTS_DIR / name).stat().st_size > 10_000 for name in logged)
    assert {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "videos")} == {
        "chain_000.gif",
        "chain_001.gif",
    }
    # artifacts beside the store, not in ./mlruns of whatever the working directory was
    assert exp.artifact_location == (pipeline / tracking.ARTIFACTS_DIR).as_uri()
    assert (pipeline / tracking.ARTIFACTS_DIR / run.info.run_id / "artifacts" / "results.json").is_file()
    # counts and settings are params or tags, true measurements are metrics
    assert int(run.data.params["params_trainable"]) > 0 and not any(m.startswith("params") for m in run.data.metrics)
    assert "num_chains" not in run.data.metrics and run.data.tags["eval.num_chains"] == "2"
    assert (
        run.data.tags["final/steps"] == "4"
        and "final/steps" not in run.data.metrics
        and "final/best_val_loss" in run.data.metrics
    )
    assert len(run.data.tags.get("mlflow.source.git.commit", "")) == 40  # the tests run in a git checkout
    assert any(m.startswith("system/cpu_utilization") for m in run.data.metrics)
    # the splits as MLflow datasets: name, digest, source and the vlaops fingerprint
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"calvin/training", "calvin/validation"}
    training = inputs["calvin/training"]
    assert {t.key: t.value for t in training.tags}["mlflow.data.context"] == "training"
    assert {t.key: t.value for t in training.tags}["vlaops.data_fingerprint"] == run.data.tags["data_fingerprint"]
    assert training.dataset.digest != inputs["calvin/validation"].dataset.digest
    assert str(pipeline / "calvin" / "training") in training.dataset.source


@pytest.mark.slow  # the module fixture runs the whole pipeline through the CLI (47 s): out of the quick loop
def test_rollout_videos_show_the_scored_chains(pipeline):
    """The first eval.videos chains as GIFs: one frame per 2 control steps of the chain that was scored
    (the replay gives the same steps), with a caption band under the static camera."""
    from PIL import Image

    index = json.loads((pipeline / "reports" / "videos" / "index.json").read_text())
    chains = json.loads((pipeline / "reports" / "chains.json").read_text())
    assert [v["file"] for v in index] == ["chain_000.gif", "chain_001.gif"]
    for video, chain in zip(index, chains):
        assert video["same_as_scored"] and (video["seed"], video["steps"], video["completed"]) == (
            chain["seed"],
            chain["steps"],
            chain["completed"],
        )
        with Image.open(pipeline / "reports" / "videos" / video["file"]) as gif:
            assert gif.format == "GIF" and gif.n_frames == (sum(chain["steps"]) + 1) // 2
            assert gif.size == (200, 236)
            frames = []
            for i in (0, gif.n_frames - 1):
                gif.seek(i)
                frames.append(np.asarray(gif.convert("RGB")))
            assert frames[0][:200].std() > 5  # the camera, not a blank frame
            assert (frames[0][200:] < 128).any()  # the caption is written


@pytest.mark.slow  # the module fixture runs the whole pipeline through the CLI (47 s): out of the quick loop
def test_the_policy_is_a_registered_mlflow_model(pipeline):
    """train logs the export as a pyfunc (as code, no pickle) with a signature and an input example and
    registers it; its predict over an episode equals PolicyRuntime.step frame by frame, bit for bit."""
    import pandas as pd

    from vlaops.io.calvin import VALIDATION, CalvinSplit
    from vlaops.model import PolicyRuntime, mlflow_model

    uri = f"sqlite:///{pipeline}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    (version,) = client.search_model_versions("name='vlaops-policy'")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments() if e.name == "vlaops"])
    assert version.run_id == run.info.run_id
    assert version.tags["avg_len"] == f"{run.data.metrics['eval/avg_len']:.4f}"  # evaluate tagged the version
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(f"models:/vlaops-policy/{version.version}")
    finally:  # MLflow's URIs are process-global: leave them as they were for the tests after this one
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    assert [c.name for c in model.metadata.signature.inputs.inputs] == ["instruction", "rgb_static", "rgb_gripper"]
    split = CalvinSplit(pipeline / "calvin" / VALIDATION)
    ann = split.annotations[0]
    frames = [split.load_frame(i, ("rgb_static", "rgb_gripper")) for i in range(ann.start, ann.start + 4)]
    table = pd.DataFrame(
        [
            {
                "instruction": ann.instruction,
                "rgb_static": mlflow_model.png_bytes(f["rgb_static"]),
                "rgb_gripper": mlflow_model.png_bytes(f["rgb_gripper"]),
            }
            for f in frames
        ]
    )
    served = model.predict(table)
    runtime = PolicyRuntime.load(pipeline / "models" / "policy")
    runtime.reset()
    direct = np.stack([runtime.step(f, ann.instruction) for f in frames])
    assert list(served.columns) == list(mlflow_model.ARM_ACTION_COLUMNS)
    np.testing.assert_array_equal(served.to_numpy(), direct)


@pytest.mark.slow  # the module fixture runs the whole pipeline through the CLI (47 s): out of the quick loop
def test_evaluate_takes_a_registered_model(pipeline, tmp_path, capsys):
    """paths.model_dir=models:/<name>/<version> evaluates the registered policy; a version that does not
    exist is one line naming it."""
    reports = tmp_path / "reports"
    store = f"tracking.uri=sqlite:///{pipeline}/mlflow.db"
    assert (
        _stage(
            "evaluate",
            pipeline,
            "paths.model_dir=models:/vlaops-policy/1",
            f"paths.reports_dir={reports}",
            store,
            "eval.ablations=[]",
            "eval.references=[]",
            "eval.videos=0",
        )
        == 0
    )
    results = json.loads((reports / "results.json").read_text())
    assert list(results) == ["models:/vlaops-policy/1"]
    assert results == {
        "models:/vlaops-policy/1": json.loads((pipeline / "reports" / "results.json").read_text()).popitem()[1]
    }
    capsys.readouterr()
    assert (
        _stage("evaluate", pipeline, "paths.model_dir=models:/vlaops-policy/7", f"paths.reports_dir={reports}", store)
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "models:/vlaops-policy/7" in err[0] and "no such registered policy" in err[0]


def test_the_store_is_the_project_roots(tmp_path, monkeypatch):
    """A relative sqlite store is the project root's: $DVC_ROOT (DVC points it at the parent repository for a
    queued or --temp experiment), else the nearest directory holding dvc.yaml, whatever the working directory."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path / "sub" / "deeper")
    cfg = tracking.TrackingConfig()
    assert tracking.tracking_uri(cfg) == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking.artifact_root(cfg) == (tmp_path / "mlartifacts").as_uri()
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "sub"))
    assert (
        tracking.tracking_uri(tracking.TrackingConfig(uri="sqlite:///runs/m.db?timeout=5"))
        == f"sqlite:///{tmp_path}/sub/runs/m.db?timeout=5"
    )
    assert tracking.tracking_uri(tracking.TrackingConfig(uri="sqlite:////abs/m.db")) == "sqlite:////abs/m.db"
    assert tracking.artifact_root(tracking.TrackingConfig(uri="http://127.0.0.1:5000")) is None


def test_runs_are_named_after_the_dvc_experiment(monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    assert tracking.default_run_name().startswith("run-") and tracking.dvc_tags() == {}
    monkeypatch.setenv("DVC_EXP_NAME", "lofty-arch")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    assert tracking.default_run_name() == "lofty-arch"
    assert tracking.dvc_tags() == {"dvc.exp_name": "lofty-arch", "dvc.baseline_rev": "abc123"}


@pytest.mark.slow  # the module fixture runs the whole pipeline through the CLI (47 s): out of the quick loop
def test_checkpoints_of_another_recipe_are_refused(pipeline, capsys):
    assert _stage("train", pipeline, "train.learning_rate=0.0005") == 1
    err = capsys.readouterr().err
    assert "models/checkpoints: holds checkpoints of a different run" in err and "learning_rate" in err


def test_under_dvc_another_recipe_sets_the_checkpoints_aside(tmp_path, monkeypatch):
    """Under DVC the checkpoints persist (a killed train resumes), so ``dvc exp run -S`` with other params
    must start afresh: the other recipe's checkpoints move to previous/ rather than stopping the run."""
    from vlaops.train.checkpoint import PREVIOUS_DIR, RUN_CONFIG_FILE, guard_checkpoints

    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    guard_checkpoints(ckpt, {"config": {"train": {"learning_rate": 1e-3}}})
    (ckpt / "step_0000010").mkdir()
    (ckpt / "step_0000010" / "trainer_state.json").write_text("{}")
    other = {"config": {"train": {"learning_rate": 5e-4}}}
    with pytest.raises(VlaopsError, match="holds checkpoints of a different run"):
        guard_checkpoints(ckpt, other)
    assert (ckpt / "step_0000010").is_dir()  # refused: nothing moved
    guard_checkpoints(ckpt, other, set_aside=True)
    assert (
        not (ckpt / "step_0000010").exists() and (ckpt / PREVIOUS_DIR / "step_0000010" / "trainer_state.json").is_file()
    )
    assert json.loads((ckpt / RUN_CONFIG_FILE).read_text()) == other
    assert json.loads((ckpt / PREVIOUS_DIR / RUN_CONFIG_FILE).read_text())["config"]["train"]["learning_rate"] == 1e-3


@pytest.mark.slow  # the module fixture runs the whole pipeline through the CLI (47 s): out of the quick loop
def test_evaluate_refuses_a_checkpoint_of_another_window(pipeline, capsys):
    assert _stage("evaluate", pipeline, "model.window_size=5") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "models/policy/policy_config.json: model.window_size is 3, but the config says model.window_size=5" in err


@pytest.mark.slow  # heavier integration check: the quick loop (-m 'not slow') stays under 5 minutes
def test_evaluation_does_not_depend_on_the_number_of_workers(pipeline):
    """The trained runtime (images rendered), its ablations and the references, run in this process and
    in a pool of two: the same chains, the same steps, the same figures."""
    runs = {}
    for workers in (1, 2):
        assert _stage("evaluate", pipeline, f"eval.num_workers={workers}") == 0
        runs[workers] = [
            json.loads((pipeline / "reports" / name).read_text()) for name in ("chains.json", "metrics.json")
        ]
    (chains_1, metrics_1), (chains_2, metrics_2) = runs[1], runs[2]
    assert chains_1 == chains_2 and len(chains_1) == 2
    assert metrics_1 == metrics_2


@pytest.mark.slow  # the module fixture runs the whole pipeline through the CLI (47 s): out of the quick loop
def test_a_few_shot_subset_trains_on_its_spans_and_says_so(pipeline, tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"  # its own run, apart from the pipeline's one
    paths = [
        o for o in path_overrides(pipeline) if not o.startswith(("paths.model_dir", "paths.checkpoint", "tracking"))
    ]
    overrides = [f"paths.model_dir={tmp_path}/policy", f"paths.checkpoint_dir={tmp_path}/ckpt", f"tracking.uri={store}"]
    args = ["train", "--config-dir", str(CONF), *paths, *SHRINK_MODEL, *SHRINK_PIPELINE, *overrides]
    assert main([*args, "data.subset.per_task=1"]) == 0
    fingerprint = json.loads((tmp_path / "policy" / "data_fingerprint.json").read_text())
    whole = json.loads((pipeline / "models" / "policy" / "data_fingerprint.json").read_text())
    assert fingerprint["calvin"] == whole["calvin"] and "subset" not in whole
    subset = fingerprint["subset"]
    assert subset["per_task"] == 1 and set(subset["spans_per_task"].values()) == {1}
    (run,) = mlflow.MlflowClient(store).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(store).search_experiments()]
    )
    assert run.data.params["data.subset.per_task"] == "1"
    assert run.data.tags["data_subset_sha256"] == subset["sha256"]


def test_evaluate_without_a_policy_names_the_directory(tmp_path, capsys):
    assert _stage("evaluate", tmp_path) == 1
    assert f"{tmp_path}/models/policy: policy directory not found" in capsys.readouterr().err


def test_train_without_normalisation_names_the_stage_to_run(tmp_path):
    from conftest import tiny_config

    from vlaops.stages import train

    with pytest.raises(VlaopsError, match=r"data.calvin_dir=.*: does not exist \(run the convert stage first"):
        train.run(tiny_config(tmp_path))
