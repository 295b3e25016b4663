"""Scenes of the pretraining corpus: layouts of their own, rendered by the robot's cameras, boxes projected.

A scene is the tabletop's robot and table (vlaops.sim.scene) with 2-6 objects of several shapes and
colours placed anywhere on a wider part of the table than the tasks use, and the arm at a random pose
over it (so the gripper camera sees the table from many places). Each scene is rendered by the static
and the gripper camera, as the robot's frames are. The simulator state is used for one thing: each
object's 3D bounding box is projected into each camera to give its 2D box, as GRIT took its boxes from
a detector; the segmentation mask says which objects are visible at all. No physics is stepped and no
action is recorded.

The layouts come from their own seed stream (:func:`scene_rng`), never the demonstrations' or the
evaluation chains' (which seed ``np.random.default_rng(seed)`` with plain integers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from vlaops.pretrain.config import PretrainConfig

# The tasks' three colours are the simulator's own (vlaops.sim.layout.BLOCK_COLORS): "the red block" of a
# caption looks like the red block of a demonstration. The others extend the palette.
RGBA = {
    "red": (0.85, 0.12, 0.1, 1.0),
    "green": (0.1, 0.7, 0.2, 1.0),
    "blue": (0.12, 0.25, 0.85, 1.0),
    "yellow": (0.95, 0.85, 0.1, 1.0),
    "orange": (0.95, 0.45, 0.05, 1.0),
    "purple": (0.5, 0.15, 0.7, 1.0),
    "white": (0.93, 0.93, 0.93, 1.0),
    "black": (0.08, 0.08, 0.08, 1.0),
}
# half sizes (m) drawn uniformly: a block's half edge, a ball's radius, a cylinder's radius and half height
HALF_SIZE = (0.018, 0.032)
CYLINDER_HALF_HEIGHT = (0.02, 0.04)
# where the arm's fingertips are sent (m, robot base frame), pointing down with a little tilt and any yaw
ARM_X, ARM_Y, ARM_Z = (0.3, 0.65), (-0.25, 0.25), (0.12, 0.35)
ARM_TILT = 0.25  # rad
MAX_LAYOUT_TRIES = 1000
# the seed streams: SeedSequence entropy (pretrain.seed, stream, scene index)
TRAIN_STREAM, HELDOUT_STREAM = 0x505254, 0x484C44  # "PRT", "HLD"


@dataclass(frozen=True)
class SceneObject:
    """One object: what it is, where it stands (on the table top), and its 3D box half extents."""

    color: str
    shape: str
    x: float
    y: float
    yaw: float
    half: tuple[float, float, float]  # half extents along its own x, y, z

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    def corners(self) -> np.ndarray:
        """(8, 3) corners of its bounding box in the robot base frame."""
        hx, hy, hz = self.half
        local = np.array([[sx * hx, sy * hy, sz * hz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        return local @ rot.T + np.array([self.x, self.y, hz])


@dataclass(frozen=True)
class SceneSpec:
    """A layout to render: its objects and where the arm's fingertips are (position, euler)."""

    index: int
    objects: tuple[SceneObject, ...]
    tcp: tuple[float, float, float, float, float, float]


@dataclass
class View:
    """One camera's image of a scene: (S, S, 3) uint8, and per object its normalised (x1, y1, x2, y2) box
    (None where it is not visible) and its visible pixel count."""

    camera: str
    image: np.ndarray
    boxes: list[tuple[float, float, float, float] | None]
    visible: list[int]


def scene_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator of one scene: its own stream, so no pretraining scene is a demonstration's."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream, index]))


def _footprint(obj: SceneObject) -> float:
    return float(np.hypot(obj.half[0], obj.half[1]))


def sample_scene(cfg: PretrainConfig, stream: int, index: int) -> SceneSpec:
    """Draw scene ``index`` of ``stream``: 2-6 objects (distinct colour-shape pairs) apart from each other."""
    rng = scene_rng(cfg.seed, stream, index)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    kinds = [(c, s) for c in cfg.colors for s in cfg.shapes]
    chosen = [kinds[i] for i in rng.choice(len(kinds), size=n, replace=False)]
    objects: list[SceneObject] = []
    for color, shape in chosen:
        h = float(rng.uniform(*HALF_SIZE))
        half = (h, h, float(rng.uniform(*CYLINDER_HALF_HEIGHT)) if shape == "cylinder" else h)
        yaw = float(rng.uniform(-np.pi / 4, np.pi / 4)) if shape == "block" else 0.0
        for _ in range(MAX_LAYOUT_TRIES):
            x, y = (float(v) for v in rng.uniform([cfg.x_range[0], cfg.y_range[0]], [cfg.x_range[1], cfg.y_range[1]]))
            obj = SceneObject(color, shape, x, y, yaw, half)
            if all(
                np.hypot(x - o.x, y - o.y) >= max(cfg.min_separation, _footprint(obj) + _footprint(o) + 0.01)
                for o in objects
            ):
                objects.append(obj)
                break
        else:
            raise ValueError(
                f"no place for {n} objects pretrain.min_separation={cfg.min_separation} apart in "
                f"{MAX_LAYOUT_TRIES} tries over pretrain.x_range={cfg.x_range}, pretrain.y_range={cfg.y_range}"
            )
    tcp = (
        *(float(v) for v in rng.uniform([ARM_X[0], ARM_Y[0], ARM_Z[0]], [ARM_X[1], ARM_Y[1], ARM_Z[1]])),
        float(np.pi + rng.uniform(-ARM_TILT, ARM_TILT)),
        float(rng.uniform(-ARM_TILT, ARM_TILT)),
        float(rng.uniform(-np.pi, np.pi)),
    )
    return SceneSpec(index=index, objects=tuple(objects), tcp=tcp)


def project(points: np.ndarray, view: list[float], proj: list[float]) -> np.ndarray:
    """(N, 3) world points -> (N, 2) normalised image coordinates (u right, v down, 0..1 across the image)
    through PyBullet's column-major view and projection matrices."""
    m = np.asarray(proj, dtype=np.float64).reshape(4, 4).T @ np.asarray(view, dtype=np.float64).reshape(4, 4).T
    clip = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ m.T  # (N, 4)
    ndc = clip[:, :3] / clip[:, 3:4]
    return np.stack([(ndc[:, 0] + 1) / 2, (1 - ndc[:, 1]) / 2], axis=1)


def box_of(obj: SceneObject, view: list[float], proj: list[float]) -> tuple[float, float, float, float] | None:
    """The 2D box of ``obj``'s projected 3D box, clipped to the image; None when it lies outside."""
    uv = project(obj.corners(), view, proj)
    x1, y1 = np.clip(uv.min(axis=0), 0.0, 1.0)
    x2, y2 = np.clip(uv.max(axis=0), 0.0, 1.0)
    if x2 <= x1 or y2 <= y1:
        return None
    return float(x1), float(y1), float(x2), float(y2)


# ---- the renderer: one PyBullet client per worker process ------------------------------------------
_RENDERER: dict[str, Any] = {}


def start_renderer() -> None:
    """Connect this process's DIRECT client and load robot and table once (the executor's per-worker
    initializer); each scene then replaces the objects and poses the arm."""
    import pybullet as p

    from vlaops.sim.scene import build_tabletop

    if "client" not in _RENDERER:
        client = p.connect(p.DIRECT)
        _RENDERER.update(client=client, robot=build_tabletop(client)[0], bodies=[])


def _build(client: int, robot: int, spec: SceneSpec) -> list[int]:
    """Replace the objects by ``spec``'s and pose the arm; the object body ids. What a scene looks like
    depends on ``spec`` only (the arm's inverse kinematics starts from the home pose every time)."""
    import pybullet as p

    from vlaops.sim import layout

    for body in _RENDERER.get("bodies", []):
        p.removeBody(body, physicsClientId=client)
    for joint, q in zip(layout.ARM_JOINTS, layout.HOME_JOINTS, strict=True):
        p.resetJointState(robot, joint, q, physicsClientId=client)
    bodies = []
    for obj in spec.objects:
        rgba = RGBA[obj.color]
        if obj.shape == "block":
            vis = p.createVisualShape(p.GEOM_BOX, halfExtents=list(obj.half), rgbaColor=rgba, physicsClientId=client)
        elif obj.shape == "ball":
            vis = p.createVisualShape(p.GEOM_SPHERE, radius=obj.half[0], rgbaColor=rgba, physicsClientId=client)
        else:
            vis = p.createVisualShape(
                p.GEOM_CYLINDER, radius=obj.half[0], length=2 * obj.half[2], rgbaColor=rgba, physicsClientId=client
            )
        orn = p.getQuaternionFromEuler((0.0, 0.0, obj.yaw))
        bodies.append(
            p.createMultiBody(
                0.0, -1, vis, [obj.x, obj.y, layout.TABLE_TOP_Z + obj.half[2]], orn, physicsClientId=client
            )
        )
    _RENDERER["bodies"] = bodies
    # the arm: inverse kinematics from the home pose
    joints = [*layout.ARM_JOINTS, *layout.FINGER_JOINTS]
    infos = [p.getJointInfo(robot, j, physicsClientId=client) for j in joints]
    lower, upper = [i[8] for i in infos], [i[9] for i in infos]
    q = p.calculateInverseKinematics(
        robot,
        layout.TCP_LINK,
        list(spec.tcp[:3]),
        p.getQuaternionFromEuler(spec.tcp[3:]),
        lowerLimits=lower,
        upperLimits=upper,
        jointRanges=[hi - lo for lo, hi in zip(lower, upper, strict=True)],
        restPoses=[*layout.HOME_JOINTS, layout.FINGER_OPEN, layout.FINGER_OPEN],
        maxNumIterations=100,
        residualThreshold=1e-5,
        physicsClientId=client,
    )
    for joint, value in zip(layout.ARM_JOINTS, q, strict=False):
        p.resetJointState(robot, joint, value, physicsClientId=client)
    return bodies


def render_scene(task: tuple[SceneSpec, tuple[str, ...], dict[str, int]]) -> list[View]:
    """Render one scene by each camera at its size: the images, each object's box and visible pixels."""
    import pybullet as p

    from vlaops.sim.scene import gripper_camera, static_camera

    spec, cameras, sizes = task
    start_renderer()
    client, robot = _RENDERER["client"], _RENDERER["robot"]
    bodies = _build(client, robot, spec)
    views = []
    for camera in cameras:
        view, proj = static_camera(client) if camera == "static" else gripper_camera(client, robot)
        size = sizes[camera]
        _, _, rgba, _, seg = p.getCameraImage(
            size, size, view, proj, renderer=p.ER_TINY_RENDERER, physicsClientId=client
        )
        image = np.asarray(rgba, dtype=np.uint8).reshape(size, size, 4)[:, :, :3].copy()
        seg = np.asarray(seg).reshape(size, size)
        visible = [int((seg == body).sum()) for body in bodies]
        boxes = [box_of(obj, view, proj) for obj in spec.objects]
        views.append(View(camera, image, boxes, visible))
    return views
