"""The policy model: Kosmos-2 backbone + action token + LSTM head, its offline processor, and the
exported runtime (RoboVLMs "cont-lstm-post", window 8, chunk 10).

Names resolve lazily: ``vlaops.model.config`` is imported by every command to validate the config,
and must not pay for importing transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "KosmosBackbone": "backbone",
    "tiny_kosmos_config": "backbone",
    "ModelConfig": "config",
    "ChunkExecutor": "execution",
    "Execution": "execution",
    "TinyKosmosConfig": "config",
    "LSTMPolicyHead": "head",
    "VLAPolicy": "policy",
    "build_offline_processor": "processor",
    "load_processor": "processor",
    "make_processor": "processor",
    "PolicyRuntime": "runtime",
    "load_policy_model": "runtime",
    "merged_state_dict": "runtime",
    "save_policy": "runtime",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"vlaops.model.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'vlaops.model' has no attribute {name!r}")
