"""Checkpoints the size of what trains: a LoRA / frozen-vision run saves its trainable tensors
only, resumes from them to the same bits as an uninterrupted run, refuses a frozen part that is not the
one it trained with, and ``vlaops export`` turns such a checkpoint (or an FSDP sharded state) into the
policy directory ``PolicyRuntime.load`` reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CONF, SHRINK_MODEL, SyntheticWindows, path_overrides
from safetensors.torch import load_file

from vlaops.errors import VlaopsError
from vlaops.model import ModelConfig
from vlaops.train.checkpoint import MANIFEST_FILE, latest_checkpoint
from vlaops.train.config import TrainConfig, TrainSetupConfig
from vlaops.train.loop import make_loader, train_policy
from vlaops.train.setup import apply_train_setup
from vlaops.train.trainable import STORED_TRAINABLE, build_policy, frozen_source, trainable_names

W, C, L, S = 2, 3, 12, 224
MODEL = ModelConfig(
    window_size=W,
    fwd_pred_next_n=C,
    max_text_len=L,
    lstm_hidden_size=32,
    lstm_num_layers=1,
    head_mlp_dims=[32],
    pretrained_dir=None,
)
# experiment=lora with the vision tower frozen too (LoRA dropout on: the resume must restore its RNG)
LORA = TrainSetupConfig(freeze_backbone=True, lora_enable=True, lora_r=4, lora_alpha=8, train_vision=False)


def lora_policy(processor, seed: int = 0):
    policy = build_policy(MODEL, len(processor.tokenizer), seed)
    apply_train_setup(policy, LORA)
    return policy


def cfg(**kw) -> TrainConfig:
    base = dict(
        max_steps=6,
        batch_size=2,
        log_every=1,
        val_every=100,
        val_batches=1,
        save_every=4,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        train_setup=LORA,
    )
    base.update(kw)
    return TrainConfig(**base)


def train(policy, data, c: TrainConfig, directory: Path, source: dict | None) -> dict:
    return train_policy(policy, make_loader(data, c, shuffle=True), None, c, lambda m, s: None, directory, None, source)


def test_a_lora_checkpoint_holds_the_trainable_tensors_and_resumes_to_the_same_bits(processor, tmp_path):
    data = SyntheticWindows(processor, 6, W, C, L, 0, S)
    source = frozen_source(MODEL, 0)
    whole = lora_policy(processor)
    train(whole, data, cfg(), tmp_path / "whole", source)

    train(lora_policy(processor), data, cfg(max_steps=4), tmp_path / "run", source)
    ckpt = latest_checkpoint(tmp_path / "run")
    saved = load_file(str(ckpt / "model.safetensors"))
    full = whole.state_dict()
    assert set(saved) == trainable_names(whole) and any("lora_" in k for k in saved)
    assert not any(k.startswith("backbone.model.vision_model.") for k in saved)  # the frozen vision tower
    saved_bytes = sum(t.numel() * t.element_size() for t in saved.values())
    full_bytes = sum(t.numel() * t.element_size() for t in full.values())
    assert len(saved) < len(full) / 2 and saved_bytes < 0.5 * full_bytes, (
        len(saved),
        len(full),
        saved_bytes,
        full_bytes,
    )
    assert (ckpt / "model.safetensors").stat().st_size < 0.5 * full_bytes
    weights = json.loads((ckpt / MANIFEST_FILE).read_text())["weights"]
    assert weights["stored"] == STORED_TRAINABLE and weights["source"] == source
    assert weights["frozen"]["tensors"] == len(full) - len(saved)

    # a fresh process: the policy rebuilt from the same source, then the checkpoint's trainable tensors
    resumed = lora_policy(processor)
    result = train(resumed, data, cfg(), tmp_path / "run", source)
    assert result["resumed_from_step"] == 4 and result["steps"] == 6
    different = [k for k, v in whole.state_dict().items() if not torch.equal(v, resumed.state_dict()[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert not all(torch.equal(v, lora_policy(processor).state_dict()[k]) for k, v in whole.state_dict().items())


def test_lora_dropout_under_cpu_bf16_resumes_exactly(processor, tmp_path):
    """The CPU bf16 probes (utils/bf16.py) build a random module at the first bf16 forward, inside a training
    step; they used to draw it from the global generator, so every later dropout mask (LoRA's) shifted, at
    step 1 in the uninterrupted run and at the first step after the resume in the other: about 1e-4 apart.
    Meaningful in a process that has not probed yet (run this test alone to see it)."""
    import dataclasses

    from vlaops.utils.bf16 import cpu_bf16_autocast_works

    if torch.cuda.is_available() or not cpu_bf16_autocast_works():
        pytest.skip("a CPU with bf16 autocast shows it")
    setup = dataclasses.replace(LORA, precision="bf16")
    data = SyntheticWindows(processor, 6, W, C, L, 0, S)
    whole = lora_policy(processor)
    train(whole, data, cfg(train_setup=setup), tmp_path / "whole", None)
    train(lora_policy(processor), data, cfg(max_steps=4, train_setup=setup), tmp_path / "run", None)
    resumed = lora_policy(processor)
    train(resumed, data, cfg(train_setup=setup), tmp_path / "run", None)
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in whole.state_dict().items())


def test_a_frozen_part_that_is_not_the_trained_one_is_refused_in_one_line(processor, tmp_path):
    data = SyntheticWindows(processor, 4, W, C, L, 0, S)
    train(lora_policy(processor), data, cfg(max_steps=2, save_every=2), tmp_path / "run", frozen_source(MODEL, 0))
    other = lora_policy(processor, seed=1)  # another random backbone under the adapters
    with pytest.raises(
        VlaopsError, match=r"run/step_0000002: holds only the trainable weights, and the frozen part .* is not the one"
    ) as info:
        train(other, data, cfg(max_steps=4, save_every=2), tmp_path / "run", frozen_source(MODEL, 1))
    assert "\n" not in str(info.value)


def test_without_a_source_checkpoints_stay_whole(processor, tmp_path):
    """A policy the caller built itself: nothing says how to rebuild its frozen part, so nothing is left out."""
    data = SyntheticWindows(processor, 4, W, C, L, 0, S)
    policy = lora_policy(processor)
    train(policy, data, cfg(max_steps=2, save_every=2), tmp_path / "run", None)
    ckpt = latest_checkpoint(tmp_path / "run")
    assert set(load_file(str(ckpt / "model.safetensors"))) == set(policy.state_dict())
    assert json.loads((ckpt / MANIFEST_FILE).read_text())["weights"]["stored"] == "full"
    # a checkpoint of an earlier vlaops (manifest format 1, no "weights": whole) still resumes
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    del manifest["weights"]
    (ckpt / MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": 1}))
    assert (
        train(lora_policy(processor, seed=5), data, cfg(max_steps=3, save_every=2), tmp_path / "run", None)[
            "resumed_from_step"
        ]
        == 2
    )


# ---- vlaops export -----------------------------------------------------------------------------------
STAGE_STEPS = [
    "train.max_steps=4",
    "train.save_every=4",
    "train.batch_size=2",
    "train.log_every=2",
    "train.val_every=4",
    "train.val_batches=1",
    "experiment=lora",
    "train.train_setup.train_vision=false",
    "train.ema_decay=0.9",
]  # the stage saves the weights' moving average: export must write the same


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """``vlaops train experiment=lora`` (vision frozen too) on tiny data, through the CLI in this process."""
    from bagfactory import write_arm_bag
    from conftest import tiny_config

    from vlaops.cli import main
    from vlaops.data.action_stats import normalize
    from vlaops.data.convert import convert
    from vlaops.data.ingest import ingest

    tmp = tmp_path_factory.mktemp("lora_run")
    cfg = tiny_config(tmp)
    for i in range(4):
        write_arm_bag(
            tmp / "raw" / f"ep{i}",
            n_frames=20,
            seed=i,
            storage="sqlite3",
            instruction="push the red block to the left" if i % 2 else "lift the blue block",
        )
    ingest(Path(cfg.data.raw_dir), Path(cfg.data.episodes_dir), cfg.data)
    convert(Path(cfg.data.episodes_dir), Path(cfg.data.calvin_dir), cfg.data)
    normalize(Path(cfg.data.calvin_dir), Path(cfg.data.normalized_dir), cfg.data)
    assert main(["train", "--config-dir", str(CONF), *path_overrides(tmp), *SHRINK_MODEL, *STAGE_STEPS]) == 0
    return tmp


def _export(*args: str) -> int:
    from vlaops.cli import main

    return main(["export", *args, "--config-dir", str(CONF)])


@pytest.mark.slow  # seconds: the full suite only (the quick loop stays under 5 minutes)
def test_export_writes_the_trained_policy_from_a_trainable_only_checkpoint(lora_run, tmp_path):
    from vlaops.model import PolicyRuntime

    ckpts = lora_run / "models" / "checkpoints"
    manifest = json.loads((ckpts / "step_0000004" / MANIFEST_FILE).read_text())
    assert manifest["weights"]["stored"] == STORED_TRAINABLE
    saved = load_file(str(ckpts / "step_0000004" / "model.safetensors"))
    trained = load_file(str(lora_run / "models" / "policy" / "model.safetensors"))  # the stage's own export (merged)
    assert any("lora_" in k for k in saved) and len(saved) < len(trained) / 2

    assert _export(str(ckpts), str(tmp_path / "policy")) == 0  # the directory: its newest checkpoint
    exported = load_file(str(tmp_path / "policy" / "model.safetensors"))
    assert exported.keys() == trained.keys()
    different = [k for k in trained if not torch.equal(trained[k], exported[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    source = json.loads((tmp_path / "policy" / "exported_from.json").read_text())
    assert source["step"] == 4 and source["weights"] == STORED_TRAINABLE and source["moving_average"]
    PolicyRuntime.load(tmp_path / "policy")  # what evaluate and serve read


def _shard_and_save(rank: int, world: int, port: int, state_file: str, out: str) -> None:
    """One of ``world`` gloo processes: every tensor of ``state_file`` sharded on dim 0 across them (a
    DTensor, as FSDP2's sharded state dict holds it), saved with torch.distributed.checkpoint as
    Accelerate's FSDP plugin saves it ({"model": state_dict})."""
    import os

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        full = load_file(state_file)
        state = {
            k: distribute_tensor(v, mesh, [Shard(0) if v.ndim and v.shape[0] >= world else Replicate()])
            for k, v in full.items()
        }
        dcp.save({"model": state}, checkpoint_id=out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # heavier integration check: the quick loop (-m 'not slow') stays under 5 minutes
def test_export_consolidates_an_fsdp_sharded_state(lora_run, tmp_path):
    """A checkpoint whose weights are a torch.distributed.checkpoint state written by two gloo processes,
    each holding half of every tensor: export consolidates it on CPU into the same policy."""
    import socket

    import torch.multiprocessing as mp

    from vlaops.train.checkpoint import write_manifest

    ckpt = tmp_path / "step_0000004"
    shutil.copytree(lora_run / "models" / "checkpoints" / "step_0000004", ckpt)
    (ckpt / "model.safetensors").unlink()
    (ckpt / "ema.safetensors").unlink()  # an FSDP run keeps no moving average (the loop refuses one)
    # a full fine-tune of the trained weights (the merged export), as FSDP would hold it
    trained = lora_run / "models" / "policy" / "model.safetensors"
    config = json.loads((ckpt / "train_config.json").read_text())
    config["train"]["train_setup"].update(lora_enable=False, freeze_backbone=False, train_vision=True)
    (ckpt / "train_config.json").write_text(json.dumps(config))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_shard_and_save, args=(2, port, str(trained), str(ckpt / "pytorch_model_fsdp_0")), nprocs=2, join=True)
    assert len(list((ckpt / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2  # one file per process
    write_manifest(ckpt, {"stored": "sharded", "engine": "FSDP"})

    assert _export(str(ckpt), str(tmp_path / "policy")) == 0
    a, b = load_file(str(trained)), load_file(str(tmp_path / "policy" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_refuses_what_it_cannot_export_in_one_line(lora_run, tmp_path, capsys):
    ckpt = lora_run / "models" / "checkpoints" / "step_0000004"
    zero = tmp_path / "zero" / "step_0000004"
    shutil.copytree(ckpt, zero)
    (zero / "pytorch_model").mkdir()
    (zero / "pytorch_model" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")

    import importlib.util

    from vlaops.train.checkpoint import write_manifest

    why = "DeepSpeed is installed, but" if importlib.util.find_spec("deepspeed") else "DeepSpeed is not installed here"
    cases = {
        "zero": (
            zero,
            "a DeepSpeed ZeRO state (bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt); vlaops cannot consolidate it "
            f"({why}",
        ),
        "missing": (tmp_path / "nowhere", "nowhere: checkpoint directory not found"),
    }
    weights = json.loads((ckpt / MANIFEST_FILE).read_text())["weights"]
    other = tmp_path / "other" / "step_0000004"  # its frozen part said to come from another seed: not rebuildable
    shutil.copytree(ckpt, other)
    write_manifest(other, {**weights, "source": {**weights["source"], "seed": 1}})
    cases["other"] = (other, "other/step_0000004: holds only the trainable weights, and the frozen part rebuilt from")
    bare = tmp_path / "bare" / "step_0000004"  # a checkpoint of a library call: no recipe beside the weights
    shutil.copytree(ckpt, bare)
    shutil.rmtree(bare / "processor")
    write_manifest(bare, weights)
    cases["bare"] = (
        bare,
        "bare/step_0000004: no processor; only checkpoints of 'vlaops train' carry what an export needs",
    )
    for name, (path, message) in cases.items():
        assert _export(str(path), str(tmp_path / name / "out")) == 1, name
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (name, err)
        assert not (tmp_path / name / "out").exists()
