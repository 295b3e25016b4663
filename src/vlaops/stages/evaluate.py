"""evaluate: models/policy -> CALVIN-style chain success in the simulator + offline action error.

The policy, each ablation of it (``eval.ablations``) and each reference policy (``eval.references``)
play the same seeded chains, spread over ``eval.num_workers`` processes; every figure carries a
bootstrap interval. Writes reports/metrics.json (a DVC metric), CALVIN's reports/results.json and the
policy's chains, and logs them onto the MLflow run that trained the policy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlaops import plots, tracking
from vlaops.config import Config
from vlaops.data.dataset import make_window_dataset
from vlaops.data.normalization import ActionNormalizer
from vlaops.errors import VlaopsError
from vlaops.eval.chains import FIRST_SUBTASK, LATER_SUBTASKS, figures, results_json, start_sr, summarize, summary_table
from vlaops.eval.offline import base_constant_action, offline_action_metrics
from vlaops.eval.plan import check_policy, plan_chains
from vlaops.eval.reference import blind_policy
from vlaops.eval.runner import AblatedFactory, ExpertFactory, FixedFactory, RuntimeFactory, run_chains
from vlaops.eval.trajectories import action_dims, validation_trajectories
from vlaops.eval.videos import write_videos
from vlaops.io.calvin import TRAINING, VALIDATION, CalvinSplit
from vlaops.model import PolicyRuntime
from vlaops.model.runtime import POLICY_CONFIG_FILE
from vlaops.utils.atomic import write_json
from vlaops.utils.executor import connect, resolve_workers
from vlaops.utils.logging import get_logger
from vlaops.utils.paths import check_outputs

log = get_logger(__name__)
METRICS_FILE = "metrics.json"
RESULTS_FILE = "results.json"
CHAINS_FILE = "chains.json"
VIDEOS_DIR = "videos"  # chain_NNN.gif + index.json (eval/videos.py)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise VlaopsError(f"eval.device={name}, but no CUDA device is available")
    return torch.device(name)


def mean_action(normalizer: ActionNormalizer) -> torch.Tensor | None:
    """The training split's mean action, normalised: the constant the offline errors are compared to."""
    if not normalizer.stats:
        return None
    return torch.as_tensor(normalizer.normalize(np.asarray(normalizer.stats["mean"], dtype=np.float32)))


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


def flat_figures(prefix: str, fig: dict[str, Any]) -> dict[str, float]:
    """MLflow names of one run's figures: <prefix>avg_len, <prefix>sr_1, <prefix>avg_len_ci_low ..."""
    out: dict[str, float] = {}
    for key, value in fig.items():
        if key.endswith(tracking.CI_SUFFIX):
            base = key[: -len(tracking.CI_SUFFIX)]
            out[f"{prefix}{base}{tracking.CI_LOW}"], out[f"{prefix}{base}{tracking.CI_HIGH}"] = value
        elif isinstance(value, (int, float)):
            out[f"{prefix}{key}"] = value
    return out


def run(cfg: Config) -> None:
    """Evaluate the policy of ``paths.model_dir``: an export directory, or a registered model
    (``models:/<name>/<version>``, downloaded from the tracking store for the run)."""
    check_outputs(cfg, "evaluate")  # before a single chain is played
    tracking.check_store(cfg.tracking)
    connect(cfg.compute)  # compute.executor=ray: Ray installed and its cluster reachable
    with tracking.policy_dir(cfg.tracking, cfg.paths.model_dir) as model_dir:
        _evaluate(cfg, model_dir)


CLOSED_LOOP_NOT_RUN = "not run: the embedded simulator is an arm, and this policy drives a mobile base"


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
    val_split = CalvinSplit(Path(cfg.data.calvin_dir) / VALIDATION, cfg.data.trust_pickles)
    val_ds = make_window_dataset(val_split, policy.normalizer, policy.processor, policy.cfg, None, cfg.data.cache_dir)
    offline = offline_action_metrics(
        policy.model,
        val_ds,
        cfg.eval.batch_size,
        cfg.eval.offline_batches,
        device,
        constant=base_constant_action(policy.normalizer),
        normalizer=policy.normalizer,
    )
    log.info("offline action metrics on %s: %s", val_split.dir, offline)
    trajectories = validation_trajectories(policy.model, val_ds, cfg.eval.plot_episodes, cfg.eval.batch_size, device)
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
    write_json(
        reports_dir / METRICS_FILE,
        {"embodiment": "mobile_base", "closed_loop": CLOSED_LOOP_NOT_RUN, "offline": offline},
    )
    run_file = model_dir / tracking.RUN_FILE
    run_id = json.loads(run_file.read_text()).get("run_id") if run_file.is_file() else None
    if run_id and cfg.tracking.enabled and not tracking.run_exists(cfg.tracking, run_id):
        run_id = None
    with tracking.run(cfg.tracking, run_id=run_id, tags=None if run_id else {"stage": "evaluate"}) as mlflow:
        tracking.log_tags(mlflow, {"eval.closed_loop": CLOSED_LOOP_NOT_RUN})
        tracking.log_metrics(mlflow, {f"{tracking.OFFLINE_PREFIX}{k}": v for k, v in offline.items()})
        for path in (reports_dir / RESULTS_FILE, reports_dir / METRICS_FILE):
            tracking.log_artifact(mlflow, path)
        for path in figure_files:
            tracking.log_artifact(mlflow, path, plots.PLOTS_DIR)


def _evaluate(cfg: Config, model_dir: Path) -> None:
    reports_dir = Path(cfg.paths.reports_dir)
    device = resolve_device(cfg.eval.device)
    execution = cfg.eval.execution()
    policy = PolicyRuntime.load(model_dir, device, execution)  # eval.chunk_steps past the policy's chunk: one line
    check_checkpoint(model_dir, policy, cfg)
    check_policy(cfg.eval, model_dir, policy.cfg)  # eval.env=calvin: CALVIN's arm actions only
    if policy.cfg.action_classes:  # the embedded simulator is an arm: a base gets the offline half only
        _evaluate_offline_only(cfg, model_dir, policy, device)
        return
    plan = plan_chains(cfg.eval, cfg.sim)  # the tabletop's seeded chains or CALVIN's sequences (eval.env), checked
    chains, instructions = plan.chains, plan.instructions
    # Every run to make, in the order of the table: fail on a missing input before any chain is played.
    executed = execution.describe(policy.cfg.fwd_pred_next_n)  # the mode and the values in force
    log.info("executing the predicted chunks: %s", executed)
    cameras = None if policy.cfg.use_hand_rgb else ("static",)  # CALVIN renders only what the policy reads
    policy_factory = RuntimeFactory(str(model_dir), str(device), execution=execution, cameras=cameras)
    factories: dict[str, Any] = {"policy": policy_factory}
    for mode in cfg.eval.ablations:
        factories[f"{tracking.ABLATION_PREFIX}{mode}"] = AblatedFactory(policy_factory, mode, instructions)
    for name in cfg.eval.references:
        if name == "expert":
            factories[f"{tracking.REFERENCE_PREFIX}expert"] = ExpertFactory()
        elif name == "blind":
            by_task = plan.instructions if cfg.eval.env == "calvin" else None  # CALVIN: validation phrasings
            blind = blind_policy(Path(cfg.data.calvin_dir) / TRAINING, cfg.data.trust_pickles, by_task)
            factories[f"{tracking.REFERENCE_PREFIX}blind"] = FixedFactory(blind)

    val_split = CalvinSplit(Path(cfg.data.calvin_dir) / VALIDATION, cfg.data.trust_pickles)
    val_ds = make_window_dataset(val_split, policy.normalizer, policy.processor, policy.cfg, None, cfg.data.cache_dir)
    offline = offline_action_metrics(
        policy.model,
        val_ds,
        cfg.eval.batch_size,
        cfg.eval.offline_batches,
        device,
        constant=mean_action(policy.normalizer),
    )
    log.info("offline action metrics on %s: %s", val_split.dir, offline)
    trajectories = validation_trajectories(policy.model, val_ds, cfg.eval.plot_episodes, cfg.eval.batch_size, device)
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
        policy_factory, plan.env_cfg, chains[:n_videos], results["policy"][:n_videos], plan.max_steps, videos_dir
    )
    if videos:
        log.info("rollout videos of %d chains in %s", len(videos), videos_dir)
    summary = summarize(results["policy"], cfg.eval.chain_length)
    metrics: dict[str, Any] = {
        **figs["policy"],
        "num_chains": summary["num_chains"],
        "env": cfg.eval.env,
        "chain_length": cfg.eval.chain_length,
        "confidence": cfg.eval.confidence,
        "execute": executed,  # how the policy's chunks ran (its ablations' too): mode, chunk_steps, ensemble_coeff
        "task_sr": {t: v["success"] / v["total"] for t, v in summary["task_info"].items()},
        "subtask_sr": start_sr(summary),  # first: from the reset scene; later: where the previous subtask left it
        "offline": offline,
        "ablations": {
            label.removeprefix(tracking.ABLATION_PREFIX): fig
            for label, fig in figs.items()
            if label.startswith(tracking.ABLATION_PREFIX)
        },
        "references": {
            label.removeprefix(tracking.REFERENCE_PREFIX): fig
            for label, fig in figs.items()
            if label.startswith(tracking.REFERENCE_PREFIX)
        },
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
    write_json(reports_dir / CHAINS_FILE, [r.__dict__ for r in results["policy"]])
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

    run_file = model_dir / tracking.RUN_FILE
    run_id = json.loads(run_file.read_text()).get("run_id") if run_file.is_file() else None
    if run_id and cfg.tracking.enabled and not tracking.run_exists(cfg.tracking, run_id):
        log.warning(
            "MLflow run %s of %s is not in %s; logging evaluation to a new run",
            run_id,
            model_dir,
            tracking.tracking_uri(cfg.tracking),
        )
        run_id = None
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
        flat: dict[str, float] = {}
        for label, fig in figs.items():
            flat.update(flat_figures(tracking.figure_prefix(label), fig))
        flat.update({f"{tracking.TASK_SR_PREFIX}{t}": v for t, v in metrics["task_sr"].items()})
        flat.update({f"{tracking.SUBTASK_SR_PREFIX}{k}": v for k, v in metrics["subtask_sr"].items() if v is not None})
        flat.update({f"{tracking.OFFLINE_PREFIX}{k}": v for k, v in offline.items()})
        flat.update({f"{tracking.EVAL_TIME_PREFIX}{label}": t for label, t in times.items()})
        tracking.log_metrics(mlflow, flat)
        tracking.log_artifact(mlflow, reports_dir / RESULTS_FILE)
        tracking.log_artifact(mlflow, reports_dir / METRICS_FILE)
        for path in figure_files:
            tracking.log_artifact(mlflow, path, plots.PLOTS_DIR)
        for video in videos:
            tracking.log_artifact(mlflow, videos_dir / video["file"], VIDEOS_DIR)
        headline = {
            k: v for k, v in figs["policy"].items() if k == tracking.AVG_LEN or k.startswith(tracking.SR_PREFIX)
        }
        versions = tracking.tag_model_versions(
            mlflow,
            cfg.tracking,
            tracking.active_run_id(mlflow),
            {k: f"{v:.4f}" if isinstance(v, float) else v for k, v in headline.items()},
        )
        if versions:
            log.info("tagged %s version(s) %s with the evaluation", cfg.tracking.registered_model, ", ".join(versions))
