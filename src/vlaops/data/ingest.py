"""Ingest: every recording under the raw directory -> one validated canonical episode file.

A bad recording either stops the stage with one line naming it (``data.on_bad_input=error``) or
is quarantined with its reason in the report (``quarantine``); it is never silently dropped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vlaops.data.config import DataConfig
from vlaops.errors import VlaopsError
from vlaops.io.episode import write_episode
from vlaops.io.readers import expected_formats, find_reader
from vlaops.utils.atomic import atomic_dir, write_json
from vlaops.utils.logging import get_logger

log = get_logger(__name__)
REPORT_FILE = "ingest_report.json"


def ingest(raw_dir: Path, out_dir: Path, cfg: DataConfig) -> dict[str, Any]:
    """Read every recording in ``raw_dir`` and write ``out_dir/<episode_id>.h5`` plus a report."""
    if not raw_dir.is_dir():
        raise VlaopsError(f"{raw_dir}: raw data directory not found (data.raw_dir); run collect or point data.raw_dir at your recordings")
    entries = sorted(p for p in raw_dir.iterdir() if not p.name.startswith("."))
    if not entries:
        raise VlaopsError(f"{raw_dir}: raw data directory is empty; expected recordings ({expected_formats()})")
    started = time.perf_counter()
    report: dict[str, Any] = {"raw_dir": str(raw_dir), "episodes": {}, "quarantined": {}}
    with atomic_dir(out_dir) as tmp:
        for entry in tqdm(entries, desc="ingest", unit="rec", disable=None):
            try:
                reader = find_reader(entry)
                if reader is None:
                    raise VlaopsError(f"{entry}: not a recording vlaops can read; expected {expected_formats()}")
                episode = reader.read(entry, cfg)
                target = tmp / f"{episode.episode_id}.h5"
                if target.exists():
                    raise VlaopsError(f"{entry}: episode id '{episode.episode_id}' is already taken by another recording")
                write_episode(target, episode)
            except VlaopsError as exc:
                if cfg.on_bad_input == "error":
                    raise
                log.warning("quarantined %s: %s", entry.name, exc)
                report["quarantined"][entry.name] = str(exc)
                continue
            report["episodes"][episode.episode_id] = {
                "source_format": episode.source_format,
                "frames": len(episode),
                "instruction": episode.instruction,
                "task": episode.task,
                "source_sha256": episode.source_sha256,
            }
        if not report["episodes"]:
            raise VlaopsError(f"{raw_dir}: no recording could be ingested; reasons: {report['quarantined']}")
        # No wall time in the report: its bytes are a function of the recordings and the settings, so a
        # forced re-ingest of the same data gives DVC the same hash. Timings go to the log.
        write_json(tmp / REPORT_FILE, report)
    log.info("ingested %d episodes, quarantined %d, in %.1f s", len(report["episodes"]), len(report["quarantined"]),
             time.perf_counter() - started)
    return report
