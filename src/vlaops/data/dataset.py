"""Sliding-window training samples over a CALVIN split, in the RoboVLMs custom-dataset contract.

Each sample is a window of W frames inside one language-annotated span, with the C actions that
follow every window frame (RoboVLMs' ``fwd_pred_next_n`` chunk), masked past the span's end. With
``pad_history`` the span's start also ends W - 1 windows, left-padded by repeating its first frame (the
padded positions carry no loss), as ``PolicyRuntime`` fills its history at an episode's first step.
Images come from the split's packed frame cache (data/frame_cache.py: decoded and resized once) when
one is given, else from the per-frame npz files as RoboVLMs' loader reads them; both give the same
bits. :func:`make_window_dataset` is the one construction train and evaluate share.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset

from vlaops.data import keys
from vlaops.data.config import AugmentConfig
from vlaops.data.frame_cache import IMAGE_KEYS, FrameCache, open_frame_cache
from vlaops.data.normalization import ActionNormalizer
from vlaops.data.sampling import SampleKey, as_key, sample_generator
from vlaops.data.tokens import tokenize
from vlaops.data.transforms import augment_to_model_input, normalize_uint8, resize_uint8
from vlaops.errors import VlaopsError
from vlaops.io.calvin import STATISTICS, CalvinSplit
from vlaops.utils.logging import get_logger

log = get_logger(__name__)

Tokenize = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]  # texts -> ids (B, L), mask (B, L)
DATA_SOURCE = "calvin_action"
ROBOT_OBS = "robot_obs"


class WindowSettings(Protocol):
    """The ``model.*`` keys the windows are cut by (their meaning: ``vlaops.model.config.ModelConfig``,
    which satisfies this protocol; the model imports the data package, never the other way round)."""

    window_size: int
    fwd_pred_next_n: int
    image_size: int
    max_text_len: int
    pad_history: bool
    aux_weight: float
    aux_robot_dims: list[int]
    aux_goal: bool


Settings = TypeVar("Settings", bound=WindowSettings)


class CalvinWindowDataset(Dataset):
    """Windows of ``window_size`` frames; actions normalised by the shared :class:`ActionNormalizer`.

    Samples collate with torch's default collation: tensors stack along a new batch dim, the two
    string keys become lists of length B. A sample is addressed by a :class:`SampleKey` (what the
    training sampler yields) or a plain index (epoch 0, seed 0); its augmentation draws from a generator
    derived from the key alone, so the same key gives the same bits in any process, at any time
    (data/sampling.py says why resume needs that).
    """

    def __init__(
        self,
        split: CalvinSplit,
        normalizer: ActionNormalizer,
        tokenize: Tokenize,
        window_size: int,
        chunk_size: int,
        image_size: int,
        augment: AugmentConfig | None = None,
        frames: FrameCache | None = None,
        pad_history: bool = False,
        aux_dims: list[int] | None = None,
        aux_goal: bool = False,
    ) -> None:
        if frames is not None and frames.image_size != image_size:
            raise VlaopsError(
                f"{frames.dir}: frame cache at {frames.image_size} px, the model expects {image_size} "
                "(model.image_size)"
            )
        self.split = split
        self.frames = frames
        self.window_size = window_size
        self.chunk_size = chunk_size
        self.image_size = image_size
        self.augment = augment
        self.pad_history = pad_history
        anns = [a for a in split.annotations if a.end - a.start + 1 >= window_size]
        if not anns:
            raise VlaopsError(
                f"{split.dir}: no annotated span has the {window_size} frames a window needs (model.window_size)"
            )
        self.annotations = anns
        # The auxiliary target (model.aux_robot_dims): (n, K) per span, standardised by statistics.yaml, whose
        # observation mean/std convert writes from the training split into both splits; with aux_goal (n, 2K),
        # each frame's dims followed by the span's last frame's (where the subtask ends).
        standardise = _AuxStandardiser(split, aux_dims, aux_goal) if aux_dims else None
        obs_keys = (ROBOT_OBS,) if standardise is not None else ()
        # Every frame's npz is opened once here, for its action and the read-outs' observations together.
        spans = [[split.load_frame(i, ("rel_actions", *obs_keys)) for i in range(a.start, a.end + 1)] for a in anns]
        # (n, A) normalised actions per span, read once: a window needs W + C - 1 of them.
        self.actions = [
            normalizer.normalize(np.stack([f["rel_actions"] for f in frames])).astype(np.float32) for frames in spans
        ]
        self.aux = [standardise(frames) for frames in spans] if standardise is not None else None
        texts = sorted({a.instruction for a in anns})
        ids, mask = tokenize(texts)
        self.tokens = {t: (ids[i], mask[i]) for i, t in enumerate(texts)}
        # (span, offset of the window's first frame); a negative offset is a left-padded window
        first = 1 - window_size if pad_history else 0
        self.index = [(k, t) for k, a in enumerate(anns) for t in range(first, a.end - a.start + 2 - window_size)]
        self.first_row = (
            [frames.row(a.start) for a in anns] if frames is not None else None
        )  # cache row of each span's start

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any]:
        key = as_key(key)
        k, t = self.index[key.index]
        ann, acts = self.annotations[k], self.actions[k]
        w, c = self.window_size, self.chunk_size
        pad = max(0, -t)  # leading positions that repeat the span's first frame
        if self.frames is not None:  # resized once, at build time: (W, 3, S, S) uint8 slices of the memmaps
            images = {
                key: torch.from_numpy(v) for key, v in self.frames.window(self.first_row[k] + t + pad, w - pad).items()
            }
        else:  # RoboVLMs' way: one compressed npz per frame, inflated and resized for every sample
            frames = [self.split.load_frame(ann.start + t + i, IMAGE_KEYS) for i in range(pad, w)]
            images = {
                key: resize_uint8(torch.from_numpy(np.stack([f[key] for f in frames])), self.image_size)
                for key in IMAGE_KEYS
            }
        if pad:
            images = {key: torch.cat([v[:1].expand(pad, *v.shape[1:]), v]) for key, v in images.items()}  # (W, 3, S, S)
        if self.augment is not None:
            a, g = self.augment, sample_generator(key)
            rgb = augment_to_model_input(
                images["rgb_static"], a.rgb_pad, a.brightness, a.contrast, a.saturation, g
            )  # (W, 3, S, S)
            hand = augment_to_model_input(
                images["rgb_gripper"], a.gripper_pad, a.brightness, a.contrast, a.saturation, g
            )
        else:
            rgb, hand = normalize_uint8(images["rgb_static"]), normalize_uint8(images["rgb_gripper"])  # (W, 3, S, S)
        chunk = np.zeros((w, c, acts.shape[1]), dtype=np.float32)  # (W, C, A)
        mask = np.zeros((w, c), dtype=bool)  # (W, C)
        for i in range(pad, w):
            future = acts[t + i : t + i + c]
            chunk[i, : len(future)] = future
            mask[i, : len(future)] = True
        ids, text_mask = self.tokens[ann.instruction]
        extra = {}
        if self.aux is not None:  # padded positions repeat the first frame, whose state they show
            extra[keys.AUX_TARGET] = torch.from_numpy(self.aux[k][np.maximum(np.arange(t, t + w), 0)])  # (W, K)
        return {
            **extra,
            keys.RGB: rgb,
            keys.HAND_RGB: hand,
            keys.ACTION: torch.from_numpy(acts[np.maximum(np.arange(t, t + w), 0)]),
            keys.ACTION_CHUNK: torch.from_numpy(chunk),
            keys.CHUNK_MASK: torch.from_numpy(mask),
            keys.TEXT: ids,
            keys.TEXT_MASK: text_mask,
            keys.RAW_TEXT: ann.instruction,
            keys.DATA_SOURCE: DATA_SOURCE,
        }


def _varies(std: float) -> bool:
    """A dim the read-outs can regress: its training-split std is above round-off (a constant is not)."""
    return std > 1e-6


def aux_dims_from_data(model_cfg: Settings, split: CalvinSplit) -> Settings:
    """``model_cfg`` with the auxiliary target (``aux_robot_dims``) cut to the dims that vary in ``split``'s
    statistics.yaml, as train sets the head's action space from the data.

    A dim that never varies is a constant the read-out's bias learns, and cannot be standardised; a
    mobile base (no robot_obs) has none that vary, and the read-outs are then off (model.aux_weight 0),
    said in one warning. The export's policy_config.json keeps what was trained."""
    if model_cfg.aux_weight <= 0:
        return model_cfg
    std = (split.statistics().get(ROBOT_OBS) or [{}])[0].get("std")
    dims = model_cfg.aux_robot_dims
    kept = [d for d in dims if std is not None and _varies(float(std[d]))]
    if kept != list(dims):
        log.warning(
            "%s: robot_obs dims %s never vary in the training split: the auxiliary read-outs leave them out "
            "(model.aux_robot_dims)",
            split.dir / STATISTICS,
            sorted(set(dims) - set(kept)),
        )
    if not kept:
        log.warning(
            "model.aux_weight=%g but no auxiliary target varies in %s: the read-outs are off",
            model_cfg.aux_weight,
            split.dir,
        )
        return dataclasses.replace(model_cfg, aux_weight=0.0, aux_goal=False)
    return dataclasses.replace(model_cfg, aux_robot_dims=kept)


def words_named(instruction: str, words: Sequence[str]) -> list[int]:
    """Indices of the ``words`` that occur in ``instruction`` as whole words, case aside."""
    tokens = set(re.findall(r"[a-z0-9]+", instruction.lower()))
    return [i for i, w in enumerate(words) if w.lower() in tokens]


class _AuxStandardiser:
    """Turns a span's loaded frames into the read-outs' target: the robot_obs dims ``dims``, standardised
    by the split's statistics.yaml."""

    def __init__(self, split: CalvinSplit, dims: list[int], goal: bool = False) -> None:
        where = split.dir / STATISTICS
        vec = (split.statistics().get(ROBOT_OBS) or [{}])[0]
        if "mean" not in vec or "std" not in vec:
            raise VlaopsError(
                f"{where}: no robot_obs mean/std; model.aux_weight > 0 needs an arm dataset with robot_obs"
            )
        self.dims, self.goal = list(dims), goal
        self.mu, self.sigma = np.asarray(vec["mean"])[self.dims], np.asarray(vec["std"])[self.dims]
        flat = [d for d, v in zip(self.dims, self.sigma) if not _varies(v)]
        if flat:  # aux_dims_from_data cuts these for train; a caller that skipped it is told here
            raise VlaopsError(
                f"{where}: robot_obs dims {flat} never vary in the training split (std 0): the recordings carry no "
                "such state; set model.aux_weight=0 or model.aux_robot_dims to dims that do"
            )

    def __call__(self, frames: list[dict[str, np.ndarray]]) -> np.ndarray:
        """frames of one span, each with robot_obs -> (n, K) float32, or (n, 2K) with the span's last frame's."""
        now = ((np.stack([f[ROBOT_OBS][self.dims] for f in frames]) - self.mu) / self.sigma).astype(np.float32)
        if not self.goal:
            return now  # (n, K)
        return np.concatenate([now, np.broadcast_to(now[-1], now.shape)], axis=1)  # (n, 2K)


def make_window_dataset(
    split: CalvinSplit,
    normalizer: ActionNormalizer,
    processor: Any,
    model_cfg: WindowSettings,
    augment: AugmentConfig | None,
    cache_dir: str | os.PathLike[str] | None,
) -> CalvinWindowDataset:
    """The window dataset of ``split`` as the model ``model_cfg`` reads it (window, chunk, image size,
    text length), tokenised by ``processor``; images from the frame cache under ``cache_dir`` (built
    or reused here), or from the npz files when ``cache_dir`` is None; the auxiliary targets
    (``model.aux_robot_dims``) those that vary in the split (:func:`aux_dims_from_data`). Train and evaluate
    both call this, so their samples cannot drift apart."""
    frames = open_frame_cache(split, model_cfg.image_size, cache_dir) if cache_dir is not None else None
    aux_cfg = aux_dims_from_data(model_cfg, split)  # a no-op on the config train cut the same way
    return CalvinWindowDataset(
        split,
        normalizer,
        partial(tokenize, processor, max_len=model_cfg.max_text_len),
        model_cfg.window_size,
        model_cfg.fwd_pred_next_n,
        model_cfg.image_size,
        augment,
        frames,
        model_cfg.pad_history,
        aux_cfg.aux_robot_dims if aux_cfg.aux_weight > 0 else None,
        aux_cfg.aux_goal,
    )
