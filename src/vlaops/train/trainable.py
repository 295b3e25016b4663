"""Checkpoints the size of what trains: the trainable state is saved, the frozen rest rebuilt and checked.

With LoRA on a frozen Kosmos-2 a few percent of the parameters train; a checkpoint of the whole state
dict would store the real model's other 6.5 GB again at every save. A checkpoint therefore holds the
parameters with ``requires_grad`` (LoRA adapters included) and the optimizer, RNG and sampler state; the
frozen rest (frozen parameters and buffers) is rebuilt from its source, which is the run's own build
(:func:`build_policy`): the tiny backbone's random weights are a function of the seed, the model config
and the vocabulary size, a pretrained backbone is read again from ``model.pretrained_dir``. The sha256 of
the frozen state is recorded in the checkpoint's manifest and compared on resume and export, so a source
that changed (other weights in ``pretrained_dir``, a transformers whose init draws differently) is one
line naming the checkpoint, not a silently different model.

A run that cannot name its source (a library caller's own policy) keeps whole checkpoints, and says why.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn as nn

from vlaops.model.config import ModelConfig
from vlaops.utils.logging import get_logger

log = get_logger(__name__)

# what a checkpoint's model file holds (the manifest's "weights.stored")
STORED_TRAINABLE = "trainable"  # the parameters with requires_grad; the frozen rest is rebuilt from "source"
STORED_FULL = "full"  # the whole state dict (checkpoints of vlaops before manifest format 2 are all full)
STORED_SHARDED = "sharded"  # what FSDP / DeepSpeed write through Accelerate: their own (sharded) full state
WRAPPER_SEGMENTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")  # torch.compile, FSDP1


def build_policy(model_cfg: ModelConfig, vocab_size: int, seed: int) -> nn.Module:
    """The policy as a run builds it, seeded right before the build: its random parts (the tiny
    backbone, the head) depend on (seed, ``model_cfg``, ``vocab_size``) only, so a resume or an export
    rebuilds the same frozen weights that a checkpoint does not store."""
    from vlaops.model.policy import VLAPolicy

    torch.manual_seed(seed)
    return VLAPolicy.build(model_cfg, vocab_size)


def frozen_source(model_cfg: ModelConfig, seed: int) -> dict[str, Any]:
    """Where :func:`build_policy` takes the frozen weights from, as recorded in a checkpoint's manifest."""
    return {"build": "vlaops.train.trainable.build_policy", "seed": seed, "pretrained_dir": model_cfg.pretrained_dir}


def plain_name(key: str) -> str:
    """A state-dict key without the wrappers' parts: DDP's leading ``module.``, torch.compile's and FSDP's."""
    parts = key.split(".")
    if parts[0] == "module":
        parts = parts[1:]
    return ".".join(p for p in parts if p not in WRAPPER_SEGMENTS)


def trainable_names(model: nn.Module) -> set[str]:
    """State-dict keys of ``model``'s parameters with ``requires_grad`` (in ``model``'s own key space)."""
    return {name for name, p in model.named_parameters() if p.requires_grad}


def frozen_digest(model: nn.Module) -> dict[str, Any]:
    """sha256 of ``model``'s frozen state (every state-dict entry that is not a trainable parameter):
    name, dtype, shape and bytes of each, in name order; and how many tensors and bytes it covers."""
    trainable = {plain_name(n) for n in trainable_names(model)}
    digest, tensors, size = hashlib.sha256(), 0, 0
    state = {plain_name(k): v for k, v in model.state_dict().items()}
    for name in sorted(state):
        if name in trainable:
            continue
        t = state[name].detach()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        data = t.cpu().contiguous().reshape(-1).view(torch.uint8)  # the raw bytes of any dtype (bf16 included)
        digest.update(memoryview(data.numpy()))
        tensors, size = tensors + 1, size + data.numel()
    return {"sha256": digest.hexdigest(), "tensors": tensors, "bytes": size}


def weights_record(policy: nn.Module, source: dict[str, Any] | None, engine: str | None = None) -> dict[str, Any]:
    """The manifest's ``weights`` entry of a run's checkpoints: what their model file holds.

    ``source`` (:func:`frozen_source`) None: the frozen part cannot be rebuilt, so checkpoints stay whole.
    ``engine`` (Accelerate's FSDP or DEEPSPEED) saves its own sharded full state through Accelerate."""
    trainable = trainable_names(policy)
    total = sum(1 for _ in policy.state_dict())
    if engine is not None:
        reason = f"{engine} saves its own sharded state of the whole model (vlaops export consolidates it)"
        log.info("checkpoints hold the whole model: %s", reason)
        return {"stored": STORED_SHARDED, "engine": engine, "reason": reason}
    if source is None:
        reason = "the policy was built by the caller, so its frozen part has no source to be rebuilt from"
        if len(trainable) < total:
            log.info("checkpoints hold the whole model: %s", reason)
        return {"stored": STORED_FULL, "reason": reason}
    frozen = frozen_digest(policy)
    log.info(
        "checkpoints hold the %d trainable tensors of %d; the frozen %d (%.1f MB) are rebuilt from %s and checked "
        "(sha256 %s)",
        len(trainable),
        total,
        frozen["tensors"],
        frozen["bytes"] / 1e6,
        source,
        frozen["sha256"][:12],
    )
    return {"stored": STORED_TRAINABLE, "source": source, "frozen": frozen, "trainable_tensors": len(trainable)}


def check_rebuilt(
    checkpoint: Any, recorded: dict[str, Any], policy: nn.Module, file_keys: set[str], model_keys: set[str]
) -> None:
    """Refuse, in one line naming ``checkpoint``, a trainable-only checkpoint that ``policy`` cannot complete.

    ``recorded`` is the manifest's ``weights`` entry; ``policy`` the freshly built policy whose frozen part
    must hash as recorded; ``file_keys`` the tensors in the checkpoint's model file, ``model_keys`` the
    trainable parameters they must load into (both without wrapper prefixes, :func:`plain_name`)."""
    from vlaops.errors import VlaopsError

    frozen = recorded.get("frozen") or {}
    rebuilt = frozen_digest(policy)
    if rebuilt["sha256"] != frozen.get("sha256"):
        raise VlaopsError(
            f"{checkpoint}: holds only the trainable weights, and the frozen part rebuilt from "
            f"{recorded.get('source')} is not the one it was trained with (sha256 {rebuilt['sha256'][:12]} over "
            f"{rebuilt['tensors']} tensors, recorded {str(frozen.get('sha256'))[:12]} over {frozen.get('tensors')}); "
            "restore that source (model.pretrained_dir, seed, transformers version) or delete the checkpoint to "
            "start afresh"
        )
    if file_keys != model_keys:
        extra, missing = sorted(file_keys - model_keys), sorted(model_keys - file_keys)
        raise VlaopsError(
            f"{checkpoint}: its trainable tensors do not match this run's ({len(missing)} missing, e.g. {missing[:2]}; "
            f"{len(extra)} unexpected, e.g. {extra[:2]}); not a checkpoint of this recipe's train_setup"
        )
