"""The reader registry: one reader per recording format, each turning a path into an Episode.

New formats (robot HDF5 layouts, ROS1 bags, LeRobot, RLDS) are added here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlaops.io.episode import Episode
from vlaops.io.hdf5 import hdf5_episodes, is_hdf5, read_hdf5
from vlaops.io.mobile_base import read_base_bag
from vlaops.io.rosbag2 import is_rosbag2, read_rosbag2, rosbag2_episodes, sidecar_paths
from vlaops.io.settings import ReaderSettings


@dataclass(frozen=True)
class RecordingReader:
    """One recording format. A recording holds one or more episodes (a bag one, a robomimic file many):
    ``episodes`` lists their keys, ``read`` reads one, so one bad episode is reported on its own and the
    others of the same file are kept. Both raise :class:`vlaops.errors.RecordingError` on bad data."""

    name: str
    description: str
    matches: Callable[[Path], bool]
    episodes: Callable[[Path, ReaderSettings], list[str]]  # settings: DataConfig satisfies ReaderSettings
    read: Callable[[Path, str, ReaderSettings], Episode]
    # files beside the recording that belong to it (a bag's instruction sidecar): not recordings of their own
    sidecars: Callable[[Path], list[Path]] = lambda path: []


def read_bag(path: Path, key: str, cfg: ReaderSettings) -> Episode:
    """One episode of a bag as its rig recorded it: a mobile base's velocity commands and action_type
    (``data.embodiment=mobile_base``, ``vlaops.io.mobile_base``: a bag is one episode) or an arm's
    (``vlaops.io.rosbag2``)."""
    if cfg.embodiment == "mobile_base":
        return read_base_bag(path, cfg)
    return read_rosbag2(path, key, cfg)


READERS: tuple[RecordingReader, ...] = (
    RecordingReader(
        "rosbag2",
        "a rosbag2 directory (metadata.yaml + .db3 or .mcap; without metadata.yaml too), a lone .db3 / .mcap file, or "
        "a ROS1 .bag",
        is_rosbag2,
        rosbag2_episodes,
        read_bag,
        sidecar_paths,
    ),
    RecordingReader(
        "hdf5",
        "an HDF5 file (canonical, ALOHA/ACT or robomimic layout, told by its content)",
        is_hdf5,
        hdf5_episodes,
        read_hdf5,
    ),
)


def find_reader(path: Path) -> RecordingReader | None:
    """The reader that claims ``path``, or None when no format matches."""
    return next((r for r in READERS if r.matches(path)), None)


def sidecars(entries: list[Path]) -> set[Path]:
    """The entries that are another entry's sidecar (``bag_0003.json`` beside ``bag_0003/``)."""
    return {side for entry in entries if (reader := find_reader(entry)) is not None for side in reader.sidecars(entry)}


def expected_formats() -> str:
    return "; ".join(r.description for r in READERS)
