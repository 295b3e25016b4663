"""``vlaops inspect PATH``: what a person checks before spending GPU hours on a dataset.

PATH is told by its content, not its name: a CALVIN split (``ep_start_end_ids.npy``), a CALVIN root
(``training/`` and ``validation/`` splits), an episodes directory (ingest's report, or canonical ``.h5``
files only), one recording, or a raw directory of recordings. Raw recordings are read through the reader
registry (``vlaops.io.readers``) with the ``data.*`` settings and the same contract and plausibility
checks ingest runs, so inspect lists exactly the recordings ingest would stop on or quarantine, each with
its reason, never a traceback. CALVIN data is read only through ``vlaops.io.calvin``.

The summary: episodes, frames, tasks (episodes each; for CALVIN, annotated windows each), instructions
and how often each occurs, per-dimension action statistics (LeRobot's min / max / mean / std / q01 / q99),
image sizes per camera, control rates where the data records one, the unreadable recordings, and a
contact sheet of the first / middle / last frames of a few episodes spread over the data
(``data/contact_sheet.py``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from vlaops.data.config import DataConfig
from vlaops.data.contact_sheet import SheetRow, draw_contact_sheet, sample_indices

# the read and checks ingest runs on every episode, so inspect and ingest cannot disagree about a recording
from vlaops.data.ingest import REPORT_FILE, guarded, read_checked
from vlaops.errors import RecordingError, VlaopsError
from vlaops.io import calvin
from vlaops.io.episode import Episode, read_episode
from vlaops.io.hdf5 import is_hdf5, layout
from vlaops.io.readers import expected_formats, find_reader
from vlaops.utils.executor import map_ordered
from vlaops.utils.logging import get_logger

log = get_logger(__name__)

RAW, RECORDING, EPISODES, CALVIN_SPLIT, CALVIN_ROOT = "raw", "recording", "episodes", "calvin_split", "calvin"
KIND_NAMES = {
    RAW: "raw recordings",
    RECORDING: "one recording",
    EPISODES: "canonical episodes",
    CALVIN_SPLIT: "a CALVIN split",
    CALVIN_ROOT: "a CALVIN dataset",
}
CAMERAS = ("rgb_static", "rgb_gripper")
# Dimension names of the action streams: the canonical episode's (``vlaops.io.episode``) and
# CALVIN's actions / rel_actions (tcp xyz, tcp euler xyz, gripper: io/calvin_spec.py).
ARM_DIMS = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")
BASE_DIMS = ("linear_x", "linear_y", "angular_z", "action_type")
ACTION_STREAMS = {"action/abs": "action_abs", "action/base": "action_base"}
CALVIN_ACTIONS = ("actions", "rel_actions")
DEFAULT_SHEET_EPISODES = 6


@dataclass
class EpisodeFacts:
    """What inspect keeps of one episode: counts, actions per stream (T, A), image size per camera (H, W)
    and, for an episode on the contact sheet, its first / middle / last frame per camera (H, W, 3) uint8."""

    label: str
    instruction: str
    task: str
    embodiment: str
    frames: int
    control_hz: float | None
    actions: dict[str, np.ndarray]
    image_sizes: dict[str, tuple[int, int]]
    samples: dict[str, list[np.ndarray]] | None = None


@dataclass(frozen=True)
class Unreadable:
    """A recording (or one episode of it) inspect could not read, with ingest's report fields."""

    recording: str
    episode: str | None
    check: str
    stream: str | None
    reason: str

    @classmethod
    def from_error(cls, recording: str, exc: RecordingError, episode: str | None = None) -> Unreadable:
        return cls(recording, episode if episode is not None else exc.episode, exc.check, exc.stream, exc.reason)


def dimension_names(width: int) -> list[str]:
    """Names of the ``width`` dimensions of an action stream: an arm's 7, a base's 4, else ``d<i>``."""
    names = {len(ARM_DIMS): ARM_DIMS, len(BASE_DIMS): BASE_DIMS}.get(width)
    return list(names) if names else [f"d{i}" for i in range(width)]


def action_ranges(values: np.ndarray) -> dict[str, list[float]]:
    """Per-dimension min / max / mean / std / q01 / q99 of (N, A) actions: the statistics normalize keeps
    (``data/normalization.py``, after LeRobot's), computed here without importing torch for them."""
    return {
        "min": values.min(0).tolist(),
        "max": values.max(0).tolist(),
        "mean": values.mean(0).tolist(),
        "std": values.std(0).tolist(),
        "q01": np.quantile(values, 0.01, axis=0).tolist(),
        "q99": np.quantile(values, 0.99, axis=0).tolist(),
    }


def _is_calvin_split(path: Path) -> bool:
    return (path / calvin.EP_START_END_IDS).is_file()


def _is_canonical(path: Path) -> bool:
    if path.suffix != ".h5" or not is_hdf5(path):
        return False
    try:
        with h5py.File(path, "r") as f:
            return layout(f) == "canonical"
    except OSError:
        return False


def detect(path: Path) -> str:
    """What ``path`` holds (one of :data:`KIND_NAMES`), from its content; a VlaopsError naming it when
    it is missing, empty or holds nothing vlaops reads."""
    if not path.exists():
        raise VlaopsError(
            f"{path}: not found; expected a raw recordings directory, an episodes directory or a CALVIN split"
        )
    if path.is_file():
        if find_reader(path) is None:
            raise VlaopsError(f"{path}: not a recording vlaops can read; expected {expected_formats()}")
        return RECORDING
    if _is_calvin_split(path):
        return CALVIN_SPLIT
    if any(_is_calvin_split(path / split) for split in calvin.SPLITS):
        return CALVIN_ROOT
    # a rosbag2 directory itself; a directory of lone .db3 / .mcap files is a raw directory (as data.raw_dir),
    # though the reader would also take it for one bag split into files
    if (path / "metadata.yaml").is_file() and find_reader(path) is not None:
        return RECORDING
    entries = _entries(path)
    if not entries:
        raise VlaopsError(
            f"{path}: empty directory; expected recordings ({expected_formats()}), canonical "
            "episodes (*.h5) or a CALVIN split"
        )
    if (path / REPORT_FILE).is_file() or all(_is_canonical(p) for p in entries):
        return EPISODES
    if not any(find_reader(p) for p in entries):
        raise VlaopsError(
            f"{path}: no recording, canonical episode or CALVIN split here; expected recordings ({expected_formats()})"
        )
    return RAW


def _entries(path: Path) -> list[Path]:
    """The visible entries of a directory, in the order ingest reads them."""
    return sorted(p for p in path.iterdir() if not p.name.startswith("."))


def _facts(episode: Episode, label: str, sample: bool) -> EpisodeFacts:
    """An episode's facts; its sampled frames copied, so the whole image arrays can be freed."""
    images = {name: getattr(episode, name) for name in CAMERAS if getattr(episode, name) is not None}
    actions = {
        stream: np.asarray(getattr(episode, attr), dtype=np.float64)
        for stream, attr in ACTION_STREAMS.items()
        if getattr(episode, attr) is not None
    }
    samples = None
    if sample:
        samples = {name: [img[i].copy() for i in sample_indices(len(episode))] for name, img in images.items()}
    return EpisodeFacts(
        label,
        episode.instruction,
        episode.task,
        episode.embodiment,
        len(episode),
        episode.control_hz,
        actions,
        {name: tuple(img.shape[1:3]) for name, img in images.items()},
        samples,
    )


def _read_raw(item: tuple[Path, str, bool, DataConfig, bool]) -> EpisodeFacts | Unreadable:
    """One episode of a recording, read and checked as ingest reads it (in a worker process or this one);
    ``several``: the recording holds more than one, so a failure names the episode (as ingest does)."""
    entry, key, several, cfg, sample = item
    reader = find_reader(entry)
    where = f"{entry} episode '{key}'" if several else str(entry)
    try:
        episode = guarded(where, key, lambda: read_checked(where, cfg, lambda: reader.read(entry, key, cfg)))
    except RecordingError as exc:
        return Unreadable.from_error(entry.name, exc, key if several else None)
    return _facts(episode, episode.episode_id, sample)


def _read_canonical(item: tuple[Path, bool]) -> EpisodeFacts | Unreadable:
    path, sample = item
    try:
        episode = guarded(str(path), None, lambda: read_episode(path))
    except RecordingError as exc:
        return Unreadable.from_error(path.name, exc)
    return _facts(episode, episode.episode_id, sample)


def spread(n_items: int, n_picked: int) -> list[int]:
    """``n_picked`` indices spread evenly over ``range(n_items)``, first and last included."""
    if n_items <= 0 or n_picked <= 0:
        return []
    return sorted({int(round(i)) for i in np.linspace(0, n_items - 1, min(n_picked, n_items))})


def _by_count(counter: Counter[str]) -> dict[str, int]:
    """Most frequent first, ties by name: the order the table prints and the JSON keeps."""
    return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


class _Tally:
    """The summary, accumulated one episode (or one CALVIN annotation) at a time."""

    def __init__(self) -> None:
        self.episodes = self.frames = 0
        self.tasks: Counter[str] = Counter()
        self.instructions: Counter[str] = Counter()
        self.embodiments: Counter[str] = Counter()
        self.control_hz: Counter[str] = Counter()
        self.cameras: dict[str, Counter[str]] = {}
        self.actions: dict[str, list[np.ndarray]] = {}
        self.unreadable: list[Unreadable] = []
        self.rows: list[SheetRow] = []
        self.splits: dict[str, dict[str, int]] = {}

    def add_frames(
        self,
        frames: int,
        actions: dict[str, np.ndarray],
        sizes: dict[str, tuple[int, int]],
        embodiment: str,
        control_hz: float | None,
    ) -> None:
        self.episodes += 1
        self.frames += frames
        self.embodiments[embodiment] += 1
        if control_hz is not None:
            self.control_hz[f"{control_hz:g}"] += 1
        for stream, values in actions.items():
            self.actions.setdefault(stream, []).append(values)
        for camera, (h, w) in sizes.items():
            self.cameras.setdefault(camera, Counter())[f"{h}x{w}"] += 1

    def add_language(self, task: str, instruction: str) -> None:
        self.tasks[task] += 1
        self.instructions[instruction] += 1

    def add_episode(self, facts: EpisodeFacts) -> None:
        self.add_frames(facts.frames, facts.actions, facts.image_sizes, facts.embodiment, facts.control_hz)
        self.add_language(facts.task, facts.instruction)
        if facts.samples:
            self.rows.append(SheetRow(f"{facts.label}: {facts.instruction}", facts.samples))

    def summary(self, path: Path, kind: str) -> dict[str, Any]:
        actions = {}
        for stream, parts in self.actions.items():
            values = np.concatenate(parts)  # (N, A)
            actions[stream] = {"dims": dimension_names(values.shape[1]), **action_ranges(values)}
        out: dict[str, Any] = {
            "path": str(path),
            "kind": kind,
            "episodes": self.episodes,
            "frames": self.frames,
            "embodiments": _by_count(self.embodiments),
            "control_hz": _by_count(self.control_hz),
            "tasks": _by_count(self.tasks),
            "instructions": _by_count(self.instructions),
            "cameras": {cam: _by_count(sizes) for cam, sizes in self.cameras.items()},
            "actions": actions,
            # a stable sort: recordings by name (ingest's order), the episodes of one recording in its order
            "unreadable": [vars(u) for u in sorted(self.unreadable, key=lambda u: u.recording)],
            "sheet": None,
        }
        if self.splits:
            out["splits"] = self.splits
        return out


def _tally_episodes(
    tally: _Tally,
    fn: Callable[[Any], EpisodeFacts | Unreadable],
    make_item: Callable[[int, bool], Any],
    n_items: int,
    n_sheet: int,
    workers: int,
) -> None:
    """Read items ``0..n_items-1`` with ``fn(make_item(i, sample))`` through the executor seam, in order; the
    ``n_sheet`` spread over them keep their frames for the contact sheet. A picked episode that cannot be
    read gives its place to the nearest readable one, read again for its frames."""
    picked = set(spread(n_items, n_sheet))
    results = map_ordered(fn, [make_item(i, i in picked) for i in range(n_items)], workers, desc="inspect", unit="ep")
    readable = [i for i, r in enumerate(results) if isinstance(r, EpisodeFacts)]
    shown = picked.intersection(readable)
    for p in sorted(picked - shown):
        spare = [i for i in readable if i not in shown]
        if spare:
            q = min(spare, key=lambda i: (abs(i - p), i))
            shown.add(q)
            results[q] = fn(make_item(q, True))
    for result in results:
        if isinstance(result, Unreadable):
            tally.unreadable.append(result)
        else:
            tally.add_episode(result)


def _inspect_raw(tally: _Tally, entries: list[Path], cfg: DataConfig, n_sheet: int) -> None:
    """Every episode of every recording in ``entries``, read with the reader registry."""
    listed: list[tuple[Path, str, bool]] = []  # (recording, episode key, several episodes in it)
    for entry in entries:
        reader = find_reader(entry)
        if reader is None:
            tally.unreadable.append(
                Unreadable(
                    entry.name,
                    None,
                    "unknown_format",
                    None,
                    f"not a recording vlaops can read; expected {expected_formats()}",
                )
            )
            continue
        try:
            keys = guarded(str(entry), None, lambda: reader.episodes(entry, cfg))
        except RecordingError as exc:
            tally.unreadable.append(Unreadable.from_error(entry.name, exc))
            continue
        listed += [(entry, key, len(keys) > 1) for key in keys]
    _tally_episodes(
        tally, _read_raw, lambda i, sample: (*listed[i], cfg, sample), len(listed), n_sheet, cfg.num_workers
    )


def _inspect_episodes(tally: _Tally, path: Path, cfg: DataConfig, n_sheet: int) -> None:
    files = sorted(path.glob("*.h5"))
    if not files:
        raise VlaopsError(f"{path}: no canonical episodes (*.h5) found; run ingest first")
    _tally_episodes(tally, _read_canonical, lambda i, sample: (files[i], sample), len(files), n_sheet, cfg.num_workers)


@dataclass
class _Provenance:
    """What convert's provenance stamp adds to a CALVIN dataset: episode ids by (split, start, end), the
    rows whose gripper camera convert filled with zeros (the episode had none), the embodiment. A real
    CALVIN dataset has no stamp: an arm's, its rows named by their frame range, both cameras real."""

    ids: dict[tuple[str, int, int], str] = field(default_factory=dict)
    no_gripper: set[tuple[str, int, int]] = field(default_factory=set)
    embodiment: str = "arm"


def _calvin_provenance(root: Path) -> _Provenance:
    try:
        stamp = json.loads((root / calvin.PROVENANCE).read_text())
        rows = {(e["split"], int(e["start"]), int(e["end"])): (ep_id, e) for ep_id, e in stamp["episodes"].items()}
        return _Provenance(
            {key: ep_id for key, (ep_id, _) in rows.items()},
            {key for key, (_, e) in rows.items() if e.get("has_gripper_camera") is False},
            str(stamp.get("embodiment", "arm")),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return _Provenance()


def _calvin_episode(
    split: calvin.CalvinSplit, start: int, end: int
) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, int]]]:
    """The (T, A) actions and rel_actions of frames ``start``..``end`` (inclusive) and the image size of
    each camera (from the first frame); a RecordingError naming the frame file that cannot be read."""
    frames = []
    for i in range(start, end + 1):
        where = str(split.frame_path(i))
        keys = (*CALVIN_ACTIONS, *CAMERAS) if i == start else CALVIN_ACTIONS  # images: decompressed once
        frames.append(guarded(where, None, lambda: split.load_frame(i, keys)))
    where = str(split.frame_path(start))
    actions = {
        k: guarded(where, None, lambda: np.stack([f[k] for f in frames]).astype(np.float64)) for k in CALVIN_ACTIONS
    }
    return actions, {cam: tuple(frames[0][cam].shape[:2]) for cam in CAMERAS}


def _inspect_calvin(tally: _Tally, path: Path, kind: str, cfg: DataConfig, n_sheet: int) -> None:
    """Episodes are the rows of ``ep_start_end_ids``; tasks and instructions are counted per annotated
    window (CALVIN annotates windows of its long play episodes; convert writes one per episode)."""
    root = path.parent if kind == CALVIN_SPLIT else path
    names = [path.name] if kind == CALVIN_SPLIT else [s for s in calvin.SPLITS if _is_calvin_split(path / s)]
    splits = [(name, calvin.CalvinSplit(root / name, trust_pickles=cfg.trust_pickles)) for name in names]
    stamp = _calvin_provenance(root)
    for name, split in splits:
        before = (tally.episodes, tally.frames)
        for start, end in tqdm(split.ep_start_end_ids.tolist(), desc=f"inspect {name}", unit="ep", disable=None):
            try:
                actions, sizes = _calvin_episode(split, start, end)
            except RecordingError as exc:
                recording = Path(exc.recording)
                recording = recording.relative_to(root) if recording.is_relative_to(root) else recording
                episode = stamp.ids.get((name, start, end), f"frames {start}-{end}")
                tally.unreadable.append(Unreadable(str(recording), episode, exc.check, exc.stream, exc.reason))
                continue
            if (name, start, end) in stamp.no_gripper:
                del sizes["rgb_gripper"]  # zeros, not a camera
            tally.add_frames(end - start + 1, actions, sizes, stamp.embodiment, None)  # CALVIN records no control rate
        for ann in split.annotations:
            tally.add_language(ann.task, ann.instruction)
        tally.splits[name] = {
            "episodes": tally.episodes - before[0],
            "frames": tally.frames - before[1],
            "annotations": len(split.annotations),
        }
    windows = [(name, split, ann) for name, split in splits for ann in split.annotations]
    for i in spread(len(windows), n_sheet):
        name, split, ann = windows[i]
        label = stamp.ids.get((name, ann.start, ann.end), f"frames {ann.start}-{ann.end}")
        label = f"{label} ({name})" if kind == CALVIN_ROOT else label
        try:
            loaded = [
                guarded(name, None, lambda: split.load_frame(ann.start + k, CAMERAS))
                for k in sample_indices(ann.end - ann.start + 1)
            ]
        except RecordingError:
            continue  # its episode is listed as unreadable above
        cameras = [
            cam for cam in CAMERAS if not (cam == "rgb_gripper" and (name, ann.start, ann.end) in stamp.no_gripper)
        ]
        tally.rows.append(SheetRow(f"{label}: {ann.instruction}", {cam: [f[cam] for f in loaded] for cam in cameras}))


def inspect_path(
    path: str | Path, cfg: DataConfig, sheet: str | Path | None = None, sheet_episodes: int = DEFAULT_SHEET_EPISODES
) -> dict[str, Any]:
    """Summarise the dataset at ``path`` (see the module docstring); with ``sheet``, also write the contact
    sheet PNG of ``sheet_episodes`` episodes there. Returns the summary (JSON-ready)."""
    path = Path(path)
    if sheet_episodes < 1:
        raise VlaopsError(f"episodes on the contact sheet: expected at least 1, got {sheet_episodes}")
    kind = detect(path)
    n_sheet = sheet_episodes if sheet is not None else 0
    tally = _Tally()
    if kind == RAW:
        _inspect_raw(tally, _entries(path), cfg, n_sheet)
    elif kind == RECORDING:
        _inspect_raw(tally, [path], cfg, n_sheet)
    elif kind == EPISODES:
        _inspect_episodes(tally, path, cfg, n_sheet)
    else:
        _inspect_calvin(tally, path, kind, cfg, n_sheet)
    summary = tally.summary(path, kind)
    log.info("%s: %d episodes, %d frames, %d unreadable", path, tally.episodes, tally.frames, len(tally.unreadable))
    if sheet is not None and tally.rows:
        cameras = [cam for cam in CAMERAS if any(cam in row.frames for row in tally.rows)]
        width, height = draw_contact_sheet(tally.rows, cameras, sheet)
        summary["sheet"] = {
            "path": str(sheet),
            "episodes": [row.label for row in tally.rows],
            "cameras": cameras,
            "size": [width, height],
        }
        log.info(
            "contact sheet: %s (%d episodes x %d cameras, %dx%d px)",
            sheet,
            len(tally.rows),
            len(cameras),
            width,
            height,
        )
    elif sheet is not None:
        log.warning("no contact sheet: no episode of %s could be read", path)
    return summary


def _counts(counter: dict[str, int], unit: str, limit: int = 20) -> list[str]:
    lines = [f"  {n:>6}  {name}" for name, n in list(counter.items())[:limit]]
    if len(counter) > limit:
        lines.append(f"  ... {len(counter) - limit} more {unit} (all in --json)")
    return lines


def summary_table(summary: dict[str, Any]) -> str:
    """The summary as the aligned, human-readable text ``vlaops inspect`` prints."""

    def sizes(counter: dict[str, int]) -> str:
        return ", ".join(f"{size} ({n})" for size, n in counter.items())

    lines = [
        f"{summary['path']}: {KIND_NAMES[summary['kind']]}",
        f"episodes       {summary['episodes']}",
        f"frames         {summary['frames']}",
    ]
    for name, split in summary.get("splits", {}).items():
        lines.append(
            f"  {name:<12} {split['episodes']} episodes, {split['frames']} frames, {split['annotations']} annotations"
        )
    hz = summary["control_hz"]
    lines.append(f"control rate   {', '.join(f'{r} Hz ({n})' for r, n in hz.items()) if hz else 'not recorded'}")
    lines.append(f"embodiment     {sizes(summary['embodiments']) or '-'}")
    for camera, counter in summary["cameras"].items():
        lines.append(f"{camera:<14} {sizes(counter)}")
    lines.append(f"tasks ({len(summary['tasks'])})")
    lines += _counts(summary["tasks"], "tasks")
    lines.append(f"instructions ({len(summary['instructions'])} distinct)")
    lines += _counts(summary["instructions"], "instructions")
    for stream, stats in summary["actions"].items():
        lines.append(f"{stream:<14} {'min':>10} {'max':>10} {'mean':>10} {'std':>10}")
        for d, dim in enumerate(stats["dims"]):
            lines.append(f"  {dim:<12} " + " ".join(f"{stats[k][d]:>10.4g}" for k in ("min", "max", "mean", "std")))
    unreadable = summary["unreadable"]
    lines.append(f"unreadable     {len(unreadable)}")
    for u in unreadable:
        episode = f" episode '{u['episode']}'" if u["episode"] else ""
        lines.append(f"  {u['recording']}{episode} [{u['check']}]: {u['reason']}")
    sheet = summary["sheet"]
    lines.append(
        f"contact sheet  {sheet['path']} ({len(sheet['episodes'])} episodes)"
        if sheet
        else "contact sheet  none (--sheet PNG draws one)"
    )
    return "\n".join(lines)
