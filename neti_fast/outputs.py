"""Writing generated images: deterministic names, atomic PNGs, a grid per prompt, manifest.json.

Re-running into the same folder skips images already there (resume). An existing image made with
different settings is never overwritten silently: that is an error unless --overwrite.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from .concept import atomic_write
from .errors import NetiError

MANIFEST = "manifest.json"


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "prompt"


def image_name(prompt_index: int, prompt: str, truncation: int | None, seed: int, digits: int = 3) -> str:
    """`{index}-{prompt slug}_{full|tK}_s{seed}.png` (jobs number by job-file line, 5 digits)."""
    t = "full" if truncation is None else f"t{truncation}"
    return f"{prompt_index:0{digits}d}-{slug(prompt)}_{t}_s{seed}.png"


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise NetiError(f"--out {out}: not writable ({e.strerror or e})") from None


def save_png(path: Path, image: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def read_manifest(out: Path) -> dict:
    p = out / MANIFEST
    if not p.exists():
        return {}
    try:
        return {e["file"]: e for e in json.loads(p.read_text())["images"]}
    except (ValueError, KeyError, TypeError) as e:
        raise NetiError(f"{p}: unreadable manifest ({e}); move it away or use another --out") from None


def write_manifest(out: Path, entries: dict) -> None:
    data = {"images": sorted(entries.values(), key=lambda e: e["file"])}
    atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))


SETTINGS_KEYS = ("prompt", "seed", "truncation", "steps", "guidance", "scheduler", "model", "concept",
                 "negative_prompt", "height", "width", "dtype")


def plan(out: Path, wanted: list[dict], overwrite: bool) -> list[dict]:
    """Which of `wanted` (manifest entries) still need generating; refuses silent overwrites."""
    done = read_manifest(out)
    todo = []
    for e in wanted:
        path = out / e["file"]
        if overwrite or not path.exists():
            todo.append(e)
            continue
        old = done.get(e["file"])
        if old is not None and any(old.get(k) != e.get(k) for k in SETTINGS_KEYS):
            diff = [k for k in SETTINGS_KEYS if old.get(k) != e.get(k)]
            raise NetiError(f"{path}: exists with different settings ({', '.join(diff)}); use --overwrite or another --out")
    return todo


def write_grid(path: Path, images: list[list[np.ndarray]], row_labels: list[str] | None = None,
               col_labels: list[str] | None = None) -> None:
    """Rows of equally sized uint8 images -> one PNG, with optional labels left of rows / above columns."""
    rows, cols = len(images), max(len(r) for r in images)
    h, w, _ = images[0][0].shape
    left = 0 if row_labels is None else 160
    top = 0 if col_labels is None else 24
    grid = np.full((top + rows * h, left + cols * w, 3), 255, dtype=np.uint8)
    for i, row in enumerate(images):
        for j, img in enumerate(row):
            grid[top + i * h:top + (i + 1) * h, left + j * w:left + (j + 1) * w] = img
    pic = Image.fromarray(grid)
    if row_labels or col_labels:
        from PIL import ImageDraw
        draw = ImageDraw.Draw(pic)
        for j, label in enumerate(col_labels or []):
            draw.text((left + j * w + 4, 6), label, fill=(0, 0, 0))
        for i, label in enumerate(row_labels or []):
            words, lines = label.split(), [""]
            for word in words:  # wrap to the label column
                if len(lines[-1]) + len(word) + 1 > 24:
                    lines.append("")
                lines[-1] = f"{lines[-1]} {word}".strip()
            draw.multiline_text((4, top + i * h + 4), "\n".join(lines[: max(1, h // 12)]), fill=(0, 0, 0))
    atomic_write(path, lambda tmp: pic.save(tmp, format="PNG"))
