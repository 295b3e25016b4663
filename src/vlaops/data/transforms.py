"""Image preprocessing in torch, shared by the training loader and the policy runtime.

The Kosmos-2/CLIP image processor runs on PIL one image at a time and PyPI's torchvision does not
import beside the CPU torch we pin, so resizing and CLIP normalisation are done here on batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# CLIP's statistics, as RoboVLMs' preprocess_image and CLIPImageProcessor use them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_model_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 frames (N, H, W, 3) -> CLIP-normalised float (N, 3, size, size)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).float().div_(255.0)  # (N, 3, H, W)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp_(0.0, 1.0)
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random-shift augmentation (RoboVLMs' rgb_pad / gripper_pad): pad by replication, crop back.

    images: (N, 3, H, W); one shift per sequence of frames keeps the window temporally consistent,
    so callers pass one window at a time.
    """
    if pad <= 0:
        return images
    _, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + h, dx : dx + w]


def color_jitter(
    images: torch.Tensor,
    brightness: float,
    contrast: float,
    saturation: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Colour jitter on CLIP-normalised frames (N, 3, H, W), one draw per window."""
    if brightness <= 0 and contrast <= 0 and saturation <= 0:
        return images
    mean = torch.tensor(CLIP_MEAN, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=images.dtype).view(1, 3, 1, 1)
    x = images * std + mean  # back to [0, 1]

    def draw(strength: float) -> float:
        return 1.0 + (torch.rand((), generator=generator).item() * 2 - 1) * strength

    x = x * draw(brightness)
    gray = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - gray) * draw(contrast) + gray
    luma = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - luma) * draw(saturation) + luma
    return (x.clamp(0.0, 1.0) - mean) / std
