"""convert: data/episodes -> data/calvin/{training,validation} in CALVIN's layout."""

from pathlib import Path

from vlaops.config import Config
from vlaops.data.convert import convert
from vlaops.utils.paths import check_input_dir, check_outputs


def run(cfg: Config) -> None:
    check_input_dir("data.episodes_dir", cfg.data.episodes_dir)
    check_outputs(cfg, "convert")
    convert(Path(cfg.data.episodes_dir), Path(cfg.data.calvin_dir), cfg.data)
