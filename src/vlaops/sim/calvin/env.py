"""``CalvinEnv``: calvin_env's ``PlayTableSimEnv`` behind the evaluation interface (``eval/env.py``).

Built as CALVIN's evaluation builds it from a dataset's config, but from calvin_env's own conf/ (the robot,
the scene, the static 200x200 and gripper 84x84 cameras), with EGL off so that it runs on any CPU. A chain
is named by its index in CALVIN's 1000 sequences: ``reset(index)`` puts the robot and the scene where
CALVIN's ``get_env_state_for_initial_condition`` puts them for that sequence (``sequences.initial_state``).
Success is calvin_env's own ``Tasks`` oracle, comparing ``get_info()`` at a subtask's start with the current
one (``CalvinTask``); the instruction is CALVIN's validation annotation of the task.
"""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlaops.errors import VlaopsError
from vlaops.io.calvin_spec import ACTION_DIM, GRIPPER_CLOSE, GRIPPER_OPEN, RGB_GRIPPER_SIZE, RGB_STATIC_SIZE
from vlaops.sim.calvin.config import CalvinConfig
from vlaops.sim.calvin.instructions import instructions
from vlaops.sim.calvin.sequences import load_sequences
from vlaops.utils.logging import get_logger

log = get_logger(__name__)
INSTALL_HINT = "pip install 'vlaops[calvin]', or `make install` beside a calvin_env snapshot (docs/calvin.md)"
CAMERAS = ("static", "gripper")  # CALVIN's static_and_gripper: rgb_static 200x200, rgb_gripper 84x84
CAMERA_SIZES = {"static": RGB_STATIC_SIZE, "gripper": RGB_GRIPPER_SIZE}
PHYSICS_HZ, CONTROL_HZ = 240.0, 30  # calvin_env's conf/env/play_table_env.yaml


def import_calvin_env() -> Any:
    """The calvin_env package, or one line saying how to install it."""
    try:
        import calvin_env
    except ImportError as exc:
        raise VlaopsError(f"eval.env=calvin needs calvin_env ({exc}); {INSTALL_HINT}") from None
    return calvin_env


def calvin_root(cfg: CalvinConfig) -> Path:
    """The calvin_env checkout whose conf/ and data/ are used (``eval.calvin.root``, or beside the package)."""
    if cfg.root:
        root = Path(cfg.root).expanduser()
        where = f"eval.calvin.root={cfg.root}"
    else:
        root = Path(import_calvin_env().__file__).resolve().parents[1]
        where = f"the directory above the installed calvin_env package ({root})"
    for sub in ("conf/scene", "conf/robot", "conf/tasks", "data"):
        if not (root / sub).is_dir():
            raise VlaopsError(
                f"{where} has no {sub}/: set eval.calvin.root to a calvin_env checkout (conf/ and data/ of commit "
                "797142c), as a wheel installed from the git URL holds neither"
            )
    return root


def _load(path: Path) -> Any:
    from omegaconf import OmegaConf

    if not path.is_file():
        raise VlaopsError(f"{path}: not found; check eval.calvin.scene / robot / tasks against calvin_env's conf/")
    return OmegaConf.load(path)


def _without_defaults(cfg: Any) -> Any:
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(cfg)
    data.pop("defaults", None)
    return OmegaConf.create(data)


def compose(cfg: CalvinConfig, root: Path, cameras: Sequence[str]) -> Any:
    """calvin_env's robot, scene and camera configs, composed as its Hydra defaults would compose them
    (the robot over its parent panda.yaml) and resolved against each other, without Hydra's global state
    (the vlaops CLI may hold it)."""
    from omegaconf import OmegaConf

    conf = root / "conf"
    robot = _load(conf / "robot" / f"{cfg.robot}.yaml")
    for parent in OmegaConf.to_container(robot).get("defaults", []):  # e.g. [panda]
        robot = OmegaConf.merge(_load(conf / "robot" / f"{parent}.yaml"), _without_defaults(robot))
    tree = OmegaConf.create(
        {
            "data_path": str(root / "data"),
            "robot": _without_defaults(robot),
            "scene": _load(conf / "scene" / f"{cfg.scene}.yaml"),
            "cameras": {name: _load(conf / "cameras" / "cameras" / f"{name}.yaml") for name in cameras},
        }
    )
    OmegaConf.resolve(tree)
    return tree


@functools.cache
def _quiet_commit_lookup() -> None:
    """``PlayTableSimEnv`` logs the git commit of the tree calvin_env is installed in and raises when that is
    no git work tree (a snapshot, a wheel in a virtualenv outside any clone); only the log line needs it,
    so the lookup answers "unknown" there instead."""
    import calvin_env.envs.play_table_env as play_table_env

    lookup = play_table_env.get_git_commit_hash

    def commit_or_unknown(path: Path) -> str:
        try:
            return lookup(path)
        except Exception:  # git.exc.InvalidGitRepositoryError, NoSuchPathError, or git missing
            return "unknown (not a git work tree)"

    play_table_env.get_git_commit_hash = commit_or_unknown


def task_oracle(cfg: CalvinConfig, root: Path | None = None) -> Any:
    """calvin_env's ``Tasks`` built from conf/tasks/<eval.calvin.tasks>.yaml."""
    from calvin_env.envs.tasks import Tasks

    return Tasks(_load((root or calvin_root(cfg)) / "conf" / "tasks" / f"{cfg.tasks}.yaml").tasks)


def oracle_task_names(cfg: CalvinConfig) -> list[str]:
    """The task names the configured oracle knows, read from its YAML (no simulator built)."""
    return list(_load(calvin_root(cfg) / "conf" / "tasks" / f"{cfg.tasks}.yaml").tasks)


@dataclass(frozen=True)
class CalvinTask:
    """One subtask: CALVIN's instruction for it and calvin_env's oracle asked about this task only."""

    name: str
    instruction: str
    oracle: Any

    def success(self, start_info: dict[str, Any], end_info: dict[str, Any]) -> bool:
        return bool(self.oracle.get_task_info_for_set(start_info, end_info, {self.name}))


def to_calvin_action(action: Any) -> np.ndarray:
    """A policy's (7,) relative action in CALVIN's units -> calvin_env's: the arm clipped to [-1, 1] (calvin_env
    scales it by 0.02 m / 0.05 rad), the gripper snapped to +1 (open) or -1 (close) as calvin_env demands."""
    arr = np.asarray(action, dtype=np.float64)
    if arr.shape != (ACTION_DIM,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"action must be a finite ({ACTION_DIM},) array, got {arr.shape}: {arr.tolist()}")
    out = np.clip(arr, -1.0, 1.0)
    out[-1] = GRIPPER_OPEN if arr[-1] >= 0 else GRIPPER_CLOSE
    return out


class CalvinEnv:
    """calvin_env's scene (``eval.calvin.scene``) for CALVIN's chains; one PyBullet client per instance.

    ``cameras``: which of CALVIN's cameras to render; the others (all when ``render`` is False) are returned
    as zeros of CALVIN's shapes, so a policy that does not read a camera does not pay for it.
    """

    def __init__(self, cfg: CalvinConfig, render: bool = True, cameras: Sequence[str] = CAMERAS) -> None:
        import_calvin_env()
        from calvin_env.envs.play_table_env import PlayTableSimEnv

        _quiet_commit_lookup()
        self.cfg = cfg
        self.root = calvin_root(cfg)
        unknown = [c for c in cameras if c not in CAMERAS]
        if unknown:
            raise ValueError(f"unknown camera(s) {unknown}; CALVIN's are {list(CAMERAS)}")
        self.cameras = tuple(cameras) if render else ()
        tree = compose(cfg, self.root, self.cameras)
        self.sim = PlayTableSimEnv(
            robot_cfg=tree.robot,
            seed=0,
            use_vr=False,
            bullet_time_step=PHYSICS_HZ,
            cameras=tree.cameras,
            show_gui=False,
            scene_cfg=tree.scene,
            use_scene_info=True,
            use_egl=False,
            control_freq=CONTROL_HZ,
        )
        self.oracle = task_oracle(cfg, self.root)
        self.instructions = instructions()
        self.sequences = load_sequences()
        self.control_hz = CONTROL_HZ

    # --- the evaluation interface ---------------------------------------------------------------
    def reset(self, seed: int) -> dict[str, Any]:
        """The scene CALVIN starts sequence number ``seed`` (0-based, in CALVIN's order) from."""
        from vlaops.sim.calvin.sequences import initial_state

        condition, _ = self.sequences[seed]
        robot_obs, scene_obs = initial_state(condition)
        return self.reset_to(robot_obs, scene_obs)

    def reset_to(self, robot_obs: np.ndarray, scene_obs: np.ndarray) -> dict[str, Any]:
        self.sim.reset(robot_obs=np.asarray(robot_obs), scene_obs=np.asarray(scene_obs))
        return self.observe()

    def step(self, action: Any) -> dict[str, Any]:
        self.sim.robot.apply_action(to_calvin_action(action))
        for _ in range(self.sim.action_repeat):
            self.sim.p.stepSimulation(physicsClientId=self.sim.cid)
        self.sim.scene.step()
        return self.observe()

    def joint_state(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions, velocities) of the seven arm joints and the two fingers, in the order of the Panda's
        ``panda_joint1..7, panda_finger_joint1..2`` (a JointState message's)."""
        robot = self.sim.robot
        ids = [*robot.arm_joint_ids, *robot.gripper_joint_ids]
        states = self.sim.p.getJointStates(robot.robot_uid, ids, physicsClientId=self.sim.cid)
        return np.array([s[0] for s in states]), np.array([s[1] for s in states])

    def get_info(self) -> dict[str, Any]:
        return self.sim.get_info()

    def get_task(self, name: str) -> CalvinTask:
        if name not in self.oracle.tasks:
            raise VlaopsError(f"{name!r} is not a task of calvin_env's oracle ({self.cfg.tasks}.yaml)")
        return CalvinTask(name, self.instructions[name], self.oracle)

    def observe(self) -> dict[str, Any]:
        """CALVIN's observation: rgb_obs {rgb_static, rgb_gripper} (u8), robot_obs (15,), scene_obs (24,)."""
        rgb_obs, _ = self.sim.get_camera_obs()
        for name in CAMERAS:
            size = CAMERA_SIZES[name]
            rgb_obs.setdefault(f"rgb_{name}", np.zeros((size, size, 3), dtype=np.uint8))
        return {"rgb_obs": rgb_obs, **self.sim.get_state_obs()}

    def close(self) -> None:
        """Disconnect the PyBullet client; calvin_env prints as it does (and again when collected), so both
        happen here with its stdout swallowed."""
        sim, self.sim = getattr(self, "sim", None), None
        if sim is not None:
            with contextlib.redirect_stdout(io.StringIO()):
                sim.close()
                sim.cid = -1
                del sim

    def __enter__(self) -> CalvinEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_sequences(cfg: CalvinConfig, chains: Sequence[tuple[int, Sequence[str]]]) -> None:
    """One line naming the first chain with a task calvin_env's oracle does not know, before any chain runs."""
    known = set(oracle_task_names(cfg))
    for index, names in chains:
        unknown = [n for n in names if n not in known or n not in instructions()]
        if unknown:
            raise VlaopsError(
                f"CALVIN sequence {index} names task(s) {unknown} that calvin_env's oracle ({cfg.tasks}.yaml) "
                "or CALVIN's instructions do not know"
            )


def chain_list(count: int) -> list[tuple[int, list[str]]]:
    """The first ``count`` of CALVIN's sequences as (index, task names): the chains ``run_chains`` plays."""
    return [(i, list(tasks)) for i, (_, tasks) in enumerate(load_sequences(count))]


def observation_shapes(obs: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """{key: shape} of an observation, for logs and tests."""
    out = {k: np.asarray(v).shape for k, v in obs["rgb_obs"].items()}
    out.update({k: np.asarray(obs[k]).shape for k in ("robot_obs", "scene_obs")})
    return out
