"""normalize: data/calvin training split -> data/normalized (action statistics + normaliser)."""

from pathlib import Path

from vlaops.config import Config
from vlaops.data.action_stats import normalize
from vlaops.utils.paths import check_input_dir, check_outputs


def run(cfg: Config) -> None:
    check_input_dir("data.calvin_dir", cfg.data.calvin_dir)
    check_outputs(cfg, "normalize")
    normalize(Path(cfg.data.calvin_dir), Path(cfg.data.normalized_dir), cfg.data)
