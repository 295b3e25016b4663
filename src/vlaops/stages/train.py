"""train: CALVIN training split + normaliser -> models/policy (Kosmos-2 + LSTM), tracked in MLflow."""

from __future__ import annotations

import csv
from pathlib import Path

from vlaops import tracking
from vlaops.config import Config, flatten, to_container
from vlaops.data.dataset import make_window_dataset
from vlaops.data.normalization import NORMALIZATION_FILE, ActionNormalizer
from vlaops.errors import VlaopsError
from vlaops.io.calvin import TRAINING, VALIDATION, CalvinSplit, dataset_fingerprint
from vlaops.model import VLAPolicy, make_processor, save_policy
from vlaops.train.checkpoint import guard_checkpoints
from vlaops.train.loop import make_loader, train_policy
from vlaops.train.setup import apply_train_setup
from vlaops.utils.atomic import atomic_file
from vlaops.utils.logging import get_logger

log = get_logger(__name__)
CURVE_FILE = "train_curve.csv"


def _write_curve(path: Path, rows: dict[int, dict[str, float]]) -> None:
    """train_curve.csv for `dvc plots show`: step, train_loss, val_loss, lr."""
    with atomic_file(path) as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "train_loss", "val_loss", "lr"])
        for step in sorted(rows):
            r = rows[step]
            writer.writerow([step, *(r.get(k, "") for k in (tracking.TRAIN_LOSS, tracking.VAL_LOSS, tracking.TRAIN_LR))])


def run(cfg: Config) -> None:
    calvin_dir, normalized_dir = Path(cfg.data.calvin_dir), Path(cfg.data.normalized_dir)
    model_dir, checkpoint_dir = Path(cfg.paths.model_dir), Path(cfg.paths.checkpoint_dir)
    # fail fast: data, normaliser and processor before any model is built
    normalizer = ActionNormalizer.load(normalized_dir / NORMALIZATION_FILE)
    train_split = CalvinSplit(calvin_dir / TRAINING, cfg.data.trust_pickles)
    val_split = CalvinSplit(calvin_dir / VALIDATION, cfg.data.trust_pickles)
    processor = make_processor(cfg.model, sorted({a.instruction for a in train_split.annotations}))
    train_ds = make_window_dataset(train_split, normalizer, processor, cfg.model, cfg.data.augment, cfg.data.cache_dir)
    val_ds = make_window_dataset(val_split, normalizer, processor, cfg.model, None, cfg.data.cache_dir)
    if len(train_ds) < cfg.train.batch_size:
        raise VlaopsError(f"{calvin_dir / TRAINING}: {len(train_ds)} training windows, fewer than train.batch_size={cfg.train.batch_size}")
    fingerprint = {"calvin": dataset_fingerprint(calvin_dir), "normalization": normalizer.to_dict()}
    recipe = {"config": {k: v for k, v in to_container(cfg).items() if k in ("seed", "model", "train", "data")}, "data": fingerprint["calvin"]}
    guard_checkpoints(checkpoint_dir, recipe)

    policy = VLAPolicy.build(cfg.model, vocab_size=len(processor.tokenizer))
    counts = apply_train_setup(policy, cfg.train.train_setup)
    log.info("%d training windows, %d validation windows; parameters: %s", len(train_ds), len(val_ds), counts)

    tags = {"stage": "train", "data_fingerprint": fingerprint["calvin"], "git_commit": tracking.git_commit() or "unknown"}
    curve: dict[int, dict[str, float]] = {}
    with tracking.run(cfg.tracking, tags=tags) as mlflow:
        tracking.log_params(mlflow, flatten(to_container(cfg)))
        tracking.log_metrics(mlflow, {f"params/{k}": float(v) for k, v in counts.items()})

        def log_metrics(metrics: dict[str, float], step: int) -> None:
            tracking.log_metrics(mlflow, metrics, step)
            curve.setdefault(step, {}).update(metrics)

        result = train_policy(
            policy, make_loader(train_ds, cfg.train, shuffle=True), make_loader(val_ds, cfg.train, shuffle=False),
            cfg.train, log_metrics, checkpoint_dir,
        )
        tracking.log_metrics(mlflow, {f"final/{k}": v for k, v in result.items()})
        run_info = {"run_id": tracking.active_run_id(mlflow), "tracking_uri": tracking.tracking_uri(cfg.tracking) if mlflow else None}
        save_policy(
            model_dir, policy, processor, normalizer, cfg.model,
            extra={"train_config": to_container(cfg), "data_fingerprint": fingerprint, "train_result": result,
                   Path(tracking.RUN_FILE).stem: run_info},
        )
        _write_curve(Path(cfg.paths.reports_dir) / CURVE_FILE, curve)
        tracking.log_artifact(mlflow, model_dir / "train_config.json")
        tracking.log_artifact(mlflow, Path(cfg.paths.reports_dir) / CURVE_FILE)
