"""The exported policy and its runtime: ``save_policy`` writes it, ``PolicyRuntime`` runs it step by step.

An export directory carries everything needed to act, and nothing from the training tree:

    model.safetensors      the policy state dict (LoRA merged: ``merged_state_dict``)
    backbone_config.json   Kosmos2Config.to_dict(): rebuilds the tiny or real architecture offline
    policy_config.json     the ModelConfig dict + format_version
    processor/             Kosmos2Processor.save_pretrained (AutoProcessor reloads it)
    normalization.json     the ActionNormalizer (same object training used)
    <name>.json            each ``extra`` dict (train config, data fingerprint, MLflow run id, ...)

``PolicyRuntime`` has the interface CALVIN's evaluator calls (calvin_models/calvin_agent/evaluation/
evaluate_policy.py: ``model.reset()``, ``model.step(obs, lang_annotation)``). It runs the backbone
once per prediction on the frames that arrived since the last one, caches earlier frames' features
(the backbone is per-frame, so a cached feature equals a recomputed one), and runs the LSTM head over
the last ``window_size`` of them; with ``pad_history`` an episode's first frame fills the whole window,
as the training windows that end at a span's start are padded. Which action of the predicted chunks it
runs is its ``Execution`` (``vlaops.model.execution``: ``first``, the default, predicts every step and
runs the chunk's first action).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import Kosmos2Config

from vlaops.data.normalization import NORMALIZATION_FILE, ActionNormalizer
from vlaops.data.tokens import tokenize
from vlaops.data.transforms import to_model_input
from vlaops.errors import VlaopsError
from vlaops.model.backbone import KosmosBackbone
from vlaops.model.config import ModelConfig
from vlaops.model.execution import ChunkExecutor, Execution
from vlaops.model.policy import VLAPolicy
from vlaops.model.processor import load_processor
from vlaops.utils.atomic import atomic_dir, write_json
from vlaops.utils.logging import get_logger

log = get_logger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
BACKBONE_CONFIG_FILE = "backbone_config.json"
POLICY_CONFIG_FILE = "policy_config.json"
PROCESSOR_DIR = "processor"
REQUIRED = (WEIGHTS_FILE, BACKBONE_CONFIG_FILE, POLICY_CONFIG_FILE, PROCESSOR_DIR, NORMALIZATION_FILE)


def _plain(obj: Any) -> Any:
    """A dataclass, OmegaConf node or mapping -> plain JSON-able dicts and lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(obj):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:
        pass
    return dict(obj) if isinstance(obj, dict) else obj


def merged_state_dict(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The policy's state dict with any LoRA adapters merged into their base weights.

    Keys are those of a plain (LoRA-free) policy, so ``PolicyRuntime.load`` needs no peft. Merges in place,
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


def save_canonical(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``save_file``, then its JSON header rewritten with sorted keys: safetensors writes the metadata in a
    per-process hash order, so the same weights would otherwise give different bytes (and DVC hashes) from
    run to run. Tensor offsets are relative to the data after the header, so only the header changes."""
    save_file(state, str(path), metadata=metadata)
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8 : 8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors pads its header with spaces to 8 bytes
    path.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + size :])


def save_policy(
    out_dir: str | os.PathLike[str],
    policy: VLAPolicy,
    processor: Any,
    normalizer: ActionNormalizer,
    model_cfg: dict[str, Any] | ModelConfig,
    extra: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write the export directory atomically (a crash leaves the previous export or none)."""
    extra = extra or {}
    reserved = {Path(f).stem for f in REQUIRED}
    for name in extra:
        if name in reserved or not name or "/" in name or name.startswith("."):
            raise ValueError(f"save_policy: extra name {name!r} is reserved or not a plain file name")
    cfg_dict = _plain(model_cfg)
    ModelConfig(**cfg_dict)  # fail before writing anything if it would not load back
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        state = {k: v.contiguous().cpu() for k, v in merged_state_dict(policy).items()}
        save_canonical(state, tmp / WEIGHTS_FILE, {"format": "pt", "vlaops_format_version": str(FORMAT_VERSION)})
        write_json(tmp / BACKBONE_CONFIG_FILE, policy.backbone.model.config.to_dict())
        write_json(tmp / POLICY_CONFIG_FILE, {"format_version": FORMAT_VERSION, "model": cfg_dict})
        processor.save_pretrained(str(tmp / PROCESSOR_DIR))
        normalizer.save(tmp / NORMALIZATION_FILE)
        for name, payload in extra.items():
            write_json(tmp / f"{name}.json", _plain(payload))
    log.info("saved policy to %s (%s tensors)", out_dir, len(state))
    return out_dir


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise VlaopsError(f"{path}: not valid JSON ({exc})") from exc


def load_policy_model(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[VLAPolicy, Any, ActionNormalizer]:
    """(policy in eval mode on ``device``, processor, normalizer) from an export directory."""
    path = Path(path)
    if not path.is_dir():
        raise VlaopsError(f"{path}: policy directory not found")
    missing = [name for name in REQUIRED if not (path / name).exists()]
    if missing:
        raise VlaopsError(f"{path}: not a complete policy export; missing {', '.join(missing)}")
    pcfg = _read_json(path / POLICY_CONFIG_FILE)
    if pcfg.get("format_version") != FORMAT_VERSION:
        raise VlaopsError(
            f"{path / POLICY_CONFIG_FILE}: format_version {pcfg.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    try:
        cfg = ModelConfig(**pcfg["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise VlaopsError(f"{path / POLICY_CONFIG_FILE}: bad model config ({exc})") from exc
    kcfg = Kosmos2Config.from_dict(_read_json(path / BACKBONE_CONFIG_FILE))
    policy = VLAPolicy(cfg, KosmosBackbone.from_kosmos_config(kcfg, cfg.use_hand_rgb))
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError) as exc:  # truncated, corrupt or unreadable: say which file
        raise VlaopsError(
            f"{path / WEIGHTS_FILE}: not a readable safetensors file ({exc}); re-export the policy"
        ) from None
    try:
        policy.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise VlaopsError(f"{path / WEIGHTS_FILE}: weights do not match the saved architecture ({exc})") from exc
    processor = load_processor(path / PROCESSOR_DIR)
    normalizer = ActionNormalizer.load(path / NORMALIZATION_FILE)
    if normalizer.action_classes != cfg.action_classes:  # a head that cannot read these actions
        raise VlaopsError(
            f"{path}: the policy's head has action_classes={cfg.action_classes}, its normalisation "
            f"{normalizer.action_classes}; re-export the policy"
        )
    return policy.to(device).eval(), processor, normalizer


def _camera(obs: dict[str, Any], key: str) -> np.ndarray | None:
    """obs["rgb_static"] or CALVIN's obs["rgb_obs"]["rgb_static"]."""
    if key in obs:
        return obs[key]
    nested = obs.get("rgb_obs")
    if isinstance(nested, dict) and key in nested:
        return nested[key]
    return None


class PolicyRuntime:
    """Closed-loop runtime of an exported policy: ``reset()``, then ``step(obs, instruction) -> (7,)
    relative action``; ``encode`` is the per-frame backbone step that ``step`` caches.

    ``execution`` says which action of the predicted chunks each step runs (default ``first``). In
    ``chunk`` mode the model runs once per k steps, yet every frame observed in between still enters the
    window history: its images are prepared when it arrives and encoded, all of them in one backbone
    call, when the next chunk is predicted, so that prediction sees the frames that passed, as the
    training windows (consecutive frames) do.
    """

    def __init__(
        self,
        model: VLAPolicy,
        processor: Any,
        normalizer: ActionNormalizer,
        device: str | torch.device = "cpu",
        execution: Execution | None = None,
    ):
        self.model = model.to(device).eval()
        self.processor = processor
        self.normalizer = normalizer
        self.device = torch.device(device)
        self.cfg: ModelConfig = model.cfg
        self.window_size = self.cfg.window_size
        self.execution = execution or Execution()
        try:
            self.executor = ChunkExecutor(self.execution, self.cfg.fwd_pred_next_n)
        except ValueError as exc:  # chunk_steps past this policy's chunk
            raise VlaopsError(str(exc)) from None
        self._features: deque[torch.Tensor] = deque(maxlen=self.window_size)  # each (1, D)
        self._pending: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # frames not yet encoded: (1, 3, S, S)
        self._instruction: str | None = None
        self._text: tuple[torch.Tensor, torch.Tensor] | None = None  # (1, L) ids, (1, L) mask

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], device: str | torch.device = "cpu", execution: Execution | None = None
    ) -> PolicyRuntime:
        model, processor, normalizer = load_policy_model(path, device)
        log.info("loaded policy from %s on %s", path, device)
        return cls(model, processor, normalizer, device, execution)

    def with_execution(self, execution: Execution | None) -> PolicyRuntime:
        """A runtime over the same weights, processor and normaliser with a history of its own, running
        chunks as ``execution`` says (a served session, an MLflow predict call)."""
        return PolicyRuntime(self.model, self.processor, self.normalizer, self.device, execution)

    def reset(self) -> None:
        """Start a new episode or subtask: forget the window history and every predicted chunk."""
        self._features.clear()
        self._pending.clear()
        self.executor.reset()
        self._instruction = None
        self._text = None

    def text(self, instruction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The instruction's token ids and mask, (1, L) each, on the device (tokenised once per instruction).

        An instruction other than the current one forgets the history and the chunks: the cached
        features were computed with the old text, and the chunks' actions were for the old task."""
        if instruction != self._instruction:
            self._features.clear()
            self._pending.clear()
            self.executor.reset()
            ids, mask = tokenize(self.processor, [instruction], self.cfg.max_text_len)  # (1, L) each
            self._text = (ids.to(self.device), mask.to(self.device))
            self._instruction = instruction
        return self._text

    def images(self, obs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """obs -> the backbone's image inputs on the device: rgb_static (1, 3, S, S), and rgb_gripper
        (1, 3, S, S) when the policy uses it, else None (resized and CLIP-normalised as in training)."""
        rgb = self._image(obs, "rgb_static")
        return rgb, self._image(obs, "rgb_gripper") if self.cfg.use_hand_rgb else None

    def _image(self, obs: dict[str, Any], key: str) -> torch.Tensor:
        img = _camera(obs, key)
        if img is None:
            raise VlaopsError(f"observation has no {key!r} (flat or under 'rgb_obs')")
        img = np.asarray(img)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
            raise VlaopsError(f"observation {key!r}: expected uint8 (H, W, 3), got {img.dtype} {img.shape}")
        x = to_model_input(torch.from_numpy(np.ascontiguousarray(img))[None], self.cfg.image_size)  # (1, 3, S, S)
        return x.to(self.device)

    @torch.inference_mode()
    def encode(self, obs: dict[str, Any], instruction: str) -> torch.Tensor:
        """obs with ``rgb_static`` (H, W, 3) u8 (and ``rgb_gripper`` when the policy uses it) -> the
        frame's features (1, D): one backbone call, on this frame only.

        The history is not touched, except that an instruction other than the current one forgets it
        (``text``).
        """
        ids, mask = self.text(instruction)  # (1, L) each
        rgb, hand = self.images(obs)  # (1, 3, S, S) each, hand None without use_hand_rgb
        return self.model.encode_frames(rgb, hand, ids, mask)  # (1, D)

    @torch.inference_mode()
    def step(self, obs: dict[str, Any], instruction: str) -> np.ndarray:
        """obs with ``rgb_static`` (H, W, 3) u8 (and ``rgb_gripper`` when the policy uses it) -> (7,) float64.

        The action is relative, in CALVIN units: arm in [-1, 1] scaled by the normaliser's
        [norm_min, norm_max] range, gripper -1 (close) or 1 (open). A step that predicts runs the backbone
        once, over this frame and any frames that arrived since the last prediction, and the head once.
        """
        ids, mask = self.text(instruction)  # (1, L) each; a new instruction forgets the history
        self._pending.append(self.images(obs))  # (1, 3, S, S) each
        chunk = None
        if self.executor.needs_chunk():
            n = len(self._pending)
            rgb = torch.cat([r for r, _ in self._pending])  # (n, 3, S, S)
            hand = torch.cat([h for _, h in self._pending]) if self.cfg.use_hand_rgb else None
            self._pending.clear()
            feats = self.model.encode_frames(rgb, hand, ids.repeat(n, 1), mask.repeat(n, 1))  # (n, D)
            for feat in feats.split(1):  # each (1, D), oldest first
                if not self._features and self.cfg.pad_history:  # the first frame fills the history, as in training
                    self._features.extend([feat] * (self.window_size - 1))
                self._features.append(feat)
            window = torch.stack(list(self._features), dim=1)  # (1, w, D), w <= window_size
            chunk = self.chunk_from_features(window)  # (C, A-1 + 1 | K)
        return self.decide(self.executor.step(chunk))

    @torch.inference_mode()
    def chunk_from_features(self, window: torch.Tensor) -> np.ndarray:
        """(1, w, D) frame features, newest last -> the chunk predicted at the newest frame, (C, A-1 + 1)
        float32: the arm in [-1, 1] and the gripper's probability (a mobile base: (C, A-1 + K), the
        action_type class probabilities)."""
        arm, grip = self.model.predict_from_features(window)  # (1, w, C, A-1), (1, w, C, 1 | K)
        return torch.cat([arm[0, -1].float(), grip[0, -1].float()], dim=-1).cpu().numpy()  # (C, A-1 + 1 | K)

    def decide(self, row: np.ndarray) -> np.ndarray:
        """One row of a chunk (or of an ensemble of them), (A-1 + 1 | K,) -> the (A,) float64 relative
        action: the arm denormalised, the gripper +1 where its probability exceeds the normaliser's
        threshold, else -1 (a mobile base: velocities and the most probable action_type's class id)."""
        row = np.asarray(row, dtype=np.float64)
        if self.cfg.action_classes:
            a = self.cfg.action_dim - 1
            row = np.concatenate([row[:a], [float(np.argmax(row[a:]))]])  # (A,)
        return self.normalizer.denormalize(row)

    @torch.inference_mode()
    def action_from_features(self, window: torch.Tensor) -> np.ndarray:
        """(1, w, D) frame features, newest last -> the (7,) relative action of ``first``: the first
        action of the chunk predicted at the newest frame, denormalised (a mobile base: (4,) linear_x m/s,
        linear_y m/s, angular_z rad/s and the action_type class id). The history is not touched."""
        return self.decide(self.chunk_from_features(window)[0])
