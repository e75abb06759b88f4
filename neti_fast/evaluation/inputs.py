"""What `neti-fast eval` reads: a generated folder's manifest and images, the training images,
and prompts without their concept markers."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

from ..errors import NetiError
from ..utils import first_line as _first_line

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MANIFEST_JSON = "manifest.json"      # older `generate` folders
MANIFEST_JSONL = "manifest.jsonl"
_PLACEHOLDER = re.compile(r"\{[^{}\s]*\}")


def strip_placeholder(prompt: str, placeholders=()) -> str:
    """The prompt without the concept: `{}` / `{name}` markers (and any literal `placeholders`)
    removed, whitespace collapsed, no space left before punctuation.

    "A photo of {} on a beach" -> "A photo of on a beach"; "An oil painting of {}." -> "An oil painting of."
    """
    text = _PLACEHOLDER.sub(" ", prompt)
    for p in placeholders:
        if p:
            text = text.replace(p, " ")
    text = " ".join(text.split())
    return re.sub(r"\s+([.,;:!?])", r"\1", text)


def truncation_key(truncation: int | None) -> str:
    return "full" if truncation is None else str(truncation)


def _sort_truncations(keys):
    """Truncation values in increasing order, full (None) last: most editable -> most faithful."""
    return sorted(keys, key=lambda t: (t is None, t if t is not None else 0))


# ----------------------------------------------------------------------------- inputs

def _parse_truncation(value, where: str) -> int | None:
    if value is None or value == "full":
        return None
    if isinstance(value, bool):
        raise NetiError(f"{where}: truncation {value!r} is not an integer or null")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise NetiError(f"{where}: truncation {value!r} is not an integer or null")


def _check_entry(entry, where: str) -> dict:
    if not isinstance(entry, dict):
        raise NetiError(f"{where}: expected a JSON object per image, got {type(entry).__name__}")
    file, prompt = entry.get("file"), entry.get("prompt")
    if not isinstance(file, str) or not file:
        raise NetiError(f"{where}: an image entry has no \"file\"")
    if not isinstance(prompt, str):
        raise NetiError(f"{where}: image {file}: no \"prompt\"")
    return {**entry, "truncation": _parse_truncation(entry.get("truncation"), f"{where}: image {file}")}


def read_manifest_entries(out_dir: str | Path) -> list[dict]:
    """Image entries of a generation folder: `manifest.json` (`neti-fast generate`) and / or
    `manifest.jsonl` plus any `manifest.rank*.jsonl` (the job runner; one object per line). Only
    entries whose `status` is absent or "done" count; all files together -> their union by file
    (a later finished entry for the same file replaces an earlier one). Every listed image must
    exist. Entries come back sorted by file name."""
    out = Path(out_dir)
    if not out.exists():
        raise NetiError(f"{out}: output folder does not exist")
    if not out.is_dir():
        raise NetiError(f"{out}: is not a folder (give the folder written by `neti-fast generate`)")
    from ..jobs import manifest
    pj = out / MANIFEST_JSON
    if not pj.is_file() and not manifest.manifest_files(out):
        raise NetiError(f"{out}: no {MANIFEST_JSON} or {MANIFEST_JSONL} (give a folder written by `neti-fast generate`)")
    entries: dict[str, dict] = {}
    for where, e in manifest.read_entries(out):  # a later finished entry for a file replaces an earlier one
        e = _check_entry(e, where)
        entries[e["file"]] = e
    if not entries:
        raise NetiError(f"{out}: the manifest lists no finished images")
    missing = [f for f in sorted(entries) if not (out / f).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise NetiError(f"{out}: {len(missing)} image(s) listed in the manifest are missing: "
                        f"{', '.join(missing[:3])}{more}")
    return [entries[f] for f in sorted(entries)]


def _open_rgb(path: Path):
    from PIL import Image, UnidentifiedImageError

    from ..training.data import to_rgb
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise NetiError(f"{path}: not a readable image ({_first_line(e)})") from None


def load_generated_images(out_dir: str | Path, entries: list[dict]) -> list:
    out = Path(out_dir)
    return [_open_rgb(out / e["file"]) for e in entries]


def load_train_images(train_dir: str | Path) -> tuple[list, list[str]]:
    """Every .png / .jpg / .jpeg / .webp in `train_dir` (not recursive, sorted) as RGB; unreadable
    files are skipped with a warning. Returns (images, file names)."""
    d = Path(train_dir)
    if not d.exists():
        raise NetiError(f"--train-images {d}: folder does not exist")
    if not d.is_dir():
        raise NetiError(f"--train-images {d}: is not a folder")
    files = sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_EXTENSIONS)
    images, names = [], []
    for p in files:
        try:
            images.append(_open_rgb(p))
            names.append(p.name)
        except NetiError as e:
            warnings.warn(f"{e}; skipped", stacklevel=2)
    if not images:
        what = f"none of its {len(files)} image files is readable" if files else \
            f"no {' / '.join(IMAGE_EXTENSIONS)} files in it"
        raise NetiError(f"--train-images {d}: no training images ({what})")
    return images, names
