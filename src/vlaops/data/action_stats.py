"""Action statistics of the training split (the normalize stage), and the normaliser train and runtime share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vlaops.data.config import DataConfig
from vlaops.data.normalization import NORMALIZATION_FILE, ActionNormalizer, action_statistics
from vlaops.io import calvin
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
    arm = actions[:, :-1]
    clipped = float(np.mean((arm < cfg.norm_min) | (arm > cfg.norm_max)))
    normalizer = ActionNormalizer(norm_min=cfg.norm_min, norm_max=cfg.norm_max, stats=stats)
    summary = {"frames": len(actions), "arm_fraction_clipped": clipped, **stats}
    with atomic_dir(out_dir) as tmp:
        normalizer.save(tmp / NORMALIZATION_FILE)
        write_json(tmp / STATS_FILE, summary)
    log.info("action stats over %d training frames; %.1f%% of arm values clipped to [%g, %g]",
             len(actions), 100 * clipped, cfg.norm_min, cfg.norm_max)
    return summary
