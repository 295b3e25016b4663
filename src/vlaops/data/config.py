"""Settings of the data stages (ingest, convert, normalize) and the training loader."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass
class TopicMap:
    """Which rosbag2 topic holds which stream; None for an optional stream the rig lacks.

    Field names are the simulator's too (``vlaops.sim.config.SimTopics``): conf/data/default.yaml
    defaults each one to ``${sim.topics.<name>}``, so ingest reads what collect records."""

    rgb_static: str = "/camera/static/image_raw"  # sensor_msgs/Image or CompressedImage
    rgb_gripper: str | None = "/camera/gripper/image_raw"
    joint_states: str = "/joint_states"  # sensor_msgs/JointState
    tcp_pose: str = "/tcp_pose"  # geometry_msgs/PoseStamped
    scene_obs: str | None = "/scene_state"  # std_msgs/Float64MultiArray (24)
    action: str = "/action"  # std_msgs/Float64MultiArray (7): absolute tcp target + gripper ±1
    instruction: str = "/instruction"  # std_msgs/String
    task: str | None = None  # std_msgs/String; None: the task name is derived from the instruction


# The Franka Panda's joint limits (rad), from Franka's "Robot and interface specifications" (q_min / q_max):
# the embedded simulator's arm and the robot data.arm_joint_names names by default.
PANDA_JOINT_MIN = [-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973]
PANDA_JOINT_MAX = [2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973]


@dataclass
class CheckConfig:
    """Plausibility checks ingest runs on every episode before it is kept (``data/plausibility.py``).

    A recording can be readable and still wrong: a commanded action of 1e30, a joint far past its limit,
    a camera that changes resolution, a clock that jumps back. One such episode would wreck the action
    statistics and the normalisation every other episode is trained with, so it is quarantined (or stops
    ingest) with the check that failed. Defaults fit a 7-DOF arm on a table (the Panda of the embedded
    simulator: its recordings reach 0.67 m, 0.65 m/s target speed and 0.035 m target offset); ``null``
    turns a bound off. Non-finite values and a frame size changing mid-episode are always errors.
    """

    max_abs_position_m: float | None = 2.0  # |x|, |y|, |z| of the TCP pose and of the target pose
    max_abs_angle_rad: float | None = 6.3  # |euler| of the TCP and target pose: any euler convention is within 2 pi
    max_target_speed_m_s: float | None = 3.0  # target position jump between ticks x control_hz (Panda: 1.7 m/s max)
    max_target_offset_m: float | None = 0.5  # distance of the target position from the TCP at the same tick
    joint_min: list[float] | None = field(
        default_factory=lambda: list(PANDA_JOINT_MIN)
    )  # one per arm joint; null: no limit
    joint_max: list[float] | None = field(default_factory=lambda: list(PANDA_JOINT_MAX))
    joint_margin_rad: float = 0.05  # a simulator or a controller overshoots a limit by a little
    monotonic_stamps: bool = True  # a topic's stamps going back in time is an error; false: sort them by stamp

    def __post_init__(self) -> None:
        for name in ("max_abs_position_m", "max_abs_angle_rad", "max_target_speed_m_s", "max_target_offset_m"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"data.checks.{name} must be > 0 or null, got {value}")
        if (self.joint_min is None) != (self.joint_max is None):
            raise ValueError("data.checks.joint_min and data.checks.joint_max must both be lists or both null")
        if self.joint_min is not None and self.joint_max is not None:
            if len(self.joint_min) != len(self.joint_max) or any(
                lo >= hi for lo, hi in zip(self.joint_min, self.joint_max)
            ):
                raise ValueError(
                    f"data.checks.joint_min < joint_max expected, one per joint; got {self.joint_min}, {self.joint_max}"
                )
        if self.joint_margin_rad < 0:
            raise ValueError(f"data.checks.joint_margin_rad must be >= 0, got {self.joint_margin_rad}")


ACTION_EXPRESSIONS = ("absolute_pose", "relative_pose", "absolute_joint")


@dataclass
class Hdf5StreamMap:
    """Which dataset of a robot HDF5 layout holds which of vlaops' streams (``io/hdf5.py``).

    Keys are relative to one episode: the file's root for ALOHA/ACT, ``data/<demo>`` for robomimic. An
    image key holds (T, H, W, 3) uint8, or (T, N) uint8 JPEG bytes when a ``compress_len`` dataset sits
    beside the images (ALOHA's compressed variant). The canonical episode needs the TCP pose and a
    TCP-pose action; how the file expresses its action says how it is converted:
    ``absolute_pose`` (target xyz + euler xyz, or + quaternion xyzw), ``relative_pose`` (a controller's
    delta: xyz and axis-angle in [-1, 1], scaled by relative_pos_scale / relative_rot_scale, or by the
    controller's output_max in robomimic's ``env_args``), ``absolute_joint`` (joint targets: converting
    them needs the robot's kinematics, which vlaops does not have, so such a file is refused with that
    reason rather than given invented poses)."""

    rgb_static: str = "observations/images/top"
    rgb_gripper: str | None = None  # e.g. observations/images/cam_left_wrist; null: none
    joints: str = "observations/qpos"
    joint_columns: list[int] | None = None  # the arm's joints among the key's columns (7); null: all columns
    gripper: str | None = None  # finger positions; width = sum of |columns|; null: the width is not recorded (0)
    gripper_columns: list[int] | None = None
    tcp_pos: str | None = None  # (T, 3) TCP position, m; null: not recorded (an absolute_joint action needs it anyway)
    tcp_rot: str | None = None  # (T, 4) quaternion xyzw or (T, 3) euler xyz, rad
    action: str = "action"
    action_expression: str = "absolute_joint"
    action_columns: list[int] | None = None  # pose (6 or 7) + gripper (1) among the key's columns; null: all
    gripper_open_sign: float = 1.0  # the sign of an "open" gripper action in the file (robosuite: -1)
    relative_pos_scale: float = 0.05  # m per unit of a relative action (robosuite OSC_POSE output_max)
    relative_rot_scale: float = 0.5  # rad per unit
    instruction: str | None = None  # used when the file has no 'instruction' attr; null: required in the file

    def check(self, prefix: str) -> None:
        """Raise ValueError naming ``prefix.<field>`` (Hdf5Config knows which layout this map is)."""
        if self.action_expression not in ACTION_EXPRESSIONS:
            raise ValueError(
                f"{prefix}.action_expression must be one of {ACTION_EXPRESSIONS}, got {self.action_expression!r}"
            )
        if self.gripper_open_sign not in (1.0, -1.0):
            raise ValueError(f"{prefix}.gripper_open_sign must be 1 or -1, got {self.gripper_open_sign}")
        if not (self.relative_pos_scale > 0 and self.relative_rot_scale > 0):
            raise ValueError(f"{prefix}.relative_pos_scale and relative_rot_scale must be > 0")


def _robomimic_map() -> Hdf5StreamMap:
    """robomimic's Panda datasets (robosuite: OSC_POSE delta actions, gripper -1 open)."""
    return Hdf5StreamMap(
        rgb_static="obs/agentview_image",
        rgb_gripper="obs/robot0_eye_in_hand_image",
        joints="obs/robot0_joint_pos",
        gripper="obs/robot0_gripper_qpos",
        tcp_pos="obs/robot0_eef_pos",
        tcp_rot="obs/robot0_eef_quat",
        action="actions",
        action_expression="relative_pose",
        gripper_open_sign=-1.0,
    )


@dataclass
class Hdf5Config:
    """The HDF5 layouts ingest reads, each chosen per file by its content (not its extension):
    canonical (vlaops' own episode file, ``vlaops.io.episode``: read as it is), ALOHA/ACT and robomimic
    (mapped by these keys)."""

    aloha: Hdf5StreamMap = field(default_factory=Hdf5StreamMap)
    robomimic: Hdf5StreamMap = field(default_factory=_robomimic_map)

    def __post_init__(self) -> None:
        self.aloha.check("data.hdf5.aloha")
        self.robomimic.check("data.hdf5.robomimic")


TCP_SOURCES = ("pose", "tf")


@dataclass
class TfConfig:
    """The TCP pose from the transform tree (``data.tcp_source: tf``): the chain of tf2_msgs/TFMessage
    transforms from ``base_frame`` to ``tool_frame`` (through any intermediate frames, static ones from
    ``static_topic`` included), composed at every control tick. Many rigs publish no PoseStamped of the
    tool, but every ROS arm driver publishes /tf."""

    topic: str = "/tf"
    static_topic: str | None = "/tf_static"  # null: the rig publishes no static transforms
    base_frame: str | None = None  # e.g. panda_link0: the frame the TCP pose (and the action) is in
    tool_frame: str | None = None  # e.g. panda_hand_tcp


@dataclass
class MessageFields:
    """Where a stream's numbers are in a message of the team's own type (``data.custom_msgs``): field paths
    (``target``, ``pose.position.x``) whose values, concatenated in order, give the stream. null: the
    stream's topic has the standard type (``data.topics`` says which)."""

    action: list[str] | None = None  # 7 values: target tcp xyz, euler xyz, gripper ±1
    joint_states: list[str] | None = None  # data.arm_joint_names' positions, then data.gripper_joint_names'


SPLIT_MODES = ("none", "instruction", "gap")


@dataclass
class SplitConfig:
    """How one bag is cut into episodes: ``none`` (the bag is one episode), ``instruction`` (each message
    on data.topics.instruction starts one) or ``gap`` (no action message for more than ``gap_s`` ends one).
    The episodes of a cut bag are ``<bag>_000``, ``<bag>_001`` ... in time order."""

    by: str = "none"
    gap_s: float = 1.0


EMBODIMENTS = ("arm", "mobile_base")  # vlaops.io.episode.EMBODIMENTS


@dataclass
class BaseConfig:
    """A mobile base's recording (``data.embodiment: mobile_base``; ``io/mobile_base.py``): the seed's robot car,
    whose action is linear_x, linear_y, angular_z (continuous) + an action_type class.

    The velocity command on ``cmd_vel`` (geometry_msgs/Twist or TwistStamped) is the action and sets the
    control ticks; ``action_type`` (std_msgs/String holding one of ``action_types``, or an std_msgs integer
    holding a class id) is held from its last message at each tick. A base records no arm state: its
    episode has none (no robot_obs), and the policy reads only the cameras and the instruction."""

    cmd_vel: str = "/cmd_vel"
    action_type: str = "/action_type"
    # the rig's action_type labels in class-id order (class id = index); required for a mobile base
    action_types: list[str] = field(default_factory=list)

    def check(self) -> None:
        """Raise ValueError naming ``data.base.<field>`` (DataConfig calls it for a mobile base)."""
        if len(self.action_types) < 2 or len(set(self.action_types)) != len(self.action_types):
            raise ValueError(
                "data.base.action_types must list at least two distinct action_type labels (class id = "
                f"index) for data.embodiment=mobile_base, got {self.action_types}"
            )
        if not (self.cmd_vel and self.action_type):
            raise ValueError(
                f"data.base.cmd_vel and data.base.action_type must name topics, got {self.cmd_vel!r}, "
                f"{self.action_type!r}"
            )


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
class SubsetConfig:
    """Few-shot training (``data.subset``): which annotated spans of the training split train, picked per
    task with ``seed``; the validation split, the normalisation and the data on disk stay whole."""

    per_task: int | None = None  # this many spans of each task (all of a task that has fewer)
    fraction: float | None = None  # or this fraction of each task's spans, rounded, at least one
    seed: int = 0

    def __post_init__(self) -> None:
        if self.per_task is not None and self.fraction is not None:
            raise ValueError(f"data.subset: set per_task ({self.per_task}) or fraction ({self.fraction}), not both")
        if self.per_task is not None and (not isinstance(self.per_task, int) or self.per_task < 1):
            raise ValueError(f"data.subset.per_task must be a positive integer or null, got {self.per_task!r}")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"data.subset.fraction must be in (0, 1] or null, got {self.fraction!r}")

    @property
    def active(self) -> bool:
        return self.per_task is not None or self.fraction is not None


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
    # message definitions for bags that carry none (a .db3 without metadata.yaml, older rosbag2): a
    # rosbags.typesys.Stores value (ros2_humble, ros2_jazzy, ros1_noetic, ...)
    typestore: str = "ros2_humble"
    # what the recordings are of: "arm" (CALVIN's 7-dim actions) or "mobile_base" (data.base: Twist + action_type)
    embodiment: str = "arm"
    base: BaseConfig = field(default_factory=BaseConfig)
    # message types of the team's own packages, {type name: .msg text}, for bags that carry no definitions
    # (ROS1-converted, a .db3 without them, a recorder that lacked the package); data.fields says where
    # the numbers are
    custom_msgs: dict[str, str] = field(default_factory=dict)
    fields: MessageFields = field(default_factory=MessageFields)
    tcp_source: str = "pose"  # "pose": data.topics.tcp_pose (PoseStamped); "tf": composed from data.tf
    tf: TfConfig = field(default_factory=TfConfig)
    # the instruction when data.topics.instruction gives none: a sidecar <recording>.json (or
    # <bag dir>/instruction.json) with {"instruction": ..., "task": ...} first, then this; null: required
    default_instruction: str | None = None
    split: SplitConfig = field(default_factory=SplitConfig)
    num_workers: int = 0  # processes reading recordings (0: one per core); the output does not depend on it
    checks: CheckConfig = field(default_factory=CheckConfig)
    hdf5: Hdf5Config = field(default_factory=Hdf5Config)
    # convert
    val_fraction: float = 0.2
    split_seed: int = 0
    lang_embedding_dim: int = 384  # CALVIN ships 384-d MiniLM embeddings; ours are hashed (see io/calvin.py)
    trust_pickles: bool = False  # load CALVIN's pickled annotation files when no JSON twin exists
    # normalize (RoboVLMs: norm_min / norm_max in robovlms/data/data_utils.py)
    norm_min: float = -0.65
    norm_max: float = 0.65
    # training loader
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Packed frame cache (data/frame_cache.py): each annotated frame decoded and resized once, keyed by the
    # split's content and model.image_size; None reads the npz files for every sample (RoboVLMs' loader).
    # Git-ignored and not a DVC output: it is derived from data.calvin_dir and rebuilt whenever that
    # changes, so tracking it would only double the storage, and DVC deletes a stage's outputs before
    # running it, which would throw away the reuse the cache exists for.
    cache_dir: str | None = "data/cache"

    def __post_init__(self) -> None:
        if self.on_bad_input not in ("error", "quarantine"):
            raise ValueError(f"data.on_bad_input must be 'error' or 'quarantine', got {self.on_bad_input!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0 (0: one per core), got {self.num_workers}")
        if self.control_hz <= 0 or self.sync_tolerance_s <= 0:
            raise ValueError("data.control_hz and data.sync_tolerance_s must be > 0")
        if self.cache_dir is not None and not self.cache_dir.strip():
            raise ValueError("data.cache_dir must be a directory or null (no cache), got an empty string")
        from rosbags.typesys import Stores  # the names rosbags knows; imported here, where they are checked

        if self.typestore not in {s.value for s in Stores}:
            raise ValueError(f"data.typestore must be one of {sorted(s.value for s in Stores)}, got {self.typestore!r}")
        if self.checks.joint_min is not None and len(self.checks.joint_min) != len(self.arm_joint_names):
            raise ValueError(
                f"data.checks.joint_min/joint_max hold {len(self.checks.joint_min)} limits, "
                f"data.arm_joint_names {len(self.arm_joint_names)} joints"
            )
        self._check_ros_reading()
        if self.embodiment not in EMBODIMENTS:
            raise ValueError(f"data.embodiment must be one of {EMBODIMENTS}, got {self.embodiment!r}")
        if self.embodiment == "mobile_base":
            self.base.check()
            if self.split.by != "none":  # io/mobile_base.py reads a base's bag as one episode
                raise ValueError(
                    f"data.split.by={self.split.by!r} is not supported for data.embodiment=mobile_base; "
                    "use one bag per episode (data.split.by=none)"
                )
        if not self.norm_min < 0 < self.norm_max:
            raise ValueError(f"data.norm_min < 0 < data.norm_max expected, got {self.norm_min}, {self.norm_max}")

    def _check_ros_reading(self) -> None:
        """data.tcp_source / tf / split / fields / custom_msgs, each error naming its key."""
        if self.tcp_source not in TCP_SOURCES:
            raise ValueError(f"data.tcp_source must be one of {TCP_SOURCES}, got {self.tcp_source!r}")
        if self.tcp_source == "tf" and not (self.tf.base_frame and self.tf.tool_frame):
            raise ValueError(
                "data.tcp_source is 'tf': data.tf.base_frame and data.tf.tool_frame must name the frames, "
                f"got {self.tf.base_frame!r} and {self.tf.tool_frame!r}"
            )
        if self.split.by not in SPLIT_MODES:
            raise ValueError(f"data.split.by must be one of {SPLIT_MODES}, got {self.split.by!r}")
        if not self.split.gap_s > 0:
            raise ValueError(f"data.split.gap_s must be > 0, got {self.split.gap_s}")
        for name in ("action", "joint_states"):
            paths = getattr(self.fields, name)
            if paths is not None and (
                not paths or not all(re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", p) for p in paths)
            ):
                raise ValueError(
                    f"data.fields.{name} must be a non-empty list of field paths like 'target' or "
                    f"'pose.position.x', got {paths}"
                )
        if self.default_instruction is not None and not self.default_instruction.strip():
            raise ValueError("data.default_instruction must be an instruction or null, got a blank string")
        if self.custom_msgs:
            from vlaops.io.rosbag2 import typestore  # parses and registers data.custom_msgs, naming the bad one

            typestore(self.typestore, tuple(sorted(self.custom_msgs.items())))
