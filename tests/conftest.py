"""Shared fixtures: the real config tree, shrunk; tiny recordings written with the real libraries."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # bagfactory

from bagfactory import write_arm_bag  # noqa: E402

from vlaops.config import Config, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def tiny_config(tmp_path: Path, *overrides: str) -> Config:
    """The real conf/ composed, every path moved into ``tmp_path``, sizes shrunk for a test."""
    return load_config(
        [
            f"paths.collect_dir={tmp_path}/raw",
            f"data.raw_dir={tmp_path}/raw",
            f"data.episodes_dir={tmp_path}/episodes",
            f"data.calvin_dir={tmp_path}/calvin",
            f"data.normalized_dir={tmp_path}/normalized",
            f"paths.model_dir={tmp_path}/models/policy",
            f"paths.checkpoint_dir={tmp_path}/models/checkpoints",
            f"paths.reports_dir={tmp_path}/reports",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            "model.window_size=3",
            "model.fwd_pred_next_n=4",
            "model.lstm_num_layers=1",
            "model.lstm_hidden_size=32",
            "model.head_mlp_dims=[32]",
            "model.image_size=64",
            "model.tiny.patch_size=16",
            "model.tiny.latent_query_num=4",
            "model.max_text_len=12",
            "data.min_episode_len=8",
            *overrides,
        ],
        CONF,
    )


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return tiny_config(tmp_path)


@pytest.fixture
def raw_dir(tmp_path: Path) -> Path:
    """Four synthetic arm episodes (two instructions, both storage plugins)."""
    raw = tmp_path / "raw"
    for i in range(4):
        write_arm_bag(
            raw / f"ep{i}",
            n_frames=20,
            instruction="push the red block to the left" if i % 2 else "lift the blue block",
            storage="mcap" if i % 2 else "sqlite3",
            seed=i,
        )
    return raw


@pytest.fixture
def calvin_dir(cfg: Config, raw_dir: Path) -> Path:
    """raw_dir ingested, converted and normalised with the library functions of the stages."""
    from vlaops.data.convert import convert
    from vlaops.data.ingest import ingest
    from vlaops.data.action_stats import normalize

    ingest(Path(cfg.data.raw_dir), Path(cfg.data.episodes_dir), cfg.data)
    convert(Path(cfg.data.episodes_dir), Path(cfg.data.calvin_dir), cfg.data)
    normalize(Path(cfg.data.calvin_dir), Path(cfg.data.normalized_dir), cfg.data)
    return Path(cfg.data.calvin_dir)
