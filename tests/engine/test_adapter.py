"""The diffusers adapter (`neti_fast.attach`) with each scheduler: same images as the engine, and the
step read from the scheduler's own counter (no per-call match of the timestep) where it has one."""
import numpy as np
import pytest
import torch

import neti_fast
from neti_fast.engine.adapter import Attachment
from neti_fast.engine.engine import Engine
from neti_fast.engine.request import GenerateConfig, Request
from neti_fast.concepts.table import precompute

STEPS = 3


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from diffusers import StableDiffusionPipeline

    from neti_fast.sd.models import tiny_model_dir
    p = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir()), safety_checker=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.parametrize("scheduler", ["dpm++", "euler", "ddim"])
def test_adapter_equals_engine(pipe, tiny_model, make_concept, scheduler, monkeypatch):
    from neti_fast.engine.sampling import make_scheduler
    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    table = precompute(make_concept("neti", dim=tiny_model.text_dim, seed=31), truncations=[8], progress=False)
    matched = []
    orig = Attachment._match_step
    monkeypatch.setattr(Attachment, "_match_step", staticmethod(lambda ts, t: matched.append(1) or orig(ts, t)))
    handle = neti_fast.attach(pipe, table, truncation=8)
    try:
        gens = [torch.Generator("cpu").manual_seed(s) for s in (1, 2)]
        out = pipe(["a photo of {}"], num_images_per_prompt=2, num_inference_steps=STEPS, generator=gens,
                   output_type="np").images
    finally:
        handle.detach()
    out = (out * 255).round().astype("uint8")
    ours = Engine(tiny_model, GenerateConfig(steps=STEPS, scheduler=scheduler)).generate(
        [Request("a photo of {}", s, table, 8) for s in (1, 2)])
    assert int(np.abs(out.astype(np.int32) - ours.astype(np.int32)).max()) <= 1
    # DPM-Solver++ / Euler count their steps: at most the first call (DPM: before any step(); Euler
    # sets its counter in scale_model_input already) is matched by value; DDIM has no counter
    if scheduler == "ddim":
        assert len(matched) == STEPS
    else:
        assert len(matched) <= 1


def test_adapter_multi_vector_ti(pipe, tiny_model):
    """A 3-vector TI embedding through the adapter: the engine's image (3 token positions)."""
    from neti_fast.concepts.concept import Concept
    from neti_fast.engine.sampling import make_scheduler
    pipe.scheduler = make_scheduler("dpm++", dict(pipe.scheduler.config))
    c = Concept("ti", "<tri>", tiny_model.text_dim, embeds=torch.randn(3, tiny_model.text_dim,
                                                                       generator=torch.Generator().manual_seed(5)))
    table = precompute(c, progress=False)
    handle = neti_fast.attach(pipe, table)
    try:
        out = pipe("a photo of {}", num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(4),
                   output_type="np").images
    finally:
        handle.detach()
    out = (out * 255).round().astype("uint8")
    ours = Engine(tiny_model, GenerateConfig(steps=STEPS)).generate([Request("a photo of {}", 4, table)])
    assert int(np.abs(out.astype(np.int32) - ours.astype(np.int32)).max()) <= 1


@pytest.mark.parametrize("builtin", ["tiny-sd2", "tiny-xl"])
def test_adapter_on_other_families(builtin, make_concept, request):
    """attach on SD 2.x's StableDiffusionPipeline and SDXL's StableDiffusionXLPipeline: the engine's
    images (SDXL: its pooled embeddings replace the pipeline's, per step)."""
    import diffusers

    from neti_fast.sd.models import tiny_model_dir
    model = request.getfixturevalue({"tiny-sd2": "tiny_sd2_model", "tiny-xl": "tiny_xl_model"}[builtin])
    fam = model.family
    extra = {"add_watermarker": False} if fam.added_conditioning else {"safety_checker": None,
                                                                        "requires_safety_checker": False}
    p = getattr(diffusers, fam.pipeline).from_pretrained(str(tiny_model_dir(builtin)), **extra)
    p.set_progress_bar_config(disable=True)
    from neti_fast.engine.sampling import make_scheduler
    p.scheduler = make_scheduler("euler", dict(p.scheduler.config))
    table = precompute(make_concept("neti", dim=model.text_dim, seed=31, family=fam), truncations=[8], progress=False)
    handle = neti_fast.attach(p, table, truncation=8)
    try:
        gens = [torch.Generator("cpu").manual_seed(s) for s in (1, 2)]
        out = p(["a photo of {}"], num_images_per_prompt=2, num_inference_steps=STEPS, guidance_scale=5.0,
                generator=gens, output_type="np").images
    finally:
        handle.detach()
    out = (out * 255).round().astype("uint8")
    ours = Engine(model, GenerateConfig(steps=STEPS, scheduler="euler", guidance=5.0)).generate(
        [Request("a photo of {}", s, table, 8) for s in (1, 2)])
    assert int(np.abs(out.astype(np.int32) - ours.astype(np.int32)).max()) <= 1
