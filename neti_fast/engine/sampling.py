"""Schedulers, per-image noise and decoding: the pieces of sampling the engine, the reference path
and the diffusers adapter share, so that an image depends only on its own seed."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import NetiError
from ..sd.models import Model
from ..utils import SCHEDULERS


def make_scheduler(name: str, config: dict):
    """dpm++ (DPM-Solver++ 2M), dpm++-karras (same on Karras sigmas), ddim, euler, euler-a (ancestral)."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler)
    classes = {"dpm++": (DPMSolverMultistepScheduler, {}), "ddim": (DDIMScheduler, {}),
               "euler": (EulerDiscreteScheduler, {}), "euler-a": (EulerAncestralDiscreteScheduler, {}),
               "dpm++-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True})}
    if name not in classes:
        raise NetiError(f"must be one of {', '.join(SCHEDULERS)}", field="scheduler", value=name)
    cls, extra = classes[name]
    return cls.from_config(config, **extra)


def image_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with its seed: it draws the image's initial latents and then
    any noise an ancestral / stochastic scheduler adds, so an image never depends on its batch-mates
    (diffusers' pipelines with generator=[...] draw the same way)."""
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def initial_latents(seed: int, shape: tuple, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """diffusers' draw for one image from `torch.Generator("cpu").manual_seed(seed)` (or `generator`,
    seeded so): batch-independent."""
    from diffusers.utils.torch_utils import randn_tensor
    generator = generator or torch.Generator("cpu").manual_seed(seed)
    return randn_tensor((1, *shape), generator=generator, device=torch.device("cpu"), dtype=dtype)


def decode(model: Model, latents: torch.Tensor) -> np.ndarray:
    """VAE decode to uint8 [B, H, W, 3], rounding exactly like diffusers' image processor."""
    x = model.vae.decode(latents.to(model.vae.dtype) / model.vae.config.scaling_factor).sample
    x = (x / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return (x * 255).round().astype("uint8")
