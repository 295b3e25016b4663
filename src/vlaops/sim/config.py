"""Settings of the simulator ``collect`` records (the embedded tabletop, or CALVIN's) and of the recording.

A plain dataclass so that Hydra can register it as a structured config (``conf/sim/``): only
primitives, lists and nested dataclasses, and every value is checked in ``__post_init__`` so a bad
setting fails before a single episode is simulated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlaops.io.calvin_spec import RGB_GRIPPER_SIZE, RGB_STATIC_SIZE
from vlaops.sim.calvin.config import CalvinConfig

#: What ``collect`` records (``sim.env``): the embedded tabletop, or CALVIN's calvin_env.
SIMULATORS = ("tabletop", "calvin")
#: rosbag2 storage plugins that ``rosbags`` can write.
STORAGE_PLUGINS = ("sqlite3", "mcap")
#: The expert's default speed cap (fraction of CALVIN's full relative action, 0.02 m / 0.05 rad per step):
#: just inside RoboVLMs' arm normalisation range (data.norm_max 0.65, robovlms/data/data_utils.py
#: ``normalize_action``). Not 0.65 itself: the recorded rel actions are recomputed from absolute targets
#: (io/calvin.rel_actions_from_abs), and float round-off would put ~10 % of them a hair above 0.65.
EXPERT_MAX_ACTION = 0.64


# The tasks collected and evaluated by default, in conf/sim/default.yaml's order (the order in force:
# collect and the chain sampler iterate it). Written out rather than ``list(TASKS)`` (the registry's
# order differs), and held equal to the YAML by tests/test_config.py.
DEFAULT_TASKS = (
    "push_red_left",
    "push_red_right",
    "push_green_left",
    "push_green_right",
    "push_blue_left",
    "push_blue_right",
    "lift_red",
    "lift_green",
    "lift_blue",
    "place_red",
    "place_green",
    "place_blue",
)


@dataclass
class SimTopics:
    """ROS2 topic names the recorder writes, one per stream, named as ingest's ``data.topics`` names them
    (``vlaops.data.config.TopicMap``); conf/data/default.yaml reads these by interpolation."""

    rgb_static: str = "/camera/static/image_raw"
    rgb_gripper: str = "/camera/gripper/image_raw"
    joint_states: str = "/joint_states"
    tcp_pose: str = "/tcp_pose"
    scene_obs: str = "/scene_state"
    action: str = "/action"
    instruction: str = "/instruction"

    def __post_init__(self) -> None:
        names = [getattr(self, f) for f in self.__dataclass_fields__]
        for key in self.__dataclass_fields__:
            value = getattr(self, key)
            if not isinstance(value, str) or not value.startswith("/"):
                raise ValueError(f"sim.topics.{key} must be an absolute topic name like '/x', got {value!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"sim.topics must be distinct, got {names}")


@dataclass
class SimConfig:
    """The simulator, its scripted expert and the recording of demonstrations.

    ``env`` picks the simulator ``collect`` records: the embedded tabletop (every block_* setting below is
    its own) or CALVIN's calvin_env (``calvin``: its scene, robot and oracle; ``tasks`` are then CALVIN's
    task names the scripted CALVIN expert covers, recorded along chains, docs/calvin.md)."""

    env: str = "tabletop"
    seed: int = 0
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    episodes_per_task: int = 6
    # Failed expert attempts are discarded; past this many the expert (or the physics) is broken.
    max_attempts_per_task: int = 20
    # CALVIN records and controls at 30 Hz; 240 Hz is PyBullet's default physics step.
    control_hz: int = 30
    physics_hz: int = 240
    # A cap on one demonstration; the expert needs 40-90 steps for every default task.
    max_episode_steps: int = 150
    # CALVIN's camera resolutions: rgb_static 200x200, rgb_gripper 84x84.
    static_camera_size: int = RGB_STATIC_SIZE
    gripper_camera_size: int = RGB_GRIPPER_SIZE
    storage: str = "sqlite3"
    # The scripted expert's largest arm action, as a teleoperator caps speed: a demonstration faster than
    # the training normalisation's range (data.norm_min/norm_max, RoboVLMs' +-0.65) is clipped there and
    # cannot be reproduced by a policy. The top-level config checks it fits inside data.norm_max.
    expert_max_action: float = EXPERT_MAX_ACTION
    # DART noise: the recorded demonstrations execute the expert's arm action plus N(0, this) per
    # dimension (in the env's [-1, 1] units) and record the expert's own action, so they hold recoveries
    # from the drift a policy's errors cause (sim/expert.py run_expert). 0: the clean expert.
    expert_action_noise: float = 0.0
    # Fraction of each task's demonstrations that start where another task left the scene, as a chain's
    # later subtasks do: before recording, the expert runs one other task feasible in the scene, unrecorded
    # (vlaops.sim.record.stage_predecessor). 0: every demonstration starts from a reset scene (a task with a
    # setup, place, starts from its setup's end either way).
    staged_fraction: float = 0.0
    # Every task draws its scenes from one seed sequence, so a scene (one block layout) is demonstrated
    # with several instructions: the same first image, a different action (docs/results.md measures it).
    # false: each task has its own scenes, every demonstration a new layout.
    shared_scenes: bool = False
    # Block start poses, sampled per reset: (x, y) uniform over this rectangle of the table (m, robot
    # base frame), centres at least block_min_separation apart, colours in any arrangement, yaw uniform
    # in +-block_yaw_range (pi/4 covers every orientation of a cube). Wide enough that a policy must
    # look at the camera to find a block (a blind nearest-neighbour baseline fails, bench/reference_policies.py).
    block_x_range: list[float] = field(default_factory=lambda: [0.36, 0.64])
    block_y_range: list[float] = field(default_factory=lambda: [-0.2, 0.2])
    block_min_separation: float = 0.1
    block_yaw_range: float = 0.785
    # Joint states are published this many times per control tick (a realistic multi-rate bag).
    joint_state_rate_factor: int = 4
    # Worker processes for ``collect`` (one task per worker at a time); 1 runs in-process.
    # The recordings do not depend on it.
    num_workers: int = 2
    topics: SimTopics = field(default_factory=SimTopics)
    calvin: CalvinConfig = field(default_factory=CalvinConfig)

    def __post_init__(self) -> None:
        if isinstance(self.topics, dict):  # tolerate a plain mapping (e.g. from JSON)
            self.topics = SimTopics(**self.topics)
        if isinstance(self.calvin, dict):
            self.calvin = CalvinConfig(**self.calvin)
        if self.env not in SIMULATORS:
            raise ValueError(f"sim.env must be one of {list(SIMULATORS)}, got {self.env!r}")
        self._check_tasks()
        if not self.tasks:
            raise ValueError("sim.tasks must name at least one task, got []")
        for key in (
            "episodes_per_task",
            "max_attempts_per_task",
            "control_hz",
            "physics_hz",
            "max_episode_steps",
            "static_camera_size",
            "gripper_camera_size",
            "joint_state_rate_factor",
            "num_workers",
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"sim.{key} must be a positive integer, got {value!r}")
        if self.max_attempts_per_task < self.episodes_per_task:
            raise ValueError(
                f"sim.max_attempts_per_task ({self.max_attempts_per_task}) must be >= "
                f"sim.episodes_per_task ({self.episodes_per_task})"
            )
        if self.physics_hz % self.control_hz:
            raise ValueError(
                f"sim.physics_hz must be a multiple of sim.control_hz ({self.control_hz}), got {self.physics_hz}"
            )
        if self.substeps % self.joint_state_rate_factor:
            raise ValueError(
                f"sim.joint_state_rate_factor must divide physics_hz // control_hz ({self.substeps}), "
                f"got {self.joint_state_rate_factor}"
            )
        if self.storage not in STORAGE_PLUGINS:
            raise ValueError(f"sim.storage must be one of {list(STORAGE_PLUGINS)}, got {self.storage!r}")
        if not 0.0 < self.expert_max_action <= 1.0:
            raise ValueError(
                f"sim.expert_max_action must be in (0, 1] (a fraction of CALVIN's full relative "
                f"action), got {self.expert_max_action!r}"
            )
        if not 0.0 <= self.expert_action_noise < 1.0:
            raise ValueError(
                f"sim.expert_action_noise must be in [0, 1) (a standard deviation in the env's [-1, 1] "
                f"action units), got {self.expert_action_noise!r}"
            )
        if not 0.0 <= self.staged_fraction <= 1.0:
            raise ValueError(
                f"sim.staged_fraction must be in [0, 1] (the fraction of demonstrations recorded after "
                f"another task), got {self.staged_fraction!r}"
            )
        self._check_block_area()

    def _check_tasks(self) -> None:
        """The tasks must be the chosen simulator's: the tabletop's, or CALVIN's that its expert covers."""
        if self.env == "calvin":
            from vlaops.sim.calvin.expert import EXPERT_TASKS, UNCOVERED

            uncovered = [t for t in self.tasks if t in UNCOVERED]
            if uncovered:
                raise ValueError(
                    f"sim.tasks: the scripted CALVIN expert does not cover {uncovered}; it covers {list(EXPERT_TASKS)}"
                )
            known = EXPERT_TASKS
        else:
            from vlaops.sim.tasks import TASKS as known
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            raise ValueError(f"sim.tasks: unknown {self.env} task(s) {unknown}; known tasks: {sorted(known)}")

    def _check_block_area(self) -> None:
        """The sampling area must lie on the table top and hold three blocks at the minimum separation."""
        from vlaops.sim.layout import BLOCK_HALF, BLOCK_ORDER, TABLE_CENTER, TABLE_HALF_EXTENTS

        for key, axis in (("block_x_range", 0), ("block_y_range", 1)):
            value = list(getattr(self, key))
            low_edge = TABLE_CENTER[axis] - TABLE_HALF_EXTENTS[axis] + BLOCK_HALF
            high_edge = TABLE_CENTER[axis] + TABLE_HALF_EXTENTS[axis] - BLOCK_HALF
            if len(value) != 2 or not low_edge <= value[0] <= value[1] <= high_edge:
                raise ValueError(
                    f"sim.{key} must be [low, high] with {low_edge:.3f} <= low <= high <= "
                    f"{high_edge:.3f} (on the table top), got {value!r}"
                )
        if not 2 * BLOCK_HALF * 2**0.5 <= self.block_min_separation <= 0.2:
            raise ValueError(
                f"sim.block_min_separation must be in [{2 * BLOCK_HALF * 2**0.5:.3f}, 0.2] m "
                f"(blocks may not overlap), got {self.block_min_separation!r}"
            )
        # Twice the length a row of blocks needs, so that rejection sampling (env.sample_block_poses) finds
        # a layout in a few tries.
        span = max(self.block_x_range[1] - self.block_x_range[0], self.block_y_range[1] - self.block_y_range[0])
        if span < (len(BLOCK_ORDER) - 1) * self.block_min_separation * 2:
            raise ValueError(
                f"sim.block_x_range / block_y_range span {span:.3f} m, too small for "
                f"{len(BLOCK_ORDER)} blocks {self.block_min_separation} m apart (need at least "
                f"{(len(BLOCK_ORDER) - 1) * self.block_min_separation * 2:.3f} m)"
            )
        if not 0.0 <= self.block_yaw_range <= 3.1416:
            raise ValueError(f"sim.block_yaw_range must be in [0, pi] rad, got {self.block_yaw_range!r}")

    @property
    def substeps(self) -> int:
        """Physics steps per control step (8 at 240/30 Hz)."""
        return self.physics_hz // self.control_hz
