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


def test_adapter_sdxl_explicit_empty_negative_is_encoded(make_concept, tiny_xl_model):
    """diffusers' SDXL zeroes the negative conditioning (force_zeros_for_empty_prompt) only when no
    negative_prompt is given; an explicit "" is encoded as text. The engine's request flag for it
    (zero_empty_negative=False) gives diffusers' image for negative_prompt="", and the adapter sets it
    for an explicit "" (and only then): its images are the engine's, either way; "" and None differ
    well beyond the tolerance."""
    from diffusers import StableDiffusionXLPipeline

    from neti_fast.engine.sampling import make_scheduler
    from neti_fast.sd.models import tiny_model_dir
    p = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir("tiny-xl")), add_watermarker=False)
    p.set_progress_bar_config(disable=True)
    p.scheduler = make_scheduler("euler", dict(p.scheduler.config))
    assert p.config.force_zeros_for_empty_prompt

    def run(prompt, **kw):
        out = p(prompt, num_inference_steps=STEPS, guidance_scale=5.0,
                generator=torch.Generator("cpu").manual_seed(4), output_type="np", **kw).images[0]
        return (out * 255).round().astype("uint8")

    def engine(prompt, table=None, **kw):
        return Engine(tiny_xl_model, GenerateConfig(steps=STEPS, scheduler="euler", guidance=5.0)).generate(
            [Request(prompt, 4, table, negative_prompt="", **kw)])[0]

    def diff(a, b):
        return int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())
    plain = "a photo of a dog"
    assert diff(run(plain, negative_prompt=""), engine(plain, zero_empty_negative=False)) <= 1
    assert diff(run(plain), engine(plain)) <= 1
    assert diff(run(plain, negative_prompt=""), run(plain)) > 10
    table = precompute(make_concept("ti", dim=tiny_xl_model.text_dim, seed=3, family=tiny_xl_model.family),
                       progress=False)
    handle = neti_fast.attach(p, table)
    try:
        got_empty, got_none = run("a photo of {}", negative_prompt=""), run("a photo of {}")
    finally:
        handle.detach()
    assert diff(got_empty, engine("a photo of {}", table, zero_empty_negative=False)) <= 1
    assert diff(got_none, engine("a photo of {}", table)) <= 1
    assert diff(got_empty, got_none) > 10
    # a second text for SDXL's second encoder cannot be honoured: refused, not dropped (the same text is fine)
    from neti_fast.errors import NetiError
    handle = neti_fast.attach(p, table)
    try:
        for kw in ({"prompt_2": "a painting"}, {"negative_prompt": "blurry", "negative_prompt_2": "dark"}):
            with pytest.raises(NetiError, match=next(iter(k for k in kw if k.endswith("_2"))) + " is not supported"):
                run("a photo of {}", **kw)
        assert diff(run("a photo of {}", prompt_2="a photo of {}"), got_none) == 0
    finally:
        handle.detach()


def test_adapter_clip_skip_is_diffusers(pipe, tiny_model, make_concept):
    """diffusers' clip_skip=1 (hidden state -2, then the final layer norm) is neti-fast's CLIP skip 2;
    the attached pipeline passes it through instead of dropping it."""
    from neti_fast.engine.sampling import make_scheduler
    pipe.scheduler = make_scheduler("dpm++", dict(pipe.scheduler.config))
    table = precompute(make_concept("ti", dim=tiny_model.text_dim, seed=9), progress=False)
    handle = neti_fast.attach(pipe, table)
    try:
        out = [(pipe("a photo of {}", num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(3),
                     output_type="np", **kw).images[0] * 255).round().astype(np.int32) for kw in ({}, {"clip_skip": 1})]
    finally:
        handle.detach()
    engine = Engine(tiny_model, GenerateConfig(steps=STEPS))
    skip2 = engine.generate([Request("a photo of {}", 3, table, clip_skip=2)])[0].astype(np.int32)
    assert int(np.abs(out[1] - skip2).max()) <= 1 and int(np.abs(out[0] - out[1]).max()) > 10
