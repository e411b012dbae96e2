"""Validation grids with their prompts above the columns and their seeds beside the rows."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

#: Small samples are enlarged (nearest-neighbour, whole factor) to about this side so labels fit.
CELL_SIDE = 96
_FONT_SIZE = 12
_PAD = 4


def label_font() -> ImageFont.ImageFont:
    """The small sans-serif font the grid labels use."""
    try:
        return ImageFont.load_default(size=_FONT_SIZE)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels (a word longer than the width keeps its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines or [""]


def labelled_grid(
    images: Sequence[Image.Image], row_labels: Sequence[str], column_labels: Sequence[str]
) -> Image.Image:
    """Tile equally sized ``images`` row by row, ``len(column_labels)`` per row, on white, with
    each column's label (wrapped) above it and each row's label to its left.

    Images smaller than ``CELL_SIDE`` are enlarged by a whole factor, nearest-neighbour, so
    their pixels stay sharp and the labels have room.
    """
    columns, rows = len(column_labels), len(row_labels)
    if len(images) != columns * rows:
        raise ValueError(f"{len(images)} images for {rows} rows x {columns} columns")
    width, height = images[0].size
    factor = max(1, CELL_SIDE // max(width, height))
    cell_w, cell_h = width * factor, height * factor
    font = label_font()
    line_h = math.ceil(font.getbbox("Ag")[3]) + 2
    headers = [_wrap(label, font, cell_w - _PAD) for label in column_labels]
    top = max(len(lines) for lines in headers) * line_h + 2 * _PAD
    left = math.ceil(max(font.getlength(label) for label in row_labels)) + 2 * _PAD
    grid = Image.new("RGB", (left + columns * cell_w, top + rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(headers):
        for i, line in enumerate(lines):
            draw.text((left + c * cell_w + _PAD // 2, _PAD + i * line_h), line, fill="black", font=font)
    for r, label in enumerate(row_labels):
        draw.text((_PAD, top + r * cell_h + (cell_h - line_h) // 2), label, fill="black", font=font)
    for i, image in enumerate(images):
        cell = image.convert("RGB").resize((cell_w, cell_h), Image.Resampling.NEAREST)
        grid.paste(cell, (left + (i % columns) * cell_w, top + (i // columns) * cell_h))
    return grid
