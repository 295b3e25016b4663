"""What the data decides about the policy before it is built: the head's action space and the auxiliary
targets it reads out.

The head's action space is the data's (an arm's 6 + gripper, a base's 3 + action_type classes), taken
from the normaliser normalize wrote; the auxiliary targets are the observation dims that vary in the
training split. The export's policy_config.json keeps both, so inference rebuilds the same head.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vlaops.data.dataset import aux_dims_from_data
from vlaops.data.normalization import ActionNormalizer
from vlaops.io.calvin import CalvinSplit
from vlaops.model.config import ModelConfig
from vlaops.utils.logging import get_logger

log = get_logger(__name__)


def model_from_data(
    model_cfg: ModelConfig, normalizer: ActionNormalizer, normalization_file: Path, train_split: CalvinSplit
) -> ModelConfig:
    """``model_cfg`` with ``action_dim`` / ``action_classes`` from ``normalizer`` (read from
    ``normalization_file``, named in the log when they differ from the config) and the auxiliary dims cut
    to those that vary in ``train_split``."""
    action_dim, action_classes = normalizer.head_space()
    if (model_cfg.action_dim, model_cfg.action_classes) != (action_dim, action_classes):
        log.info(
            "policy head from the data (%s): model.action_dim=%d, model.action_classes=%d",
            normalization_file,
            action_dim,
            action_classes,
        )
    model_cfg = dataclasses.replace(model_cfg, action_dim=action_dim, action_classes=action_classes)
    return aux_dims_from_data(model_cfg, train_split)
