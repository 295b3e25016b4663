"""Convert canonical episodes into the CALVIN layout with a training / validation split."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from vlaops.data.config import DataConfig
from vlaops.errors import VlaopsError
from vlaops.io import calvin
from vlaops.io.calvin_spec import RGB_GRIPPER_SIZE, RGB_STATIC_SIZE, SCENE_OBS_DIM
from vlaops.io.episode import BASE_ACTION_NAMES, Episode, read_episode
from vlaops.io.mobile_base import episode_labels
from vlaops.utils.atomic import atomic_dir, write_json
from vlaops.utils.logging import get_logger

log = get_logger(__name__)


def split_episodes(episode_ids: list[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """Seeded split by episode (never by frame), at least one episode on each side."""
    if len(episode_ids) < 2:
        raise VlaopsError(f"need at least 2 episodes for a training/validation split, got {len(episode_ids)}")
    order = np.random.default_rng(seed).permutation(len(episode_ids))
    n_val = min(max(1, round(val_fraction * len(episode_ids))), len(episode_ids) - 1)
    val = sorted(episode_ids[i] for i in order[:n_val])
    train = sorted(episode_ids[i] for i in order[n_val:])
    return {calvin.TRAINING: train, calvin.VALIDATION: val}


def _resize(frames: np.ndarray, size: int) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, size, size, 3) uint8; CALVIN's cameras are square."""
    if frames.shape[1:3] == (size, size):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR)) for f in frames])


def _calvin_frames(ep: Episode) -> dict[str, np.ndarray]:
    """Per-key (T, ...) arrays in CALVIN's per-frame layout."""
    t = len(ep)
    gripper = (
        ep.rgb_gripper if ep.rgb_gripper is not None else np.zeros((t, RGB_GRIPPER_SIZE, RGB_GRIPPER_SIZE, 3), np.uint8)
    )
    if ep.embodiment == calvin.MOBILE_BASE:  # 4-dim actions, no robot or scene state: calvin.BASE_FRAME_KEYS
        return {
            "actions": ep.action_base,
            "rel_actions": calvin.base_rel_actions(ep.action_base),
            "rgb_static": _resize(ep.rgb_static, RGB_STATIC_SIZE),
            "rgb_gripper": _resize(gripper, RGB_GRIPPER_SIZE),
        }
    if ep.embodiment != "arm":
        raise VlaopsError(f"{ep.source}: embodiment '{ep.embodiment}' cannot be written as CALVIN")
    return {
        "actions": ep.action_abs,
        "rel_actions": calvin.rel_actions_from_abs(ep.action_abs, ep.robot_obs),
        "robot_obs": ep.robot_obs,
        "scene_obs": ep.scene_obs if ep.scene_obs is not None else np.zeros((t, SCENE_OBS_DIM)),
        "rgb_static": _resize(ep.rgb_static, RGB_STATIC_SIZE),
        "rgb_gripper": _resize(gripper, RGB_GRIPPER_SIZE),
    }


def convert(episodes_dir: Path, out_dir: Path, cfg: DataConfig) -> dict[str, Any]:
    """Write ``out_dir/{training,validation}`` from ``episodes_dir/*.h5``; returns the provenance."""
    paths = sorted(episodes_dir.glob("*.h5")) if episodes_dir.is_dir() else []
    if not paths:
        raise VlaopsError(f"{episodes_dir}: no canonical episodes (*.h5) found; run ingest first")
    started = time.perf_counter()
    by_id = {p.stem: p for p in paths}
    splits = split_episodes(list(by_id), cfg.val_fraction, cfg.split_seed)
    provenance: dict[str, Any] = {
        "format_version": calvin.FORMAT_VERSION,
        "created_by": "vlaops convert",
        "lang_embedding": calvin.LANG_EMBEDDING_NAME,
        "episodes": {},
    }
    frame_id = 0
    train_stats: dict[str, Any] | None = None
    kind: tuple[str, list[str] | None] | None = (
        None  # (embodiment, base labels) of the first episode: all must share it
    )
    with atomic_dir(out_dir) as tmp:
        for split in calvin.SPLITS:  # training first: its statistics are written to both splits
            split_dir = tmp / split
            split_dir.mkdir()
            entries: list[tuple[int, int, str, str]] = []
            collected: dict[str, list[np.ndarray]] = {"robot_obs": [], "scene_obs": [], "actions": []}
            for ep_id in tqdm(splits[split], desc=f"convert {split}", unit="ep", disable=None):
                ep = read_episode(by_id[ep_id])
                this = (ep.embodiment, episode_labels(ep))
                if kind is not None and this != kind:  # one action space per dataset: it is the policy head's
                    raise VlaopsError(
                        f"{by_id[ep_id]}: an episode of embodiment "
                        f"'{this[0]}'{f' with action_types {this[1]}' if this[1] else ''}"
                        f", but {episodes_dir} also holds '{kind[0]}' episodes"
                        f"{f' with action_types {kind[1]}' if kind[1] else ''}; convert one kind at a time"
                    )
                kind = this
                if ep.embodiment == calvin.MOBILE_BASE and this[1] is None:
                    raise VlaopsError(
                        f"{by_id[ep_id]}: a mobile_base episode without its action_types labels; re-ingest it"
                    )
                frames = _calvin_frames(ep)
                start = frame_id
                for i in range(len(ep)):
                    calvin.write_frame(split_dir, frame_id, {k: v[i] for k, v in frames.items()})
                    frame_id += 1
                entries.append((start, frame_id - 1, ep.instruction, ep.task))
                for key in collected:
                    if key in frames:  # a base has no robot_obs / scene_obs
                        collected[key].append(frames[key])
                provenance["episodes"][ep_id] = {
                    "split": split,
                    "start": start,
                    "end": frame_id - 1,
                    # the recording's name and content hash, not its absolute path: the output (and the data
                    # fingerprint hashed from it) must not change when the raw data moves
                    "source_name": Path(ep.source).name,
                    "source_sha256": ep.source_sha256,
                    "has_gripper_camera": ep.rgb_gripper is not None,
                }
            if train_stats is None and kind is not None and kind[0] == calvin.MOBILE_BASE:
                train_stats = calvin.base_statistics_yaml(np.concatenate(collected["actions"]))
            elif train_stats is None:
                train_stats = calvin.statistics_yaml(
                    *(np.concatenate(collected[k]) for k in ("robot_obs", "scene_obs", "actions"))
                )
            calvin.write_split_metadata(split_dir, entries, train_stats, cfg.lang_embedding_dim)
        if kind is not None and kind[0] == calvin.MOBILE_BASE:  # an arm's provenance stays as it was (no key)
            provenance["embodiment"] = calvin.MOBILE_BASE
            provenance["action_names"] = list(BASE_ACTION_NAMES)
            provenance["action_types"] = kind[1]
        provenance["frames"] = frame_id
        provenance["splits"] = {s: len(v) for s, v in splits.items()}
        write_json(tmp / calvin.PROVENANCE, provenance)
    log.info(
        "converted %d episodes (%d frames) in %.1fs: %s",
        len(paths),
        frame_id,
        time.perf_counter() - started,
        provenance["splits"],
    )
    return provenance
