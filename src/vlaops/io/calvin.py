"""The one place that knows the CALVIN dataset layout: its file names, keys, writer and reader.

Layout as the public dataset ships it (mees/calvin, dataset/README.md): one
``episode_%07d.npz`` per frame with global frame ids, ``ep_start_end_ids.npy`` (N, 2) with
*inclusive* ends, ``ep_lens.npy``, ``statistics.yaml`` and ``lang_annotations/auto_lang_ann.npy``.
CALVIN's and RoboVLMs' own loaders read what is written here. The annotation file is a pickle by
CALVIN's design; we also write a JSON twin and read that, loading the pickle only when the user
says the data is trusted (``data.trust_pickles``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from vlaops.errors import VlaopsError
from vlaops.io.calvin_spec import REL_ORN_SCALE, REL_POS_SCALE, wrap_angle
from vlaops.utils.signals import signals_deferred

FORMAT_VERSION = 1
TRAINING, VALIDATION = "training", "validation"
SPLITS = (TRAINING, VALIDATION)
FRAME_FILE = "episode_{:07d}.npz"
EP_START_END_IDS = "ep_start_end_ids.npy"
EP_LENS = "ep_lens.npy"
STATISTICS = "statistics.yaml"
LANG_DIR = "lang_annotations"
LANG_ANN = "auto_lang_ann.npy"
LANG_ANN_JSON = "auto_lang_ann.json"
LANG_EMB = "embeddings.npy"
LANG_EMB_JSON = "embeddings.json"
PROVENANCE = "vlaops_dataset.json"  # ours; CALVIN's loaders ignore it

# Per-frame keys (CALVIN dataset/README.md); their shapes and the action convention: io/calvin_spec.py.
FRAME_KEYS = ("actions", "rel_actions", "robot_obs", "scene_obs", "rgb_static", "rgb_gripper")
# A mobile base (docs/mobile_base.md): the same layout with 4-dim actions and no robot or scene state.
# actions (4) = rel_actions (4) = [linear_x m/s, linear_y m/s, angular_z rad/s, action_type class id]: a
# body-frame velocity command is already relative to the robot, so there is no absolute target to take a
# difference from. The class labels are in PROVENANCE ("action_types", class id = index).
BASE_FRAME_KEYS = ("actions", "rel_actions", "rgb_static", "rgb_gripper")
MOBILE_BASE = "mobile_base"
NORMALIZE_TARGET = "calvin_agent.utils.transforms.NormalizeVector"
LANG_EMBEDDING_NAME = "hashed-bow-v1"


def frame_path(split_dir: Path, frame_id: int) -> Path:
    return split_dir / FRAME_FILE.format(frame_id)


def write_frame(split_dir: Path, frame_id: int, arrays: dict[str, np.ndarray]) -> None:
    """One frame's compressed npz, CALVIN's ``episode_%07d.npz``, written whole before a signal is honoured.

    A SIGINT/SIGTERM that lands inside the zip writer unwinds it with a member's write handle still open;
    the ZipFile then fails to close, and its ``__del__`` prints a traceback after the stage's one-line
    "stopped by" (the temporary directory is dropped either way). Writing one frame takes milliseconds."""
    with signals_deferred():
        np.savez_compressed(frame_path(split_dir, frame_id), **arrays)


def rel_actions_from_abs(actions: np.ndarray, robot_obs: np.ndarray) -> np.ndarray:
    """(T, 7) absolute tcp targets + (T, 15) robot_obs -> (T, 7) CALVIN rel_actions in [-1, 1].

    [clip(Δpos, ±0.02)/0.02, clip(wrap(Δeuler), ±0.05)/0.05, gripper], as CALVIN's
    ``to_relative_action`` (calvin_env/utils/utils.py) computes them.
    """
    dpos = np.clip(actions[:, :3] - robot_obs[:, :3], -REL_POS_SCALE, REL_POS_SCALE) / REL_POS_SCALE
    dorn = wrap_angle(actions[:, 3:6] - robot_obs[:, 3:6])
    dorn = np.clip(dorn, -REL_ORN_SCALE, REL_ORN_SCALE) / REL_ORN_SCALE
    return np.concatenate([dpos, dorn, actions[:, 6:7]], axis=1)


def base_rel_actions(action_base: np.ndarray) -> np.ndarray:
    """(T, 4) [linear_x, linear_y, angular_z, class id] -> (T, 4) rel_actions: the same values (see
    BASE_FRAME_KEYS); the class id stays a whole number, never scaled."""
    return np.array(action_base, dtype=np.float64, copy=True)


def base_statistics_yaml(actions: np.ndarray) -> dict[str, Any]:
    """statistics.yaml of a base split: per-dimension action bounds only (a base has no robot_obs/scene_obs)."""
    return {"act_min_bound": actions.min(0).tolist(), "act_max_bound": actions.max(0).tolist()}


@dataclass(frozen=True)
class DatasetInfo:
    """What a converted dataset is of: ``embodiment`` (arm unless our provenance says otherwise: a real
    CALVIN split is an arm's) and, for a base, its action_type labels (class id = index)."""

    embodiment: str = "arm"
    action_types: tuple[str, ...] = ()


def dataset_info(root: str | Path) -> DatasetInfo:
    """The embodiment and class labels of the converted dataset under ``root`` (from PROVENANCE)."""
    path = Path(root) / PROVENANCE
    if not path.is_file():
        return DatasetInfo()
    try:
        prov = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise VlaopsError(f"{path}: not valid JSON ({exc})") from exc
    embodiment = prov.get("embodiment", "arm")
    labels = tuple(prov.get("action_types") or ())
    if embodiment == MOBILE_BASE and len(labels) < 2:
        raise VlaopsError(f"{path}: a mobile_base dataset without its action_types labels; re-run convert")
    return DatasetInfo(embodiment, labels)


def language_embedding(texts: list[str], dim: int) -> np.ndarray:
    """(N, dim) float32 unit vectors from hashed word unigrams and bigrams.

    CALVIN ships MiniLM sentence embeddings; no network at run time means no sentence model here,
    so this deterministic stand-in fills the field (our policy reads the tokenised text, not this).
    """
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        words = re.findall(r"[a-z0-9]+", text.lower())
        grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
        for gram in grams:
            h = int.from_bytes(hashlib.sha256(gram.encode()).digest()[:8], "little")
            out[row, h % dim] += 1.0 if (h >> 63) & 1 else -1.0
        norm = np.linalg.norm(out[row])
        if norm > 0:
            out[row] /= norm
    return out


def statistics_yaml(robot_obs: np.ndarray, scene_obs: np.ndarray, actions: np.ndarray) -> dict[str, Any]:
    """CALVIN's statistics.yaml: observation mean/std as NormalizeVector transforms, action bounds."""

    def vector(x: np.ndarray) -> dict[str, Any]:
        return {"_target_": NORMALIZE_TARGET, "mean": x.mean(0).tolist(), "std": x.std(0).tolist()}

    return {
        "robot_obs": [vector(robot_obs)],
        "scene_obs": [vector(scene_obs)],
        "act_min_bound": actions.min(0).tolist(),
        "act_max_bound": actions.max(0).tolist(),
    }


def write_split_metadata(
    split_dir: Path,
    episodes: list[tuple[int, int, str, str]],
    stats: dict[str, Any],
    emb_dim: int,
) -> None:
    """Write the per-split files for ``episodes`` = [(start, end_inclusive, instruction, task)]."""
    ids = np.array([(s, e) for s, e, _, _ in episodes], dtype=np.int64).reshape(-1, 2)
    np.save(split_dir / EP_START_END_IDS, ids)
    np.save(split_dir / EP_LENS, ids[:, 1] - ids[:, 0] + 1)
    with open(split_dir / STATISTICS, "w") as handle:
        yaml.safe_dump(stats, handle, sort_keys=False)
    anns = [ann for _, _, ann, _ in episodes]
    tasks = [task for _, _, _, task in episodes]
    emb = language_embedding(anns, emb_dim)[:, None, :]  # (N, 1, D) as CALVIN ships it
    lang = {
        "language": {"ann": anns, "task": tasks, "emb": emb},
        "info": {"episodes": [], "indx": [(int(s), int(e)) for s, e, _, _ in episodes]},
    }
    lang_dir = split_dir / LANG_DIR
    lang_dir.mkdir(exist_ok=True)
    np.save(lang_dir / LANG_ANN, np.array(lang, dtype=object))  # CALVIN's format (a pickle); we read the JSON twin
    twin = {**lang, "language": {**lang["language"], "emb": emb.tolist()}}
    (lang_dir / LANG_ANN_JSON).write_text(json.dumps(twin))
    per_task: dict[str, dict[str, Any]] = {}
    for ann, task, vec in zip(anns, tasks, emb):
        per_task.setdefault(task, {"emb": vec, "ann": ann})
    np.save(lang_dir / LANG_EMB, np.array(per_task, dtype=object))
    (lang_dir / LANG_EMB_JSON).write_text(
        json.dumps({t: {"emb": v["emb"].tolist(), "ann": v["ann"]} for t, v in per_task.items()})
    )


@dataclass(frozen=True)
class Annotation:
    start: int  # first frame id
    end: int  # last frame id, inclusive (CALVIN's convention)
    instruction: str
    task: str


class CalvinSplit:
    """Read access to one split (ours or a real CALVIN task_X_X split)."""

    def __init__(self, split_dir: str | Path, trust_pickles: bool = False) -> None:
        self.dir = Path(split_dir)
        ids_path = self.dir / EP_START_END_IDS
        if not ids_path.is_file():
            raise VlaopsError(f"{ids_path}: not found; expected a CALVIN split directory (run convert)")
        self.ep_start_end_ids = np.load(ids_path)  # (N, 2) inclusive
        if self.ep_start_end_ids.ndim != 2 or self.ep_start_end_ids.shape[1] != 2:
            raise VlaopsError(f"{ids_path}: expected shape (N, 2), got {self.ep_start_end_ids.shape}")
        self.annotations = self._read_annotations(trust_pickles)

    def _read_annotations(self, trust_pickles: bool) -> list[Annotation]:
        json_path = self.dir / LANG_DIR / LANG_ANN_JSON
        pickle_path = self.dir / LANG_DIR / LANG_ANN
        if json_path.is_file():
            try:
                lang = json.loads(json_path.read_text())
            except json.JSONDecodeError as exc:
                raise VlaopsError(f"{json_path}: not valid JSON ({exc})") from exc
        elif pickle_path.is_file():
            if not trust_pickles:
                raise VlaopsError(
                    f"{pickle_path}: only CALVIN's pickled annotations exist, and a pickle can run code; "
                    "set data.trust_pickles=true if you trust this dataset"
                )
            lang = np.load(pickle_path, allow_pickle=True).item()  # trusted by the user's explicit switch
        else:
            raise VlaopsError(f"{json_path}: language annotations not found")
        try:
            language, indx = lang["language"], lang["info"]["indx"]
            anns, tasks = language["ann"], language["task"]
        except (KeyError, TypeError) as exc:
            raise VlaopsError(
                f"{json_path}: missing annotation field {exc}; expected language.ann/task, info.indx"
            ) from exc
        if not (len(anns) == len(tasks) == len(indx)):
            raise VlaopsError(f"{json_path}: language.ann, language.task and info.indx differ in length")
        return [Annotation(int(s), int(e), str(a), str(t)) for (s, e), a, t in zip(indx, anns, tasks)]

    def frame_path(self, frame_id: int) -> Path:
        return frame_path(self.dir, frame_id)

    def load_frame(self, frame_id: int, keys: tuple[str, ...] = FRAME_KEYS) -> dict[str, np.ndarray]:
        """Read ``keys`` of one frame; npz members are decompressed only when asked for."""
        path = self.frame_path(frame_id)
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in keys}
        except FileNotFoundError as exc:
            raise VlaopsError(f"{path}: frame file missing") from exc
        except KeyError as exc:
            raise VlaopsError(f"{path}: missing key {exc}; expected {list(keys)}") from exc

    def statistics(self) -> dict[str, Any]:
        path = self.dir / STATISTICS
        if not path.is_file():
            raise VlaopsError(f"{path}: not found")
        return yaml.safe_load(path.read_text())


def dataset_fingerprint(root: str | Path) -> str:
    """sha256 over what identifies a converted dataset: our provenance stamp when present, else every
    split's episode ids and annotations (a real CALVIN split), so runs on different data never compare
    as equal in MLflow."""
    root = Path(root)
    digest = hashlib.sha256()
    names = [PROVENANCE] if (root / PROVENANCE).is_file() else []
    for split in SPLITS:
        names += [
            f"{split}/{EP_START_END_IDS}",
            f"{split}/{LANG_DIR}/{LANG_ANN_JSON}",
            f"{split}/{LANG_DIR}/{LANG_ANN}",
        ]
    for name in names:
        path = root / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
