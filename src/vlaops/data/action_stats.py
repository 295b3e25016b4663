"""Action statistics of the training split (the normalize stage), and the normaliser train and runtime share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vlaops.data.config import DataConfig
from vlaops.data.normalization import NORMALIZATION_FILE, ActionNormalizer, action_statistics
from vlaops.errors import VlaopsError
from vlaops.io import calvin
from vlaops.io.episode import BASE_ACTION_NAMES
from vlaops.utils.atomic import atomic_dir, write_json
from vlaops.utils.logging import get_logger

log = get_logger(__name__)
STATS_FILE = "action_stats.json"


def split_rel_actions(split: calvin.CalvinSplit) -> np.ndarray:
    """(N, 7) rel_actions of every frame of every episode of ``split``."""
    frames = [i for s, e in split.ep_start_end_ids for i in range(int(s), int(e) + 1)]
    return np.stack([split.load_frame(i, ("rel_actions",))["rel_actions"] for i in frames])


def normalize(calvin_dir: Path, out_dir: Path, cfg: DataConfig) -> dict[str, Any]:
    """Write ``normalization.json`` and ``action_stats.json`` from the training split of ``calvin_dir``."""
    split = calvin.CalvinSplit(calvin_dir / calvin.TRAINING, trust_pickles=cfg.trust_pickles)
    actions = split_rel_actions(split)
    stats = action_statistics(actions)
    info = calvin.dataset_info(calvin_dir)
    if info.embodiment == calvin.MOBILE_BASE:
        return _normalize_base(actions, stats, info, out_dir, cfg)
    arm = actions[:, :-1]
    clipped = float(np.mean((arm < cfg.norm_min) | (arm > cfg.norm_max)))
    normalizer = ActionNormalizer(norm_min=cfg.norm_min, norm_max=cfg.norm_max, stats=stats)
    summary = {"frames": len(actions), "arm_fraction_clipped": clipped, **stats}
    with atomic_dir(out_dir) as tmp:
        normalizer.save(tmp / NORMALIZATION_FILE)
        write_json(tmp / STATS_FILE, summary)
    log.info(
        "action stats over %d training frames; %.1f%% of arm values clipped to [%g, %g]",
        len(actions),
        100 * clipped,
        cfg.norm_min,
        cfg.norm_max,
    )
    return summary


def _normalize_base(
    actions: np.ndarray, stats: dict[str, Any], info: calvin.DatasetInfo, out_dir: Path, cfg: DataConfig
) -> dict[str, Any]:
    """A mobile base's (N, 4) rel_actions: per-dimension bounds of the 3 continuous dims (the training split's
    min and max) onto [norm_min, norm_max]; the action_type class id kept as it is (its counts recorded)."""
    classes = actions[:, -1]
    k = len(info.action_types)
    if np.any(classes != np.round(classes)) or np.any(classes < 0) or np.any(classes >= k):
        raise VlaopsError(
            f"{out_dir}: action_type class ids {np.unique(classes)[:5]} outside 0..{k - 1} "
            f"(labels {list(info.action_types)}); re-run convert"
        )
    stats["class_counts"] = np.bincount(classes.astype(np.int64), minlength=k).astype(np.float64).tolist()
    normalizer = ActionNormalizer(
        norm_min=cfg.norm_min,
        norm_max=cfg.norm_max,
        stats=stats,
        act_min_bound=stats["min"][:-1],
        act_max_bound=stats["max"][:-1],
        action_classes=k,
        class_labels=list(info.action_types),
    )
    summary = {"frames": len(actions), "embodiment": info.embodiment, "action_names": list(BASE_ACTION_NAMES), **stats}
    with atomic_dir(out_dir) as tmp:
        normalizer.save(tmp / NORMALIZATION_FILE)
        write_json(tmp / STATS_FILE, summary)
    log.info(
        "mobile base: %d training frames; continuous bounds %s..%s -> [%g, %g]; action_type counts %s",
        len(actions),
        stats["min"][:-1],
        stats["max"][:-1],
        cfg.norm_min,
        cfg.norm_max,
        dict(zip(info.action_types, stats["class_counts"])),
    )
    return summary
