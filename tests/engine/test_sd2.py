"""SD 2.x (`tiny-sd2`: OpenCLIP-style encoder, head dim 64, linear projections, upcast attention,
v-prediction) through the same engine: equal to diffusers' StableDiffusionPipeline with no concept
and with a Textual Inversion concept, the fast path equal to the reference path, and a seed's image
independent of its batch-mates."""
import numpy as np
import pytest
import torch

from neti_fast.concepts.table import precompute
from neti_fast.engine.engine import Engine
from neti_fast.engine.reference import generate_reference
from neti_fast.engine.request import GenerateConfig, Request
from neti_fast.sd.families import SD2

STEPS = 4
CFG = GenerateConfig(steps=STEPS, batch_size=8)
TOL = 1  # levels of 1/255, as for SD 1.x (tests/engine/test_engine.py)


@pytest.fixture(scope="module")
def pipe(tiny_sd2_model):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from neti_fast.sd.models import tiny_model_dir
    p = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir("tiny-sd2")), safety_checker=None,
                                                requires_safety_checker=False)
    p.scheduler = DPMSolverMultistepScheduler.from_config(p.scheduler.config)   # keeps v_prediction
    p.set_progress_bar_config(disable=True)
    return p


def _diffusers(pipe, prompt, seed):
    d = pipe(prompt, num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images
    return (d * 255).round().astype("uint8")


def test_plain_prompt_equals_diffusers(max_diff, pipe, tiny_sd2_model):
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    ours = Engine(tiny_sd2_model, CFG).generate([Request("a photo of a dog", 3)])
    assert max_diff(_diffusers(pipe, "a photo of a dog", 3)[0], ours[0]) <= TOL


def test_ti_concept_equals_diffusers_load_textual_inversion(max_diff, pipe, tiny_sd2_model, make_concept, tmp_path):
    from safetensors.torch import save_file
    c = make_concept("ti", dim=tiny_sd2_model.text_dim, seed=21, placeholder="<sd2-c>", family=SD2)
    save_file({"<sd2-c>": c.embeds[0].clone()}, tmp_path / "learned_embeds.safetensors")
    pipe.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors"), token="<sd2-c>")
    try:
        d = _diffusers(pipe, "a photo of <sd2-c> on a beach", 5)
    finally:
        pipe.unload_textual_inversion("<sd2-c>")
    ours = Engine(tiny_sd2_model, CFG).generate([Request("a photo of {} on a beach", 5, precompute(c, progress=False))])
    assert max_diff(d[0], ours[0]) <= TOL
    plain = Engine(tiny_sd2_model, CFG).generate([Request("a photo of a dog on a beach", 5)])
    assert max_diff(plain[0], ours[0]) > 0   # the concept is used


@pytest.mark.parametrize("method", ["neti", "xti"])
def test_fast_equals_reference(max_diff, tiny_sd2_model, make_concept, method):
    c = make_concept(method, dim=tiny_sd2_model.text_dim, seed=4, family=SD2)
    table = precompute(c, truncations=[16] if method == "neti" else [], progress=False)
    truncs = [None, 16] if method == "neti" else [None]
    reqs = [Request("a photo of {} on a beach", 0, table, t) for t in truncs]
    fast = Engine(tiny_sd2_model, CFG).generate(reqs)
    for r, img in zip(reqs, fast):
        assert max_diff(img, generate_reference(tiny_sd2_model, r, CFG)[0]) <= TOL


def test_seed_independent_of_batch_composition(max_diff, tiny_sd2_model, make_concept):
    ta = precompute(make_concept("neti", dim=tiny_sd2_model.text_dim, seed=7, family=SD2), truncations=[8], progress=False)
    tb = precompute(make_concept("xti", dim=tiny_sd2_model.text_dim, seed=8, placeholder="<d>", family=SD2), progress=False)
    target = Request("a photo of {} in snow", 11, ta, 8)
    alone = Engine(tiny_sd2_model, GenerateConfig(steps=STEPS, batch_size=1)).generate([target])[0]
    mixed = [Request("a painting of {}", 2, tb), target, Request("a cat", 9, None),
             Request("{a} beside {b}", 4, {"a": ta, "b": tb})]
    batched = Engine(tiny_sd2_model, GenerateConfig(steps=STEPS, batch_size=4)).generate(mixed)
    assert max_diff(alone, batched[1]) <= TOL
    assert int(np.abs(batched[0].astype(int) - batched[2].astype(int)).max()) > 10


@pytest.fixture(scope="module")
def img2img_pipe(tiny_sd2_model):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline

    from neti_fast.sd.models import tiny_model_dir
    p = StableDiffusionImg2ImgPipeline.from_pretrained(str(tiny_model_dir("tiny-sd2")), safety_checker=None,
                                                       requires_safety_checker=False)
    p.scheduler = DPMSolverMultistepScheduler.from_config(p.scheduler.config)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_img2img_equals_diffusers(max_diff, img2img_pipe, tiny_sd2_model, init_image, strength):
    """img2img (v-prediction) = StableDiffusionImg2ImgPipeline for the same seed and strength, as for SD 1.x."""
    from neti_fast.engine.img2img import prepare_init
    p = img2img_pipe
    d = p("a photo of a dog", image=init_image, strength=strength, num_inference_steps=STEPS,
          generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    size = tiny_sd2_model.default_size

    def ours(s):
        return Engine(tiny_sd2_model, CFG).generate([Request("a photo of a dog", 3, init=prepare_init(init_image, size, size, s))])[0]
    got = ours(strength)
    assert max_diff((d * 255).round().astype("uint8"), got) <= TOL
    assert max_diff(ours(0.5), got) > 10


def test_inpainting_equals_the_diffusers_blend(max_diff, img2img_pipe, tiny_sd2_model, init_image):
    """Inpainting on SD 2.x (v-prediction): the blend in StableDiffusionImg2ImgPipeline's step callback,
    as for SD 1.x and SDXL (inpaint_util); outside the mask the pixels are the init image's."""
    from inpaint_util import STRENGTH, blended_reference, masked_init

    from neti_fast.engine.img2img import prepare_init
    init, inside = masked_init(init_image)
    ref = blended_reference(img2img_pipe, "a photo of a dog", init_image, init, STEPS, 3)
    ours = Engine(tiny_sd2_model, CFG).generate([Request("a photo of a dog", 3, init=init)])[0]
    assert max_diff(ref[inside], ours[inside]) <= TOL
    assert np.array_equal(ours[~inside], np.asarray(init_image)[~inside])
    size = tiny_sd2_model.default_size
    plain = Engine(tiny_sd2_model, CFG).generate([Request("a photo of a dog", 3, init=prepare_init(init_image, size, size, STRENGTH))])[0]
    assert max_diff(plain[inside], ours[inside]) > 10
