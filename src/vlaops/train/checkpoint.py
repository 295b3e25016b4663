"""Training checkpoints: the recipe guard, the atomic save, and finding the newest one to resume.

A checkpoint is ``accelerator.save_state`` (model, optimizer, scheduler, RNG states) plus
``trainer_state.json``, written into a hidden temporary directory and renamed, so a SIGKILL leaves the
previous checkpoint whole; ``trainer_state.json`` is written last, so its presence marks a complete one.
``run_config.json`` beside them stamps the recipe they were trained with: a restart resumes only the same
recipe.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from vlaops.errors import VlaopsError
from vlaops.utils.atomic import write_json
from vlaops.utils.logging import get_logger

log = get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{7,})$")
TRAINER_STATE_FILE = "trainer_state.json"
RUN_CONFIG_FILE = "run_config.json"  # in the checkpoint dir: what the checkpoints were trained with


def _differing_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (lists compare as values)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in old.keys() | new.keys() for k in _differing_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def guard_checkpoints(checkpoint_dir: Path, recipe: dict[str, Any]) -> None:
    """Resume only the same recipe: a checkpoint of another config is an error, never a silent mix."""
    stamp = checkpoint_dir / RUN_CONFIG_FILE
    if stamp.is_file():
        previous = json.loads(stamp.read_text())
        if previous != recipe:
            diff = sorted(_differing_keys(previous, recipe))
            raise VlaopsError(
                f"{checkpoint_dir}: holds checkpoints of a different run (differs in {diff[:5]}); "
                f"delete it to start afresh, or set paths.checkpoint_dir elsewhere"
            )
    write_json(stamp, recipe)


def latest_checkpoint(checkpoint_dir: Path | None) -> Path | None:
    """The newest complete ``step_XXXXXXX`` (hidden temporaries of an interrupted save are ignored)."""
    if checkpoint_dir is None or not checkpoint_dir.is_dir():
        return None
    found = []
    for p in checkpoint_dir.iterdir():
        m = CHECKPOINT_PATTERN.match(p.name)
        if m and (p / TRAINER_STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a complete checkpoint (step, best/last losses)."""
    return json.loads((checkpoint / TRAINER_STATE_FILE).read_text())


def save_checkpoint(accelerator: Accelerator, checkpoint_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``step_XXXXXXX`` atomically (every process saves its part), keep the newest ``keep``."""
    final = checkpoint_dir / f"step_{step:07d}"
    # a fixed temporary name (not mkdtemp): every process must write its RNG state into the same dir
    tmp = checkpoint_dir / f".step_{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / TRAINER_STATE_FILE, state)  # last: its presence marks a complete checkpoint
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        older = sorted(
            (int(m.group(1)), p)
            for p in checkpoint_dir.iterdir()
            if (m := CHECKPOINT_PATTERN.match(p.name)) and p != final
        )
        for _, p in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
        log.info("checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final
