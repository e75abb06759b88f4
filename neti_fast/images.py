"""Labelled image grids (generation grids and sweeps, training validation grids), written atomically."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .utils import atomic_write


def _wrap(draw, text: str, width: int) -> list[str]:
    """Words of `text` in lines no wider than `width` pixels (a word too long alone is cut)."""
    lines = [""]
    for word in text.split():
        trial = f"{lines[-1]} {word}".strip()
        if draw.textlength(trial) <= width or not lines[-1]:
            lines[-1] = trial
        else:
            lines.append(word)
    for i, ln in enumerate(lines):
        while len(ln) > 1 and draw.textlength(ln) > width:
            ln = ln[:-1]
        lines[i] = ln
    return lines


def write_grid(path: Path, images: list[list[np.ndarray]], row_labels: list[str] | None = None,
               col_labels: list[str] | None = None) -> None:
    """Rows of equally sized uint8 images -> one PNG, with optional labels left of rows / above
    columns; labels wrap to their cell's width, so they never run into each other."""
    from PIL import ImageDraw
    rows, cols = len(images), max(len(r) for r in images)
    h, w, _ = images[0][0].shape
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = 12
    left = 0 if row_labels is None else 160
    col_lines = [_wrap(measure, label, w - 8) for label in (col_labels or [])]
    top = 0 if col_labels is None else 12 + line_h * max([len(ls) for ls in col_lines] or [1])
    grid = np.full((top + rows * h, left + cols * w, 3), 255, dtype=np.uint8)
    for i, row in enumerate(images):
        for j, img in enumerate(row):
            grid[top + i * h:top + (i + 1) * h, left + j * w:left + (j + 1) * w] = img
    pic = Image.fromarray(grid)
    if row_labels or col_labels:
        draw = ImageDraw.Draw(pic)
        for j, lines in enumerate(col_lines):
            draw.multiline_text((left + j * w + 4, 6), "\n".join(lines), fill=(0, 0, 0), spacing=2)
        for i, label in enumerate(row_labels or []):
            lines = _wrap(draw, label, left - 8)
            draw.multiline_text((4, top + i * h + 4), "\n".join(lines[: max(1, (h - 4) // line_h)]), fill=(0, 0, 0),
                                spacing=2)
    atomic_write(path, lambda tmp: pic.save(tmp, format="PNG"))
