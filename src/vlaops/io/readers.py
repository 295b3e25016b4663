"""The reader registry: one reader per recording format, each turning a path into an Episode.

New formats (robot HDF5 layouts, ROS1 bags, LeRobot, RLDS) are added here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlaops.io.episode import Episode
from vlaops.io.rosbag2 import is_rosbag2, read_rosbag2
from vlaops.io.settings import ReaderSettings


@dataclass(frozen=True)
class RecordingReader:
    name: str
    description: str
    matches: Callable[[Path], bool]
    read: Callable[[Path, ReaderSettings], Episode]  # settings: DataConfig satisfies ReaderSettings


READERS: tuple[RecordingReader, ...] = (
    RecordingReader("rosbag2", "a rosbag2 directory (metadata.yaml + .db3 or .mcap)", is_rosbag2, read_rosbag2),
)


def find_reader(path: Path) -> RecordingReader | None:
    """The reader that claims ``path``, or None when no format matches."""
    return next((r for r in READERS if r.matches(path)), None)


def expected_formats() -> str:
    return "; ".join(r.description for r in READERS)
