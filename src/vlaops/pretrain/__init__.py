"""Pretraining the tiny Kosmos-2 as Kosmos-2 was pretrained, at toy scale: rendered scenes with grounded
captions (scenes, captions), Kosmos-2's language-model loss through the same transformers classes
(training). ``vlaops pretrain`` writes a checkpoint that ``model.pretrained_dir`` loads.

Names resolve lazily, so validating a config (``vlaops.pretrain.config``) does not load PyBullet or torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PretrainConfig": "config",
    "pretrain": "training",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"vlaops.pretrain.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'vlaops.pretrain' has no attribute {name!r}")
