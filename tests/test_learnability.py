"""The end-to-end learnability check: a policy overfit on one recorded demonstration replays it.

Every link from the recording to the executed action takes part: the simulator records a rosbag2 bag,
ingest, convert and normalize turn it into a CALVIN split, train fits the Kosmos-2 + LSTM policy, and
the exported runtime drives the simulator from the same scene. A broken link (an off-by-one between
frames and actions, a sign or scale in the normalisation, a camera swapped, a chunk misaligned) makes
the replay fail, where the loss alone would still fall.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import CONF, path_overrides

from vlaops.cli import main
from vlaops.config import load_config
from vlaops.eval.chains import rollout
from vlaops.model import PolicyRuntime
from vlaops.sim import TabletopEnv, get_task

TASK = "push_red_left"


def _overrides(tmp_path: Path) -> list[str]:
    return [
        *path_overrides(tmp_path),
        "tracking.enabled=false",
        f"sim.tasks=[{TASK}]",
        "sim.episodes_per_task=2",  # one to train on, one for the validation split convert requires
        "sim.num_workers=1",
        "data.val_fraction=0.5",
        # memorise one demonstration: no augmentation, a small model, a few hundred steps
        "data.augment.rgb_pad=0",
        "data.augment.gripper_pad=0",
        "data.augment.brightness=0",
        "data.augment.contrast=0",
        "data.augment.saturation=0",
        "model.pretrained_dir=null",  # from random weights, as this memorisation was first measured
        "model.image_size=64",
        "model.tiny.patch_size=16",
        "model.tiny.latent_query_num=8",
        "model.lstm_hidden_size=64",
        "model.head_mlp_dims=[64]",
        "model.max_text_len=12",
        "train.max_steps=400",
        "train.batch_size=4",
        "train.val_every=400",
        "train.val_batches=1",
        "train.save_every=0",
        "train.log_every=50",
    ]


@pytest.mark.slow
def test_a_policy_overfit_on_one_demonstration_replays_it_in_closed_loop(tmp_path):
    overrides = _overrides(tmp_path)
    for stage in ("collect", "ingest", "convert", "normalize", "train"):
        assert main([stage, "--config-dir", str(CONF), *overrides]) == 0, stage
    cfg = load_config(overrides, CONF)

    provenance = json.loads((tmp_path / "calvin" / "vlaops_dataset.json").read_text())
    (trained,) = [e for e in provenance["episodes"].values() if e["split"] == "training"]
    metadata = yaml.safe_load((Path(cfg.data.raw_dir) / trained["source_name"] / "metadata.yaml").read_text())
    seed = int(metadata["rosbag2_bagfile_information"]["custom_data"]["seed"])

    policy = PolicyRuntime.load(cfg.paths.model_dir)
    task = get_task(TASK)
    with TabletopEnv(cfg.sim) as env:
        obs = env.reset(seed)
        success, steps, _ = rollout(env, policy, task, obs, cfg.sim.max_episode_steps)
    assert success, f"the overfit policy did not replay its one demonstration of {TASK!r} (scene seed {seed})"
