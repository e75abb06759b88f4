"""FLOP counts of the three networks, measured on the actual model at the actual resolution.

Counted with `torch.utils.flop_counter.FlopCounterMode` (a multiply-add = 2 FLOPs; convolutions,
matmuls, bmm and attention; element-wise ops, norms and softmax are not counted) by running each
network once, forward only, batch 1:

- `unet_per_sample`:   one U-Net forward for one latent sample (one row of a CFG batch), i.e.
                       a 512x512 image costs 2 x steps x this with classifier-free guidance;
- `text_encoder_pass`: one pass of the family's text encoders (SD 1.x / 2.x: one CLIP; SDXL: CLIP-L
                       and bigG, both) over the 77 tokens of one prompt;
- `vae_decode`:        one VAE decode of one latent to one image.

Reference numbers (from the issue) for SD 1.5 at 512x512:
    0.80 TFLOP per U-Net sample per step, 13.3 GFLOP per text-encoder pass, 2.5 TFLOP per VAE decode.
So NeTI's official inference spends 50 x 16 x 13.3 GFLOP = 10.6 TFLOP on text per image, 13 % of
its 80 TFLOP of U-Net work (50 steps x 2 x 0.80).

Scaled-dot-product attention is counted by forcing PyTorch's MATH backend while counting (its fused
CPU kernel has no FLOP formula registered), so attention's two matmuls are always included. The
U-Net is counted in neti-fast's "plain" cross-attention mode (K/V projected from the prompt); the
engine's table mode reads precomputed K/V instead, a difference of 16 small projections (< 1 %).
Results are cached per process by (model name, height, width, batch).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode

from neti_fast.utils import image_size

_CACHE: dict = {}


@contextmanager
def _math_sdpa():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.MATH):
            yield
    except ImportError:  # very old torch: fall back to whatever SDPA picks
        yield


def _count(fn) -> int:
    with torch.no_grad(), _math_sdpa():
        with FlopCounterMode(display=False) as counter:
            fn()
    return int(counter.get_total_flops())


def _size(model, height, width) -> tuple[int, int]:
    return image_size(model, height, width)


def unet_flops(model, height: int | None = None, width: int | None = None, batch: int = 1) -> int:
    """FLOPs of one U-Net forward on `batch` latent samples at height x width pixels."""
    h, w = _size(model, height, width)
    key = ("unet", model.name, h, w, batch)
    if key not in _CACHE:
        f = model.vae_scale_factor
        dev, dt = model.device, model.dtype
        x = torch.zeros(batch, model.unet.config.in_channels, h // f, w // f, device=dev, dtype=dt)
        enc = torch.zeros(batch, 77, model.text_dim, device=dev, dtype=dt)
        t = torch.tensor(500, device=dev)
        # the family's added conditioning (SDXL: text_embeds, time_ids); zeros cost what real values do
        added = {n: torch.zeros(batch, w, device=dev, dtype=dt) for n, w in model.added_widths.items()} or None
        st = getattr(model, "attn_state", None)
        prev = None if st is None else st.mode
        if st is not None:
            st.mode = "plain"
        try:
            _CACHE[key] = _count(lambda: model.unet(x, t, encoder_hidden_states=enc, added_cond_kwargs=added))
        finally:
            if st is not None:
                st.mode = prev
    return _CACHE[key]


def text_encoder_flops(model, batch: int = 1) -> int:
    """FLOPs of one pass of every text encoder of the family over `batch` prompts of 77 tokens."""
    key = ("text", model.name, batch)
    if key not in _CACHE:
        total = 0
        for tok, te in zip(model.tokenizers, model.text_encoders):
            ids = torch.full((batch, 77), int(tok.eos_token_id), dtype=torch.long, device=te.device)
            total += _count(lambda te=te, ids=ids: te(ids))
        _CACHE[key] = total
    return _CACHE[key]


def vae_decode_flops(model, height: int | None = None, width: int | None = None, batch: int = 1) -> int:
    """FLOPs of one VAE decode of `batch` latents to height x width images."""
    h, w = _size(model, height, width)
    key = ("vae", model.name, h, w, batch)
    if key not in _CACHE:
        f = model.vae_scale_factor
        z = torch.zeros(batch, model.vae.config.latent_channels, h // f, w // f,
                        device=model.vae.device, dtype=model.vae.dtype)
        _CACHE[key] = _count(lambda: model.vae.decode(z))
    return _CACHE[key]


def count(model, height: int | None = None, width: int | None = None) -> dict:
    """{"unet_per_sample", "text_encoder_pass", "vae_decode"} FLOPs for one sample / pass / image."""
    h, w = _size(model, height, width)
    return {
        "height": h,
        "width": w,
        "unet_per_sample": unet_flops(model, h, w, 1),
        "text_encoder_pass": text_encoder_flops(model, 1),
        "vae_decode": vae_decode_flops(model, h, w, 1),
    }


def image_flops(flops: dict, steps: int, guidance: bool = True) -> int:
    """U-Net FLOPs to denoise one image: steps x (2 with guidance) x per-sample forward."""
    return steps * (2 if guidance else 1) * flops["unet_per_sample"]
