"""ingest: data/raw -> data/episodes (one canonical HDF5 file per recording)."""

from pathlib import Path

from vlaops.config import Config
from vlaops.data.ingest import ingest


def run(cfg: Config) -> None:
    ingest(Path(cfg.data.raw_dir), Path(cfg.data.episodes_dir), cfg.data)
