"""The pretrain stage's run: pretrain the tiny Kosmos-2 of the composed config, tracked in MLflow, and write
its report (``reports/pretrain.json``, a DVC metric)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vlaops import tracking
from vlaops.config import Config, flatten
from vlaops.model.config import ModelConfig
from vlaops.pretrain.training import pretrain
from vlaops.utils.atomic import write_json

REPORT_FILE = "pretrain.json"


def pretrain_tracked(cfg: Config) -> None:
    """Pretrain into ``paths.pretrained_dir`` (atomically) and record what it measured."""
    # the architecture the policy will load: model.tiny at model.image_size, the tokenizer's target size;
    # nothing else of model (its head, its window) changes what is pretrained
    arch = ModelConfig(
        tiny=cfg.model.tiny, image_size=cfg.model.image_size, vocab_size=cfg.model.vocab_size, pretrained_dir=None
    )
    report_path = Path(cfg.paths.reports_dir) / REPORT_FILE
    commit = tracking.git_commit()
    tags = {"stage": "pretrain", "git_commit": commit or "unknown"}
    with tracking.run(cfg.tracking, tags=tags) as mlflow:
        tracking.log_params(
            mlflow,
            flatten(
                {
                    "pretrain": dataclasses.asdict(cfg.pretrain),
                    "model": {
                        "tiny": dataclasses.asdict(arch.tiny),
                        "image_size": arch.image_size,
                        "vocab_size": arch.vocab_size,
                    },
                }
            ),
        )
        report = pretrain(
            cfg.pretrain,
            arch,
            Path(cfg.paths.pretrained_dir),
            cfg.compute,
            lambda metrics, step: tracking.log_metrics(mlflow, metrics, step),
        )
        write_json(report_path, report)
        flat = flatten(report)
        # the corpus's counts are facts about the run (tags); losses and grounding figures are measurements
        tracking.log_tags(mlflow, {f"pretrain/{k}": v for k, v in flat.items() if k.startswith("corpus.")})
        tracking.log_metrics(
            mlflow,
            {
                f"pretrain/{k}": v
                for k, v in flat.items()
                if isinstance(v, float) and not k.startswith("corpus.")  # None: no view had two objects
            },
        )
        tracking.log_artifact(mlflow, report_path)
