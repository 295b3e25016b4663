"""Configured paths checked in a stage's first second, before any long work.

Why: an output path under a file, or in a read-only place, used to surface as an OSError traceback
after the work was done (a whole training lost at ``save_policy``). Each check names the config key the
path came from, so the one-line error says what to change.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vlaops.errors import VlaopsError

# What each stage writes, by config key: one table for the stage's own first-second check and for
# `vlaops check`, which runs them all before a pipeline is started.
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "collect": ("paths.collect_dir", "paths.reports_dir"),
    "pretrain": ("paths.pretrained_dir", "paths.reports_dir"),
    "ingest": ("data.episodes_dir",),
    "convert": ("data.calvin_dir",),
    "normalize": ("data.normalized_dir",),
    "train": ("paths.model_dir", "paths.checkpoint_dir", "paths.reports_dir", "data.cache_dir"),
    "evaluate": ("paths.reports_dir", "data.cache_dir"),
}


def config_value(cfg: Any, key: str) -> Any:
    """``cfg.a.b`` for ``key`` "a.b"."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_outputs(cfg: Any, stage: str) -> list[str]:
    """Check every output path of ``stage`` (STAGE_OUTPUTS) writable; returns the keys checked."""
    keys = [k for k in STAGE_OUTPUTS[stage] if config_value(cfg, k) is not None]  # data.cache_dir may be off
    for key in keys:
        check_writable(key, config_value(cfg, key))
    return keys


def check_writable(key: str, path: str | os.PathLike[str], value: str | None = None) -> None:
    """``path`` (from config key ``key``, whose value ``value`` defaults to the path) can be created or
    replaced by this user: its nearest existing ancestor is a writable directory, an existing ``path``
    is a directory, and its parent is writable (outputs are replaced by a rename)."""
    path = Path(path)
    where = f"{key}={value if value is not None else path}"
    if path.exists() and not path.is_dir():
        raise VlaopsError(f"{where}: {path} is a file, not a directory")
    parent = path if path.exists() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise VlaopsError(f"{where}: {parent} is a file, so the directory cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise VlaopsError(f"{where}: {parent} is not writable by this user")
    if path.exists() and not os.access(path.parent, os.W_OK | os.X_OK):
        raise VlaopsError(f"{where}: {path.parent} is not writable by this user (outputs are replaced by a rename)")


def check_input_dir(key: str, path: str | os.PathLike[str]) -> None:
    """``path`` (config key ``key``) is an existing, readable directory."""
    path = Path(path)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        producer = next((stage for stage, keys in STAGE_OUTPUTS.items() if key in keys), None)
        hint = f" (run the {producer} stage first: dvc repro {producer})" if producer and not path.exists() else ""
        raise VlaopsError(f"{key}={path}: {what}{hint}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise VlaopsError(f"{key}={path}: not readable by this user")
