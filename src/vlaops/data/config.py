"""Settings of the data stages (ingest, convert, normalize) and the training loader."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class TopicMap:
    """Which rosbag2 topic holds which stream; None for an optional stream the rig lacks.

    Field names are the simulator's too (``vlaops.sim.config.SimTopics``): conf/data/default.yaml
    defaults each one to ``${sim.topics.<name>}``, so ingest reads what collect records."""

    rgb_static: str = "/camera/static/image_raw"  # sensor_msgs/Image or CompressedImage
    rgb_gripper: Optional[str] = "/camera/gripper/image_raw"
    joint_states: str = "/joint_states"  # sensor_msgs/JointState
    tcp_pose: str = "/tcp_pose"  # geometry_msgs/PoseStamped
    scene_obs: Optional[str] = "/scene_state"  # std_msgs/Float64MultiArray (24)
    action: str = "/action"  # std_msgs/Float64MultiArray (7): absolute tcp target + gripper ±1
    instruction: str = "/instruction"  # std_msgs/String
    task: Optional[str] = None  # std_msgs/String; None: the task name is derived from the instruction


@dataclass
class AugmentConfig:
    """RoboVLMs' training augmentation: random shift and colour jitter."""

    rgb_pad: int = 10
    gripper_pad: int = 4
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1

    def __post_init__(self) -> None:
        for name in ("rgb_pad", "gripper_pad"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.augment.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class DataConfig:
    raw_dir: str = "data/raw"  # conf/: ${paths.collect_dir}, so ingest depends on collect in dvc.yaml
    episodes_dir: str = "data/episodes"
    calvin_dir: str = "data/calvin"
    normalized_dir: str = "data/normalized"
    # ingest
    topics: TopicMap = field(default_factory=TopicMap)
    arm_joint_names: list[str] = field(default_factory=lambda: [f"panda_joint{i}" for i in range(1, 8)])
    gripper_joint_names: list[str] = field(default_factory=lambda: ["panda_finger_joint1", "panda_finger_joint2"])
    control_hz: float = 30.0  # conf/: ${sim.control_hz} (an int there; a float here for real rigs)
    sync_tolerance_s: float = 0.05  # the newest message of a stream may be at most this old at a tick
    min_episode_len: int = 16
    on_bad_input: str = "error"  # "error": stop at the first bad recording; "quarantine": report and skip it
    # convert
    val_fraction: float = 0.2
    split_seed: int = 0
    lang_embedding_dim: int = 384  # CALVIN ships 384-d MiniLM embeddings; ours are hashed (see io/calvin.py)
    trust_pickles: bool = False  # load CALVIN's pickled annotation files when no JSON twin exists
    # normalize (RoboVLMs: norm_min / norm_max in robovlms/data/data_utils.py)
    norm_min: float = -0.65
    norm_max: float = 0.65
    # training loader
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Packed frame cache (data/frame_cache.py): each annotated frame decoded and resized once, keyed by the
    # split's content and model.image_size; None reads the npz files for every sample (RoboVLMs' loader).
    # Git-ignored and not a DVC output: it is derived from data.calvin_dir and rebuilt whenever that
    # changes, so tracking it would only double the storage, and DVC deletes a stage's outputs before
    # running it, which would throw away the reuse the cache exists for.
    cache_dir: Optional[str] = "data/cache"

    def __post_init__(self) -> None:
        if self.on_bad_input not in ("error", "quarantine"):
            raise ValueError(f"data.on_bad_input must be 'error' or 'quarantine', got {self.on_bad_input!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.control_hz <= 0 or self.sync_tolerance_s <= 0:
            raise ValueError("data.control_hz and data.sync_tolerance_s must be > 0")
        if self.cache_dir is not None and not self.cache_dir.strip():
            raise ValueError("data.cache_dir must be a directory or null (no cache), got an empty string")
        if not self.norm_min < 0 < self.norm_max:
            raise ValueError(f"data.norm_min < 0 < data.norm_max expected, got {self.norm_min}, {self.norm_max}")
