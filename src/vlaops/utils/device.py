"""The torch device a setting names (``eval.device``, ``serve.device``), resolved once for every caller."""

from __future__ import annotations

import torch

from vlaops.errors import VlaopsError


def resolve_device(name: str, key: str) -> torch.device:
    """``auto``: CUDA when a device is available, else the CPU; a CUDA device asked for on a machine without
    one is refused in one line naming the setting ``key``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise VlaopsError(f"{key}={name}, but no CUDA device is available")
    return torch.device(name)
