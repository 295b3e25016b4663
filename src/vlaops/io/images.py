"""Image helpers every reader shares: compressed bytes to pixels, and one frame size per stream."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlaops.errors import RecordingError


def decode_compressed(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> (H, W, 3) uint8; raises OSError or ValueError on bytes no decoder reads.

    Bytes after the image's end marker are ignored, so a zero-padded row (ALOHA's compressed layout pads
    every frame to the longest) decodes as the image it holds."""
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # its message names the BytesIO's address: not the same in two runs
        raise ValueError(f"no image format PIL recognises in {len(data)} bytes") from None
    with img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def same_shapes(values: list[np.ndarray], where: str, stream: str, label: str) -> None:
    """Every frame of one stream has one shape (a camera that changes resolution mid-episode cannot be
    stacked into one (T, H, W, 3) array, and a policy trained on it would see two cameras).

    ``stream`` is the topic or key for the report, ``label`` how the message names it ("topic '/cam'")."""
    shapes = [v.shape for v in values]
    changed = next((i for i, s in enumerate(shapes) if s != shapes[0]), None)
    if changed is not None:
        image = len(shapes[0]) == 3
        raise RecordingError(
            where,
            f"{label}: {'frame size' if image else 'array shape'} changes mid-episode, from "
            f"{shapes[0]} to {shapes[changed]} at message {changed}",
            check="frame_size" if image else "wrong_shape",
            stream=stream,
        )
