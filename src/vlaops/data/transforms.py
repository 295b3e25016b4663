"""Image preprocessing in torch, shared by the training loader and the policy runtime.

The Kosmos-2/CLIP image processor runs on PIL one image at a time and PyPI's torchvision does not
import beside the CPU torch we pin, so resizing and CLIP normalisation are done here on batches.
Frames are resized to uint8 once (:func:`resize_uint8`, what the frame cache stores and the runtime
calls); the training loader then augments and normalises them per sample in a handful of passes
(:func:`augment_to_model_input`), since that is all a cached sample still costs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# CLIP's statistics, as RoboVLMs' preprocess_image and CLIPImageProcessor use them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 frames (N, H, W, 3) -> uint8 planes (N, 3, size, size): antialiased bicubic, rounded to the
    nearest level.

    The one resize of the project: the frame cache (data/frame_cache.py) stores its output and the policy
    runtime calls it per step, so a frame at evaluation is bit for bit what training saw. The result is
    quantised to uint8 as CLIPImageProcessor and RoboVLMs' torchvision ``Resize`` on PIL images produce it
    (PIL resizes uint8 to uint8). Channels first, as the model reads them: the per-sample arithmetic then
    runs on contiguous planes (broadcasting over a permuted view is several times slower on CPU). Each
    image is resized on its own, so the result does not depend on which frames share a batch.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    planes = images.permute(0, 3, 1, 2)  # (N, 3, H, W)
    if images.shape[1:3] == (size, size):
        return planes.contiguous()
    x = F.interpolate(planes.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return x.round_().clamp_(0.0, 255.0).to(torch.uint8).contiguous()  # (N, 3, S, S)


def _check_planes(planes: torch.Tensor) -> None:
    if planes.dtype != torch.uint8 or planes.ndim != 4 or planes.shape[1] != 3:
        raise ValueError(f"expected uint8 planes (N, 3, S, S), got {planes.dtype} {tuple(planes.shape)}")


def _clip_affine(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) (1, 3, 1, 1) with (v / 255 - mean) / std == v * scale - offset for v in [0, 255]."""
    mean = torch.tensor(CLIP_MEAN, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=dtype).view(1, 3, 1, 1)
    return 1.0 / (255.0 * std), mean / std


def normalize_uint8(planes: torch.Tensor) -> torch.Tensor:
    """uint8 planes (N, 3, S, S) -> CLIP-normalised float (N, 3, S, S), no resizing."""
    _check_planes(planes)
    scale, offset = _clip_affine(torch.float32)
    x = planes.float()
    return torch.addcmul(-offset, x, scale, out=x)  # (v / 255 - mean) / std, in place


def to_model_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 frames (N, H, W, 3) -> CLIP-normalised float (N, 3, size, size): :func:`resize_uint8`, then
    :func:`normalize_uint8`. Training (from the frame cache or the npz files) and the runtime both end here."""
    return normalize_uint8(resize_uint8(images, size))


# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale (adjust_saturation) uses them; they sum to 1.
LUMA = (0.299, 0.587, 0.114)


def augment_to_model_input(
    planes: torch.Tensor,
    pad: int,
    brightness: float,
    contrast: float,
    saturation: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 planes (N, 3, S, S) of one window -> augmented, CLIP-normalised float (N, 3, S, S).

    RoboVLMs' training augmentation, one draw per window so the window stays temporally consistent:
    random shift (``rgb_pad`` / ``gripper_pad``: pad by replication, crop back at a random offset), then
    colour jitter (brightness x b, contrast (x - gray) c + gray with gray the frame mean, saturation
    (x - luma) s + luma, factors drawn uniformly in 1 +- strength, clamped to [0, 1] once at the end).
    The shift is done while converting to float; the jitter is affine per frame, so it is applied as
    ``A x + B luma(x) + C``: the step-by-step arithmetic in about a third of the memory passes
    (tests/test_frame_cache.py checks the two against each other). ``planes`` may be a read-only view.
    """
    _check_planes(planes)
    dx = dy = pad
    if pad > 0:
        dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    x = _shifted_float(planes, dx - pad, dy - pad)  # (N, 3, S, S) in [0, 255]
    scale, offset = _clip_affine(x.dtype)
    if brightness > 0 or contrast > 0 or saturation > 0:

        def draw(strength: float) -> float:
            return 1.0 + (torch.rand((), generator=generator).item() * 2 - 1) * strength

        b, c, s = draw(brightness), draw(contrast), draw(saturation)
        gray = x.mean(dim=(1, 2, 3), keepdim=True).mul_(b * (1.0 - c))  # (N, 1, 1, 1): b * mean(x) * (1 - c)
        luma = (x[:, 0:1] * LUMA[0]).add_(x[:, 1:2], alpha=LUMA[1]).add_(x[:, 2:3], alpha=LUMA[2])  # (N, 1, S, S)
        # brightness then contrast: b c x + gray; saturation on that: s b c x + (1 - s) b c luma(x) + gray
        luma.mul_((1.0 - s) * b * c).add_(gray)
        torch.add(luma, x, alpha=s * b * c, out=x).clamp_(0.0, 255.0)
    return torch.addcmul(-offset, x, scale, out=x)  # (v / 255 - mean) / std, in place


def _shifted_float(planes: torch.Tensor, sx: int, sy: int) -> torch.Tensor:
    """uint8 planes (N, 3, H, W) -> float (N, 3, H, W) with out[.., y, x] = in[.., clamp(y + sy), clamp(x + sx)]:
    the random shift's replicate-pad-and-crop, done while converting to float (one pass, plus the edges)."""
    n, ch, h, w = planes.shape
    out = torch.empty((n, ch, h, w), dtype=torch.float32)
    y0, y1, x0, x1 = max(0, -sy), min(h, h - sy), max(0, -sx), min(w, w - sx)  # where the source lands
    out[:, :, y0:y1, x0:x1] = planes[:, :, y0 + sy : y1 + sy, x0 + sx : x1 + sx]
    out[:, :, :y0] = out[:, :, y0 : y0 + 1]  # replicate the edge rows, then the edge columns
    out[:, :, y1:] = out[:, :, y1 - 1 : y1]
    out[:, :, :, :x0] = out[:, :, :, x0 : x0 + 1]
    out[:, :, :, x1:] = out[:, :, :, x1 - 1 : x1]
    return out
