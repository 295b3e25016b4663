"""The policy model: Kosmos-2 backbone + LSTM head and its loss (which parts train: ``vlaops.train.setup``).

Batch contract (the keys and shapes of ``vlaops.data.keys``): ``rgb``/``hand_rgb`` (B, W, 3, S, S)
CLIP-normalised, ``action_chunk`` (B, W, C, A) normalised (arm in [-1, 1], gripper {0, 1}),
``chunk_mask`` (B, W, C) bool, ``text``/``text_mask`` (B, L).

A mobile base (``cfg.action_classes`` K >= 2): ``action_chunk``'s last dim is the action_type class id
(0..K-1, never scaled), the head gives class logits (B, W, C, K) under ``class_logits``, and its loss is a
cross-entropy weighted by ``arm_gripper_loss_ratio`` in place of the gripper's BCE (reported as
``gripper_loss``: the discrete head's loss, whichever it is).
"""

from __future__ import annotations

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
            action_classes=cfg.action_classes,
        )
        # training-only read-outs (model.aux_*: image tokens / action token -> the robot's own state dims);
        # inference never calls them
        self.aux_heads = None
        self._warned_no_aux = False
        if cfg.aux_weight > 0:
            q, d = backbone.model.config.latent_query_num, backbone.hidden_size
            self.aux_heads = nn.ModuleDict(
                {name: nn.Linear(q * d if name == "image_tokens" else d, cfg.aux_target_dim) for name in cfg.aux_inputs}
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
        """features (B, W, D) -> arm (B, W, C, A-1) in [-1, 1], gripper probability (B, W, C, 1)
        (a base: class probabilities (B, W, C, K))."""
        arm, logits = self.head(features)
        if self.cfg.action_classes:
            return arm, torch.softmax(logits.float(), dim=-1)
        return arm, torch.sigmoid(logits)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """batch (keys above) -> loss, arm_loss, gripper_loss (scalars), arm (B, W, C, A-1),
        gripper_logits (B, W, C, 1); with ``aux_weight`` > 0 also aux_loss (the batch then needs
        ``aux_target`` (B, W, K)), already added into loss with its weight, and policy_loss, the loss
        without it (what offline evaluation reports, so runs with and without read-outs compare)."""
        rgb = batch[keys.RGB]  # (B, W, 3, S, S)
        b, w = rgb.shape[:2]
        hand = batch.get(keys.HAND_RGB) if self.cfg.use_hand_rgb else None
        # the instruction is shared by every frame of a window: (B, L) -> (B*W, L)
        text = batch[keys.TEXT].repeat_interleave(w, dim=0)
        text_mask = batch[keys.TEXT_MASK].repeat_interleave(w, dim=0)
        flat_hand = hand.flatten(0, 1) if hand is not None else None
        aux = self.aux_heads is not None and keys.AUX_TARGET in batch
        if self.aux_heads is not None and not aux and self.training and not self._warned_no_aux:
            log.warning(
                "model.aux_weight=%g but the batch has no '%s' (make_window_dataset adds it): "
                "training without the auxiliary read-outs",
                self.cfg.aux_weight,
                keys.AUX_TARGET,
            )
            self._warned_no_aux = True
        if not aux:
            feats = self.encode_frames(rgb.flatten(0, 1), flat_hand, text, text_mask)  # (B*W, D)
        else:
            feats, tokens = self.backbone(rgb.flatten(0, 1), flat_hand, text, text_mask, return_image_tokens=True)
        arm, gripper_logits = self.head(feats.view(b, w, -1))  # (B, W, C, A-1), (B, W, C, 1) (a base: (B, W, C, K))
        losses = self.loss(arm, gripper_logits, batch[keys.ACTION_CHUNK], batch[keys.CHUNK_MASK])
        if aux:
            reads = {
                "image_tokens": lambda: tokens.flatten(1),
                "mean_image_token": lambda: tokens.mean(1),
                "action_token": lambda: feats,
            }  # (B*W, Q*D | D | D)
            target = batch[keys.AUX_TARGET].flatten(0, 1).float()  # (B*W, K)
            k = self.cfg.aux_target_dim
            if target.shape[-1] != k:
                raise ValueError(
                    f"batch '{keys.AUX_TARGET}' has {target.shape[-1]} dims, the read-outs {k} "
                    f"(model.aux_robot_dims {self.cfg.aux_robot_dims}, aux_goal {self.cfg.aux_goal}): build the "
                    "policy from the config train cut to the data (vlaops.data.dataset.aux_dims_from_data)"
                )
            aux_loss = sum(F.mse_loss(head(reads[name]()).float(), target) for name, head in self.aux_heads.items())
            losses = {
                **losses,
                "loss": losses["loss"] + self.cfg.aux_weight * aux_loss,
                "policy_loss": losses["loss"].detach(),
                "aux_loss": aux_loss.detach(),
            }
        if self.cfg.action_classes:
            return {**losses, "arm": arm, "class_logits": gripper_logits}
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
        Each loss is the mean over the valid (b, w, c) steps, chunk step c weighted ``chunk_loss_decay**c``,
        so a step past the episode end (mask False) neither changes the loss nor gets a gradient,
        whatever its target holds.
        """
        keep = mask.bool().unsqueeze(-1)  # (B, W, C, 1)
        # zero the invalid steps' targets first: they may hold anything, even NaN, and a NaN would
        # reach the gradient through the loss's backward even where the result is masked out
        target = torch.where(keep, target.to(arm.dtype), torch.zeros_like(target, dtype=arm.dtype))
        valid = mask.float()  # (B, W, C)
        steps = torch.arange(valid.shape[-1], device=valid.device, dtype=valid.dtype)  # (C,)
        valid = valid * self.cfg.chunk_loss_decay**steps  # chunk step c weighs decay**c (1.0: RoboVLMs' plain mean)
        denom = valid.sum().clamp(min=1e-8)
        if self.cfg.loss == "huber":
            arm_err = F.huber_loss(arm, target[..., :-1], reduction="none")  # (B, W, C, A-1)
        else:
            arm_err = F.mse_loss(arm, target[..., :-1], reduction="none")
        arm_loss = (arm_err.float().mean(-1) * valid).sum() / denom
        if self.cfg.action_classes:  # a base's action_type: class ids in the last dim (0 where masked)
            grip_err = (
                F.cross_entropy(
                    gripper_logits.float().flatten(0, -2), target[..., -1].round().long().flatten(), reduction="none"
                )
                .view(target.shape[:-1])
                .unsqueeze(-1)
            )  # (B, W, C, 1)
        else:
            grip_err = F.binary_cross_entropy_with_logits(
                gripper_logits.float(), target[..., -1:].float(), reduction="none"
            )  # (B, W, C, 1)
        grip_loss = (grip_err.squeeze(-1) * valid).sum() / denom
        total = arm_loss + self.cfg.arm_gripper_loss_ratio * grip_loss
        return {"loss": total, "arm_loss": arm_loss.detach(), "gripper_loss": grip_loss.detach()}
