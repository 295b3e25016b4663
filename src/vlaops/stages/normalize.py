"""normalize: data/calvin training split -> data/normalized (action statistics + normaliser)."""

from pathlib import Path

from vlaops.config import Config
from vlaops.data.action_stats import normalize


def run(cfg: Config) -> None:
    normalize(Path(cfg.data.calvin_dir), Path(cfg.data.normalized_dir), cfg.data)
