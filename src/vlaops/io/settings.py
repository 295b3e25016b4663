"""What a recording reader needs from the ingest settings, as a protocol.

``vlaops.io`` sits below ``vlaops.data`` (imports run downward), so readers name the settings they read
here instead of importing ``DataConfig``; ``vlaops.data.config.DataConfig`` satisfies both protocols
(tests/test_ingest.py checks it), and so does any object with these attributes.
"""

from __future__ import annotations

from typing import Any, Protocol


class TopicSettings(Protocol):
    """Which rosbag2 topic holds which stream; None for an optional stream the rig lacks."""

    rgb_static: str
    rgb_gripper: str | None
    joint_states: str
    tcp_pose: str
    scene_obs: str | None
    action: str
    instruction: str
    task: str | None


class CheckSettings(Protocol):
    """The plausibility settings a reader applies while it reads (the rest run on the whole episode)."""

    monotonic_stamps: bool


class TfSettings(Protocol):
    """Where the TCP pose comes from when ``tcp_source`` is ``tf``: the transform chain base -> tool."""

    topic: str
    static_topic: str | None
    base_frame: str | None
    tool_frame: str | None


class FieldSettings(Protocol):
    """Field paths of a stream recorded in a custom message type; None: the standard type."""

    action: list[str] | None
    joint_states: list[str] | None


class SplitSettings(Protocol):
    """How one bag is cut into episodes (none, instruction, gap)."""

    by: str
    gap_s: float


class BaseSettings(Protocol):
    """A mobile base's topics and action_type labels (``vlaops.io.mobile_base``)."""

    cmd_vel: str
    action_type: str
    action_types: list[str]


class Hdf5Settings(Protocol):
    """One key map per mapped HDF5 layout (``vlaops.io.hdf5.StreamMap`` each)."""

    aloha: Any
    robomimic: Any


class ReaderSettings(Protocol):
    """The ``data.*`` keys a reader reads (their meaning: ``vlaops.data.config.DataConfig``)."""

    topics: TopicSettings
    arm_joint_names: list[str]
    gripper_joint_names: list[str]
    control_hz: float
    sync_tolerance_s: float
    min_episode_len: int
    typestore: str
    embodiment: str
    base: BaseSettings
    custom_msgs: dict[str, str]
    fields: FieldSettings
    tcp_source: str
    tf: TfSettings
    default_instruction: str | None
    split: SplitSettings
    checks: CheckSettings
    hdf5: Hdf5Settings
