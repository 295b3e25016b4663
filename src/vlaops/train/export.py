"""``vlaops export CHECKPOINT OUT``: a training checkpoint -> the policy directory ``PolicyRuntime.load`` reads.

Every checkpoint of the train stage carries what a policy export needs besides the weights (written by
:func:`write_checkpoint_recipe`): the model config, the processor, the normalisation, the train config
and the data fingerprint. The weights come from whichever state the checkpoint holds:

- vlaops' own ``model.safetensors``: the trainable tensors only (the frozen rest rebuilt as the run built
  it, ``vlaops.train.trainable.build_policy``, and checked against the sha256 in the manifest), or the
  whole model;
- an FSDP sharded state (``pytorch_model_fsdp_0/``, torch.distributed.checkpoint, as Accelerate's FSDP
  plugin writes it), consolidated on CPU with ``dcp_to_torch_save``; or FSDP's full state
  (``pytorch_model_fsdp.bin``);
- a DeepSpeed ZeRO state is refused with one line: consolidating it needs DeepSpeed's own
  ``zero_to_fp32.py``, and DeepSpeed is not a dependency of vlaops.

A run with ``train.ema_decay`` exports the moving average its checkpoint holds (``ema.safetensors``), as
its train stage does.

LoRA adapters are merged (``save_policy``), so the export loads without peft.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from vlaops.data.normalization import NORMALIZATION_FILE, ActionNormalizer
from vlaops.errors import VlaopsError
from vlaops.model.config import ModelConfig
from vlaops.model.runtime import FORMAT_VERSION, POLICY_CONFIG_FILE, PROCESSOR_DIR, save_policy
from vlaops.train.checkpoint import (
    CHECKPOINT_PATTERN,
    TRAINER_STATE_FILE,
    latest_checkpoint,
    read_manifest,
    read_trainer_state,
    verify_checkpoint,
)
from vlaops.train.config import TrainSetupConfig
from vlaops.train.ema import EMA_FILE, read_ema
from vlaops.train.trainable import STORED_TRAINABLE, build_policy, frozen_digest, plain_name, trainable_names
from vlaops.utils.atomic import write_json
from vlaops.utils.logging import get_logger

log = get_logger(__name__)

TRAIN_CONFIG_FILE = "train_config.json"  # the run's whole resolved config (seed, model, train, data ...)
DATA_FINGERPRINT_FILE = "data_fingerprint.json"
RECIPE_FILES = (POLICY_CONFIG_FILE, PROCESSOR_DIR, NORMALIZATION_FILE, TRAIN_CONFIG_FILE, DATA_FINGERPRINT_FILE)
MODEL_FILE = "model.safetensors"  # Accelerate's save_state, no engine
FSDP_SHARDED_DIR = "pytorch_model_fsdp_0"  # Accelerate's FSDP SHARDED_STATE_DICT (torch.distributed.checkpoint)
FSDP_FULL_FILE = "pytorch_model_fsdp.bin"  # Accelerate's FSDP FULL_STATE_DICT (torch.save)
ZERO_MARKERS = ("zero_pp_rank_*", "*mp_rank_*_model_states.pt", "bf16_zero_pp_rank_*")  # DeepSpeed's save_checkpoint


def write_checkpoint_recipe(
    directory: Path,
    processor: Any,
    normalizer: ActionNormalizer,
    model_cfg: dict[str, Any],
    train_config: dict[str, Any],
    data_fingerprint: dict[str, Any],
) -> None:
    """Write what :func:`export_checkpoint` needs besides the weights into a checkpoint ``directory``
    (the files of a policy export but its weights and backbone config: the build recreates both)."""
    ModelConfig(**model_cfg)  # fails here, not at export time
    write_json(directory / POLICY_CONFIG_FILE, {"format_version": FORMAT_VERSION, "model": model_cfg})
    processor.save_pretrained(str(directory / PROCESSOR_DIR))
    normalizer.save(directory / NORMALIZATION_FILE)
    write_json(directory / TRAIN_CONFIG_FILE, train_config)
    write_json(directory / DATA_FINGERPRINT_FILE, data_fingerprint)


def resolve_checkpoint(path: Path) -> Path:
    """``path`` itself (a ``step_XXXXXXX``), or the newest complete checkpoint in a checkpoint directory."""
    if not path.is_dir():
        raise VlaopsError(f"{path}: checkpoint directory not found")
    if CHECKPOINT_PATTERN.match(path.name):
        return path
    newest = latest_checkpoint(path)
    if newest is not None:
        return newest
    if any(path.glob("*.safetensors")) or (path / FSDP_SHARDED_DIR).is_dir() or _zero_files(path):
        return path  # a checkpoint under another name
    raise VlaopsError(f"{path}: neither a checkpoint nor a directory of step_XXXXXXX checkpoints")


def _zero_files(path: Path) -> list[Path]:
    return sorted(p for pattern in ZERO_MARKERS for p in path.rglob(pattern))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VlaopsError(f"{path}: unreadable ({exc})") from None


def _state(checkpoint: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The checkpoint's model weights (keys without wrapper prefixes) and the file they came from."""
    sharded = checkpoint / FSDP_SHARDED_DIR
    if (sharded / ".metadata").is_file():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory(prefix=".vlaops-export-") as tmp:
            consolidated = Path(tmp) / "model.pt"
            dcp_to_torch_save(str(sharded), str(consolidated))  # on CPU, no process group
            state = torch.load(consolidated, map_location="cpu", weights_only=True)
        state = state.get("model", state)  # Accelerate saves {"model": state_dict}
        source = f"{sharded} (FSDP sharded, consolidated)"
    elif (checkpoint / FSDP_FULL_FILE).is_file():
        state = torch.load(checkpoint / FSDP_FULL_FILE, map_location="cpu", weights_only=True)
        source = str(checkpoint / FSDP_FULL_FILE)
    elif (checkpoint / MODEL_FILE).is_file():
        state = load_file(str(checkpoint / MODEL_FILE))
        source = str(checkpoint / MODEL_FILE)
    else:
        raise VlaopsError(f"{checkpoint}: no model weights ({MODEL_FILE}, {FSDP_SHARDED_DIR}/ or {FSDP_FULL_FILE})")
    return {plain_name(k): v for k, v in state.items()}, source


def export_checkpoint(checkpoint: Path, out: Path, trust: bool = False) -> Path:
    """Write the policy export of ``checkpoint`` (a ``step_XXXXXXX``, or a checkpoint directory: its newest)
    to ``out``, atomically; ``trust`` loads a checkpoint without vlaops' manifest (``train.trust_checkpoint``)."""
    checkpoint = resolve_checkpoint(Path(checkpoint))
    zero = _zero_files(checkpoint)
    if zero:
        installed = importlib.util.find_spec("deepspeed") is not None
        why = (
            "DeepSpeed is installed, but its zero_to_fp32.py is not run by vlaops"
            if installed
            else "DeepSpeed is not installed here"
        )
        raise VlaopsError(
            f"{checkpoint}: a DeepSpeed ZeRO state ({zero[0].name}); vlaops cannot consolidate it ({why}): "
            "run DeepSpeed's zero_to_fp32.py on it, or train with conf/accelerate/fsdp.yaml or ddp.yaml, whose "
            "checkpoints export"
        )
    verify_checkpoint(checkpoint, trust)  # before anything in it is unpickled (DCP metadata, torch.load)
    missing = [name for name in RECIPE_FILES if not (checkpoint / name).exists()]
    if missing:
        raise VlaopsError(
            f"{checkpoint}: no {', '.join(missing)}; only checkpoints of 'vlaops train' carry what an export needs"
        )

    from vlaops.model.processor import load_processor
    from vlaops.train.setup import apply_train_setup

    pcfg = _read_json(checkpoint / POLICY_CONFIG_FILE)
    try:
        model_cfg = ModelConfig(**pcfg["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise VlaopsError(f"{checkpoint / POLICY_CONFIG_FILE}: bad model config ({exc})") from None
    train_config = _read_json(checkpoint / TRAIN_CONFIG_FILE)
    processor = load_processor(checkpoint / PROCESSOR_DIR)
    normalizer = ActionNormalizer.load(checkpoint / NORMALIZATION_FILE)
    recorded = read_manifest(checkpoint).get("weights", {})
    seed = int(recorded.get("source", {}).get("seed", train_config["seed"]))

    # the policy as the run built it (LoRA injected, so the keys are the run's), then the checkpoint's weights
    policy = build_policy(model_cfg, len(processor.tokenizer), seed)
    apply_train_setup(policy, TrainSetupConfig(**train_config["train"]["train_setup"]))
    state, source = _state(checkpoint)
    expected = {plain_name(k) for k in policy.state_dict()}
    unexpected = sorted(set(state) - expected)
    absent = sorted(expected - set(state))
    if unexpected:
        raise VlaopsError(
            f"{source}: {len(unexpected)} tensors the policy of {checkpoint / POLICY_CONFIG_FILE} does not have, e.g. "
            f"{unexpected[:3]}"
        )
    if recorded.get("stored") == STORED_TRAINABLE:
        trainable = {plain_name(k) for k in trainable_names(policy)}
        if set(state) != trainable:
            raise VlaopsError(
                f"{source}: holds {len(state)} tensors, the run trained {len(trainable)} (e.g. missing "
                f"{sorted(trainable - set(state))[:2]}); not the checkpoint of this recipe"
            )
        rebuilt = frozen_digest(policy)
        if rebuilt["sha256"] != recorded.get("frozen", {}).get("sha256"):
            raise VlaopsError(
                f"{checkpoint}: holds only the trainable weights, and the frozen part rebuilt from "
                f"{recorded.get('source')} is not the one it was trained with (sha256 {rebuilt['sha256'][:12]}, "
                f"recorded {str(recorded.get('frozen', {}).get('sha256'))[:12]}); restore that source "
                f"(model.pretrained_dir, transformers version) to export it"
            )
    elif absent:
        raise VlaopsError(f"{source}: lacks {len(absent)} of the policy's tensors, e.g. {absent[:3]}")
    averaged = read_ema(checkpoint)  # keys as WeightEMA wrote them: plain names
    if averaged is not None:  # a run with train.ema_decay: its policy is the average, as the train stage's is
        trainable = {plain_name(k) for k in trainable_names(policy)}
        if set(averaged) != trainable:
            raise VlaopsError(
                f"{checkpoint / EMA_FILE}: averages {len(averaged)} tensors, the run trained {len(trainable)}; "
                f"not the average of this recipe"
            )
        state = {**state, **averaged}
    with torch.no_grad():
        policy.load_state_dict(state, strict=False)  # exactly the tensors checked above
    trainer = read_trainer_state(checkpoint) if (checkpoint / TRAINER_STATE_FILE).is_file() else {}
    out = save_policy(
        out,
        policy.eval(),
        processor,
        normalizer,
        model_cfg,
        extra={
            "train_config": train_config,
            "data_fingerprint": _read_json(checkpoint / DATA_FINGERPRINT_FILE),
            "exported_from": {
                "checkpoint": str(checkpoint.resolve()),
                "step": trainer.get("step"),
                "weights": recorded.get("stored", "full"),
                "source": source,
                "moving_average": averaged is not None,
            },
        },
    )
    log.info("exported %s (step %s, %s) to %s", checkpoint, trainer.get("step"), recorded.get("stored", "full"), out)
    return out
