"""Ingest: every recording under the raw directory -> one validated canonical episode file per episode.

A bad recording either stops the stage with one line naming it (``data.on_bad_input=error``) or is
quarantined with its reason in the report (``quarantine``); it is never silently dropped, and it never
stops ingest with a traceback: whatever a reader raises on one recording (a numpy error on a camera that
changes size, a truncated database) becomes that recording's :class:`RecordingError`, so the good
episodes around it are written exactly as without it.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from vlaops.data.config import DataConfig
from vlaops.data.plausibility import check_episode
from vlaops.errors import RecordingError, VlaopsError
from vlaops.io.episode import Episode, write_episode
from vlaops.io.readers import expected_formats, find_reader, sidecars
from vlaops.utils.atomic import atomic_dir, write_json
from vlaops.utils.executor import ComputeConfig, map_ordered, resolve_workers
from vlaops.utils.logging import get_logger

log = get_logger(__name__)
REPORT_FILE = "ingest_report.json"
SAFE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
R = TypeVar("R")


def guarded(where: str, episode: str | None, fn: Callable[[], R]) -> R:
    """``fn()``, with any failure on the data turned into a :class:`RecordingError` for ``where``.

    Readers raise RecordingError for what they check; anything else they raise (numpy, h5py, sqlite,
    PIL errors on data nobody foresaw) is a bad recording too, not a reason to lose the whole run."""
    try:
        return fn()
    except RecordingError:
        raise
    except VlaopsError as exc:
        reason = str(exc).removeprefix(f"{where}: ")
        raise RecordingError(where, reason, check="unreadable", episode=episode) from exc
    except Exception as exc:  # noqa: BLE001 - see the docstring; the traceback goes to the debug log
        log.debug("reading %s failed", where, exc_info=True)
        raise RecordingError(
            where, f"cannot be read ({type(exc).__name__}: {exc})", check="reader_error", episode=episode
        ) from exc


def read_checked(where: str, cfg: DataConfig, read: Callable[[], Episode]) -> Episode:
    """Read one episode and run the contract and plausibility checks, naming the recording (never the
    temporary file it is about to be written to)."""
    episode = read()
    if episode.embodiment != cfg.embodiment:  # a dataset holds one embodiment: its action space is the head's
        raise RecordingError(
            where,
            f"an episode of embodiment '{episode.embodiment}', but data.embodiment is '{cfg.embodiment}'",
            check="wrong_embodiment",
            episode=episode.episode_id,
        )
    episode.validate(where)
    check_episode(episode, cfg.checks, where)
    return episode


@dataclass(frozen=True)
class _Outcome:
    """What reading one episode of a recording gave: a part file written in the output's temporary
    directory (``part``, with the report facts), or the RecordingError that quarantines it."""

    key: str | None  # the episode as the recording lists it; None when the whole recording failed
    episode_id: str | None = None
    part: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: RecordingError | None = None


def _relative_source(source: str, entry: Path) -> str:
    """The recording named from the raw directory (``bag_0003``, ``lift.hdf5 episode 'demo_2'``), not by
    the absolute path it was read from: the episode's bytes must not change when the data moves (DVC
    hashes them). A canonical file's own ``source`` (provenance written by an earlier ingest) is kept."""
    prefix = str(entry)
    return entry.name + source[len(prefix) :] if source.startswith(prefix) else source


def _read_recording(item: tuple[int, Path, DataConfig, Path]) -> list[_Outcome]:
    """Read, check and write every episode of one recording (in a worker process or in this one).

    Episodes are written as ``.part-<index>-<n>.h5``: the parent names them by episode id in recording
    order, so duplicates are resolved, and the output is the same whatever the number of workers.
    With ``data.on_bad_input=error`` the first bad episode raises (the executor re-raises the first failure
    in recording order)."""
    index, entry, cfg, tmp = item
    where = str(entry)
    reader = find_reader(entry)
    try:
        if reader is None:
            raise RecordingError(
                where, f"not a recording vlaops can read; expected {expected_formats()}", check="unknown_format"
            )
        keys = guarded(where, None, lambda: reader.episodes(entry, cfg))
    except RecordingError as exc:
        if cfg.on_bad_input == "error":
            raise
        return [_Outcome(None, error=exc)]
    outcomes = []
    for n, key in enumerate(keys):
        # a file of several episodes (robomimic) names the one at fault
        where_ep = where if len(keys) == 1 else f"{entry} episode '{key}'"
        try:
            episode = guarded(where_ep, key, lambda: read_checked(where_ep, cfg, lambda: reader.read(entry, key, cfg)))
            episode.source = _relative_source(episode.source, entry)
            if not SAFE_ID.fullmatch(episode.episode_id):  # it names a file in out_dir
                raise RecordingError(
                    where_ep,
                    f"episode id {episode.episode_id!r} is not a plain file name "
                    "(letters, digits, '.', '_', '-'; not starting with '.')",
                    check="bad_episode_id",
                    episode=episode.episode_id,
                )
        except RecordingError as exc:
            if cfg.on_bad_input == "error":
                raise
            outcomes.append(_Outcome(key, error=exc))
            continue
        part = f".part-{index:06d}-{n:06d}.h5"
        write_episode(tmp / part, episode)
        facts = {
            "source_format": episode.source_format,
            "frames": len(episode),
            "instruction": episode.instruction,
            "task": episode.task,
            "source_sha256": episode.source_sha256,
        }
        outcomes.append(_Outcome(key, episode.episode_id, part, facts, len(episode) / episode.control_hz))
    return outcomes


def ingest(raw_dir: Path, out_dir: Path, cfg: DataConfig, compute: ComputeConfig | None = None) -> dict[str, Any]:
    """Read every recording in ``raw_dir`` and write ``out_dir/<episode_id>.h5`` plus a report.

    Recordings are read by ``data.num_workers`` processes (0: one per core) through the executor seam
    (``compute``: local by default, or Ray) and merged in recording order, so the output does not depend
    on the executor or the number of workers. The report
    (``ingest_report.json``) is a function of the recordings and the settings only (no timings), so
    re-ingesting the same data gives the same bytes: ``episodes`` {id: facts}, ``quarantined``
    [{recording, episode, stream, check, reason}] in recording order (``episode`` as the recording lists
    it: a bag's name, a robomimic demo key; None when the whole file failed), ``summary``.
    """
    if not raw_dir.is_dir():
        raise VlaopsError(
            f"{raw_dir}: raw data directory not found (data.raw_dir); run collect or point data.raw_dir at your "
            "recordings"
        )
    entries = sorted(p for p in raw_dir.iterdir() if not p.name.startswith("."))
    claimed = sidecars(entries)  # a bag's instruction sidecar is read with the bag, not as a recording
    entries = [p for p in entries if p not in claimed]
    if not entries:
        raise VlaopsError(f"{raw_dir}: raw data directory is empty; expected recordings ({expected_formats()})")
    started = time.perf_counter()
    # recordings are named relative to raw_dir, which the report does not hold: its bytes do not depend on
    # where the data lives
    report: dict[str, Any] = {"episodes": {}, "quarantined": []}
    seconds = 0.0  # of data kept, each episode at its own control rate
    workers = resolve_workers(cfg.num_workers, compute)

    def quarantine(entry: Path, exc: RecordingError, key: str | None) -> None:
        if cfg.on_bad_input == "error":
            raise exc
        log.warning("quarantined %s", exc)
        report["quarantined"].append(
            {"recording": entry.name, "episode": key, "stream": exc.stream, "check": exc.check, "reason": exc.reason}
        )

    with atomic_dir(out_dir) as tmp:
        items = [(i, entry, cfg, tmp) for i, entry in enumerate(entries)]
        results = map_ordered(
            _read_recording,
            items,
            workers,
            desc="ingest",
            unit="rec",
            compute=compute,
            label=lambda item: f"recording {item[1].name}",
        )
        for entry, outcomes in zip(entries, results):
            for out in outcomes:
                if out.error is not None:
                    quarantine(entry, out.error, out.key)
                    continue
                if out.episode_id in report["episodes"]:
                    (tmp / out.part).unlink()
                    where = str(entry) if len(outcomes) == 1 else f"{entry} episode '{out.key}'"
                    quarantine(
                        entry,
                        RecordingError(
                            where,
                            f"episode id '{out.episode_id}' is already taken by another recording",
                            check="duplicate_episode_id",
                            episode=out.episode_id,
                        ),
                        out.key,
                    )
                    continue
                (tmp / out.part).rename(tmp / f"{out.episode_id}.h5")
                report["episodes"][out.episode_id] = out.facts
                seconds += out.seconds
        if not report["episodes"]:
            reasons = "; ".join(f"{q['recording']}: {q['reason']}" for q in report["quarantined"])
            raise VlaopsError(f"{raw_dir}: no recording could be ingested; reasons: {reasons}")
        report["summary"] = summarize(len(entries), report, seconds)
        # No wall time in the report: its bytes are a function of the recordings and the settings, so a
        # forced re-ingest of the same data gives DVC the same hash. Timings go to the log.
        write_json(tmp / REPORT_FILE, report)
    log.info(
        "ingest summary (%.1f s, %d workers):\n%s",
        time.perf_counter() - started,
        workers,
        summary_table(report["summary"]),
    )
    return report


def summarize(recordings: int, report: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Recordings in, episodes out, quarantined by check, frames and hours of data."""
    return {
        "recordings": recordings,
        "episodes": len(report["episodes"]),
        "frames": sum(e["frames"] for e in report["episodes"].values()),
        "hours": round(seconds / 3600.0, 4),
        "quarantined": dict(sorted(Counter(q["check"] for q in report["quarantined"]).items())),
    }


def summary_table(summary: dict[str, Any]) -> str:
    """The summary as the aligned two-column table the log prints at the end of ingest."""
    rows = [
        ("recordings in", summary["recordings"]),
        ("episodes out", summary["episodes"]),
        ("frames", summary["frames"]),
        ("hours of data", f"{summary['hours']:.3f}"),
        ("quarantined", sum(summary["quarantined"].values())),
    ]
    rows += [(f"  {check}", n) for check, n in summary["quarantined"].items()]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
