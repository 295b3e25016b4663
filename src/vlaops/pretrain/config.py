"""Pretraining configuration: the rendered corpus (scenes, objects, captions) and the language-model training.

Plain dataclasses, validated in ``__post_init__`` (the field and the value named), like every group of
the config. The architecture is not here: ``pretrain`` builds the tiny Kosmos-2 that ``model.tiny``,
``model.image_size`` and ``model.vocab_size`` describe, so the policy that loads the result has the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# the palette and the shapes a scene draws from (their RGBA and geometry live in vlaops.pretrain.scenes)
COLORS = ("red", "green", "blue", "yellow", "orange", "purple", "white", "black")
SHAPES = ("block", "cylinder", "ball")
CAMERAS = ("static", "gripper")
CAPTION_KINDS = ("grounded", "refer", "relation", "plain")


def _positive(name: str, value: int | float) -> None:
    if not value > 0:
        raise ValueError(f"pretrain.{name} must be > 0, got {value!r}")


@dataclass
class PretrainConfig:
    """What ``vlaops pretrain`` renders and how long it trains (defaults: about 4 minutes on 2 cores)."""

    # Its own seed stream (vlaops.pretrain.scenes.scene_rng), apart from the simulator's demonstration and
    # evaluation seeds: the pretraining scenes are never the robot's.
    seed: int = 0
    scenes: int = 400  # training scenes; each gives one image per camera
    heldout_scenes: int = 48  # scenes of another seed stream, only for the measurements
    min_objects: int = 2
    max_objects: int = 6
    colors: list[str] = field(default_factory=lambda: list(COLORS))
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))
    # Where object centres are drawn (m, robot base frame): wider than the tasks' block rectangle.
    x_range: list[float] = field(default_factory=lambda: [0.3, 0.72])
    y_range: list[float] = field(default_factory=lambda: [-0.3, 0.3])
    min_separation: float = 0.09  # between object centres (m)
    # The robot's own cameras, rendered at their own resolutions (CALVIN's 200 and 84 px) and resized to
    # model.image_size by the same transform the policy's frames go through.
    cameras: list[str] = field(default_factory=lambda: list(CAMERAS))
    static_camera_size: int = 200
    gripper_camera_size: int = 84
    # An object is named in a view when at least this many of its pixels are visible there.
    min_visible_pixels: int = 6
    # one of each kind per image; "refer" one per object in view
    captions: list[str] = field(default_factory=lambda: list(CAPTION_KINDS))
    num_workers: int = 2  # rendering processes (vlaops.utils.executor); 1 renders in-process
    # training: Kosmos-2's next-token loss over the caption tokens
    steps: int = 1200
    batch_size: int = 32
    learning_rate: float = 0.002
    weight_decay: float = 0.01
    warmup_steps: int = 100
    log_every: int = 50

    def __post_init__(self) -> None:
        for name in (
            "scenes",
            "heldout_scenes",
            "min_objects",
            "static_camera_size",
            "gripper_camera_size",
            "min_visible_pixels",
            "num_workers",
            "steps",
            "batch_size",
            "learning_rate",
            "log_every",
        ):
            _positive(name, getattr(self, name))
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError(
                f"pretrain.warmup_steps and pretrain.weight_decay must be >= 0, got "
                f"{self.warmup_steps!r}, {self.weight_decay!r}"
            )
        for name, values, known in (
            ("colors", self.colors, COLORS),
            ("shapes", self.shapes, SHAPES),
            ("cameras", self.cameras, CAMERAS),
            ("captions", self.captions, CAPTION_KINDS),
        ):
            if not values or any(v not in known for v in values) or len(set(values)) < len(values):
                raise ValueError(f"pretrain.{name} must be a non-empty list of distinct {list(known)}, got {values!r}")
        if not self.min_objects <= self.max_objects <= len(self.colors) * len(self.shapes):
            raise ValueError(
                f"pretrain.min_objects <= max_objects <= len(colors) * len(shapes) "
                f"({len(self.colors) * len(self.shapes)}) must hold, got {self.min_objects}, {self.max_objects}"
            )
        for name, rng in (("x_range", self.x_range), ("y_range", self.y_range)):
            if len(rng) != 2 or not rng[0] < rng[1]:
                raise ValueError(f"pretrain.{name} must be [low, high] with low < high, got {rng!r}")
        if not 0.06 <= self.min_separation <= 0.2:
            raise ValueError(
                f"pretrain.min_separation must be in [0.06, 0.2] m (objects may not overlap), got "
                f"{self.min_separation!r}"
            )
