"""The policy: Kosmos-2 backbone + LSTM head, its loss, and the train_setup flags.

Batch contract (``vlaops.data.keys``, DESIGN.md "Training batch"): ``rgb``/``hand_rgb`` (B, W, 3, S, S)
CLIP-normalised, ``action_chunk`` (B, W, C, A) normalised (arm in [-1, 1], gripper {0, 1}),
``chunk_mask`` (B, W, C) bool, ``text``/``text_mask`` (B, L).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlaops.data import keys
from vlaops.model.backbone import KosmosBackbone
from vlaops.model.config import ModelConfig
from vlaops.model.head import LSTMPolicyHead
from vlaops.utils.logging import get_logger

log = get_logger(__name__)


class VLAPolicy(nn.Module):
    """RoboVLMs' "cont-lstm-post" Kosmos policy (robovlms/model/backbone/base_backbone.py + LSTMDecoder)."""

    def __init__(self, cfg: ModelConfig, backbone: KosmosBackbone):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.head = LSTMPolicyHead(
            in_features=backbone.hidden_size,
            action_dim=cfg.action_dim,
            fwd_pred_next_n=cfg.fwd_pred_next_n,
            hidden_size=cfg.lstm_hidden_size,
            num_layers=cfg.lstm_num_layers,
            mlp_dims=cfg.head_mlp_dims,
            dropout=cfg.head_dropout,
        )

    @classmethod
    def build(cls, cfg: ModelConfig, vocab_size: int) -> VLAPolicy:
        """A fresh policy: tiny random Kosmos-2 or ``cfg.pretrained_dir``; ``vocab_size`` is
        ``len(processor.tokenizer)`` (the Kosmos-2 processor's added tag tokens included)."""
        return cls(cfg, KosmosBackbone.from_model_config(cfg, vocab_size))

    # ---- features and predictions -------------------------------------------------------------------
    def encode_frames(
        self,
        rgb: torch.Tensor,
        hand_rgb: torch.Tensor | None,
        text: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> torch.Tensor:
        """rgb (N, 3, S, S), hand_rgb (N, 3, s, s) | None, text/text_mask (N, L) -> features (N, D).

        One frame each; the runtime caches these so the backbone sees every frame once."""
        return self.backbone(rgb, hand_rgb if self.cfg.use_hand_rgb else None, text, text_mask)

    def predict_from_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, W, D) -> arm (B, W, C, A-1) in [-1, 1], gripper probability (B, W, C, 1)."""
        arm, logits = self.head(features)
        return arm, torch.sigmoid(logits)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """batch (keys above) -> loss, arm_loss, gripper_loss (scalars), arm (B, W, C, A-1),
        gripper_logits (B, W, C, 1)."""
        rgb = batch[keys.RGB]  # (B, W, 3, S, S)
        b, w = rgb.shape[:2]
        hand = batch.get(keys.HAND_RGB) if self.cfg.use_hand_rgb else None
        # the instruction is shared by every frame of a window: (B, L) -> (B*W, L)
        text = batch[keys.TEXT].repeat_interleave(w, dim=0)
        text_mask = batch[keys.TEXT_MASK].repeat_interleave(w, dim=0)
        feats = self.encode_frames(
            rgb.flatten(0, 1), hand.flatten(0, 1) if hand is not None else None, text, text_mask
        )  # (B*W, D)
        arm, gripper_logits = self.head(feats.view(b, w, -1))  # (B, W, C, A-1), (B, W, C, 1)
        losses = self.loss(arm, gripper_logits, batch[keys.ACTION_CHUNK], batch[keys.CHUNK_MASK])
        return {**losses, "arm": arm, "gripper_logits": gripper_logits}

    def loss(
        self,
        arm: torch.Tensor,
        gripper_logits: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Masked arm Huber/MSE + ratio x gripper BCE (RoboVLMs base_backbone.py ``_get_loss``).

        arm (B, W, C, A-1), gripper_logits (B, W, C, 1), target (B, W, C, A), mask (B, W, C) bool.
        Each loss is the mean over the valid (b, w, c) steps, so a step past the episode end (mask
        False) neither changes the loss nor gets a gradient, whatever its target holds.
        """
        keep = mask.bool().unsqueeze(-1)  # (B, W, C, 1)
        # zero the invalid steps' targets first: they may hold anything, even NaN, and a NaN would
        # reach the gradient through the loss's backward even where the result is masked out
        target = torch.where(keep, target.to(arm.dtype), torch.zeros_like(target, dtype=arm.dtype))
        valid = mask.float()  # (B, W, C)
        denom = valid.sum().clamp(min=1.0)
        if self.cfg.loss == "huber":
            arm_err = F.huber_loss(arm, target[..., :-1], reduction="none")  # (B, W, C, A-1)
        else:
            arm_err = F.mse_loss(arm, target[..., :-1], reduction="none")
        arm_loss = (arm_err.float().mean(-1) * valid).sum() / denom
        grip_err = F.binary_cross_entropy_with_logits(
            gripper_logits.float(), target[..., -1:].float(), reduction="none"
        )  # (B, W, C, 1)
        grip_loss = (grip_err.squeeze(-1) * valid).sum() / denom
        total = arm_loss + self.cfg.arm_gripper_loss_ratio * grip_loss
        return {"loss": total, "arm_loss": arm_loss.detach(), "gripper_loss": grip_loss.detach()}


# ---- train_setup ------------------------------------------------------------------------------------
def _count(module: nn.Module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def has_lora(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in module.modules())


def apply_train_setup(policy: VLAPolicy, setup) -> dict[str, int]:
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
                f"train_setup.lora_target_modules {list(setup.lora_target_modules)} matched no module in the text decoder"
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
        "trainable parameters: %s of %s (%.1f%%)%s", f"{trainable:,}", f"{total:,}", 100.0 * trainable / max(total, 1),
        " with LoRA" if setup.lora_enable else "",
    )
    return counts


def is_checkpointing(model: nn.Module) -> bool:
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(model, name))


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


def merged_state_dict(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The policy's state dict with any LoRA adapters merged into their base weights.

    Keys are those of a plain (LoRA-free) policy, so ``Policy.load`` needs no peft. Merges in place,
    copies, and unmerges, which avoids a second copy of a 1.6B-parameter model.
    """
    from peft.tuners.lora import LoraLayer

    lora_layers = [m for m in policy.modules() if isinstance(m, LoraLayer)]
    if not lora_layers:
        return {k: v.detach().clone() for k, v in policy.state_dict().items()}
    with torch.no_grad():
        for m in lora_layers:
            m.merge()
        try:
            out = {}
            for k, v in policy.state_dict().items():
                if ".lora_" in k:
                    continue
                out[k.replace(".base_layer.", ".")] = v.detach().clone()
        finally:
            for m in lora_layers:
                m.unmerge()
    return out
