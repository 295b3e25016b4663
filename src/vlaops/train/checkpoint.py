"""Training checkpoints: the recipe guard, the atomic save, and finding the newest one to resume.

A checkpoint is ``accelerator.save_state`` (model as safetensors, optimizer and RNG states) plus
``trainer_state.json`` (step, losses, the scheduler's state, the caller's state), the caller's files (the
train stage's: what ``vlaops export`` needs to write a policy from it) and ``vlaops_manifest.json`` (the
sha256 of every file, and what the model file holds: the trainable tensors only, whose frozen rest is
rebuilt and checked against the hash recorded there, see ``vlaops.train.trainable``), written into a
hidden temporary directory and
renamed, so a SIGKILL leaves the previous checkpoint whole. Only a checkpoint whose manifest matches is
resumed unless the user trusts it (:func:`verify_checkpoint`); nothing in it is loaded with
``weights_only=False``.
``run_config.json`` beside them stamps the recipe they were trained with: a restart resumes only the same
recipe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from vlaops.errors import VlaopsError
from vlaops.utils.atomic import write_json
from vlaops.utils.locks import LockHeld, file_lock
from vlaops.utils.logging import get_logger, is_rank_zero

log = get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{7,})$")
TEMP_PATTERN = re.compile(r"^\.step_(\d{7,})\.tmp$")  # a save in progress (a fixed name: every rank writes into it)
LOCK_FILE = ".lock"  # held by the one trainer using the directory
TRAINER_STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "vlaops_manifest.json"  # sha256 of every file of a checkpoint, written by vlaops only
MANIFEST_FORMAT = 2  # 2: adds "weights" (what the model file holds); a format 1 checkpoint holds the whole model
MANIFEST_FORMATS = (1, 2)  # the formats this vlaops resumes
RUN_CONFIG_FILE = "run_config.json"  # in the checkpoint dir: what the checkpoints were trained with
PREVIOUS_DIR = "previous"  # under DVC, the checkpoints of the last different recipe (guard_checkpoints)


def _differing_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (lists compare as values)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            k for key in old.keys() | new.keys() for k in _differing_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        ]
    return [] if old == new else [prefix.rstrip(".")]


@contextlib.contextmanager
def lock_checkpoints(checkpoint_dir: Path) -> Iterator[None]:
    """Hold ``checkpoint_dir`` for one trainer (the main process) for the block.

    Two trainers on one directory would interleave their checkpoints and delete each other's saves in
    progress; the second is refused with one line naming the holder. Holding the lock, any
    ``.step_*.tmp`` left is a save killed midway: it is removed (and logged).
    """
    if not is_rank_zero():  # the other processes of a distributed run follow the main one
        yield
        return
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    try:
        with file_lock(checkpoint_dir / LOCK_FILE, wait=False):
            for p in sorted(checkpoint_dir.iterdir()):
                if TEMP_PATTERN.match(p.name):
                    shutil.rmtree(p, ignore_errors=True)
                    log.warning("removed %s: a checkpoint save left by an interrupted run", p)
            yield
    except LockHeld as exc:
        raise VlaopsError(
            f"{checkpoint_dir}: in use by another trainer ({exc.holder or 'unknown holder'}); "
            f"wait for it, or set paths.checkpoint_dir elsewhere"
        ) from None


def checkpoint_recipe(config: dict[str, Any], data_fingerprint: str) -> dict[str, Any]:
    """What decides whether the checkpoints of a directory continue a run (:func:`guard_checkpoints`): the
    config as plain data (seed, model, train, data; not ``train.trust_checkpoint``, which says how to load
    a checkpoint, not what was trained) and the fingerprint of the data it trains on."""
    recipe_cfg = {k: v for k, v in config.items() if k in ("seed", "model", "train", "data")}
    recipe_cfg["train"] = {k: v for k, v in recipe_cfg["train"].items() if k != "trust_checkpoint"}
    return {"config": recipe_cfg, "data": data_fingerprint}


def guard_checkpoints(checkpoint_dir: Path, recipe: dict[str, Any], set_aside: bool = False) -> None:
    """Resume only the same recipe: a checkpoint of another config is never silently mixed in.

    A plain run refuses with one line. Under DVC (``set_aside``: the stage runs with ``DVC_STAGE`` set)
    the checkpoint output is ``persist: true`` so that a killed train resumes, and a ``dvc exp run -S``
    with other params is a new run: the other recipe's checkpoints move to ``previous/`` (replacing an
    older set there), as DVC's own clean-up would have removed them without ``persist``.
    """
    stamp = checkpoint_dir / RUN_CONFIG_FILE
    if stamp.is_file():
        previous = json.loads(stamp.read_text())
        if previous != recipe:
            diff = sorted(_differing_keys(previous, recipe))
            if not set_aside:
                raise VlaopsError(
                    f"{checkpoint_dir}: holds checkpoints of a different run (differs in {diff[:5]}); "
                    f"delete it to start afresh, or set paths.checkpoint_dir elsewhere"
                )
            aside = checkpoint_dir / PREVIOUS_DIR
            shutil.rmtree(aside, ignore_errors=True)
            aside.mkdir()
            for p in sorted(checkpoint_dir.iterdir()):
                if CHECKPOINT_PATTERN.match(p.name) or p.name == RUN_CONFIG_FILE:
                    p.rename(aside / p.name)
            log.warning(
                "%s: checkpoints of a different run (differs in %s) moved to %s; training starts afresh",
                checkpoint_dir,
                diff[:5],
                aside,
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(checkpoint: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(checkpoint)): p
        for p in sorted(checkpoint.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }


def write_manifest(checkpoint: Path, weights: dict[str, Any] | None = None) -> None:
    """Stamp ``checkpoint`` as vlaops' own: the hash of every file in it, and ``weights`` (what its model
    file holds, ``vlaops.train.trainable.weights_record``; None: the whole model)."""
    files = {name: _sha256(p) for name, p in _files(checkpoint).items()}
    manifest = {"format_version": MANIFEST_FORMAT, "writer": "vlaops", "sha256": files}
    if weights is not None:
        manifest["weights"] = weights
    write_json(checkpoint / MANIFEST_FILE, manifest)


def read_manifest(checkpoint: Path) -> dict[str, Any]:
    """The manifest of a checkpoint :func:`verify_checkpoint` accepted ({} when it has none: trusted)."""
    path = checkpoint / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def verify_checkpoint(checkpoint: Path, trust: bool) -> None:
    """Refuse to resume ``checkpoint`` unless vlaops wrote it and nothing in it changed since.

    Resuming unpickles parts of a checkpoint (optimizer and RNG states, through torch.load), so a
    directory from elsewhere must not be loaded just because it sits in ``paths.checkpoint_dir``.
    ``trust`` (``train.trust_checkpoint``) loads it anyway, with a warning.
    """
    hint = "set train.trust_checkpoint=true to load it anyway, or delete it to start afresh"
    manifest_path = checkpoint / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = manifest["sha256"] if manifest.get("format_version") in MANIFEST_FORMATS else None
        problem = None if isinstance(expected, dict) else f"{manifest_path}: not a vlaops checkpoint manifest"
    except FileNotFoundError:
        expected, problem = None, f"{checkpoint}: no {MANIFEST_FILE}, so not a checkpoint vlaops wrote"
    except (OSError, ValueError, AttributeError) as exc:
        expected, problem = None, f"{manifest_path}: unreadable ({exc})"
    if problem is None:
        found = _files(checkpoint)
        extra = sorted(set(found) - set(expected))
        missing = sorted(set(expected) - set(found))
        changed = sorted(n for n in set(found) & set(expected) if _sha256(found[n]) != expected[n])
        if extra or missing or changed:
            problem = (
                f"{checkpoint}: differs from its manifest "
                f"(changed {changed[:3]}, missing {missing[:3]}, unlisted {extra[:3]})"
            )
    if problem is None:
        return
    if not trust:
        raise VlaopsError(f"{problem}; refusing to resume it (loading a checkpoint can run code): {hint}")
    log.warning("%s; loading it because train.trust_checkpoint=true", problem)


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a complete checkpoint (step, best/last losses)."""
    return json.loads((checkpoint / TRAINER_STATE_FILE).read_text())


def save_checkpoint(
    accelerator: Accelerator,
    checkpoint_dir: Path,
    step: int,
    state: dict[str, Any],
    keep: int,
    weights: dict[str, Any] | None = None,
    write_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``step_XXXXXXX`` atomically (every process saves its part), keep the newest ``keep``.

    ``weights`` goes into the manifest (what the model file holds); ``write_files(dir)`` adds the
    caller's files (main process only), hashed with the rest."""
    final = checkpoint_dir / f"step_{step:07d}"
    # a fixed temporary name (not mkdtemp): every process must write its RNG state into the same dir
    tmp = checkpoint_dir / f".step_{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if write_files is not None:
                write_files(tmp)
            write_json(tmp / TRAINER_STATE_FILE, state)  # its presence marks a complete checkpoint
            write_manifest(tmp, weights)  # last: hashes every file above
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except BaseException:  # an error, SIGTERM or Ctrl-C mid-save: no half checkpoint left behind
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
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
