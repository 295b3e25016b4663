"""The shipped Accelerate configs (conf/accelerate/) load with Accelerate's own loader and say what they
are for; a launch that cannot train the recipe here is one line naming the settings, before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from conftest import CONF, SHRINK_MODEL, path_overrides

import vlaops
from vlaops.cli import main
from vlaops.errors import VlaopsError
from vlaops.train.config import TrainConfig, TrainSetupConfig
from vlaops.train.launch import check_launch

ACCELERATE = CONF / "accelerate"
SRC = Path(vlaops.__file__).resolve().parents[1]
# name: (distributed_type, mixed_precision, use_cpu)
INTENDED = {
    "cpu": (DistributedType.NO, "no", True),
    "gpu": (DistributedType.NO, "bf16", False),
    "ddp": (DistributedType.MULTI_GPU, "bf16", False),
    "fsdp": (DistributedType.FSDP, "bf16", False),
    "deepspeed_zero2": (DistributedType.DEEPSPEED, "bf16", False),
}


def test_the_shipped_configs_are_the_intended_ones():
    assert sorted(p.stem for p in ACCELERATE.glob("*.yaml")) == sorted(INTENDED)
    for name, (kind, precision, cpu) in INTENDED.items():
        config = load_config_from_file(str(ACCELERATE / f"{name}.yaml"))  # what accelerate launch reads
        assert (config.distributed_type, config.mixed_precision, config.use_cpu) == (kind, precision, cpu), name
        assert (config.num_machines, config.machine_rank) == (1, 0), name  # several nodes: the launch flags
    fsdp = load_config_from_file(str(ACCELERATE / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD" and fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert fsdp["fsdp_use_orig_params"] is True  # frozen and trainable parameters in one unit
    import transformers.models.kosmos2.modeling_kosmos2 as kosmos2

    assert all(hasattr(kosmos2, cls) for cls in fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","))
    zero = load_config_from_file(str(ACCELERATE / "deepspeed_zero2.yaml")).deepspeed_config
    assert zero["zero_stage"] == 2
    recipe = TrainConfig()  # DeepSpeed clips and accumulates itself: as the recipe does
    assert (zero["gradient_clipping"], zero["gradient_accumulation_steps"]) == (
        recipe.gradient_clip_val,
        recipe.gradient_accumulation_steps,
    )


def test_a_misspelt_key_fails_accelerates_loader(tmp_path):
    """The test above proves something: Accelerate's loader rejects a key it does not know."""
    bad = tmp_path / "bad.yaml"
    bad.write_text((ACCELERATE / "cpu.yaml").read_text() + "num_proceses: 2\n")
    with pytest.raises(ValueError, match=r"unknown keys \(\[.num_proceses.\]\)"):
        load_config_from_file(str(bad))


def _refused(monkeypatch, env: dict[str, str], match: str, train: dict | None = None, **setup) -> None:
    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = TrainConfig(**(train or {}), train_setup=TrainSetupConfig(**{"precision": "fp32", **setup}))
    with pytest.raises(VlaopsError, match=match) as info:
        check_launch(cfg)
    assert "\n" not in str(info.value)


def test_launches_that_cannot_train_the_recipe_are_one_line(monkeypatch):
    _refused(
        monkeypatch,
        {"ACCELERATE_MIXED_PRECISION": "bf16"},
        r"asks for mixed_precision=bf16 .* train.train_setup.precision=fp32 is fp32 here",
    )
    _refused(
        monkeypatch,
        {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_GRADIENT_CLIPPING": "0.5"},
        r"DeepSpeed's gradient_clipping: 0.5 .* differs from train.gradient_clip_val=1.0",
    )
    for engine in ("FSDP", "DEEPSPEED"):  # before the engine's own checks: whatever the machine
        _refused(
            monkeypatch,
            {f"ACCELERATE_USE_{engine}": "true"},
            r"train.compile=true under (FSDP|DeepSpeed): .* set train.compile=false",
            train={"compile": True},
        )
    if not torch.cuda.is_available():
        _refused(
            monkeypatch, {"ACCELERATE_USE_FSDP": "true"}, r"FSDP .* needs GPUs, and this machine has no CUDA device"
        )
    # the FSDP options that cannot work whatever the machine (as if it had GPUs)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fsdp = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_USE_ORIG_PARAMS": "true"}
    _refused(
        monkeypatch,
        {**fsdp, "FSDP_USE_ORIG_PARAMS": "false"},
        r"fsdp_use_orig_params: false cannot hold frozen",
        lora_enable=True,
        freeze_backbone=True,
    )
    _refused(
        monkeypatch, {**fsdp, "FSDP_STATE_DICT_TYPE": "LOCAL_STATE_DICT"}, r"LOCAL_STATE_DICT .* cannot consolidate"
    )
    _refused(
        monkeypatch,
        {**fsdp, "FSDP_ACTIVATION_CHECKPOINTING": "true"},
        r"checkpoint the same layers twice",
        gradient_checkpointing=True,
    )
    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for key, value in fsdp.items():
        monkeypatch.setenv(key, value)
    check_launch(
        TrainConfig(train_setup=TrainSetupConfig(precision="fp32", lora_enable=True, freeze_backbone=True))
    )  # as shipped: fine


def test_more_processes_than_batches_is_one_line(calvin_dir, tmp_path, monkeypatch, capsys):
    """Each process of a launch needs a batch of its own; said before the model is built."""
    monkeypatch.setenv("WORLD_SIZE", "64")
    code = main(["train", "--config-dir", str(CONF), *path_overrides(tmp_path), *SHRINK_MODEL, "train.batch_size=2"])
    err = capsys.readouterr().err
    assert code == 1 and "training windows, fewer than train.batch_size=2 x 64 processes (one batch each)" in err, err
    assert not (tmp_path / "models" / "checkpoints").exists()


def _launch(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1"
    )
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow  # heavier integration check: the quick loop (-m 'not slow') stays under 5 minutes
def test_accelerate_refuses_a_config_file_that_does_not_exist(tmp_path):
    done = _launch("--config_file", str(tmp_path / "nope.yaml"), "-m", "vlaops.cli", "train")
    assert done.returncode != 0 and f"{tmp_path / 'nope.yaml'}` does not exist" in done.stderr


@pytest.mark.slow  # heavier integration check: the quick loop (-m 'not slow') stays under 5 minutes
@pytest.mark.skipif(torch.cuda.is_available(), reason="FSDP runs where there is CUDA")
def test_fsdp_on_a_machine_without_gpus_stops_at_once_in_one_line(tmp_path):
    done = _launch(
        "--config_file",
        str(ACCELERATE / "fsdp.yaml"),
        "--num_processes",
        "1",
        "-m",
        "vlaops.cli",
        "train",
        "--config-dir",
        str(CONF),
        *path_overrides(tmp_path),
        "train.train_setup.precision=bf16",
    )
    assert done.returncode != 0
    assert "vlaops train: error: accelerate launch with FSDP (distributed_type: FSDP) needs GPUs" in done.stderr, (
        done.stderr[-2000:]
    )
    assert "Traceback" not in done.stderr.split("vlaops train: error")[0]  # nothing failed before our line
