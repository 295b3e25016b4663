"""The canonical episode: one HDF5 file per episode, the contract between ingest and convert.

Every reader (rosbag2, HDF5 layouts, later LeRobot / RLDS) produces an :class:`Episode`; convert
only ever reads this format. The fields and their shapes are :class:`Episode`'s, checked by
:meth:`Episode.validate` on every write and read; :func:`write_episode` and :func:`read_episode` hold the file layout.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from vlaops.errors import RecordingError, VlaopsError
from vlaops.io.calvin_spec import ACTION_DIM, ROBOT_OBS_DIM, SCENE_OBS_DIM
from vlaops.utils.atomic import atomic_file
from vlaops.utils.signals import signals_deferred

FORMAT_VERSION = 1
IMAGE_GZIP_LEVEL = 1  # any level reads back the same pixels; the level only trades write time for size
ARM_ACTION_DIM = ACTION_DIM  # action/abs: target tcp xyz, target tcp euler xyz, gripper ±1 (CALVIN's "actions")
BASE_ACTION_DIM = 4  # linear_x, linear_y, angular_z, action_type
BASE_ACTION_NAMES = ("linear_x", "linear_y", "angular_z", "action_type")  # m/s, m/s, rad/s, class id
EMBODIMENTS = ("arm", "mobile_base")


@dataclass
class Episode:
    """One recorded demonstration, synchronised to the control rate (T ticks)."""

    episode_id: str
    source: str
    source_sha256: str
    source_format: str
    embodiment: str
    instruction: str
    task: str
    control_hz: float
    time: np.ndarray  # (T,) seconds since the first tick
    rgb_static: np.ndarray  # (T, H, W, 3) uint8
    robot_obs: np.ndarray | None = None  # (T, 15) for an arm
    action_abs: np.ndarray | None = None  # (T, 7) for an arm
    action_base: np.ndarray | None = None  # (T, 4) for a mobile base
    rgb_gripper: np.ndarray | None = None  # (T, h, w, 3) uint8
    scene_obs: np.ndarray | None = None  # (T, 24)
    extra_attrs: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.time.shape[0])

    def validate(self, where: str) -> None:
        """Check shapes, dtypes and values; raise a RecordingError naming ``where`` and the field.

        ``where`` is what the user knows the data by: ingest passes the recording (not the temporary
        file it is about to write), convert the episode file it reads."""

        def fail(name: str, expected: str, got: object) -> None:
            check = "non_finite" if expected == "finite values" else "episode_contract"
            raise RecordingError(
                where,
                f"field '{name}' expected {expected}, got {got}",
                check=check,
                stream=name,
                episode=self.episode_id,
            )

        if self.embodiment not in EMBODIMENTS:
            fail("embodiment", f"one of {EMBODIMENTS}", repr(self.embodiment))
        if not self.instruction.strip():
            fail("instruction", "a non-empty instruction", repr(self.instruction))
        if not self.control_hz > 0:
            fail("control_hz", "> 0", self.control_hz)
        t = len(self)
        if t < 2:
            fail("time", "at least 2 synchronised frames", t)
        if not np.all(np.isfinite(self.time)):
            fail("time", "finite values", "NaN or inf")
        if np.any(np.diff(self.time) <= 0):
            fail("time", "strictly increasing stamps", "a non-increasing step")
        images = {"rgb_static": self.rgb_static, "rgb_gripper": self.rgb_gripper}
        for name, img in images.items():
            if img is None:
                continue
            if img.dtype != np.uint8 or img.ndim != 4 or img.shape[0] != t or img.shape[-1] != 3:
                fail(f"obs/{name}", f"uint8 ({t}, H, W, 3)", f"{img.dtype} {img.shape}")
        arrays: dict[str, tuple[np.ndarray | None, int]] = {
            "obs/robot_obs": (self.robot_obs, ROBOT_OBS_DIM),
            "obs/scene_obs": (self.scene_obs, SCENE_OBS_DIM),
            "action/abs": (self.action_abs, ARM_ACTION_DIM),
            "action/base": (self.action_base, BASE_ACTION_DIM),
        }
        for name, (arr, dim) in arrays.items():
            if arr is None:
                continue
            if arr.shape != (t, dim):
                fail(name, f"shape ({t}, {dim})", arr.shape)
            if not np.all(np.isfinite(arr)):
                fail(name, "finite values", "NaN or inf")
        if self.embodiment == "arm":
            if self.robot_obs is None or self.action_abs is None:
                fail("obs/robot_obs, action/abs", "both present for an arm", "a missing one")
            gripper = self.action_abs[:, 6]
            if not np.all(np.isin(gripper, (-1.0, 1.0))):
                fail("action/abs[:, 6]", "gripper actions in {-1, 1}", np.unique(gripper)[:5])
        elif self.action_base is None:
            fail("action/base", "present for a mobile base", "missing")
        else:
            classes = self.action_base[:, 3]
            labels = self.extra_attrs.get("action_types")  # JSON list (vlaops.io.mobile_base): class id = index
            n = len(json.loads(labels)) if labels is not None else None
            if np.any(classes != np.round(classes)) or np.any(classes < 0) or (n is not None and np.any(classes >= n)):
                fail(
                    "action/base[:, 3]",
                    f"action_type class ids in [0, {n if n is not None else 'K'})",
                    np.unique(classes)[:5],
                )


_ATTRS = ("episode_id", "source", "source_sha256", "source_format", "embodiment", "instruction", "task")
_DATASETS = {
    "obs/rgb_static": "rgb_static",
    "obs/rgb_gripper": "rgb_gripper",
    "obs/robot_obs": "robot_obs",
    "obs/scene_obs": "scene_obs",
    "action/abs": "action_abs",
    "action/base": "action_base",
}


def write_episode(path: str | os.PathLike[str], episode: Episode) -> None:
    """Validate and write ``episode`` to ``path`` atomically."""
    path = Path(path)
    episode.validate(str(path))
    # h5py writes through the file object's Python methods: a signal handler raising inside one would be
    # swallowed and leave HDF5 half-flushed (a crash at exit); the signal waits for the file to be closed
    with atomic_file(path, "wb") as handle, signals_deferred(), h5py.File(handle, "w") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        for name in _ATTRS:
            f.attrs[name] = getattr(episode, name)
        f.attrs["control_hz"] = float(episode.control_hz)
        for key, value in episode.extra_attrs.items():
            f.attrs[f"extra/{key}"] = value
        # track_times=False: HDF5 would stamp each dataset with its creation time, and the same episode
        # written a second later would differ in bytes (and in DVC's hash)
        f.create_dataset("time", data=episode.time.astype(np.float64), track_times=False)
        for key, attr in _DATASETS.items():
            value = getattr(episode, attr)
            if value is None:
                continue
            if value.dtype == np.uint8:
                # per-frame chunks: convert reads frame by frame. gzip level 1: on the simulator's frames it
                # costs 0.31 ms a frame against level 4's 0.88 ms (most of ingest's time) for 24 % more bytes
                # (bench/ingest.py; reports/bench/ingest*.json)
                f.create_dataset(
                    key,
                    data=value,
                    chunks=(1, *value.shape[1:]),
                    compression="gzip",
                    compression_opts=IMAGE_GZIP_LEVEL,
                    track_times=False,
                )
            else:
                f.create_dataset(key, data=value.astype(np.float64), track_times=False)


def read_episode(path: str | os.PathLike[str]) -> Episode:
    """Read and validate a canonical episode; a wrong or missing field is a VlaopsError naming it."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise VlaopsError(f"{path}: not a readable HDF5 file ({exc})") from exc
    with f:
        version = f.attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise VlaopsError(f"{path}: attr 'format_version' is {version!r}, expected {FORMAT_VERSION}")
        missing = [a for a in (*_ATTRS, "control_hz") if a not in f.attrs]
        if missing:
            raise VlaopsError(f"{path}: missing attrs {missing}")
        if "time" not in f or "obs/rgb_static" not in f:
            raise VlaopsError(f"{path}: missing dataset 'time' or 'obs/rgb_static'")
        kwargs = {a: str(f.attrs[a]) for a in _ATTRS}
        extra = {k[len("extra/") :]: str(v) for k, v in f.attrs.items() if k.startswith("extra/")}
        arrays = {attr: (f[key][()] if key in f else None) for key, attr in _DATASETS.items()}
        episode = Episode(
            **kwargs,
            control_hz=float(f.attrs["control_hz"]),
            time=f["time"][()],
            extra_attrs=extra,
            **arrays,
        )
    episode.validate(str(path))
    return episode
