"""img2img and inpainting: the init image, its mask, and what they do to a batch's latents.

An `Init` is prepared once per image by a front end (`prepare_init`: A1111's resize modes, mask
blur, masked-area fill), at the run's size; the engine then (engine.generate_batch):
  1. starts the schedule at index N - int(N * strength) (diffusers' `get_timesteps`; x the scheduler's
     order), so a NeTI concept's rows are those of the remaining timesteps;
  2. encodes the image with the VAE, sampling its latent with the image's own generator, then draws
     the noise from the same generator and noises the latent to the first timestep (`add_noise`)
     - diffusers' `prepare_latents` draw for draw, so an image still depends on its seed alone;
  3. with a mask, after every step replaces the unmasked latents by the init latents noised to the
     next timestep (clean after the last step): inpainting on a regular 4-channel U-Net, as
     diffusers' StableDiffusionInpaintPipeline does for one and A1111 for non-inpainting models;
  4. pastes the original pixels back outside the (blurred) mask after decoding (A1111's overlay).
Requests with different init images, masks and strengths share one U-Net batch when their schedules
start at the same index (`schedule_start`): everything else is per sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import NetiError
from ..utils import DEFAULT_STRENGTH, STRENGTH_RANGE

if TYPE_CHECKING:
    import torch

RESIZE_MODES = {0: "just resize", 1: "crop and resize", 2: "resize and fill"}   # A1111's resize_mode
# inpainting_fill: what the masked area starts from (A1111's values); 2 ("latent noise") is not offered
FILLS = {0: "fill", 1: "original", 3: "latent nothing"}
# A1111's API defaults for a mask, which the server's img2img and `neti-fast generate --mask` / job files share
MASK_BLUR = 4          # px, both axes
INPAINTING_FILL = 0    # fill: the masked area starts from the colours around it


@dataclass
class Init:
    """One image's img2img input, at the run's size."""
    image: np.ndarray                  # uint8 [H, W, 3]: what the VAE encodes (masked area filled)
    strength: float = DEFAULT_STRENGTH  # A1111's denoising_strength: the fraction of the schedule run
    mask: np.ndarray | None = None     # float32 [H, W] in [0, 1], 1 = repaint (blurred); None: plain img2img
    original: np.ndarray | None = None  # uint8 [H, W, 3]: pasted back outside the mask (None: `image`)
    latent_nothing: bool = False       # inpainting_fill 3: the masked latents start at zero

    def check(self, height: int, width: int) -> None:
        if self.image.shape != (height, width, 3):
            raise NetiError(f"is {self.image.shape[1]}x{self.image.shape[0]}, the run is {width}x{height}",
                            field="init_image")
        STRENGTH_RANGE.check(self.strength, "strength")


def schedule_start(steps: int, strength: float) -> int:
    """The step the schedule starts at: N - int(N * s) (diffusers' get_timesteps; A1111 runs int(N * s)
    steps too). A strength leaving no step is an error, not a silent copy of the image."""
    run = min(int(steps * strength), steps)
    if run < 1:
        raise NetiError(f"with {steps} steps leaves no step to run (needs at least 1/{steps})",
                        field="strength", value=strength)
    return steps - run


# ----------------------------------------------------------------------------- pixels

def resize_image(img, width: int, height: int, mode: int = 0):
    """A PIL image at width x height by A1111's resize mode: 0 stretches; 1 scales to cover and
    crops the centre; 2 scales to fit, centres, and fills the bands by stretching the edge rows /
    columns outwards."""
    from PIL import Image
    if mode not in RESIZE_MODES:
        raise NetiError("must be 0 (just resize), 1 (crop and resize) or 2 (resize and fill)",
                        field="resize_mode", value=mode)
    lanczos = Image.Resampling.LANCZOS
    if mode == 0 or img.size == (width, height):
        return img.resize((width, height), lanczos)
    ratio, src_ratio = width / height, img.width / img.height
    wider = ratio > src_ratio        # the target is wider than the image
    cover = wider if mode == 1 else not wider
    # cover (mode 1): the side that overflows is cropped; fit (mode 2): the short side is filled
    w, h = (width, max(1, img.height * width // img.width)) if cover else (max(1, img.width * height // img.height), height)
    r = img.resize((w, h), lanczos)
    out = Image.new(img.mode, (width, height))
    x0, y0 = width // 2 - w // 2, height // 2 - h // 2
    out.paste(r, (x0, y0))
    if mode == 2:   # the bands beside the fitted image: its edge rows / columns, stretched outwards
        bands = ([((0, 0, w, 1), (width, y0), (0, 0)), ((0, h - 1, w, h), (width, height - y0 - h), (0, y0 + h))]
                 if h < height else
                 [((0, 0, 1, h), (x0, height), (0, 0)), ((w - 1, 0, w, h), (width - x0 - w, height), (x0 + w, 0))])
        for box, size, at in bands:
            if min(size) > 0:
                out.paste(r.crop(box).resize(size), at)
    return out


def binary_mask(img) -> np.ndarray:
    """A mask image -> uint8 {0, 255}, 255 = repaint: its alpha where it has a real one (a painted
    layer), else its brightness, thresholded at 128 (A1111's create_binary_mask)."""
    a = np.asarray(img.convert("RGBA"))[..., 3] if img.mode in ("RGBA", "LA") else None
    v = a if a is not None and a.min() < 255 else np.asarray(img.convert("L"))
    return np.where(v > 128, 255, 0).astype(np.uint8)


def gaussian_blur(x: np.ndarray, sigma_x: float, sigma_y: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array with the kernel A1111 asks OpenCV for: 2*int(2.5 sigma
    + 0.5) + 1 taps, mirrored borders (OpenCV's default, numpy's "reflect")."""
    out = x.astype(np.float32)
    for axis, sigma in ((1, sigma_x), (0, sigma_y)):
        if sigma <= 0:
            continue
        r = int(2.5 * sigma + 0.5)
        k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
        k /= k.sum()
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="reflect" if out.shape[axis] > r else "edge")
        out = sum(k[i] * np.take(p, np.arange(i, i + out.shape[axis]), axis=axis) for i in range(2 * r + 1))
    return out


def fill_masked(image, mask: np.ndarray):
    """inpainting_fill 0: the masked area painted with the colours around it - the unmasked pixels
    blurred at falling radii (256 .. 0 px), each pass laid over the last with its own coverage, so
    every masked pixel takes the colour of the nearest unmasked region (A1111's masking.fill)."""
    from PIL import Image, ImageFilter
    rgba = np.dstack([np.asarray(image.convert("RGB")), 255 - mask.astype(np.uint8)])
    keep = Image.fromarray(rgba, "RGBA").convert("RGBa")   # premultiplied: the blur averages colour x coverage
    out = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        layer = keep.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(layer)
    return out.convert("RGB")


def prepare_init(image, width: int, height: int, strength: float = DEFAULT_STRENGTH, resize_mode: int = 0, mask=None,
                 mask_blur: tuple[float, float] = (4, 4), fill: int = 1, invert: bool = False) -> Init:
    """A PIL init image (and mask image) -> an Init at width x height, as A1111 prepares them for
    "whole picture" inpainting: the mask thresholded, inverted if asked, blurred, resized like the
    image; the masked area filled (`fill`, FILLS) before encoding; the original kept for the overlay."""
    rgb = resize_image(image.convert("RGB"), width, height, resize_mode)
    if mask is None:
        return Init(np.asarray(rgb), strength)
    if fill not in FILLS:
        raise NetiError("must be 0 (fill), 1 (original) or 3 (latent nothing); 2 (latent noise) is not "
                        "available in neti-fast", field="inpainting_fill", value=fill)
    from PIL import Image
    m = binary_mask(mask)
    if invert:
        m = 255 - m
    m = np.clip(gaussian_blur(m, *mask_blur).round(), 0, 255).astype(np.uint8)
    m = np.asarray(resize_image(Image.fromarray(m), width, height, resize_mode))
    original = np.asarray(rgb)
    filled = np.asarray(fill_masked(rgb, m)) if fill != 1 else original
    return Init(filled, strength, m.astype(np.float32) / 255, original, latent_nothing=fill == 3)


def latent_mask(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """The pixel mask at latent size, rounded to {0, 1}: which latents are repainted (A1111 resizes
    the blurred mask and rounds it)."""
    from PIL import Image
    small = Image.fromarray((mask * 255).round().astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    return np.round(np.asarray(small, dtype=np.float32) / 255)


def overlay(generated: np.ndarray, init: Init) -> np.ndarray:
    """The decoded image with the original pasted back outside the mask: alpha 1 - min(2 m, 1), so
    the blur's outer half blends and its inner half is all generated (A1111's mask_for_overlay)."""
    if init.mask is None:
        return generated
    keep = 1 - np.minimum(2 * init.mask, 1)[..., None]
    orig = init.original if init.original is not None else init.image
    return (orig * keep + generated * (1 - keep)).round().astype(np.uint8)


# ----------------------------------------------------------------------------- latents

def batch_start(reqs: list, steps: int) -> int:
    """The step every request of one batch starts at (0: txt2img); one denoising loop has one schedule."""
    starts = {0 if r.init is None else schedule_start(steps, r.init.strength) for r in reqs}
    if len(starts) > 1:
        raise NetiError(f"the requests of one batch start at different steps ({sorted(starts)}): batch only "
                        "requests whose strengths leave the same number of steps", field="strength")
    return starts.pop()


def encode_init(model, init: Init, generator) -> "torch.Tensor":
    """The init image's latent [1, 4, h, w]: the VAE posterior sampled with the image's generator,
    x the VAE's scaling factor (diffusers' retrieve_latents + prepare_latents)."""
    import torch
    x = torch.from_numpy(np.array(init.image)).permute(2, 0, 1)[None].float() / 255 * 2 - 1
    vae = model.vae
    dist = vae.encode(x.to(vae.device, vae.dtype)).latent_dist
    return dist.sample(generator).to(model.dtype) * vae.config.scaling_factor


@dataclass
class Blend:
    """Inpainting's step: where `keep` is 1 the latents become the init latents noised to the next
    timestep (the clean init latents after the last step); elsewhere the sampler's latents stay."""
    keep: "torch.Tensor"       # [B, 1, h, w] {0, 1}: 1 outside the mask; 0 for rows without a mask
    init: "torch.Tensor"       # [B, 4, h, w] clean init latents (0 for rows without an init image)
    noise: "torch.Tensor"      # [B, 4, h, w] the noise the latents started with
    next_t: "torch.Tensor"     # the schedule's timesteps from the second on

    def __call__(self, sched, i: int, latents):
        proper = self.init if i >= len(self.next_t) else sched.add_noise(self.init, self.noise, self.next_t[i:i + 1])
        return self.keep * proper + (1 - self.keep) * latents


def start_latents(model, sched, ts, reqs: list, gens: list, shape: tuple):
    """The batch's first latents and its inpainting Blend (None without a mask). txt2img rows: the
    seed's noise x init_noise_sigma; img2img rows: the init latent noised to ts[0] with the noise
    drawn right after the VAE's sample, from the same generator (diffusers' order)."""
    import torch

    from .sampling import initial_latents
    dev, dt = model.device, model.dtype
    rows, inits, noises, keeps = [], [], [], []
    for r, g in zip(reqs, gens):
        if r.init is None:
            noise = initial_latents(r.seed, shape, dt, g).to(dev)
            rows.append(noise * sched.init_noise_sigma)
            inits.append(torch.zeros_like(noise))
            keeps.append(torch.zeros(1, 1, *shape[1:], device=dev, dtype=dt))
            noises.append(noise)
            continue
        lat = encode_init(model, r.init, g)
        noise = initial_latents(r.seed, shape, dt, g).to(dev)
        keep = torch.zeros(1, 1, *shape[1:], device=dev, dtype=dt)
        if r.init.mask is not None:
            keep = 1 - torch.from_numpy(latent_mask(r.init.mask, *shape[1:])).to(dev, dt)[None, None]
            if r.init.latent_nothing:
                lat = lat * keep
        rows.append(sched.add_noise(lat, noise, ts[:1]))
        inits.append(lat)
        keeps.append(keep)
        noises.append(noise)
    latents = torch.cat(rows)
    if not any(r.init is not None and r.init.mask is not None for r in reqs):
        return latents, None
    return latents, Blend(torch.cat(keeps), torch.cat(inits), torch.cat(noises), ts[1:])
