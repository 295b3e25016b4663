"""Train the policy: CALVIN training split + normaliser -> models/policy (Kosmos-2 + LSTM), tracked in MLflow.

Resumes the newest checkpoint of ``paths.checkpoint_dir`` when it holds the same recipe, in the MLflow run
that checkpoint was logged to; writes the export, reports/train_curve.csv and the training plots. Under a
distributed launch (torchrun, accelerate launch) the main process owns the shared files, the MLflow run and
the export; the others train their shard of each batch. ``cfg`` is the whole run config throughout this
module.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from vlaops import plots, tracking
from vlaops.config import Config, flatten, to_container
from vlaops.data.dataset import make_window_dataset
from vlaops.data.normalization import NORMALIZATION_FILE, ActionNormalizer
from vlaops.data.subset import select_subset, subset_fingerprint
from vlaops.errors import VlaopsError
from vlaops.io.calvin import TRAINING, VALIDATION, CalvinSplit, dataset_fingerprint
from vlaops.io.episode import BASE_ACTION_NAMES
from vlaops.model import make_processor, mlflow_model, save_policy
from vlaops.train.checkpoint import (
    checkpoint_recipe,
    guard_checkpoints,
    latest_checkpoint,
    lock_checkpoints,
    read_trainer_state,
    verify_checkpoint,
)
from vlaops.train.export import write_checkpoint_recipe
from vlaops.train.launch import world_size
from vlaops.train.loop import CALLER_STATE, make_loader, process_state, train_policy
from vlaops.train.setup import apply_train_setup
from vlaops.train.sizing import model_from_data
from vlaops.train.trainable import build_policy, frozen_source
from vlaops.utils.atomic import atomic_file
from vlaops.utils.logging import get_logger

log = get_logger(__name__)
CURVE_FILE = "train_curve.csv"
TIMING_KEYS = ("wall_time_s", "steps_per_s")  # of train_policy's result: logged, never written into the policy


def _write_curve(path: Path, rows: dict[int, dict[str, float]]) -> None:
    """train_curve.csv for `dvc plots show`: step, train_loss, val_loss, lr."""
    with atomic_file(path) as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "train_loss", "val_loss", "lr"])
        for step in sorted(rows):
            r = rows[step]
            writer.writerow(
                [step, *(r.get(k, "") for k in (tracking.TRAIN_LOSS, tracking.VAL_LOSS, tracking.TRAIN_LR))]
            )


def train(cfg: Config) -> None:
    """Train and export the policy ``cfg`` describes (``cfg.model`` is sized from the data here)."""
    calvin_dir, normalized_dir = Path(cfg.data.calvin_dir), Path(cfg.data.normalized_dir)
    checkpoint_dir = Path(cfg.paths.checkpoint_dir)
    # data, normaliser and processor before any model is built
    normalizer = ActionNormalizer.load(normalized_dir / NORMALIZATION_FILE)
    train_split = CalvinSplit(calvin_dir / TRAINING, cfg.data.trust_pickles)
    train_split.annotations = select_subset(train_split.annotations, cfg.data.subset, str(calvin_dir / TRAINING))
    val_split = CalvinSplit(calvin_dir / VALIDATION, cfg.data.trust_pickles)
    cfg.model = model_from_data(cfg.model, normalizer, normalized_dir / NORMALIZATION_FILE, train_split)
    processor = make_processor(cfg.model, sorted({a.instruction for a in train_split.annotations}))
    train_ds = make_window_dataset(train_split, normalizer, processor, cfg.model, cfg.data.augment, cfg.data.cache_dir)
    val_ds = make_window_dataset(val_split, normalizer, processor, cfg.model, None, cfg.data.cache_dir)
    world = world_size()  # each process of a launch takes its own batches
    if len(train_ds) < cfg.train.batch_size * world:
        raise VlaopsError(
            f"{calvin_dir / TRAINING}: {len(train_ds)} training windows, fewer than "
            f"train.batch_size={cfg.train.batch_size}" + (f" x {world} processes (one batch each)" if world > 1 else "")
        )
    fingerprint = {"calvin": dataset_fingerprint(calvin_dir), "normalization": normalizer.to_dict()}
    if (subset := subset_fingerprint(train_split.annotations, cfg.data.subset)) is not None:
        fingerprint["subset"] = subset
        log.info("data.subset: %d training spans (%s)", subset["spans"], subset["spans_per_task"])
    # the config as plain data, once: OmegaConf is not re-entered at every checkpoint (a signal landing in
    # it leaves its cleanup raising AttributeError over the signal)
    config = to_container(cfg)
    state = process_state()
    with lock_checkpoints(checkpoint_dir):
        if state.is_main_process:  # DVC sets DVC_STAGE for every stage
            guard_checkpoints(
                checkpoint_dir, checkpoint_recipe(config, fingerprint["calvin"]), set_aside="DVC_STAGE" in os.environ
            )
        state.wait_for_everyone()
        _train(cfg, config, processor, normalizer, train_ds, val_ds, fingerprint, state.is_main_process)


def _train(
    cfg: Config,
    config: dict[str, Any],
    processor: Any,
    normalizer: ActionNormalizer,
    train_ds: Dataset,
    val_ds: Dataset,
    fingerprint: dict[str, Any],
    is_main: bool = True,
) -> None:
    """Build, train (resuming the checkpoint directory's newest checkpoint) and export the policy;
    ``config`` is ``cfg`` as plain data (MLflow params, train_config.json)."""
    model_dir, checkpoint_dir = Path(cfg.paths.model_dir), Path(cfg.paths.checkpoint_dir)
    # seeded right before the build: a checkpoint stores the trainable tensors, a resume or an export rebuilds the rest
    policy = build_policy(cfg.model, len(processor.tokenizer), cfg.seed)
    counts = apply_train_setup(policy, cfg.train.train_setup)
    log.info("%d training windows, %d validation windows; parameters: %s", len(train_ds), len(val_ds), counts)

    commit = tracking.git_commit()
    tags = {
        "stage": "train",
        "data_fingerprint": fingerprint["calvin"],
        **({"data_subset_sha256": fingerprint["subset"]["sha256"]} if "subset" in fingerprint else {}),
        "git_commit": commit or "unknown",
        **({"mlflow.source.git.commit": commit} if commit else {}),
    }
    # a resume continues the run it interrupted: the same MLflow run, the curve up to its checkpoint
    resume = latest_checkpoint(checkpoint_dir)
    if resume is not None:  # before its run id is trusted to re-open a run (train_policy checks it for itself too)
        verify_checkpoint(resume, cfg.train.trust_checkpoint)
    previous = read_trainer_state(resume).get(CALLER_STATE, {}) if resume is not None else {}
    run_id = previous.get("mlflow_run_id")
    if run_id is not None and not (cfg.tracking.enabled and tracking.run_exists(cfg.tracking, run_id)):
        log.warning(
            "%s: MLflow run %s of the checkpoint is not in %s; starting a new run",
            resume,
            run_id,
            tracking.tracking_uri(cfg.tracking),
        )
        run_id = None
    curve: dict[int, dict[str, float]] = {int(step): row for step, row in previous.get("curve", {}).items()}
    opened = (
        tracking.run(cfg.tracking, run_id=run_id, tags=None if run_id else tags)
        if is_main
        else contextlib.nullcontext()
    )
    with opened as mlflow:
        if run_id is None:
            tracking.log_params(mlflow, flatten(config))
            tracking.log_params(mlflow, counts)  # params_total, params_trainable...: counts, not measurements
            tracking.log_datasets(
                mlflow,
                {TRAINING: Path(cfg.data.calvin_dir) / TRAINING, VALIDATION: Path(cfg.data.calvin_dir) / VALIDATION},
                fingerprint["calvin"],
            )

        def log_metrics(metrics: dict[str, float], step: int) -> None:
            tracking.log_metrics(mlflow, metrics, step)
            curve.setdefault(step, {}).update(metrics)

        def caller_state() -> dict:
            return {
                "mlflow_run_id": tracking.active_run_id(mlflow),
                "curve": {str(k): v for k, v in sorted(curve.items())},
            }

        result = train_policy(
            policy,
            make_loader(train_ds, cfg.train, shuffle=True),
            make_loader(val_ds, cfg.train, shuffle=False),
            cfg.train,
            log_metrics,
            checkpoint_dir,
            caller_state,
            frozen_source(cfg.model, cfg.seed),
            # what `vlaops export` needs besides the weights, in every checkpoint
            lambda d: write_checkpoint_recipe(
                d, processor, normalizer, dataclasses.asdict(cfg.model), config, fingerprint
            ),
        )
        if not is_main:
            return
        # counts (steps, the step resumed from) are facts about the run, not measurements: tags
        counts = {k: int(v) for k, v in result.items() if k in ("steps", "resumed_from_step")}
        tracking.log_tags(mlflow, {f"final/{k}": v for k, v in counts.items()})
        tracking.log_metrics(mlflow, {f"final/{k}": v for k, v in result.items() if k not in counts})
        run_info = {
            "run_id": tracking.active_run_id(mlflow),
            "tracking_uri": tracking.tracking_uri(cfg.tracking) if mlflow else None,
        }
        save_policy(
            model_dir,
            policy,
            processor,
            normalizer,
            cfg.model,
            # no wall time in the policy (a DVC output): it stays in the log and in MLflow's final/* metrics
            extra={
                "train_config": config,
                "data_fingerprint": fingerprint,
                "train_result": {k: v for k, v in result.items() if k not in TIMING_KEYS},
                Path(tracking.RUN_FILE).stem: run_info,
            },
        )
        _write_curve(Path(cfg.paths.reports_dir) / CURVE_FILE, curve)
        tracking.log_artifact(mlflow, model_dir / "train_config.json")
        tracking.log_artifact(mlflow, Path(cfg.paths.reports_dir) / CURVE_FILE)
        use_hand = policy.cfg.use_hand_rgb
        columns = mlflow_model.action_columns(
            normalizer.head_space()[0], tuple(BASE_ACTION_NAMES) if policy.cfg.action_classes else None
        )
        tracking.log_policy_model(
            mlflow,
            cfg.tracking,
            model_dir,
            mlflow_model.signature(use_hand, columns),
            mlflow_model.input_example(val_ds.split, use_hand) if mlflow is not None else None,
        )
        plots_dir = Path(cfg.paths.reports_dir) / plots.PLOTS_DIR
        for name, fig in (
            (plots.LOSS, plots.loss_curves(curve, tracking.TRAIN_LOSS, tracking.VAL_LOSS)),
            (plots.LEARNING_RATE, plots.learning_rate(curve, tracking.TRAIN_LR)),
        ):
            tracking.log_artifact(mlflow, plots.save(fig, plots_dir / name), plots.PLOTS_DIR)
