"""ingest: data/raw -> data/episodes (one canonical HDF5 file per recording)."""

from pathlib import Path

from vlaops.config import Config
from vlaops.data.ingest import ingest
from vlaops.utils.executor import connect


def run(cfg: Config) -> None:
    connect(cfg.compute)  # compute.executor=ray: Ray installed and its cluster reachable, before any recording
    ingest(Path(cfg.data.raw_dir), Path(cfg.data.episodes_dir), cfg.data, cfg.compute)
