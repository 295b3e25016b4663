"""Training: configuration and the Accelerate loop."""

from vlaops.train.config import TrainConfig, TrainSetupConfig
from vlaops.train.loop import build_accelerator, make_loader, resolve_precision, train_policy

__all__ = [
    "TrainConfig",
    "TrainSetupConfig",
    "build_accelerator",
    "make_loader",
    "resolve_precision",
    "train_policy",
]
