"""Schedulers, per-image noise and decoding: the pieces of sampling the engine, the reference path
and the diffusers adapter share, so that an image depends only on its own seed."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import NetiError
from ..sd.models import Model
from ..utils import SAMPLERS, SCHEDULER_PARTS, SCHEDULES, SamplerSpec, first_line, scheduler_problem


def scheduler_parts(name: str) -> tuple[SamplerSpec, str]:
    """A --scheduler name -> (its SAMPLERS row, its schedule), or NetiError naming `scheduler`."""
    problem = scheduler_problem(name)
    if problem:
        raise NetiError(problem, field="scheduler", value=name)
    sampler, schedule = SCHEDULER_PARTS[name]
    return SAMPLERS[sampler], schedule


def missing_packages(name: str) -> list[str]:
    """Packages the scheduler `name` needs that are not installed (LMS and Beta: scipy; DPM++ SDE: torchsde)."""
    import importlib.util
    spec, schedule = scheduler_parts(name)
    needs = spec.needs + (("scipy",) if schedule == "beta" else ())
    return [p for p in needs if importlib.util.find_spec(p) is None]


def make_scheduler(name: str, config: dict):
    """The diffusers scheduler of `name` (utils.SAMPLERS x SCHEDULES), built from the model's config."""
    import diffusers
    spec, schedule = scheduler_parts(name)
    missing = missing_packages(name)
    if missing:
        raise NetiError(f"needs the {', '.join(missing)} package{'s' if len(missing) > 1 else ''} "
                        f"(pip install {' '.join(missing)})", field="scheduler", value=name)
    cls = getattr(diffusers, spec.cls)
    return cls.from_config(config, **dict(spec.options), **dict(SCHEDULES[schedule]))


def check_scheduler(name: str, config: dict, steps: int):
    """Build the scheduler for `steps` once, so that what diffusers refuses (LCM beyond its original 50
    steps) is a NetiError before any work; returns it, its timesteps set."""
    sched = make_scheduler(name, config)
    try:
        sched.set_timesteps(steps)
    except ValueError as e:
        raise NetiError(f"{first_line(e)} (scheduler {name})", field="steps", value=steps) from None
    return sched


def step_kwargs(name: str, sched, generators: list, seeds: list[int], eta: float | None) -> dict:
    """The extra arguments of `sched.step` for a batch: its noise comes from each image's own seed
    (its generator, or for DPM++ SDE a Brownian tree seeded with it), so an image never depends on
    its batch-mates; DDIM's eta (None: 0, deterministic)."""
    spec, _ = scheduler_parts(name)
    kw = {}
    if spec.noise == "generator":
        kw["generator"] = generators
    elif spec.noise == "brownian":
        # diffusers builds one torchsde tree per seed of a list (BatchedBrownianTree), each the size of one image
        sched.noise_sampler_seed = list(seeds)
    if spec.eta:
        kw["eta"] = 0.0 if eta is None else float(eta)
    return kw


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


# SD 1.x latent channel -> RGB in [-1, 1], a least-squares fit of the VAE decoder's mean colour
# (A1111's "Approx cheap" preview); rows: latent channels 0-3, columns R, G, B.
LATENT_RGB = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))


def preview(latents: torch.Tensor) -> np.ndarray:
    """A cheap look at latents being denoised: one fixed linear map per latent pixel, no VAE
    (uint8 [B, h, w, 3] at latent resolution, 1/8 of the image's side)."""
    rgb = torch.einsum("bchw,cr->bhwr", latents.detach().float().cpu(), torch.tensor(LATENT_RGB))
    return ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
