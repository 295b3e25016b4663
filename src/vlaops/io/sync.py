"""Time synchronisation of multi-rate streams to the control rate.

A robot publishes cameras, joint states and commands at different rates and with jitter. The
policy sees, at each control tick, the newest message of each stream that was already there
(a zero-order hold); a stream older than the tolerance at a tick means a dropped sensor, which is
an error rather than something to paper over.
"""

from __future__ import annotations

import numpy as np


class SyncError(ValueError):
    """A stream has no message close enough before a control tick."""


def hold_last(stamps: np.ndarray, ticks: np.ndarray, tolerance: float, name: str) -> np.ndarray:
    """Index of the newest message at or before each tick.

    stamps: (M,) seconds, sorted; ticks: (T,) seconds, sorted -> (T,) int indices into stamps.
    """
    if len(stamps) == 0:
        raise SyncError(f"stream '{name}' has no messages")
    idx = np.searchsorted(stamps, ticks, side="right") - 1
    if np.any(idx < 0):
        first = float(ticks[np.argmax(idx < 0)])
        raise SyncError(f"stream '{name}' has no message at or before tick t={first:.3f}s")
    age = ticks - stamps[idx]
    if np.any(age > tolerance):
        worst = int(np.argmax(age))
        raise SyncError(
            f"stream '{name}' is {age[worst] * 1e3:.0f} ms old at tick t={ticks[worst]:.3f}s "
            f"(tolerance {tolerance * 1e3:.0f} ms): a dropped or late sensor"
        )
    return idx


def common_start(stream_starts: dict[str, float], ticks: np.ndarray) -> int:
    """First tick index at which every stream has published at least once."""
    latest = max(stream_starts.values())
    return int(np.searchsorted(ticks, latest, side="left"))
