"""The documented Python API; the CLI is a thin layer over these functions.

    import neti_fast as nf
    model = nf.load_model("tiny")                       # or a diffusers folder / hub id
    table = nf.precompute(nf.load_concept("concept.safetensors"), truncations=[16])
    images = nf.generate(model, table, ["a photo of {} on a beach"], seeds=[0, 1])   # uint8 [N, H, W, 3]
    nf.generate_to_folder(model, table, prompts, seeds, out="out/")                    # PNGs, grids, manifest

`table` is anything a `Request` takes: a Table, a MixedTable (`nf.parse_layer_mix`), or
{name: table} for several concepts in one prompt ("a photo of {cat} in the style of {painting}").
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import outputs
from .concept import Concept, load_concept  # noqa: F401  (re-exported)
from .models import Model, load_model  # noqa: F401
from .pipeline import Engine, GenerateConfig, Request
from .mixing import parse_layer_mix, parse_time_mix  # noqa: F401
from .table import Table, load_table, load_tables, precompute  # noqa: F401


def _requests(table, prompts, seeds, truncations, cfg):
    return [Request(p, s, table, t, cfg.negative_prompt) for p in prompts for t in truncations for s in seeds]


def generate(model: Model, table, prompts: list[str], seeds=(0,), truncations=(None,),
             cfg: GenerateConfig | None = None, engine: Engine | None = None) -> np.ndarray:
    """Images for every (prompt, truncation, seed), in that nesting order: uint8 [N, H, W, 3]."""
    cfg = cfg or GenerateConfig()
    engine = engine or Engine(model, cfg)
    return engine.generate(_requests(table, prompts, seeds, truncations, cfg))


def generate_to_folder(model: Model, table, prompts: list[str], seeds, out: str | Path,
                       truncations=(None,), cfg: GenerateConfig | None = None, overwrite: bool = False,
                       model_name: str | None = None, concept_name: str | None = None,
                       engine: Engine | None = None, progress: bool = True) -> dict:
    """Generate into `out`: one PNG per (prompt, truncation, seed), a grid per prompt, manifest.json;
    with several truncations also a sweep grid per seed (rows prompts, columns truncations, labelled):
    the paper's reconstruction-vs-editability figure.

    Images already in `out` with the same settings are skipped (resume). Returns the manifest entries.
    """
    cfg = cfg or GenerateConfig()
    out = Path(out)
    outputs.check_writable(out)
    engine = engine or Engine(model, cfg)
    h, w = cfg.height or model.default_size, cfg.width or model.default_size
    wanted = []
    for pi, prompt in enumerate(prompts):
        for trunc in truncations:
            for seed in seeds:
                wanted.append({
                    "file": outputs.image_name(pi, prompt, trunc, seed), "prompt": prompt, "seed": seed,
                    "truncation": trunc, "steps": cfg.steps, "guidance": cfg.guidance, "scheduler": cfg.scheduler,
                    "model": model_name or model.name, "concept": concept_name, "negative_prompt": cfg.negative_prompt,
                    "height": h, "width": w, "dtype": str(model.dtype).replace("torch.", "")})
    todo = outputs.plan(out, wanted, overwrite)
    manifest = outputs.read_manifest(out)
    bar = tqdm(total=len(todo), desc="generate", unit="img", disable=not progress)
    bs = max(1, cfg.batch_size)
    for i in range(0, len(todo), bs):
        chunk = todo[i:i + bs]
        images = engine.generate_batch([Request(e["prompt"], e["seed"], table, e["truncation"], cfg.negative_prompt) for e in chunk])
        for e, img in zip(chunk, images):
            outputs.save_png(out / e["file"], img)
            manifest[e["file"]] = e
        outputs.write_manifest(out, manifest)  # after every batch: an interrupted run resumes here
        bar.update(len(chunk))
    bar.close()
    from PIL import Image
    for pi, prompt in enumerate(prompts):
        rows = [[np.asarray(Image.open(out / outputs.image_name(pi, prompt, t, s)).convert("RGB")) for s in seeds]
                for t in truncations]
        outputs.write_grid(out / f"grid-{pi:03d}-{outputs.slug(prompt)}.png", rows)
    if len(truncations) > 1:
        cols = [_trunc_label(t) for t in truncations]
        for s in seeds:
            rows = [[np.asarray(Image.open(out / outputs.image_name(pi, prompt, t, s)).convert("RGB")) for t in truncations]
                    for pi, prompt in enumerate(prompts)]
            outputs.write_grid(out / f"sweep-s{s}.png", rows, row_labels=list(prompts), col_labels=cols)
    return {e["file"]: manifest[e["file"]] for e in wanted}


def _trunc_label(t) -> str:
    return "full (no truncation)" if t is None else f"truncation {t}"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
