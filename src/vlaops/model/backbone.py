"""The Kosmos-2 backbone: one frame (+ instruction) in, the hidden state at a learnable action token out.

Follows RoboVLMs' RoboKosmos (robovlms/model/backbone/robokosmos.py ``model_encode_images``) and
BaseRoboVLM (robovlms/model/backbone/base_backbone.py ``forward_continuous``): images go through the
CLIP-like vision tower, ``post_layernorm``, L2 normalisation and the perceiver-style resampler
(``image_to_text_projection``) to Q latent tokens each; they are inserted right after <s>, the
instruction follows, and one learnable action token is appended after the last real text token
(RoboVLMs ``cat_multi_input_ids`` at ``attention_mask.sum(1)``). The Kosmos-2 text decoder runs on those
``inputs_embeds`` with its own embedding scale and sinusoidal positions; the action token's final hidden
state is the frame's feature for the LSTM head ("cont-lstm-post").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Kosmos2Config, Kosmos2Model

from vlaops.errors import VlaopsError
from vlaops.model.config import ModelConfig

KOSMOS2_MODEL_TYPE = "kosmos-2"


def tiny_kosmos_config(cfg: ModelConfig, vocab_size: int) -> Kosmos2Config:
    """The tiny architecture of ``cfg.tiny`` as a real ``Kosmos2Config`` (same classes, random weights)."""
    t = cfg.tiny
    return Kosmos2Config(
        text_config={
            "vocab_size": vocab_size,
            "embed_dim": t.text_embed_dim,
            "layers": t.text_layers,
            "attention_heads": t.text_attention_heads,
            "ffn_dim": t.text_ffn_dim,
            "dropout": t.dropout,
            "attention_dropout": t.dropout,
            "max_position_embeddings": 512,
            "init_std": t.text_init_std,
        },
        vision_config={
            "hidden_size": t.vision_hidden_size,
            "num_hidden_layers": t.vision_layers,
            "num_attention_heads": t.vision_attention_heads,
            "intermediate_size": t.vision_intermediate_size,
            "image_size": cfg.image_size,
            "patch_size": t.patch_size,
            "initializer_factor": t.vision_initializer_factor,
        },
        latent_query_num=t.latent_query_num,
    )


def build_tiny_kosmos(cfg: ModelConfig, vocab_size: int, model_class: type = Kosmos2Model) -> nn.Module:
    """A tiny Kosmos-2 with random weights: ``Kosmos2Model`` for the policy, ``Kosmos2ForConditionalGeneration``
    (its language-model head included) for ``vlaops pretrain``; initialised the same way either way."""
    model = model_class(tiny_kosmos_config(cfg, vocab_size))
    # Kosmos2Config has no key for it: the resampler's patch projection, see TinyKosmosConfig
    nn.init.normal_(model.image_to_text_projection.dense.weight, std=cfg.tiny.image_projection_init_std)
    return model


def check_tiny_architecture(config: Kosmos2Config, cfg: ModelConfig) -> None:
    """One line naming every size in which a pretrained tiny Kosmos-2 differs from ``model.tiny`` and
    ``model.image_size`` (what the policy, its exports and its checkpoints are built from)."""
    want = tiny_kosmos_config(cfg, config.text_config.vocab_size)
    keys = {
        "text_config": ("embed_dim", "layers", "attention_heads", "ffn_dim"),
        "vision_config": (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "patch_size",
            "image_size",
        ),
    }
    differ = [
        f"{part}.{k} {getattr(getattr(config, part), k)} != {getattr(getattr(want, part), k)}"
        for part, names in keys.items()
        for k in names
        if getattr(getattr(config, part), k) != getattr(getattr(want, part), k)
    ]
    if config.latent_query_num != want.latent_query_num:
        differ.append(f"latent_query_num {config.latent_query_num} != {want.latent_query_num}")
    if differ:
        raise VlaopsError(
            f"model.pretrained_dir={cfg.pretrained_dir}: its Kosmos-2 is not the architecture of model.tiny / "
            f"model.image_size ({'; '.join(differ)}); pretrain with these settings (dvc repro pretrain) or set "
            "model.pretrained_dir=null for random weights"
        )


class KosmosBackbone(nn.Module):
    """Kosmos-2 + one action token: (frames, instruction) -> (N, D) features, D = text embed_dim."""

    def __init__(self, model: Kosmos2Model, use_hand_rgb: bool = True):
        super().__init__()
        self.model = model
        self.use_hand_rgb = use_hand_rgb
        self.image_size = model.config.vision_config.image_size
        self.hidden_size = model.config.text_config.embed_dim
        # RoboVLMs base_backbone.py: ``self.action_token = nn.Parameter(torch.zeros(self.hidden_size))``
        self.action_token = nn.Parameter(torch.zeros(self.hidden_size))  # (D,)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_model_config(cls, cfg: ModelConfig, vocab_size: int) -> KosmosBackbone:
        """Tiny random Kosmos-2 (``pretrained_dir`` None) or the local pretrained checkpoint."""
        if cfg.pretrained_dir is None:
            return cls(build_tiny_kosmos(cfg, vocab_size), cfg.use_hand_rgb)
        model = load_pretrained_kosmos(cfg.pretrained_dir)
        if cfg.backbone == "tiny":  # a tiny Kosmos-2 that `vlaops pretrain` trained: model.tiny must describe it
            check_tiny_architecture(model.config, cfg)
        if model.config.vision_config.image_size != cfg.image_size:
            raise VlaopsError(
                f"{cfg.pretrained_dir}: vision image_size {model.config.vision_config.image_size} "
                f"!= model.image_size {cfg.image_size}"
            )
        if model.config.text_config.vocab_size < vocab_size:
            raise VlaopsError(
                f"{cfg.pretrained_dir}: text vocab_size {model.config.text_config.vocab_size} is smaller "
                f"than the processor's tokenizer ({vocab_size}); use the processor from the same directory"
            )
        return cls(model, cfg.use_hand_rgb)

    @classmethod
    def from_kosmos_config(cls, config: Kosmos2Config, use_hand_rgb: bool) -> KosmosBackbone:
        """The architecture only (weights come from a state dict afterwards): the saved-policy path."""
        return cls(Kosmos2Model(config), use_hand_rgb)

    # ---- the submodules that TrainSetupConfig flags act on -----------------------------------------
    @property
    def vision_encoder(self) -> nn.Module:
        return self.model.vision_model

    @property
    def resampler(self) -> nn.Module:
        return self.model.image_to_text_projection

    @property
    def text_embeddings(self) -> nn.Embedding:
        return self.model.text_model.model.embed_tokens

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.text_model.model.layers

    @property
    def vision_layers(self) -> nn.ModuleList:
        return self.model.vision_model.model.encoder.layers

    @property
    def text_decoder(self) -> nn.Module:
        return self.model.text_model

    @property
    def num_image_tokens(self) -> int:
        """Q latent tokens per image times the number of cameras."""
        return self.model.config.latent_query_num * (2 if self.use_hand_rgb else 1)

    # ---- forward ------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) CLIP-normalised -> (N, Q, D) image embeddings, via Kosmos2Model.get_image_features
        (vision tower, post_layernorm, L2 normalise, resampler) exactly as Kosmos-2 itself does."""
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            pixel_values = F.interpolate(
                pixel_values, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        dtype = self.model.image_to_text_projection.dense.weight.dtype
        out = self.model.get_image_features(pixel_values.to(dtype), return_dict=True)
        return out.pooler_output  # (N, Q, D)

    def forward(
        self,
        rgb: torch.Tensor,
        hand_rgb: torch.Tensor | None,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        return_image_tokens: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Per-frame features.

        rgb: (N, 3, S, S); hand_rgb: (N, 3, s, s) or None; text, text_mask: (N, L) right-padded
        "<s> ... </s>" ids and their mask. Returns (N, D), the action token's last hidden state, and with
        ``return_image_tokens`` also the static camera's image tokens (N, Q, D), the resampler's output
        that the decoder reads (the auxiliary read-outs, model.aux_inputs, supervise them).
        """
        n = rgb.shape[0]
        if self.use_hand_rgb:
            if hand_rgb is None:
                raise ValueError("use_hand_rgb is set but no hand_rgb was given")
            if hand_rgb.shape[-2:] != rgb.shape[-2:]:
                hand_rgb = F.interpolate(hand_rgb, size=rgb.shape[-2:], mode="bilinear", align_corners=False)
            images = self.encode_images(torch.cat([rgb, hand_rgb], dim=0))  # (2N, Q, D)
            q = images.shape[1]
            images = images.view(2, n, q, -1).permute(1, 0, 2, 3).reshape(n, 2 * q, -1)  # (N, 2Q, D) static, gripper
        else:
            images = self.encode_images(rgb)  # (N, Q, D)
        static_tokens = images[:, : self.model.config.latent_query_num]  # (N, Q, D)

        tok = self.text_embeddings(text)  # (N, L, D), unscaled: the decoder applies embed_scale
        images = images.to(tok.dtype)
        text_mask = text_mask.to(torch.long)
        seq = torch.cat([tok[:, :1], images, tok[:, 1:]], dim=1)  # (N, S, D), S = 1 + nQ + L - 1
        mask = torch.cat([text_mask[:, :1].new_ones(n, 1 + images.shape[1]), text_mask[:, 1:]], dim=1)  # (N, S)

        # insert the action token right after the last real token (RoboVLMs cat_multi_input_ids)
        s = seq.shape[1]
        insert = mask.sum(dim=1)  # (N,) index of the first pad == number of real tokens
        pos = torch.arange(s + 1, device=seq.device).unsqueeze(0)  # (1, S+1)
        src = (pos - (pos > insert[:, None]).long()).clamp_(max=s - 1)  # (N, S+1) source index in seq
        is_act = pos == insert[:, None]  # (N, S+1)
        gathered = seq.gather(1, src.unsqueeze(-1).expand(-1, -1, seq.shape[-1]))  # (N, S+1, D)
        action = self.action_token.to(seq.dtype).view(1, 1, -1)
        embeds = torch.where(is_act.unsqueeze(-1), action, gathered)  # (N, S+1, D)
        attn = torch.where(is_act, torch.ones_like(src), mask.gather(1, src))  # (N, S+1)

        hidden = self.model.text_model(
            inputs_embeds=embeds, attention_mask=attn, use_cache=False, return_dict=True
        ).last_hidden_state  # (N, S+1, D)
        features = hidden[torch.arange(n, device=hidden.device), insert]  # (N, D)
        return (features, static_tokens) if return_image_tokens else features


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


# What makes a vocabulary Kosmos-2's: the grounding tags and the 32x32 grid of location tokens that
# Kosmos2Processor adds (a grounded caption reads "<phrase> a red block</phrase><object><patch_index_0101>
# <patch_index_0167></object>"). A checkpoint whose tokenizer lacks them has never learned grounding.
GROUNDING_TOKENS = ("<grounding>", "<phrase>", "</phrase>", "<object>", "</object>")
NUM_LOCATION_TOKENS = 1024
LOCATION_TOKENS = tuple(f"<patch_index_{i:04d}>" for i in range(NUM_LOCATION_TOKENS))


def check_pretrained_dir(path: str | os.PathLike[str]) -> Path:
    """Fail before any work with what a local Kosmos-2 checkpoint directory lacks, named in one line: its
    files, a config of another model type, a tokenizer without Kosmos-2's grounding and location tokens."""
    path = Path(path)
    expected = (
        "expected a local copy of microsoft/kosmos-2-patch14-224 or the output of `vlaops pretrain` "
        "(config.json, weights, tokenizer files)"
    )
    if not path.is_dir():
        raise VlaopsError(f"model.pretrained_dir={path}: directory not found; {expected}")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES[::2]))
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    if missing:
        raise VlaopsError(f"model.pretrained_dir={path}: no {', no '.join(missing)}; {expected}")
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise VlaopsError(
            f"model.pretrained_dir={path}: config.json is not a JSON object ({exc}); {expected}"
        ) from None
    if model_type != KOSMOS2_MODEL_TYPE:
        raise VlaopsError(
            f"model.pretrained_dir={path}: config.json has model_type {model_type!r}, not {KOSMOS2_MODEL_TYPE!r}; "
            f"{expected}"
        )
    _check_grounding_vocabulary(path)
    return path


def _check_grounding_vocabulary(path: Path) -> None:
    """The saved tokenizer itself (not Kosmos2Processor, which would add what it lacks at load) must hold
    the grounding tags and every location token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise VlaopsError(f"model.pretrained_dir={path}: cannot load its tokenizer ({exc})") from None
    vocab = tokenizer.get_vocab()
    lacking = [t for t in (*GROUNDING_TOKENS, *LOCATION_TOKENS) if t not in vocab]
    if lacking:
        raise VlaopsError(
            f"model.pretrained_dir={path}: the tokenizer lacks {len(lacking)} of Kosmos-2's grounding and location "
            f"tokens (e.g. {', '.join(lacking[:3])}); expected a Kosmos-2 tokenizer with {', '.join(GROUNDING_TOKENS)} "
            f"and <patch_index_0000>..<patch_index_{NUM_LOCATION_TOKENS - 1:04d}> (Kosmos2Processor.save_pretrained "
            "writes them)"
        )


def load_pretrained_kosmos(path: str | os.PathLike[str]) -> Kosmos2Model:
    """``Kosmos2Model`` from a local microsoft/kosmos-2-patch14-224 directory; never the hub."""
    path = check_pretrained_dir(path)
    try:
        return Kosmos2Model.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise VlaopsError(f"{path}: cannot load Kosmos-2 weights ({exc})") from exc
