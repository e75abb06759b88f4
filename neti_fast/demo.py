"""`neti-fast demo`: the whole workflow on a built-in tiny model, in about 25 s on 2 CPU cores
(`--model tiny`, the default; `tiny-sd2` and `tiny-xl` run the same workflow on SD 2.x and SDXL).
Generation uses the model family's default sampler and guidance (families.Family).

1. draws a few training images of a made-up object (a striped ball) procedurally;
2. trains a NeTI concept on them for a few dozen steps;
3. precomputes its table with two truncation values;
4. generates a grid per prompt (truncation x seed) and prints where everything went.

The tiny model has random weights, so the pictures are abstract; the point is that every stage
runs, end to end, exactly as it does on Stable Diffusion.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .api import generate_to_folder, load_model, precompute
from .engine.request import GenerateConfig

NOISE_NOTE = ("\nNote: the built-in `{model}` model has random weights, so these images are noise-like patterns, "
              "not pictures of the prompts. The demo shows that every stage runs; for real images train and "
              "generate with Stable Diffusion 1.x weights (--model stable-diffusion-v1-5/stable-diffusion-v1-5 "
              "or a local diffusers folder).")
PROMPTS = ["a photo of {} on the beach", "a painting of {} in the style of van gogh"]
TRUNCATIONS = [None, 16]


def make_training_images(folder: Path, n: int = 4, size: int = 64) -> Path:
    """A striped ball on varying backgrounds: a tiny 'concept' to learn."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        bg = tuple(int(c) for c in rng.integers(90, 230, 3))
        img = Image.new("RGB", (size, size), bg)
        d = ImageDraw.Draw(img)
        r = size // 3 + int(rng.integers(-4, 5))
        cx, cy = size // 2 + int(rng.integers(-6, 7)), size // 2 + int(rng.integers(-6, 7))
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(200, 30, 40))
        for k in range(-r, r, 6):
            d.line([cx - r, cy + k, cx + r, cy + k + 3], fill=(250, 220, 40), width=2)
        img.save(folder / f"ball-{i}.png")
    return folder


def run_demo(out: str | Path = "neti-fast-demo", train_steps: int = 30, gen_steps: int = 20, model: str = "tiny") -> dict:
    from .training.trainer import train
    from .training.config import TrainConfig

    out = Path(out)
    t0 = time.perf_counter()
    name, model = model, load_model(model)
    images = make_training_images(out / "train-images")
    concept_dir = out / "concept"
    resume = "latest" if any(concept_dir.glob("checkpoint-*.safetensors")) else None
    cfg = TrainConfig(images=str(images), placeholder="<striped-ball>", init_word="ball", model=name,
                      out=str(concept_dir), steps=train_steps, batch_size=2, grad_accum=1, save_every=0,
                      resume=resume)
    concept_path = train(cfg, model=model)
    from .concepts.importers import load_concept
    table = precompute(load_concept(concept_path), truncations=[t for t in TRUNCATIONS if t])
    table_path = table.save(out / "table.safetensors")
    gen_dir = out / "images"
    gcfg = GenerateConfig(steps=gen_steps, batch_size=8, guidance=model.family.default_guidance,
                          scheduler=model.family.default_scheduler)
    generate_to_folder(model, table, PROMPTS, seeds=[0, 1, 2, 3], out=gen_dir, truncations=TRUNCATIONS, cfg=gcfg,
                       model_name=name, concept_name=str(table_path))
    print(f"\nneti-fast demo finished in {time.perf_counter() - t0:.0f} s")
    print(f"  training images : {images}")
    print(f"  concept         : {concept_path}")
    print(f"  table           : {table_path}")
    print(f"  images + grids  : {gen_dir} (rows: no truncation / truncation 16, columns: seeds 0-3; manifest.jsonl)")
    print(NOISE_NOTE.format(model=name))
    return {"concept": concept_path, "table": table_path, "images": gen_dir}
