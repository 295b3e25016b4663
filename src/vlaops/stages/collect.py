"""collect: a simulator's scripted expert records demonstrations as ROS2 bags (sim.env: the embedded
tabletop, or CALVIN's calvin_env)."""

from pathlib import Path

from vlaops.config import Config
from vlaops.errors import VlaopsError
from vlaops.sim import collect
from vlaops.sim.calvin import record as calvin_record
from vlaops.utils.atomic import atomic_dir, write_json
from vlaops.utils.executor import connect

SUMMARY_FILE = "collect.json"


def run(cfg: Config) -> None:
    connect(cfg.compute)  # compute.executor=ray: Ray installed and its cluster reachable, before any episode
    with atomic_dir(Path(cfg.paths.collect_dir)) as tmp:
        try:
            record = calvin_record.collect if cfg.sim.env == "calvin" else collect
            summary = record(cfg.sim, tmp, cfg.compute)
        except RuntimeError as exc:  # the expert could not reach episodes_per_task
            raise VlaopsError(str(exc)) from None
    write_json(Path(cfg.paths.reports_dir) / SUMMARY_FILE, summary)
