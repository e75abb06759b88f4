"""Validation grids during training: the concept as it stands at a step, generated for the run's
validation prompts x seeds (official defaults: its four prompts, seeds 42 420 501 5456, 50
DPM-Solver++ steps, guidance 7.5, the model's size), saved as `validation-{step}.png` in the run's
folder (rows prompts, columns seeds, labelled).

The images come from neti-fast's own inference path (precomputed table, batched engine): the
same images `neti-fast generate` gives for the concept saved at that step. Generating draws no
random number from the training streams (every RNG is forked), so a run with validation trains
exactly the same concept as one without (the official trainer re-seeds all RNGs after each
validation instead).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def validation_images(model, concept, cfg) -> np.ndarray:
    """uint8 [P, S, H, W, 3] for cfg.validation_prompts x cfg.validation_seeds."""
    from ..concepts.table import precompute
    from ..engine.engine import Engine
    from ..engine.request import GenerateConfig, Request

    prompts, seeds = list(cfg.validation_prompts), list(cfg.validation_seeds)
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        table = precompute(concept, progress=False)
        gen_cfg = GenerateConfig(steps=cfg.validation_steps, batch_size=min(8, len(prompts) * len(seeds)))
        engine = Engine(model, gen_cfg)  # eager PyTorch: a grid every few hundred steps needs no export
        images = engine.generate([Request(p, s, table) for p in prompts for s in seeds])
    return images.reshape(len(prompts), len(seeds), *images.shape[1:])


def write_validation(out: Path, step: int, model, concept, cfg) -> tuple[Path, np.ndarray]:
    """Generate and save `validation-{step}.png`; returns (its path, the grid image)."""
    from PIL import Image

    from ..images import write_grid
    images = validation_images(model, concept, cfg)
    path = Path(out) / f"validation-{step}.png"
    write_grid(path, [list(row) for row in images], row_labels=list(cfg.validation_prompts),
               col_labels=[f"seed {s}" for s in cfg.validation_seeds])
    with Image.open(path) as im:
        grid = np.asarray(im.convert("RGB"))
    return path, grid
