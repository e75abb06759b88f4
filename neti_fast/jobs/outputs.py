"""Writing generated images: deterministic names and atomic PNGs (labelled grids: neti_fast.images).

What is in a folder and resume are manifest.py and runner.py (one path for `generate` and `run`).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from ..utils import atomic_write


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "prompt"


def image_name(prompt_index: int, prompt: str, truncation: int | None, seed: int, digits: int = 3) -> str:
    """`{index}-{prompt slug}_{full|tK}_s{seed}.png` (jobs number by job-file line, 5 digits)."""
    t = "full" if truncation is None else f"t{truncation}"
    return f"{prompt_index:0{digits}d}-{slug(prompt)}_{t}_s{seed}.png"


def save_png(path: Path, image: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def truncation_label(t) -> str:
    """Column label of a truncation sweep."""
    return "full (no truncation)" if t is None else f"truncation {t}"
