"""Shared fixtures: the real config tree, shrunk; tiny recordings written with the real libraries;
the offline processor and synthetic batches of the training contract."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from vlaops.config import Config, load_config
from vlaops.utils.executor import usable_cpus

sys.path.insert(0, str(Path(__file__).parent))  # bagfactory, imported where a test writes bags

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: a worker per usable core, and at most one per 3 GB of free memory (a worker imports
    torch, transformers and MLflow, and its tests start whole stages as subprocesses beside it)."""
    try:
        available_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError):
        available_gb = 3.0
    return max(1, min(usable_cpus(), int(available_gb // 3)))


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n``), share the cores between the workers: each worker, and every stage it
    starts as a subprocess, runs torch on its share instead of all of them (two workers on 2 cores
    would otherwise run 4 threads on 2 cores and be slower than one)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is None:
        return
    import torch

    threads = max(1, usable_cpus() // int(workers))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def path_overrides(tmp_path: Path) -> list[str]:
    """Every output path moved into ``tmp_path`` (data.raw_dir follows paths.collect_dir)."""
    return [
        f"paths.collect_dir={tmp_path}/raw",
        f"paths.pretrained_dir={tmp_path}/models/pretrained",
        f"data.episodes_dir={tmp_path}/episodes",
        f"data.calvin_dir={tmp_path}/calvin",
        f"data.normalized_dir={tmp_path}/normalized",
        f"data.cache_dir={tmp_path}/cache",
        f"paths.model_dir={tmp_path}/models/policy",
        f"paths.checkpoint_dir={tmp_path}/models/checkpoints",
        f"paths.reports_dir={tmp_path}/reports",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
    ]


# The one shrink of the real config, for every test that builds the model or runs stages (the library
# tests, tests/test_stages.py through the CLI, tests/test_e2e.py by editing conf/ in a copy of the repo).
SHRINK_MODEL = [
    "model.pretrained_dir=null",  # random weights: the shrunk architecture is no pretrained one (test_pretrain.py)
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
    # ingest in this process: tiny data, and the machine is shared (tests/test_ingest_corpus.py checks 2)
    "data.num_workers=1",
]
# ... and of the pipeline around it: three tasks, a few demos, four training steps, two short chains.
SHRINK_PIPELINE = [
    "sim.tasks=[push_red_left,lift_blue,place_blue]",  # lift + place: a chain of 2 exists in every random scene
    "sim.episodes_per_task=3",
    "sim.num_workers=1",
    "sim.max_episode_steps=120",
    "train.max_steps=4",
    "train.batch_size=2",
    "train.log_every=2",
    "train.val_every=2",
    "train.val_batches=1",
    "train.save_every=2",
    "eval.num_chains=2",
    "eval.chain_length=2",
    "eval.max_steps_per_subtask=3",
    "eval.offline_batches=2",
]
# ... and of pretraining: a few scenes, a few steps (tests/test_pretrain.py, tests/test_e2e.py).
SHRINK_PRETRAIN = [
    "pretrain.scenes=4",
    "pretrain.heldout_scenes=2",
    "pretrain.num_workers=1",
    "pretrain.steps=3",
    "pretrain.batch_size=4",
    "pretrain.warmup_steps=1",
    "pretrain.log_every=2",
]
# The conf/ file each group's values live in (what tests/test_e2e.py edits).
GROUP_FILES = {
    "pretrain": "conf/pretrain/default.yaml",
    "sim": "conf/sim/default.yaml",
    "data": "conf/data/default.yaml",
    "model": "conf/model/tiny.yaml",
    "train": "conf/train/default.yaml",
    "eval": "conf/eval/default.yaml",
}


def conf_file_updates(overrides: list[str]) -> dict[str, dict]:
    """``group.key=value`` overrides -> {conf file: nested update}, to write a shrink into conf/ itself."""
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(OmegaConf.from_dotlist(overrides))
    return {GROUP_FILES[group]: update for group, update in tree.items()}


def tiny_config(tmp_path: Path, *overrides: str) -> Config:
    """The real conf/ composed, every path moved into ``tmp_path``, sizes shrunk for a test."""
    return load_config([*path_overrides(tmp_path), *SHRINK_MODEL, *overrides], CONF)


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return tiny_config(tmp_path)


@pytest.fixture
def raw_dir(tmp_path: Path) -> Path:
    """Four synthetic arm episodes (two instructions, both storage plugins)."""
    from bagfactory import write_arm_bag

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
    from vlaops.data.action_stats import normalize
    from vlaops.data.convert import convert
    from vlaops.data.ingest import ingest

    ingest(Path(cfg.data.raw_dir), Path(cfg.data.episodes_dir), cfg.data)
    convert(Path(cfg.data.episodes_dir), Path(cfg.data.calvin_dir), cfg.data)
    normalize(Path(cfg.data.calvin_dir), Path(cfg.data.normalized_dir), cfg.data)
    return Path(cfg.data.calvin_dir)


# ---- model inputs ----------------------------------------------------------------------------------
INSTRUCTIONS = ["open the drawer", "push the red block left", "turn on the led", "lift the blue block"]


@pytest.fixture(scope="session")
def processor():
    """The offline Kosmos-2 processor (Unigram tokenizer trained on INSTRUCTIONS), built once."""
    from vlaops.model import build_offline_processor

    return build_offline_processor(INSTRUCTIONS, vocab_size=200)


class SyntheticWindows:
    """``n`` windows of the training-batch contract (``vlaops.data.keys``), no batch dim, fixed by
    ``seed``: rgb/hand_rgb (W, 3, S, S), action (W, A), action_chunk (W, C, A) normalised (arm in
    [-1, 1], gripper {0, 1}), chunk_mask (W, C) with the last step of every odd window past its
    episode's end, text/text_mask (L,). A map-style dataset for a DataLoader."""

    def __init__(
        self,
        processor,
        n: int,
        window: int,
        chunk: int,
        text_len: int,
        seed: int = 0,
        size: int = 224,
        action_dim: int = 7,
    ) -> None:
        import torch

        from vlaops.data import keys
        from vlaops.data.tokens import tokenize

        g = torch.Generator().manual_seed(seed)
        instructions = [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(n)]
        text, mask = tokenize(processor, instructions, text_len)  # (n, L) each
        self.items = []
        for i in range(n):
            arm = torch.rand(window, chunk, action_dim - 1, generator=g) * 2 - 1
            grip = (torch.rand(window, chunk, 1, generator=g) > 0.5).float()
            chunk_mask = torch.ones(window, chunk, dtype=torch.bool)
            chunk_mask[-1, -1] = i % 2 == 0
            self.items.append(
                {
                    keys.RGB: torch.randn(window, 3, size, size, generator=g),
                    keys.HAND_RGB: torch.randn(window, 3, size, size, generator=g),
                    keys.ACTION: torch.cat([arm[:, 0], grip[:, 0]], -1),
                    keys.ACTION_CHUNK: torch.cat([arm, grip], -1),
                    keys.CHUNK_MASK: chunk_mask,
                    keys.TEXT: text[i],
                    keys.TEXT_MASK: mask[i],
                    keys.RAW_TEXT: instructions[i],
                }
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i) -> dict:  # an index or a SampleKey (what make_loader's sampler yields)
        from vlaops.data.sampling import as_key

        return self.items[as_key(i).index]


def synthetic_batch(processor, n: int, window: int, chunk: int, text_len: int, seed: int = 0, size: int = 224) -> dict:
    """``n`` SyntheticWindows collated as the DataLoader does: (n, W, ...) tensors, raw_text a list."""
    from torch.utils.data import default_collate

    return default_collate(list(SyntheticWindows(processor, n, window, chunk, text_len, seed, size)))


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory) -> Path:
    """A policy exported as ``train`` exports it (the shrunk tiny config, untrained random weights, the
    simulator's instructions in the processor, the composed config beside it), for tests that load one."""
    import torch

    from vlaops.config import to_container
    from vlaops.data.normalization import ActionNormalizer
    from vlaops.model import VLAPolicy, build_offline_processor, save_policy
    from vlaops.sim.tasks import TASKS, get_task

    tmp = tmp_path_factory.mktemp("tiny_policy")
    cfg = tiny_config(tmp)
    processor = build_offline_processor(
        [get_task(n).instruction for n in TASKS], vocab_size=cfg.model.vocab_size, image_size=cfg.model.image_size
    )
    torch.manual_seed(0)
    policy = VLAPolicy.build(cfg.model, vocab_size=len(processor.tokenizer))
    return save_policy(
        cfg.paths.model_dir,
        policy,
        processor,
        ActionNormalizer(cfg.data.norm_min, cfg.data.norm_max),
        cfg.model,
        extra={"train_config": to_container(cfg)},
    )
