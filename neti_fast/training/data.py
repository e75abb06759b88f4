"""Training images: robust loading and the Textual Inversion / NeTI training dataset.

`load_images` reads every image of a folder (sorted by name, not recursive) as 8-bit RGB, with
the conversions photo folders need: EXIF orientation applied (phone photos are stored sideways
with an orientation tag), alpha composited on white, grayscale / palette / CMYK / 16-bit images
converted without clipping. Unreadable files are skipped with a warning naming each one.

`TextualInversionDataset` follows the official NeTI / Textual Inversion dataset: optional center
crop, bicubic resize to `size`, random horizontal flip (p = 0.5), pixels in [-1, 1], and a caption
drawn from the Textual Inversion templates, with `{}` kept as the placeholder marker (it is what
`conditioning.tokenize` replaces). All randomness comes from generators the dataset owns, and
`state_dict` / `load_state_dict` capture it, so a resumed run sees exactly the same batches.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import NetiError
from ..utils import first_line
from ..sd.templates import IMAGENET_STYLE_TEMPLATES, IMAGENET_TEMPLATES

PROPERTIES = ("object", "style")
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: alpha composited on white, 16-bit / 32-bit scaled, not clipped."""
    img = ImageOps.exif_transpose(img)  # returns a copy; no-op without an orientation tag
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT:
        a = np.asarray(img, dtype=np.float64)
        # 16-bit data (PNG / TIFF): 0..65535 -> 0..255. Mode "I" is how PIL may hold a 16-bit PNG.
        a = np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = a * 255.0 if a.size and np.nanmax(a) <= 1.0 else a  # float images are 0..1 or 0..255
        return Image.fromarray(np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info) \
            or (mode in ("L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def center_crop_square(img: Image.Image) -> Image.Image:
    """The official crop: the central min(h, w) square (same integer arithmetic)."""
    w, h = img.size
    c = min(w, h)
    return img.crop(((w - c) // 2, (h - c) // 2, (w + c) // 2, (h + c) // 2))


def preprocess(img: Image.Image, size: int, center_crop: bool = False) -> Image.Image:
    """Optional center crop, then bicubic resize to size x size (non-square images are stretched, as official)."""
    if center_crop:
        img = center_crop_square(img)
    if img.size != (size, size):
        img = img.resize((size, size), resample=Image.Resampling.BICUBIC)
    return img


def load_images(folder, size: int | None = None, center_crop: bool = False, log=None) -> list[Image.Image]:
    """Every image in `folder` as RGB (resized to `size` when given), sorted by file name.

    A file with an image suffix that cannot be decoded is refused, naming it (a training set is 3-5
    images: one quietly dropped changes the concept; the server refuses such an upload the same
    way). Files of other kinds (captions, notes) are skipped, said once through `log`; hidden ones
    (.DS_Store) silently."""
    folder = Path(folder)
    if not folder.exists():
        raise NetiError(f"{folder}: image folder does not exist")
    if not folder.is_dir():
        raise NetiError(f"{folder}: is not a folder (give the folder holding the training images)")
    if size is not None and (not isinstance(size, int) or size < 8):
        raise NetiError(f"--resolution {size}: must be an integer of at least 8")
    image_suffixes = {e.lower() for e in Image.registered_extensions()}
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    others = [p.name for p in files if p.suffix.lower() not in image_suffixes]
    images = []
    for p in (p for p in files if p.suffix.lower() in image_suffixes):
        try:
            with Image.open(p) as im:
                im.load()  # force a full decode: truncated / corrupt files fail here
                img = to_rgb(im)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise NetiError(f"{p}: not a readable image ({first_line(e)}); fix or remove it") from None
        images.append(preprocess(img, size, center_crop) if size is not None else img)
    if not images:
        what = f"none of its {len(files)} files is an image" if files else "it has no image files"
        raise NetiError(f"{folder}: no training images ({what})")
    if others and log is not None:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        log(f"{folder}: {len(images)} images; skipped {len(others)} other file(s): {shown}")
    return images


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [-1, 1] (official: x / 127.5 - 1)."""
    a = np.asarray(img, dtype=np.uint8).astype(np.float32)
    return torch.from_numpy(a / 127.5 - 1.0).permute(2, 0, 1).contiguous()


class TextualInversionDataset:
    """(pixel_values [3, size, size] in [-1, 1], caption with `{}`) pairs, deterministic given `seed`.

    `next_batch(n)` walks the images in a fresh random order each epoch (shuffled, as the official
    DataLoader). Indexing (`ds[i]`) draws the caption and flip from the dataset's own generator.
    """

    def __init__(self, images: list[Image.Image], size: int, learnable_property: str = "object",
                 center_crop: bool = False, flip_p: float = 0.5, seed: int = 0):
        if learnable_property not in PROPERTIES:
            raise NetiError(f"--property {learnable_property!r}: must be one of {', '.join(PROPERTIES)}")
        if not images:
            raise NetiError("no training images")
        self.size = size
        self.images = [preprocess(to_rgb(im) if im.mode != "RGB" else im, size, center_crop) for im in images]
        self.pixels = [to_tensor(im) for im in self.images]
        self.templates = IMAGENET_STYLE_TEMPLATES if learnable_property == "style" else IMAGENET_TEMPLATES
        self.flip_p = flip_p
        self.rng = random.Random(seed)                               # captions and flips
        self.order_gen = torch.Generator().manual_seed(int(seed))    # epoch order
        self._order: list[int] = []
        self._pos = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        _, flip, caption = self.item(i)
        return (self.pixels[i].flip(-1) if flip else self.pixels[i]), caption

    def item(self, i: int) -> tuple[int, bool, str]:
        """(i, mirrored, caption) for image i: what `ds[i]` draws, without the pixels."""
        caption = self.rng.choice(self.templates)   # official order: text first, then the flip
        return i, self.rng.random() < self.flip_p, caption

    def next_index(self) -> int:
        if self._pos >= len(self._order):
            self._order = torch.randperm(len(self), generator=self.order_gen).tolist()
            self._pos = 0
        i = self._order[self._pos]
        self._pos += 1
        return i

    def next_items(self, batch_size: int) -> list[tuple[int, bool, str]]:
        """The next batch as (image index, mirrored, caption) triples (the trainer's cached latents)."""
        return [self.item(self.next_index()) for _ in range(batch_size)]

    def next_batch(self, batch_size: int):
        """([B, 3, size, size], [B captions]): the same draws as `next_items`."""
        items = self.next_items(batch_size)
        px = [self.pixels[i].flip(-1) if f else self.pixels[i] for i, f, _ in items]
        return torch.stack(px), [c for _, _, c in items]

    # --- exact resume
    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-able state, tensor state)."""
        version, internal, gauss = self.rng.getstate()
        return ({"rng": [version, list(internal), gauss], "order": list(self._order), "pos": self._pos},
                {"order_gen": self.order_gen.get_state()})

    def load_state_dict(self, js: dict, tensors: dict[str, torch.Tensor]) -> None:
        version, internal, gauss = js["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self._order = [int(i) for i in js["order"]]
        self._pos = int(js["pos"])
        self.order_gen.set_state(tensors["order_gen"])
