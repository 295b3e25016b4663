"""Record scripted demonstrations as ROS2 bags, the way a team records its real robot.

One rosbag2 directory per successful episode (``<task>_<NNNN>/``), written with ``rosbags`` (no ROS
install), sqlite3 or mcap storage. Topics run at realistic, different rates: cameras, TCP pose, scene
state and actions at the control rate, joint states ``joint_state_rate_factor`` times faster. Every
stamp is simulated time from a fixed epoch, so a seed gives byte-identical bags.

Timing of tick k (t_k = epoch + k / control_hz): the images, TCP pose and scene state observed at t_k
are stamped t_k; the absolute command computed from them is stamped t_k + 10 ms (the controller needs
the frame before it can act); joint states are sampled inside the physics substeps between ticks.
"""

from __future__ import annotations

import json
import shutil
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from vlaops.sim import layout
from vlaops.sim.config import SimConfig
from vlaops.sim.env import TabletopEnv
from vlaops.sim.expert import run_expert
from vlaops.sim.tasks import get_task
from vlaops.utils.atomic import atomic_dir
from vlaops.utils.executor import ComputeConfig, map_ordered
from vlaops.utils.logging import get_logger

log = get_logger(__name__)

#: Stamped into every bag's custom_data, so a reader can tell what layout it is looking at.
BAG_FORMAT = "vlaops-sim-rosbag2"
BAG_FORMAT_VERSION = "1"
ROSBAG2_VERSION = 9  # rosbag2 metadata version written (ROS 2 Jazzy's; Humble reads <= 5 plus rosbags)
EPOCH_NS = 1_700_000_000 * 10**9  # simulated time of the first episode's first frame
EPISODE_SPACING_NS = 1000 * 10**9  # each episode starts 1000 s after the previous one
ACTION_LATENCY_NS = 10_000_000  # the command of tick k is stamped 10 ms after its observation
STATIC_FRAME, GRIPPER_FRAME = "static_camera", "gripper_camera"
# Scenes drawn per allowed expert attempt before collect gives up on a task whose precondition rarely holds.
MAX_SCENES_PER_ATTEMPT = 10
STORAGE = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}

# Message types of each topic (SimTopics field -> ROS 2 type).
MSGTYPES = {
    "rgb_static": "sensor_msgs/msg/Image",
    "rgb_gripper": "sensor_msgs/msg/Image",
    "joint_states": "sensor_msgs/msg/JointState",
    "tcp_pose": "geometry_msgs/msg/PoseStamped",
    "scene_obs": "std_msgs/msg/Float64MultiArray",
    "action": "std_msgs/msg/Float64MultiArray",
    "instruction": "std_msgs/msg/String",
}


@dataclass
class Frame:
    """One control tick: what was observed and the absolute command (7,) computed from it."""

    tick: int
    obs: dict[str, Any]
    action_abs: np.ndarray


@dataclass
class EpisodeRecord:
    """Everything one episode's bag is written from."""

    episode_id: str
    task: str
    instruction: str
    seed: int
    start_ns: int
    frames: list[Frame] = field(default_factory=list)
    staged_after: str | None = None  # the task the expert did, unrecorded, before this one (sim.staged_fraction)
    joint_samples: list[tuple[float, np.ndarray, np.ndarray]] = field(default_factory=list)
    custom: dict[str, str] = field(default_factory=dict)  # more of the bag's custom_data (e.g. the simulator)


SHARED_SCENES = ""  # the "task" whose seed sequence every task draws from under sim.shared_scenes


def episode_seed(base_seed: int, task: str, attempt: int) -> int:
    """The reset seed of one attempt; depends on the task's name, not its place in the task list."""
    return int(np.random.SeedSequence([base_seed, zlib.crc32(task.encode()), attempt]).generate_state(1)[0])


class BagWriter:
    """Serialises one ``EpisodeRecord`` into a rosbag2 directory."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.ts = get_typestore(Stores.ROS2_HUMBLE)
        self.t = self.ts.types

    def _header(self, ns: int, frame_id: str) -> Any:
        stamp = self.t["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9)
        return self.t["std_msgs/msg/Header"](stamp=stamp, frame_id=frame_id)

    def _image(self, ns: int, frame_id: str, rgb: np.ndarray) -> Any:
        h, w, _ = rgb.shape  # (H, W, 3) uint8
        return self.t["sensor_msgs/msg/Image"](
            header=self._header(ns, frame_id),
            height=h,
            width=w,
            encoding="rgb8",
            is_bigendian=0,
            step=w * 3,
            data=np.ascontiguousarray(rgb, dtype=np.uint8).reshape(-1),
        )

    def _array(self, label: str, values: np.ndarray) -> Any:
        values = np.asarray(values, dtype=np.float64)
        dim = self.t["std_msgs/msg/MultiArrayDimension"](label=label, size=values.size, stride=values.size)
        layout = self.t["std_msgs/msg/MultiArrayLayout"](dim=[dim], data_offset=0)
        return self.t["std_msgs/msg/Float64MultiArray"](layout=layout, data=values)

    def _pose(self, ns: int, pos: np.ndarray, quat: np.ndarray) -> Any:
        point = self.t["geometry_msgs/msg/Point"](x=float(pos[0]), y=float(pos[1]), z=float(pos[2]))
        q = self.t["geometry_msgs/msg/Quaternion"](
            x=float(quat[0]), y=float(quat[1]), z=float(quat[2]), w=float(quat[3])
        )
        pose = self.t["geometry_msgs/msg/Pose"](position=point, orientation=q)
        return self.t["geometry_msgs/msg/PoseStamped"](header=self._header(ns, layout.BASE_FRAME), pose=pose)

    def _joint_state(self, ns: int, q: np.ndarray, dq: np.ndarray) -> Any:
        return self.t["sensor_msgs/msg/JointState"](
            header=self._header(ns, layout.BASE_FRAME),
            name=list(layout.JOINT_NAMES),
            position=np.asarray(q, dtype=np.float64),
            velocity=np.asarray(dq, dtype=np.float64),
            effort=np.zeros(0, dtype=np.float64),
        )

    def messages(self, rec: EpisodeRecord) -> list[tuple[int, str, Any]]:
        """(stamp ns, topic field, message) for the whole episode, in time order."""
        hz = self.cfg.control_hz
        out: list[tuple[int, int, str, Any]] = []  # (ns, order, field, msg); order breaks ties stably
        text = self.t["std_msgs/msg/String"](data=rec.instruction)
        out.append((rec.start_ns, 0, "instruction", text))
        for fr in rec.frames:
            ns = rec.start_ns + fr.tick * 10**9 // hz
            o = fr.obs
            out.append((ns, 2, "rgb_static", self._image(ns, STATIC_FRAME, o["rgb_static"])))
            out.append((ns, 3, "rgb_gripper", self._image(ns, GRIPPER_FRAME, o["rgb_gripper"])))
            out.append((ns, 4, "tcp_pose", self._pose(ns, o["tcp_pos"], o["tcp_quat"])))
            out.append((ns, 5, "scene_obs", self._array("scene_obs", o["scene_obs"])))
            out.append((ns + ACTION_LATENCY_NS, 6, "action", self._array("abs_action", fr.action_abs)))
        for t, q, dq in rec.joint_samples:
            ns = rec.start_ns + round(t * 10**9)
            out.append((ns, 1, "joint_states", self._joint_state(ns, q, dq)))
        out.sort(key=lambda m: (m[0], m[1]))
        return [(ns, name, msg) for ns, _, name, msg in out]

    def write(self, rec: EpisodeRecord, out_dir: Path) -> Path:
        """Write ``out_dir / rec.episode_id`` atomically; return its path."""
        target = Path(out_dir) / rec.episode_id
        with atomic_dir(target) as tmp:
            # rosbags' Writer insists on creating its directory and names its storage file after it, so
            # write to tmp/<id>/ (deterministic names) and lift the files up into the atomic directory.
            inner = tmp / rec.episode_id
            with Writer(inner, version=ROSBAG2_VERSION, storage_plugin=STORAGE[self.cfg.storage]) as writer:
                for key, value in (
                    ("format", BAG_FORMAT),
                    ("format_version", BAG_FORMAT_VERSION),
                    ("episode_id", rec.episode_id),
                    ("task", rec.task),
                    ("instruction", rec.instruction),
                    ("seed", str(rec.seed)),
                    ("control_hz", str(self.cfg.control_hz)),
                    *((("staged_after", rec.staged_after),) if rec.staged_after else ()),
                    *rec.custom.items(),
                ):
                    writer.set_custom_data(key, value)
                conns = {
                    name: writer.add_connection(getattr(self.cfg.topics, name), msgtype, typestore=self.ts)
                    for name, msgtype in MSGTYPES.items()
                }
                for ns, name, msg in self.messages(rec):
                    writer.write(conns[name], ns, self.ts.serialize_cdr(msg, MSGTYPES[name]))
            for path in sorted(inner.iterdir()):
                shutil.move(str(path), tmp / path.name)
            inner.rmdir()
            tmp.chmod(0o755)  # mkdtemp makes it 0700; a bag should be as readable as its files
        return target


def record_episode(
    env: TabletopEnv, cfg: SimConfig, task_name: str, seed: int, episode_id: str, start_ns: int
) -> tuple[bool | None, EpisodeRecord]:
    """Run the expert on ``task_name`` from ``reset(seed)`` and capture what a bag needs.

    A task with a ``setup`` (place needs a lifted block) first runs that task's expert unrecorded, the
    way an operator would stage the scene before pressing record. Any other task starts, with probability
    ``sim.staged_fraction`` (drawn from ``seed``), where another task leaves the scene
    (:func:`stage_predecessor`), as a chain's later subtasks do. Returns (success, record); success is
    None when the scene of ``seed`` does not allow the task at all (e.g. another block stands where a push
    would go), which is no attempt of the expert's.
    """
    task = get_task(task_name)
    obs = env.reset(seed)
    first = get_task(task.setup) if task.setup is not None else task
    if not first.precondition(env.get_info()):
        return None, EpisodeRecord(episode_id, task.name, task.instruction, seed, start_ns)
    if task.setup is not None:
        ok = _unrecorded(env, cfg, task.setup)
        if not ok or not task.precondition(env.get_info()):
            return False, EpisodeRecord(episode_id, task.name, task.instruction, seed, start_ns)
        obs = env.observe()
    staged = None
    if task.setup is None and cfg.staged_fraction > 0:
        rng = np.random.default_rng([seed, 2])
        if rng.random() < cfg.staged_fraction:
            staged = stage_predecessor(env, cfg, task_name, rng)
            if staged is None:
                return None, EpisodeRecord(episode_id, task.name, task.instruction, seed, start_ns)
            obs = env.observe()
    tick0 = env.tick
    samples0 = len(env.joint_samples) - 1  # include the sample at the current instant
    rec = EpisodeRecord(episode_id, task.name, task.instruction, seed, start_ns, staged_after=staged)

    def on_step(o: dict[str, Any], rel: np.ndarray) -> None:
        rec.frames.append(Frame(env.tick - tick0, o, env.rel_to_abs(rel)))

    noise_rng = np.random.default_rng([seed, 1]) if cfg.expert_action_noise > 0 else None
    ok, _, _ = run_expert(
        env, task, cfg.max_episode_steps, obs=obs, on_step=on_step, action_noise=cfg.expert_action_noise, rng=noise_rng
    )
    t0 = tick0 / cfg.control_hz
    rec.joint_samples = [(t - t0, q, dq) for t, q, dq in env.joint_samples[samples0:]]
    return ok, rec


def _unrecorded(env: TabletopEnv, cfg: SimConfig, task_name: str) -> bool:
    """Run the expert on ``task_name`` without rendering: nobody looks at the staging frames."""
    render, env.render = env.render, False
    try:
        ok, _, _ = run_expert(env, task_name, cfg.max_episode_steps)
    finally:
        env.render = render
    return ok


def stage_predecessor(env: TabletopEnv, cfg: SimConfig, task_name: str, rng: np.random.Generator) -> str | None:
    """Leave the scene as a chain would before ``task_name``: the expert does one other task of ``cfg.tasks``
    (with its setup first), drawn by ``rng`` among those feasible now, unrecorded. Returns its name, or None
    when none was feasible, the expert failed it, or ``task_name`` is no longer feasible after it (the scene
    then allows no staged demonstration, which is no attempt of the expert's)."""
    info = env.get_info()
    feasible = [
        other
        for other in map(get_task, cfg.tasks)
        if other.name != task_name and get_task(other.setup or other.name).precondition(info)
    ]
    if not feasible:
        return None
    other = feasible[int(rng.integers(len(feasible)))]
    if other.setup is not None and not _unrecorded(env, cfg, other.setup):
        return None
    if not _unrecorded(env, cfg, other.name) or not get_task(task_name).precondition(env.get_info()):
        return None
    return other.name


def expert_episodes(
    env: TabletopEnv, cfg: SimConfig, task_name: str, task_pos: int = 0
) -> Iterator[tuple[int, EpisodeRecord]]:
    """The seeded, successful expert episodes of one task that ``collect`` records, in order.

    Yields (attempts so far, record) until ``episodes_per_task`` succeeded. Scenes in which the task is
    impossible are skipped without counting as attempts. RuntimeError past ``max_attempts_per_task``
    attempts (the expert or the physics is broken) or when the task is feasible in too few scenes.
    Run on a ``render=False`` env it gives the demonstrations' states and actions without images.
    """
    successes = attempts = 0
    scenes = 0  # seeds drawn, including scenes in which the task is impossible (not attempts)
    while successes < cfg.episodes_per_task:
        if attempts >= cfg.max_attempts_per_task:
            raise RuntimeError(
                f"task {task_name!r}: only {successes} of {cfg.episodes_per_task} expert episodes succeeded "
                f"in sim.max_attempts_per_task={cfg.max_attempts_per_task} attempts; the expert or the "
                f"physics settings are broken for this task"
            )
        if scenes >= MAX_SCENES_PER_ATTEMPT * cfg.max_attempts_per_task:
            raise RuntimeError(
                f"task {task_name!r}: its precondition held in only {attempts} of {scenes} random scenes; "
                f"widen sim.block_x_range / sim.block_y_range or lower sim.block_min_separation"
            )
        seed = episode_seed(cfg.seed, SHARED_SCENES if cfg.shared_scenes else task_name, scenes)
        scenes += 1
        episode_id = f"{task_name}_{successes:04d}"
        start_ns = EPOCH_NS + (task_pos * cfg.episodes_per_task + successes) * EPISODE_SPACING_NS
        ok, rec = record_episode(env, cfg, task_name, seed, episode_id, start_ns)
        if ok is None:
            continue
        attempts += 1
        if not ok:
            log.warning("task %s: expert failed on seed %d (attempt %d); not recorded", task_name, seed, attempts)
            continue
        successes += 1
        yield attempts, rec


def _collect_job(job: tuple[SimConfig, str, int, Path]) -> dict[str, Any]:
    return _collect_task(*job)


def _collect_task(cfg: SimConfig, task_name: str, task_pos: int, out_dir: Path) -> dict[str, Any]:
    """Attempt seeded episodes of one task until ``episodes_per_task`` succeed; write those bags."""
    writer = BagWriter(cfg)
    ids: list[str] = []
    attempts = 0
    with TabletopEnv(cfg) as env:
        for attempts, rec in expert_episodes(env, cfg, task_name, task_pos):  # noqa: B007 (the last count is returned)
            writer.write(rec, out_dir)
            ids.append(rec.episode_id)
    return {"task": task_name, "attempts": attempts, "successes": len(ids), "episodes": ids}


def collect(cfg: SimConfig, out_dir: Path, compute: ComputeConfig | None = None) -> dict[str, Any]:
    """Record ``episodes_per_task`` successful expert demonstrations of every task in ``cfg.tasks``.

    Bags go to ``out_dir/<task>_<NNNN>/``, each written atomically. Deterministic for ``cfg.seed``
    whatever ``num_workers`` and the executor (``compute``, default local) are (seeds and stamps depend
    only on task and attempt). Returns the summary
    ``{"tasks": {task: {attempts, successes, success_rate}}, "episodes": [...]}`` (no wall time: a DVC metric);
    RuntimeError when a task cannot reach ``episodes_per_task`` within ``max_attempts_per_task``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log.info(
        "collecting %d x %d episodes (%s storage) into %s", len(cfg.tasks), cfg.episodes_per_task, cfg.storage, out_dir
    )
    jobs = [(cfg, name, pos, out_dir) for pos, name in enumerate(cfg.tasks)]
    # the parent holds no PyBullet client (each worker opens its own), so fork is safe where it exists
    results = map_ordered(
        _collect_job,
        jobs,
        cfg.num_workers,
        desc="collect",
        unit="task",
        compute=compute,
        label=lambda job: f"task {job[1]}",
    )
    # the summary is a DVC metric (reports/collect.json): its bytes depend on the seed only, the time goes to the log
    summary: dict[str, Any] = {"tasks": {}, "episodes": []}
    for res in results:
        summary["tasks"][res["task"]] = {
            "attempts": res["attempts"],
            "successes": res["successes"],
            "success_rate": res["successes"] / res["attempts"],
        }
        summary["episodes"] += res["episodes"]
    log.info(
        "collected %d episodes in %.1f s: %s",
        len(summary["episodes"]),
        time.perf_counter() - start,
        json.dumps({k: v["success_rate"] for k, v in summary["tasks"].items()}),
    )
    return summary
