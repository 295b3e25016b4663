"""A contact sheet: one PNG showing the first, middle and last frame of a few episodes, per camera.

``vlaops inspect`` draws it so that a person sees, in one glance, what the policy will see before any
GPU hour is spent: a camera pointed at the ceiling, a gripper camera that is black, a channel swap
(BGR recorded as RGB), an instruction attached to the wrong episode. Pillow only; every frame is fitted
into the same square cell, so cameras of different sizes line up in columns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlaops.utils.atomic import atomic_file

POSITIONS = ("first", "middle", "last")  # which frames of an episode a row shows, per camera
CELL = 128  # px, the square every frame is fitted into
GAP = 4  # px between cells and around the sheet
HEADER = 18  # px, the column captions
LABEL = 16  # px, the line above each row naming the episode and its instruction
BACKGROUND = (255, 255, 255)
EMPTY = (200, 200, 200)  # a cell for a camera the episode does not have
TEXT = (0, 0, 0)


@dataclass
class SheetRow:
    """One episode on the sheet: a label and, per camera, its first / middle / last frame (H, W, 3) uint8."""

    label: str
    frames: dict[str, list[np.ndarray]]


def sample_indices(n_frames: int) -> list[int]:
    """The frame indices of :data:`POSITIONS` in an episode of ``n_frames`` frames."""
    return [0, n_frames // 2, n_frames - 1]


def sheet_size(n_rows: int, n_cameras: int) -> tuple[int, int]:
    """(width, height) in pixels of a sheet of ``n_rows`` episodes and ``n_cameras`` cameras."""
    cols = n_cameras * len(POSITIONS)
    return GAP + cols * (CELL + GAP), HEADER + n_rows * (LABEL + CELL + GAP) + GAP


def cell_box(row: int, column: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the cell at ``row`` and ``column`` (camera-major: camera c, position
    p is column ``c * len(POSITIONS) + p``)."""
    left = GAP + column * (CELL + GAP)
    top = HEADER + row * (LABEL + CELL + GAP) + LABEL
    return left, top, left + CELL, top + CELL


def _fit(frame: np.ndarray) -> Image.Image:
    """(H, W, 3) uint8 -> the frame scaled to fit a CELL x CELL square, aspect kept, centred on EMPTY."""
    image = Image.fromarray(np.ascontiguousarray(frame), "RGB")
    scale = CELL / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    cell = Image.new("RGB", (CELL, CELL), EMPTY)
    cell.paste(image.resize(size, Image.BILINEAR), ((CELL - size[0]) // 2, (CELL - size[1]) // 2))
    return cell


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, width: int, font: ImageFont.ImageFont) -> None:
    """Draw ``text`` cut to ``width`` pixels; a glyph the font cannot encode (the bitmap fallback font is
    Latin-1 only) is drawn as '?' rather than failing the whole sheet."""
    while text and draw.textlength(text, font=font) > width:
        text = text[:-4] + "..." if len(text) > 4 else ""
    try:
        draw.text(xy, text, fill=TEXT, font=font)
    except UnicodeEncodeError:
        draw.text(xy, text.encode("latin-1", "replace").decode("latin-1"), fill=TEXT, font=font)


def draw_contact_sheet(rows: list[SheetRow], cameras: list[str], path: str | os.PathLike[str]) -> tuple[int, int]:
    """Write the sheet of ``rows`` (one per episode, ``cameras`` as columns) to ``path`` as a PNG,
    atomically; returns its (width, height) (:func:`sheet_size`)."""
    width, height = sheet_size(len(rows), len(cameras))
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for c, camera in enumerate(cameras):
        for p, position in enumerate(POSITIONS):
            left = cell_box(0, c * len(POSITIONS) + p)[0]
            _text(draw, (left, 3), f"{camera} {position}", CELL, font)
    for r, row in enumerate(rows):
        _text(draw, (GAP, cell_box(r, 0)[1] - LABEL + 2), row.label, width - 2 * GAP, font)
        for c, camera in enumerate(cameras):
            frames = row.frames.get(camera)
            for p in range(len(POSITIONS)):
                left, top, _, _ = cell_box(r, c * len(POSITIONS) + p)
                sheet.paste(_fit(frames[p]) if frames else Image.new("RGB", (CELL, CELL), EMPTY), (left, top))
    with atomic_file(Path(path), "wb") as handle:
        sheet.save(handle, format="PNG")
    return width, height
