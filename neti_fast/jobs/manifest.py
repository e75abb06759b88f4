"""The manifest of an output folder: one JSON object per image, one per line, in `manifest.jsonl`.

`neti-fast generate` and `neti-fast run` write it the same way (the job runner, runner.py), `eval`
reads it through `read_entries`. Each batch's entries are appended and fsynced as soon as its PNGs
are written, so a killed run loses at most the batch in flight; under torchrun each rank appends to
`manifest.rank{r}.jsonl` and rank 0 merges them at the end. An entry whose `status` is "done" (or
absent, in older manifests) records a finished image with the settings it was made with.

Folders written before this format by `generate` hold `manifest.json` ({"images": [entries]});
they are read as well, and folded into `manifest.jsonl` the next time something is written there.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only; imported where used, so `--help` does not load it
    import numpy as np

from ..errors import NetiError
from ..utils import atomic_write

MANIFEST = "manifest.jsonl"
LEGACY_MANIFEST = "manifest.json"      # `generate` before the JSON-lines format
# an existing image is the same image when these agree (a key an entry lacks counts as null: txt2img
# entries have no img2img keys; an init image or mask is compared by its path as written and its content)
SETTINGS = ("prompt", "concept", "seed", "truncation", "negative_prompt", "steps", "guidance", "scheduler",
            "height", "width", "init_image", "init_image_sha256", "strength", "resize_mode", "mask", "mask_sha256",
            "mask_blur", "inpainting_fill", "prompt_syntax", "model", "dtype")


def is_done(entry) -> bool:
    return isinstance(entry, dict) and entry.get("status") in (None, "done")


def manifest_files(out: Path) -> list[Path]:
    """manifest.jsonl (if any), then manifest.rank{r}.jsonl in rank order (not the legacy file)."""
    out = Path(out)
    ranks = sorted(out.glob("manifest.rank*.jsonl"), key=lambda p: (len(p.name), p.name))
    return ([out / MANIFEST] if (out / MANIFEST).exists() else []) + ranks


def _unreadable(p: Path, e) -> NetiError:
    return NetiError(f"{p}: unreadable manifest ({getattr(e, 'strerror', None) or e}); "
                     "move it away or use another --out")


def _legacy(out: Path) -> list[tuple[str, object]]:
    p = out / LEGACY_MANIFEST
    if not p.is_file():
        return []
    try:
        images = json.loads(p.read_text(encoding="utf-8"))["images"]
        if not isinstance(images, list):
            raise TypeError('"images" is not a list')
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise _unreadable(p, f"{type(e).__name__}: {e}") from None
    return [(str(p), e) for e in images]


def _jsonl(p: Path, strict: bool) -> tuple[list[tuple[str, object]], int]:
    """(where, object) per line; unreadable lines are counted (strict: only a torn last line is allowed)."""
    try:
        lines = [(i, ln) for i, ln in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise _unreadable(p, e) from None
    got, torn = [], 0
    for k, (i, line) in enumerate(lines):
        try:
            obj = json.loads(line)
        except ValueError as e:
            if strict and k != len(lines) - 1:
                raise NetiError(f"{p}:{i}: not a JSON object ({e})") from None
            if strict:
                warnings.warn(f"{p}:{i}: incomplete last line skipped", stacklevel=4)
            torn += 1  # a run killed mid-write (or one still writing)
            continue
        if strict and not isinstance(obj, dict):
            raise NetiError(f"{p}:{i}: expected a JSON object, got {type(obj).__name__}")
        got.append((f"{p}:{i}", obj))
    return got, torn


def read_all(out: str | Path, strict: bool = False) -> tuple[list[tuple[str, object]], int]:
    """Every entry of the folder's manifests, in order (legacy manifest.json, manifest.jsonl, rank
    files) as (where, entry), and the number of unreadable lines skipped."""
    out = Path(out)
    entries, torn = _legacy(out), 0
    for p in manifest_files(out):
        got, bad = _jsonl(p, strict)
        entries += got
        torn += bad
    return entries, torn


def read_done(out: str | Path) -> tuple[dict, int]:
    """Finished images: ({file: entry} (a later entry for a file wins), unreadable lines skipped).

    A torn last line (a killed run) is skipped: its images are checked again before being trusted."""
    done, bad = {}, 0
    entries, torn = read_all(out)
    for _, e in entries:
        if not (isinstance(e, dict) and isinstance(e.get("file"), str)):
            bad += 1
        elif is_done(e):
            done[e["file"]] = e
    return done, bad + torn


def read_entries(out: str | Path) -> list[tuple[str, dict]]:
    """Finished entries for readers (`eval`): strict (a bad line other than a torn last one is an
    error; a torn last line is skipped with a warning), in file order."""
    entries, _ = read_all(out, strict=True)
    return [(w, e) for w, e in entries if not isinstance(e, dict) or is_done(e)]


def append(path: Path, entries: list[dict]) -> None:
    """Append entries as JSON lines and fsync: a killed run loses at most the batch in flight."""
    if not entries:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(e) + "\n" for e in entries))
        f.flush()
        os.fsync(f.fileno())


def _sort_key(e: dict):
    # by file name (names start with the zero-padded line / prompt number: file order is line order,
    # and older entries without "line" sort in place); failed requests without a file last, by line
    file, line = e.get("file"), e.get("line")
    return (not isinstance(file, str), file if isinstance(file, str) else "", line if isinstance(line, int) else 0)


def merge(out: Path, extra: list[dict] = (), keep_failed: bool = True) -> list[dict]:
    """All manifests (legacy manifest.json included) -> one manifest.jsonl, one entry per file (the
    latest), sorted; written atomically, then the rank files and the legacy file are removed (their
    entries are in manifest.jsonl now). Failed entries are kept only from this run (`keep_failed`)."""
    out = Path(out)
    by_file, failed_lines = {}, []
    entries, _ = read_all(out)
    for _, e in entries:
        if not isinstance(e, dict):
            continue
        if is_done(e) and isinstance(e.get("file"), str):
            by_file[e["file"]] = e
        elif e.get("status") == "failed" and keep_failed:
            if isinstance(e.get("file"), str):
                by_file.setdefault(e["file"], e)
            else:
                failed_lines.append(e)
    merged = sorted(list(by_file.values()) + failed_lines + list(extra), key=_sort_key)
    text = "".join(json.dumps(e) + "\n" for e in merged)
    atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    for p in manifest_files(out) + [out / LEGACY_MANIFEST]:
        if p.name != MANIFEST:
            p.unlink(missing_ok=True)
    return merged


def differences(old: dict, new: dict) -> list[str]:
    """The settings keys on which a recorded image and the wanted one disagree."""
    return [k for k in SETTINGS if _norm(k, old.get(k)) != _norm(k, new.get(k))]


def _norm(key: str, v):
    # JSON has one number type: 7.5 and 7.5, 7 and 7.0 (guidance, strength) are the same setting
    if key in ("guidance", "strength") and isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return v


def same_image(path: Path, image: np.ndarray) -> bool:
    """An unrecorded file counts as ours when it decodes to this image (within one level: backends)."""
    import numpy as np
    from PIL import Image
    try:
        with Image.open(path) as im:
            old = np.asarray(im.convert("RGB"))
    except (OSError, ValueError):
        return False
    return old.shape == image.shape and int(np.abs(old.astype(np.int16) - image.astype(np.int16)).max()) <= 1
