"""The documented Python API; the CLI is a thin layer over these functions.

    import neti_fast as nf
    model = nf.load_model("tiny")                       # or a diffusers folder / hub id
    table = nf.precompute(nf.load_concept("concept.safetensors"), truncations=[16])
    images = nf.generate(model, table, ["a photo of {} on a beach"], seeds=[0, 1])   # uint8 [N, H, W, 3]
    nf.generate_to_folder(model, table, prompts, seeds, out="out/")                    # PNGs, grids, manifest.jsonl

`table` is anything a `Request` takes: a Table, a MixedTable (`nf.parse_layer_mix`), or
{name: table} for several concepts in one prompt ("a photo of {cat} in the style of {painting}").
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from .jobs import manifest
from .jobs import outputs
from . import images
from .concepts.importers import load_concept  # noqa: F401  (the documented API: neti_fast/__init__.py)
from .errors import NetiError
from .concepts.mixing import parse_layer_mix, parse_time_mix  # noqa: F401  (documented API)
from .sd.models import Model, load_model  # noqa: F401  (documented API)
from .engine.engine import Engine
from .engine.request import GenerateConfig, Request, check_settings
from .concepts.table import load_table, load_tables, precompute  # noqa: F401  (documented API)


def _requests(table, prompts, seeds, truncations, cfg):
    return [Request(p, s, table, t, cfg.negative_prompt, prompt_syntax=cfg.prompt_syntax)
            for p in prompts for t in truncations for s in seeds]


def _engine(model, cfg, engine, backend, export_dir=None, model_name=None):
    if engine is not None:
        return engine
    from .engine.backends import engine as backend_engine
    return backend_engine(model, cfg, backend, export_dir=export_dir, model_name=model_name)


def generate(model: Model, table, prompts: list[str], seeds=(0,), truncations=(None,),
             cfg: GenerateConfig | None = None, engine: Engine | None = None, backend: str = "auto") -> np.ndarray:
    """Images for every (prompt, truncation, seed), in that nesting order: uint8 [N, H, W, 3].

    `backend`: the U-Net runtime (auto | eager | compile | onnx | tensorrt, as `--backend`;
    see neti_fast.engine.backends); ignored when an `engine` is given."""
    cfg = cfg or GenerateConfig()
    check_settings(cfg)
    engine = _engine(model, cfg, engine, backend)
    return engine.generate(_requests(table, prompts, seeds, truncations, cfg))


def generate_to_folder(model: Model, table, prompts: list[str], seeds, out: str | Path,
                       truncations=(None,), cfg: GenerateConfig | None = None, overwrite: bool = False,
                       model_name: str | None = None, concept_name: str | None = None,
                       engine: Engine | None = None, progress: bool = True, backend: str = "auto",
                       export_dir: str | Path | None = None, on_summary=None, init=None) -> dict:
    """Generate into `out`: one PNG per (prompt, truncation, seed), a grid per prompt, manifest.jsonl;
    with several truncations also a sweep grid per seed (rows prompts, columns truncations, labelled):
    the paper's reconstruction-vs-editability figure.

    This is a small job run by the job runner (neti_fast.jobs.runner): the same fixed batch plan, manifest
    and resume as `neti-fast run`. Images already in `out` with the same settings are skipped; a PNG
    the manifest does not list (a run killed between writing it and recording it) is kept if it
    equals the regenerated image and is an error otherwise (unless `overwrite`). Folders written
    with the older manifest.json resume too. Every request is checked before any work (and before
    an exported backend is built: `backend`, `export_dir` as for `generate`). Returns the manifest
    entries {file: entry}; `on_summary(summary)` gets the run's counts (made, skipped...: job.json's body).
    `init`: img2img for every image, a `jobs.jobfile.InitSource` (`init_source(path, strength, resize_mode,
    mask)`: the files are checked and hashed with the rest, and recorded in the manifest).
    """
    from .jobs import runner
    from .jobs.jobfile import Concepts, Line, check_lines
    cfg = cfg or GenerateConfig()
    check_settings(cfg)
    out = Path(out)
    truncations = list(dict.fromkeys(truncations))
    lines = [Line(line=pi + 1, prompt=prompt, concept=concept_name, paths=None, seeds=list(seeds),
                  truncations=truncations, steps=cfg.steps, guidance=cfg.guidance, scheduler=cfg.scheduler,
                  negative_prompt=cfg.negative_prompt, height=cfg.height, width=cfg.width, init=init,
                  prompt_syntax=cfg.prompt_syntax)
             for pi, prompt in enumerate(prompts)]
    concepts = Concepts(loaded=table)
    problems = check_lines(model, lines, concepts)  # before an engine is built (an export takes minutes)
    if problems:
        raise problems[0][1]
    if engine is None:
        engine = _engine(model, cfg, None, backend, export_dir=export_dir, model_name=model_name)
        cfg = engine.cfg  # with the attention the backend settled on
    summary, failures = runner.run(lines, out, model, cfg, concepts, model_name=model_name, overwrite=overwrite,
                             engine=engine, progress=progress, desc="generate",
                             numbering=lambda L: (L.line - 1, 3))  # generate numbers prompts from 0
    entries = {e["file"]: e for e in manifest.merge(out) if manifest.is_done(e) and "file" in e}
    if failures:
        f = failures[0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise NetiError(f"{out / f['file']}: {f['reason']}{more}")
    _write_grids(out, prompts, seeds, truncations)
    if on_summary is not None:
        on_summary(summary)
    return {f: entries[f] for f in (outputs.image_name(pi, p, t, s) for pi, p in enumerate(prompts)
                                    for t in truncations for s in seeds)}


def load_concepts(specs: list[str], placeholder: str | None = None, layer_mix: str | None = None,
                  time_mix: str | None = None) -> dict:
    """{name: table} of `[NAME=]PATH` specs (any concept format, tables, bundles), with the layer /
    time mixes of them added as `mix` (as `generate --concept ... --layer-mix ... --time-mix ...`)."""
    from .concepts.mixing import add_mixes
    return add_mixes(load_tables(specs, placeholder), layer_mix, time_mix)


def _write_grids(out: Path, prompts, seeds, truncations) -> None:
    from PIL import Image

    def pixels(pi, prompt, t, s):
        with Image.open(out / outputs.image_name(pi, prompt, t, s)) as im:
            return np.asarray(im.convert("RGB"))
    for pi, prompt in enumerate(prompts):
        rows = [[pixels(pi, prompt, t, s) for s in seeds] for t in truncations]
        images.write_grid(out / f"grid-{pi:03d}-{outputs.slug(prompt)}.png", rows,
                           row_labels=[outputs.truncation_label(t) for t in truncations],
                           col_labels=[f"seed {s}" for s in seeds])
    if len(truncations) > 1:
        cols = [outputs.truncation_label(t) for t in truncations]
        for s in seeds:
            rows = [[pixels(pi, prompt, t, s) for t in truncations] for pi, prompt in enumerate(prompts)]
            images.write_grid(out / f"sweep-s{s}.png", rows, row_labels=list(prompts), col_labels=cols)
