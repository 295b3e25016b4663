"""convert: data/episodes -> data/calvin/{training,validation} in CALVIN's layout."""

from pathlib import Path

from vlaops.config import Config
from vlaops.data.convert import convert


def run(cfg: Config) -> None:
    convert(Path(cfg.data.episodes_dir), Path(cfg.data.calvin_dir), cfg.data)
