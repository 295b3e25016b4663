"""Evaluate an exported policy: CALVIN-style chain success in the simulator + offline action error.

The policy, each ablation of it (``eval.ablations``) and each reference policy (``eval.references``)
play the same seeded chains, spread over ``eval.num_workers`` processes; every figure carries a
bootstrap interval. Writes reports/metrics.json (a DVC metric, schema in ``vlaops.eval.metrics``),
CALVIN's reports/results.json, the policy's chains, plots and rollout videos, and logs them onto the
MLflow run that trained the policy. ``cfg`` is the whole run config throughout this module.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from vlaops import plots, tracking
from vlaops.config import Config
from vlaops.data.dataset import make_window_dataset
from vlaops.errors import VlaopsError
from vlaops.eval.chains import FIRST_SUBTASK, LATER_SUBTASKS, figures, results_json, summarize, summary_table
from vlaops.eval.metrics import (
    POLICY,
    headline,
    mlflow_metrics,
    offline_mlflow_metrics,
    offline_only_metrics,
    policy_metrics,
)
from vlaops.eval.offline import base_constant_action, mean_action, offline_action_metrics
from vlaops.eval.plan import check_policy, plan_chains
from vlaops.eval.policies import policies_to_play
from vlaops.eval.runner import RuntimeFactory, run_chains
from vlaops.eval.trajectories import action_dims, validation_trajectories
from vlaops.eval.videos import write_videos
from vlaops.io.calvin import TRAINING, VALIDATION, CalvinSplit
from vlaops.model import PolicyRuntime
from vlaops.model.execution import Execution
from vlaops.model.runtime import POLICY_CONFIG_FILE
from vlaops.utils.atomic import write_json
from vlaops.utils.device import resolve_device
from vlaops.utils.executor import resolve_workers
from vlaops.utils.logging import get_logger

log = get_logger(__name__)
METRICS_FILE = "metrics.json"
RESULTS_FILE = "results.json"
CHAINS_FILE = "chains.json"
VIDEOS_DIR = "videos"  # chain_NNN.gif + index.json (eval/videos.py)
CLOSED_LOOP_NOT_RUN = "not run: the embedded simulator is an arm, and this policy drives a mobile base"


def check_checkpoint(model_dir: Path, policy: PolicyRuntime, cfg: Config) -> None:
    """One line naming the key, the file and both values when the export differs from ``cfg.model``."""
    configured = {"window_size": cfg.model.window_size, "fwd_pred_next_n": cfg.model.fwd_pred_next_n}
    for key, value in configured.items():
        saved = getattr(policy.cfg, key)
        if saved != value:
            raise VlaopsError(
                f"{model_dir / POLICY_CONFIG_FILE}: model.{key} is {saved}, but the config says "
                f"model.{key}={value}; evaluate with model.{key}={saved} or retrain"
            )


def evaluate(cfg: Config, model_dir: Path) -> None:
    """Evaluate the export at ``model_dir`` (``paths.model_dir``, or where a registered model was
    downloaded) and write the reports: closed loop and offline for an arm's policy, offline only for a
    mobile base's (the embedded simulator is an arm)."""
    device = resolve_device(cfg.eval.device, "eval.device")
    execution = cfg.eval.execution()
    policy = PolicyRuntime.load(model_dir, device, execution)  # eval.chunk_steps past the policy's chunk: one line
    check_checkpoint(model_dir, policy, cfg)
    check_policy(cfg.eval, model_dir, policy.cfg)  # eval.env=calvin: CALVIN's arm actions only
    if policy.cfg.action_classes:
        _evaluate_offline_only(cfg, model_dir, policy, device)
    else:
        _evaluate_closed_loop(cfg, model_dir, policy, device, execution)


def _offline(
    cfg: Config, policy: PolicyRuntime, device: torch.device, constant: torch.Tensor | None, **kw: Any
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The offline metrics on the validation split and the trajectories drawn from it."""
    val_split = CalvinSplit(Path(cfg.data.calvin_dir) / VALIDATION, cfg.data.trust_pickles)
    val_ds = make_window_dataset(val_split, policy.normalizer, policy.processor, policy.cfg, None, cfg.data.cache_dir)
    offline = offline_action_metrics(
        policy.model, val_ds, cfg.eval.batch_size, cfg.eval.offline_batches, device, constant=constant, **kw
    )
    log.info("offline action metrics on %s: %s", val_split.dir, offline)
    trajectories = validation_trajectories(policy.model, val_ds, cfg.eval.plot_episodes, cfg.eval.batch_size, device)
    return offline, trajectories


def _run_to_log(cfg: Config, model_dir: Path) -> str | None:
    """The MLflow run that trained the policy, when the store still holds it; None: log to a new run."""
    run_id = tracking.policy_run_id(model_dir)
    if run_id and cfg.tracking.enabled and not tracking.run_exists(cfg.tracking, run_id):
        log.warning(
            "MLflow run %s of %s is not in %s; logging evaluation to a new run",
            run_id,
            model_dir,
            tracking.tracking_uri(cfg.tracking),
        )
        return None
    return run_id


def _evaluate_offline_only(cfg: Config, model_dir: Path, policy: PolicyRuntime, device: torch.device) -> None:
    """A mobile base's policy: the offline metrics on the validation split (per velocity dim, action_type
    accuracy, each against the constant baseline) and the trajectory plot; the closed-loop outputs say
    that no chain was played (docs/mobile_base.md), so the stage's outputs exist and mean what they say."""
    reports_dir = Path(cfg.paths.reports_dir)
    log.info(
        "%s: a mobile base's policy (action_type classes %s): %s; offline evaluation only",
        model_dir,
        policy.normalizer.class_labels,
        CLOSED_LOOP_NOT_RUN,
    )
    offline, trajectories = _offline(
        cfg, policy, device, base_constant_action(policy.normalizer), normalizer=policy.normalizer
    )
    plots_dir = reports_dir / plots.PLOTS_DIR
    figure_files = [
        plots.save(plots.not_evaluated(title, CLOSED_LOOP_NOT_RUN), plots_dir / name)
        for name, title in (
            (plots.SR_BY_LENGTH, "Success rate by chain length"),
            (plots.TASK_SUCCESS, "Per-task success"),
        )
    ]
    figure_files.append(
        plots.save(plots.action_trajectories(trajectories, action_dims(policy.model)), plots_dir / plots.TRAJECTORIES)
    )
    write_videos(None, cfg.sim, [], [], cfg.eval.max_steps_per_subtask, reports_dir / VIDEOS_DIR)  # an empty index
    write_json(reports_dir / CHAINS_FILE, [])
    write_json(
        reports_dir / RESULTS_FILE, {str(cfg.paths.model_dir): {"closed_loop": CLOSED_LOOP_NOT_RUN, "offline": offline}}
    )
    write_json(reports_dir / METRICS_FILE, offline_only_metrics(offline, CLOSED_LOOP_NOT_RUN))
    run_id = _run_to_log(cfg, model_dir)
    with tracking.run(cfg.tracking, run_id=run_id, tags=None if run_id else {"stage": "evaluate"}) as mlflow:
        tracking.log_tags(mlflow, {"eval.closed_loop": CLOSED_LOOP_NOT_RUN})
        tracking.log_metrics(mlflow, offline_mlflow_metrics(offline))
        for path in (reports_dir / RESULTS_FILE, reports_dir / METRICS_FILE):
            tracking.log_artifact(mlflow, path)
        for path in figure_files:
            tracking.log_artifact(mlflow, path, plots.PLOTS_DIR)


def _evaluate_closed_loop(
    cfg: Config, model_dir: Path, policy: PolicyRuntime, device: torch.device, execution: Execution
) -> None:
    reports_dir = Path(cfg.paths.reports_dir)
    plan = plan_chains(cfg.eval, cfg.sim)  # the tabletop's seeded chains or CALVIN's sequences (eval.env), checked
    chains = plan.chains
    # every run to make, in the order of the table: fail on a missing input before any chain is played
    executed = execution.describe(policy.cfg.fwd_pred_next_n)  # the mode and the values in force
    log.info("executing the predicted chunks: %s", executed)
    cameras = None if policy.cfg.use_hand_rgb else ("static",)  # CALVIN renders only what the policy reads
    policy_factory = RuntimeFactory(str(model_dir), str(device), execution=execution, cameras=cameras)
    factories = policies_to_play(
        policy_factory,
        cfg.eval.ablations,
        cfg.eval.references,
        plan.instructions,
        Path(cfg.data.calvin_dir) / TRAINING,
        cfg.data.trust_pickles,
        blind_by_task=cfg.eval.env == "calvin",  # CALVIN's validation phrasings never occur in training
    )
    offline, trajectories = _offline(cfg, policy, device, mean_action(policy.normalizer))
    dims = action_dims(policy.model)
    del policy  # each worker loads its own

    workers = resolve_workers(cfg.eval.num_workers, cfg.compute)
    results, figs, times = {}, {}, {}
    for label, factory in factories.items():
        start = time.perf_counter()
        results[label] = run_chains(
            factory, plan.env_cfg, chains, plan.max_steps, workers, desc=label, compute=cfg.compute
        )
        times[label] = time.perf_counter() - start
        figs[label] = figures(
            results[label], cfg.eval.chain_length, cfg.eval.bootstrap_resamples, cfg.eval.confidence, cfg.eval.seed
        )
        log.info(
            "%s: Avg. Len %.3f %s in %.1f s (%.2f chains/s, %d workers%s)",
            label,
            figs[label][tracking.AVG_LEN],
            figs[label][f"{tracking.AVG_LEN}{tracking.CI_SUFFIX}"],
            times[label],
            len(chains) / times[label],
            workers,
            "" if factory.needs_images else ", no rendering",
        )

    videos_dir = reports_dir / VIDEOS_DIR
    n_videos = min(cfg.eval.videos, len(chains))
    videos = write_videos(
        policy_factory, plan.env_cfg, chains[:n_videos], results[POLICY][:n_videos], plan.max_steps, videos_dir
    )
    if videos:
        log.info("rollout videos of %d chains in %s", len(videos), videos_dir)
    summary = summarize(results[POLICY], cfg.eval.chain_length)
    metrics = {
        "env": cfg.eval.env,
        **policy_metrics(figs, summary, cfg.eval.chain_length, cfg.eval.confidence, offline, executed),
    }
    plots_dir = reports_dir / plots.PLOTS_DIR
    figure_files = [
        plots.save(
            plots.sr_by_chain_length(figs, cfg.eval.chain_length, cfg.eval.confidence), plots_dir / plots.SR_BY_LENGTH
        ),
        plots.save(plots.task_success(summary["task_info"]), plots_dir / plots.TASK_SUCCESS),
        plots.save(plots.action_trajectories(trajectories, dims), plots_dir / plots.TRAJECTORIES),
    ]
    # metrics.json last: it is the DVC metric, so a kill before it leaves the stage not done
    write_json(reports_dir / CHAINS_FILE, [r.__dict__ for r in results[POLICY]])
    write_json(reports_dir / RESULTS_FILE, results_json(summary, str(cfg.paths.model_dir)))
    write_json(reports_dir / METRICS_FILE, metrics)
    log.info(
        "%d chains of %d in %s, seed %d, execute %s:\n%s",
        len(chains),
        cfg.eval.chain_length,
        cfg.eval.env,
        cfg.eval.seed,
        executed,
        summary_table(figs, cfg.eval.chain_length, cfg.eval.confidence),
    )
    first, later = summary["start_info"][FIRST_SUBTASK], summary["start_info"][LATER_SUBTASKS]
    log.info(
        "policy's subtasks: %d of %d succeeded from the reset scene, %d of %d after another subtask",
        first["success"],
        first["total"],
        later["success"],
        later["total"],
    )

    run_id = _run_to_log(cfg, model_dir)
    with tracking.run(cfg.tracking, run_id=run_id, tags=None if run_id else {"stage": "evaluate"}) as mlflow:
        tracking.log_tags(
            mlflow,
            {
                "eval.num_chains": metrics["num_chains"],
                "eval.chain_length": cfg.eval.chain_length,
                "eval.execute": executed["mode"],
                "eval.chunk_steps": executed["chunk_steps"],
                "eval.ensemble_coeff": executed["ensemble_coeff"],  # None unless ensemble: a stale value never stays
                "eval.env": cfg.eval.env,
            },
        )
        tracking.log_metrics(mlflow, mlflow_metrics(figs, metrics, times))
        tracking.log_artifact(mlflow, reports_dir / RESULTS_FILE)
        tracking.log_artifact(mlflow, reports_dir / METRICS_FILE)
        for path in figure_files:
            tracking.log_artifact(mlflow, path, plots.PLOTS_DIR)
        for video in videos:
            tracking.log_artifact(mlflow, videos_dir / video["file"], VIDEOS_DIR)
        versions = tracking.tag_model_versions(
            mlflow, cfg.tracking, tracking.active_run_id(mlflow), headline(figs[POLICY])
        )
        if versions:
            log.info("tagged %s version(s) %s with the evaluation", cfg.tracking.registered_model, ", ".join(versions))
