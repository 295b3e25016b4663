"""How a camera image travels as JSON, both ways exact: the server decodes the very bytes the client had.

    {"encoding": "raw", "shape": [200, 200, 3], "data": "<base64 of the uint8 pixels, C order>"}
    {"encoding": "png", "data": "<base64 of a PNG file>"}          (shape optional; checked when given)

Both are lossless, so an action served over HTTP equals ``PolicyRuntime.step`` on the same frame bit for
bit (tests/test_serve.py); JPEG would not be. ``raw`` costs no encoding time (a 200x200 frame is 160 KB of
base64); ``png`` is smaller on a network and costs a few ms to encode.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

ENCODINGS = ("raw", "png")


def encode_image(img: np.ndarray, encoding: str = "raw") -> dict[str, Any]:
    """(H, W, 3) uint8 -> the JSON object above."""
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {arr.dtype} {arr.shape}")
    if encoding == "raw":
        data = np.ascontiguousarray(arr).tobytes()
    elif encoding == "png":
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG", compress_level=1)  # lossless at any level; 1 is fastest
        data = buf.getvalue()
    else:
        raise ValueError(f"encoding must be one of {list(ENCODINGS)}, got {encoding!r}")
    return {"encoding": encoding, "shape": list(arr.shape), "data": base64.b64encode(data).decode("ascii")}


def decode_image(payload: Mapping[str, Any]) -> np.ndarray:
    """The JSON object above -> (H, W, 3) uint8; ValueError saying what is wrong (the caller names the field)."""
    encoding = payload.get("encoding", "raw")
    shape = payload.get("shape")
    try:
        data = base64.b64decode(payload["data"], validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise ValueError(f"'data' is not valid base64 ({exc})") from None
    if encoding == "raw":
        if shape is None:
            raise ValueError("'shape' is required with encoding 'raw', e.g. [200, 200, 3]")
        if len(shape) != 3 or not all(isinstance(n, int) and n > 0 for n in shape) or shape[-1] != 3:
            raise ValueError(f"'shape' must be [H, W, 3] with H, W > 0, got {list(shape)}")
        expected = int(np.prod(shape))
        if len(data) != expected:
            raise ValueError(f"'data' holds {len(data)} bytes, shape {list(shape)} needs {expected}")
        img = np.frombuffer(bytearray(data), dtype=np.uint8).reshape(shape)  # writable: torch.from_numpy wants it
    elif encoding == "png":
        try:
            with Image.open(io.BytesIO(data)) as png:
                if png.format != "PNG":
                    raise ValueError(f"'data' is a {png.format} image, not a PNG")
                img = np.array(png.convert("RGB"), dtype=np.uint8)  # a writable copy
        except (OSError, Image.DecompressionBombError) as exc:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"'data' is not a readable PNG ({type(exc).__name__})") from None
        if shape is not None and list(img.shape) != list(shape):
            raise ValueError(f"the PNG is {list(img.shape)}, 'shape' says {list(shape)}")
    else:
        raise ValueError(f"'encoding' must be one of {list(ENCODINGS)}, got {encoding!r}")
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {list(img.shape)}")
    return img
