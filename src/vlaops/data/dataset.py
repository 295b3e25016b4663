"""Sliding-window training samples over a CALVIN split, in the RoboVLMs custom-dataset contract.

Each sample is a window of W frames inside one language-annotated span, with the C actions that
follow every window frame (RoboVLMs' ``fwd_pred_next_n`` chunk), masked past the span's end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vlaops.data import keys
from vlaops.data.config import AugmentConfig
from vlaops.data.normalization import ActionNormalizer
from vlaops.data.transforms import color_jitter, random_shift, to_model_input
from vlaops.errors import VlaopsError
from vlaops.io.calvin import CalvinSplit

Tokenize = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]  # texts -> ids (B, L), mask (B, L)
DATA_SOURCE = "calvin_action"


class CalvinWindowDataset(Dataset):
    """Windows of ``window_size`` frames; actions normalised by the shared :class:`ActionNormalizer`.

    Samples collate with torch's default collation: tensors stack along a new batch dim, the two
    string keys become lists of length B.
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
    ) -> None:
        self.split = split
        self.window_size = window_size
        self.chunk_size = chunk_size
        self.image_size = image_size
        self.augment = augment
        anns = [a for a in split.annotations if a.end - a.start + 1 >= window_size]
        if not anns:
            raise VlaopsError(
                f"{split.dir}: no annotated span has the {window_size} frames a window needs (model.window_size)"
            )
        self.annotations = anns
        # (n, A) normalised actions per span, read once: a window needs W + C - 1 of them.
        self.actions = [
            normalizer.normalize(
                np.stack([split.load_frame(i, ("rel_actions",))["rel_actions"] for i in range(a.start, a.end + 1)])
            ).astype(np.float32)
            for a in anns
        ]
        texts = sorted({a.instruction for a in anns})
        ids, mask = tokenize(texts)
        self.tokens = {t: (ids[i], mask[i]) for i, t in enumerate(texts)}
        self.index = [(k, t) for k, a in enumerate(anns) for t in range(a.end - a.start + 2 - window_size)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        k, t = self.index[idx]
        ann, acts = self.annotations[k], self.actions[k]
        w, c = self.window_size, self.chunk_size
        frames = [self.split.load_frame(ann.start + t + i, ("rgb_static", "rgb_gripper")) for i in range(w)]
        rgb = to_model_input(torch.from_numpy(np.stack([f["rgb_static"] for f in frames])), self.image_size)  # (W, 3, S, S)
        hand = to_model_input(torch.from_numpy(np.stack([f["rgb_gripper"] for f in frames])), self.image_size)
        if self.augment is not None:
            a = self.augment
            rgb = color_jitter(random_shift(rgb, a.rgb_pad), a.brightness, a.contrast, a.saturation)
            hand = color_jitter(random_shift(hand, a.gripper_pad), a.brightness, a.contrast, a.saturation)
        chunk = np.zeros((w, c, acts.shape[1]), dtype=np.float32)  # (W, C, A)
        mask = np.zeros((w, c), dtype=bool)  # (W, C)
        for i in range(w):
            future = acts[t + i : t + i + c]
            chunk[i, : len(future)] = future
            mask[i, : len(future)] = True
        ids, text_mask = self.tokens[ann.instruction]
        return {
            keys.RGB: rgb,
            keys.HAND_RGB: hand,
            keys.ACTION: torch.from_numpy(acts[t : t + w]),
            keys.ACTION_CHUNK: torch.from_numpy(chunk),
            keys.CHUNK_MASK: torch.from_numpy(mask),
            keys.TEXT: ids,
            keys.TEXT_MASK: text_mask,
            keys.RAW_TEXT: ann.instruction,
            keys.DATA_SOURCE: DATA_SOURCE,
        }

