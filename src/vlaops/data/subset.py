"""Few-shot training subsets: N demonstrations per task, or a fraction, of a split already converted.

A learning curve (success against demonstrations per task) needs the same data cut smaller, not new data:
re-collecting would change the scenes along with the count. ``data.subset`` picks annotated spans of the
training split per task, with its own seed, each smaller subset inside the larger ones of the same seed
(every task's spans are shuffled once and the first N taken), so the curve's points differ only by the
demonstrations added. The choice is recorded with the data fingerprint (the checkpoint's and MLflow's).
"""

from __future__ import annotations

import hashlib
import zlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from vlaops.data.config import SubsetConfig
from vlaops.errors import VlaopsError
from vlaops.io.calvin import Annotation


def select_subset(annotations: Sequence[Annotation], cfg: SubsetConfig, where: str) -> list[Annotation]:
    """The spans ``cfg`` keeps, in their original order (all of them when no subset is set)."""
    if not cfg.active:
        return list(annotations)
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, ann in enumerate(annotations):
        by_task[ann.task].append(i)
    if not by_task:
        raise VlaopsError(f"{where}: no annotated spans to take data.subset from")
    keep: list[int] = []
    for task, indices in sorted(by_task.items()):
        rng = np.random.default_rng([cfg.seed, zlib.crc32(task.encode())])
        order = [indices[j] for j in rng.permutation(len(indices))]
        if cfg.per_task is not None:
            count = min(cfg.per_task, len(order))
        else:
            count = max(1, round(float(cfg.fraction) * len(order)))
        keep += order[:count]
    return [annotations[i] for i in sorted(keep)]


def subset_fingerprint(kept: Sequence[Annotation], cfg: SubsetConfig) -> dict[str, Any] | None:
    """What the subset is, for the data fingerprint: the setting, spans per task and a hash of the spans."""
    if not cfg.active:
        return None
    per_task = Counter(ann.task for ann in kept)
    spans = "\n".join(f"{a.start} {a.end} {a.task}" for a in kept)
    return {
        "per_task": cfg.per_task,
        "fraction": cfg.fraction,
        "seed": cfg.seed,
        "spans": len(kept),
        "spans_per_task": dict(sorted(per_task.items())),
        "sha256": hashlib.sha256(spans.encode()).hexdigest(),
    }
