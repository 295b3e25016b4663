"""Which parts of the policy train: the ``train_setup`` flags acting on the real modules.

RoboVLMs semantics (robovlms/model/backbone/base_backbone.py ``_trainable_params_setup``), plus peft LoRA
adapters and Kosmos-2's own gradient checkpointing. The training stage applies it once, before the loop.
"""

from __future__ import annotations

import re

import torch.nn as nn

from vlaops.model.policy import VLAPolicy
from vlaops.train.config import TrainSetupConfig
from vlaops.utils.logging import get_logger

log = get_logger(__name__)


def _count(module: nn.Module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def has_lora(module: nn.Module) -> bool:
    """Whether peft LoRA adapters are injected anywhere in ``module``."""
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in module.modules())


def apply_train_setup(policy: VLAPolicy, setup: TrainSetupConfig) -> dict[str, int]:
    """Set ``requires_grad`` on the real modules per ``TrainSetupConfig``; returns parameter counts.

    RoboVLMs semantics (base_backbone.py ``_trainable_params_setup``), in this order:
    1. the Kosmos-2 model as a whole: frozen if ``freeze_backbone`` or ``lora_enable``; else, with
       ``train_decoder_layers=N >= 0``, frozen except the last N text decoder layers; else trainable;
    2. ``train_vision`` sets the vision tower, ``train_text_embedding`` the token embeddings,
       ``freeze_resampler`` the image_to_text_projection, each overriding step 1 (as in RoboVLMs, so
       ``freeze_backbone`` alone still trains those three at their defaults);
    3. ``lora_enable``: peft LoRA adapters on ``lora_target_modules`` inside the text decoder layers
       (the last N only, with ``train_decoder_layers=N``), trainable;
    4. the action token and the LSTM head always train.
    ``gradient_checkpointing`` turns on Kosmos-2's own (non-reentrant, so frozen inputs are fine).
    ``precision`` is read by the training loop's Accelerator.
    """
    bb = policy.backbone
    n_layers = len(bb.decoder_layers)
    last_n = n_layers if setup.train_decoder_layers < 0 else min(setup.train_decoder_layers, n_layers)
    trained_layers = list(range(n_layers - last_n, n_layers))

    if setup.lora_enable:
        from peft import LoraConfig, inject_adapter_in_model

        if has_lora(bb.model):
            raise ValueError("apply_train_setup: LoRA adapters are already in this policy")
        if not trained_layers:
            raise ValueError("train_setup.lora_enable with train_decoder_layers=0 leaves no layer for LoRA")
        names = "|".join(re.escape(m) for m in setup.lora_target_modules)
        layers = "|".join(str(i) for i in trained_layers)
        lora_cfg = LoraConfig(
            r=setup.lora_r,
            lora_alpha=setup.lora_alpha,
            lora_dropout=setup.lora_dropout,
            # full-match regex over Kosmos2Model module names: the text decoder's layers only, not the
            # vision tower's or the resampler's identically named q_proj/v_proj
            target_modules=rf"text_model\.model\.layers\.({layers})\.(.*\.)?({names})",
            bias="none",
        )
        try:
            inject_adapter_in_model(lora_cfg, bb.model)
        except ValueError as exc:  # peft: "Target modules ... not found in the base model"
            raise ValueError(
                f"train_setup.lora_target_modules {list(setup.lora_target_modules)} matched no module in the "
                f"text decoder layers {trained_layers} ({exc})"
            ) from exc
        if not has_lora(bb.model):
            raise ValueError(
                f"train_setup.lora_target_modules {list(setup.lora_target_modules)} matched no module in the text "
                "decoder"
            )

    # 1. the backbone as a whole
    base_trainable = not (setup.freeze_backbone or setup.lora_enable)
    bb.model.requires_grad_(base_trainable and setup.train_decoder_layers < 0)
    if base_trainable and setup.train_decoder_layers >= 0:
        for i in trained_layers:
            bb.decoder_layers[i].requires_grad_(True)
    # 2. per-module overrides
    bb.vision_encoder.requires_grad_(setup.train_vision)
    bb.text_embeddings.requires_grad_(setup.train_text_embedding)
    bb.resampler.requires_grad_(not setup.freeze_resampler)
    # 3. LoRA adapters (the base weights they wrap stay frozen)
    if setup.lora_enable:
        for name, p in bb.model.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
    # 4. always
    bb.action_token.requires_grad_(True)
    policy.head.requires_grad_(True)

    _set_checkpointing(bb.model, setup.gradient_checkpointing)

    trainable, total = _count(policy)
    counts = {
        "params_total": total,
        "params_trainable": trainable,
        "params_trainable_vision": _count(bb.vision_encoder)[0],
        "params_trainable_resampler": _count(bb.resampler)[0],
        "params_trainable_text": _count(bb.text_decoder)[0],
        "params_trainable_head": _count(policy.head)[0],
    }
    log.info(
        "trainable parameters: %s of %s (%.1f%%)%s",
        f"{trainable:,}",
        f"{total:,}",
        100.0 * trainable / max(total, 1),
        " with LoRA" if setup.lora_enable else "",
    )
    return counts


def is_checkpointing(model: nn.Module) -> bool:
    """Whether Kosmos-2's own activation checkpointing is on (transformers 5 name, 4.x fallback)."""
    name = (
        "is_activation_checkpointing"
        if hasattr(type(model), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    return bool(getattr(model, name))


def compile_layers(policy: VLAPolicy) -> int:
    """torch.compile each Kosmos-2 layer in place (the vision encoder's and the text decoder's); returns how many.

    Regional compilation: every layer of a stack shares one compiled graph, so the compiler runs once per
    layer type and mode (train, eval) instead of over the whole model, and ``Module.compile`` keeps the
    state-dict keys (checkpoints, EMA and export see the same names). On a GPU it fuses each layer's
    elementwise work (norms, activations, residuals, dropout) into fewer kernels; the mask building, the
    action-token insertion and the LSTM head stay eager. Apply after ``apply_train_setup`` (LoRA
    adapters are then inside the layers it compiles).
    """
    layers = [*policy.backbone.vision_layers, *policy.backbone.decoder_layers]
    for layer in layers:
        layer.compile()
    return len(layers)


def _set_checkpointing(model: nn.Module, enable: bool) -> None:
    """Kosmos-2's own activation checkpointing (transformers 5 name, 4.x name as the fallback)."""
    if enable:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif is_checkpointing(model):
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
