"""What a launcher asks for, checked against the recipe in the train stage's first seconds.

``accelerate launch --config_file conf/accelerate/<name>.yaml`` passes its config to the processes as
environment variables (``ACCELERATE_MIXED_PRECISION``, ``ACCELERATE_USE_FSDP`` and ``FSDP_*``,
``ACCELERATE_USE_DEEPSPEED`` and its ``ACCELERATE_GRADIENT_*``); torchrun sets ``WORLD_SIZE``. Accelerate
checks some of it itself, late and as a traceback (FSDP without a GPU fails when the Accelerator is built,
after the data and the model), or not at all (an Accelerator given its own ``mixed_precision`` silently
ignores the launcher's). A combination that cannot work here is one line naming the settings, before
anything is built. Accelerate itself refuses a ``--config_file`` that does not exist and a DeepSpeed
config without DeepSpeed installed, before any process starts.

``train.train_setup.precision`` is the one source of the precision: the shipped configs state the
``mixed_precision`` it resolves to on their hardware, and a launcher asking for another one is refused.
"""

from __future__ import annotations

import os

import torch

from vlaops.errors import VlaopsError
from vlaops.train.config import TrainConfig, TrainSetupConfig
from vlaops.utils.bf16 import cpu_bf16_autocast_works

ACCELERATE_PRECISION = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def world_size() -> int:
    """How many processes the launch started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def trains_everything(setup: TrainSetupConfig) -> bool:
    """Whether ``setup`` leaves no parameter frozen (a full fine-tune; no LoRA)."""
    return not (
        setup.freeze_backbone
        or setup.lora_enable
        or not setup.train_vision
        or setup.freeze_resampler
        or not setup.train_text_embedding
        or setup.train_decoder_layers >= 0
    )


def resolve_precision(precision: str) -> str:
    """train_setup.precision -> Accelerate's mixed_precision ("no" | "bf16" | "fp16").

    "auto" is bf16 on a CUDA device that supports it (RoboVLMs trains Kosmos in bf16), else fp32:
    CPU autocast in bf16 is slower than fp32 on most CPUs and changes numerics for nothing.
    """
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if precision == "fp16" and not torch.cuda.is_available():
        raise VlaopsError("train.train_setup.precision=fp16 needs a CUDA device; use auto, fp32 or bf16")
    if precision == "bf16" and not torch.cuda.is_available() and not cpu_bf16_autocast_works():
        raise VlaopsError(
            "train.train_setup.precision=bf16: this CPU cannot run bf16 autocast (a bf16 Linear fails); use auto or "
            "fp32"
        )
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def check_launch(cfg: TrainConfig) -> None:
    """Refuse, in one line naming the settings, a launch that cannot train ``cfg`` here (the stage also
    checks the training split holds a batch for each of the :func:`world_size` processes)."""
    setup = cfg.train_setup
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    mixed = resolve_precision(setup.precision)
    if asked != "no" and asked != mixed:  # "no" is also the launcher's default, so it is not a request
        raise VlaopsError(
            f"accelerate launch asks for mixed_precision={asked} (its config file or --mixed_precision), and "
            f"train.train_setup.precision={setup.precision} is {ACCELERATE_PRECISION[mixed]} here"
            f"{'' if torch.cuda.is_available() else ' (no CUDA device)'}: set train.train_setup.precision="
            f"{ACCELERATE_PRECISION.get(asked, asked)}, or launch with --mixed_precision {mixed} "
            "(conf/accelerate/cpu.yaml on a CPU)"
        )
    sharded = (
        "FSDP" if _env_true("ACCELERATE_USE_FSDP") else "DeepSpeed" if _env_true("ACCELERATE_USE_DEEPSPEED") else None
    )
    if sharded is not None and cfg.compile:
        raise VlaopsError(
            f"train.compile=true under {sharded}: compiling the layers of a sharded model is not run "
            "here; set train.compile=false, or launch with conf/accelerate/ddp.yaml or gpu.yaml"
        )
    if _env_true("ACCELERATE_USE_FSDP"):
        _check_fsdp(setup)
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        _check_deepspeed(cfg)


def _check_fsdp(setup: TrainSetupConfig) -> None:
    if not torch.cuda.is_available():
        raise VlaopsError(
            "accelerate launch with FSDP (distributed_type: FSDP) needs GPUs, and this machine has no CUDA "
            "device: use conf/accelerate/ddp.yaml (DDP over gloo on CPUs) or cpu.yaml"
        )
    version = os.environ.get("FSDP_VERSION", "1")
    if version == "1" and not _env_true("FSDP_USE_ORIG_PARAMS") and not trains_everything(setup):
        raise VlaopsError(
            "FSDP with fsdp_use_orig_params: false cannot hold frozen and trainable parameters in one "
            "unit (LoRA, freeze_backbone, train_vision=false ...): set fsdp_use_orig_params: true "
            "(conf/accelerate/fsdp.yaml does)"
        )
    if os.environ.get("FSDP_STATE_DICT_TYPE", "") == "LOCAL_STATE_DICT":
        raise VlaopsError(
            "FSDP with fsdp_state_dict_type: LOCAL_STATE_DICT writes per-process flat shards that "
            "vlaops export cannot consolidate: use SHARDED_STATE_DICT (conf/accelerate/fsdp.yaml) or FULL_STATE_DICT"
        )
    if _env_true("FSDP_ACTIVATION_CHECKPOINTING") and setup.gradient_checkpointing:
        raise VlaopsError(
            "FSDP's fsdp_activation_checkpointing and train.train_setup.gradient_checkpointing would "
            "checkpoint the same layers twice: set one of them"
        )


def _check_deepspeed(cfg: TrainConfig) -> None:
    """DeepSpeed clips and accumulates itself, from its own config: it must say what the recipe says."""
    for env, key, ours in (
        ("ACCELERATE_GRADIENT_CLIPPING", "gradient_clipping", cfg.gradient_clip_val),
        ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "gradient_accumulation_steps", cfg.gradient_accumulation_steps),
    ):
        value = os.environ.get(env)
        if value not in (None, "", "auto", "none") and float(value) != float(ours):
            raise VlaopsError(
                f"DeepSpeed's {key}: {value} (accelerate launch's config) differs from train."
                f"{'gradient_clip_val' if key == 'gradient_clipping' else key}={ours}: make them equal"
            )
