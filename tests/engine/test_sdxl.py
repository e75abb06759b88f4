"""SDXL (`tiny-xl`: CLIP-L + bigG-with-projection at hidden state -2, pooled `text_embeds` and
`time_ids`, force_zeros_for_empty_prompt, 11 modules / 70 blocks) through the same engine: equal to
diffusers' StableDiffusionXLPipeline with no concept and with a TI concept loaded on both encoders,
the fast path equal to the reference path for NeTI and XTI, a seed independent of its batch-mates."""
import numpy as np
import pytest
import torch

from neti_fast.concepts.table import precompute
from neti_fast.engine.engine import Engine
from neti_fast.engine.reference import generate_reference
from neti_fast.engine.request import GenerateConfig, Request
from neti_fast.engine.sampling import make_scheduler
from neti_fast.sd.families import SDXL

STEPS = 4
TOL = 1  # levels of 1/255, as for SD 1.x (tests/engine/test_engine.py)


def _cfg(**kw):
    return GenerateConfig(**{"steps": STEPS, "guidance": SDXL.default_guidance, "scheduler": SDXL.default_scheduler,
                             "batch_size": 8, **kw})


@pytest.fixture(scope="module")
def pipe(tiny_xl_model):
    from diffusers import StableDiffusionXLPipeline

    from neti_fast.sd.models import tiny_model_dir
    p = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir("tiny-xl")), add_watermarker=False)
    p.set_progress_bar_config(disable=True)
    return p


def _diffusers(pipe, prompt, seed, scheduler):
    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    d = pipe(prompt, num_inference_steps=STEPS, guidance_scale=SDXL.default_guidance,
             generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images
    return (d * 255).round().astype("uint8")


@pytest.mark.parametrize("scheduler", ["euler", "dpm++"])
def test_plain_prompt_equals_diffusers(max_diff, pipe, tiny_xl_model, scheduler):
    assert pipe.config.force_zeros_for_empty_prompt and tiny_xl_model.zero_empty_negative
    ours = Engine(tiny_xl_model, _cfg(scheduler=scheduler)).generate([Request("a photo of a dog", 3)])
    assert max_diff(_diffusers(pipe, "a photo of a dog", 3, scheduler)[0], ours[0]) <= TOL


def test_ti_concept_equals_diffusers_on_both_encoders(max_diff, pipe, tiny_xl_model, make_concept):
    m = tiny_xl_model
    c = make_concept("ti", dim=m.text_dim, seed=21, placeholder="<xl-c>", family=SDXL)
    w = m.text_widths[0]
    pipe.load_textual_inversion(c.embeds[:, :w].clone(), token="<xl-c>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(c.embeds[:, w:].clone(), token="<xl-c>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    try:
        d = _diffusers(pipe, "a photo of <xl-c> on a beach", 5, "euler")
    finally:
        pipe.unload_textual_inversion("<xl-c>", tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
        pipe.unload_textual_inversion("<xl-c>", tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2)
    ours = Engine(m, _cfg()).generate([Request("a photo of {} on a beach", 5, precompute(c, progress=False))])
    assert max_diff(d[0], ours[0]) <= TOL
    plain = Engine(m, _cfg()).generate([Request("a photo of a dog on a beach", 5)])
    assert max_diff(plain[0], ours[0]) > 0   # the concept is used


@pytest.mark.parametrize("method", ["neti", "xti"])
def test_fast_equals_reference(max_diff, tiny_xl_model, make_concept, method):
    m = tiny_xl_model
    c = make_concept(method, dim=m.text_dim, seed=4, family=SDXL)
    assert (c.mapper.cfg.num_layers if c.mapper else c.embeds.shape[0]) == 11
    table = precompute(c, truncations=[16] if method == "neti" else [], progress=False)
    truncs = [None, 16] if method == "neti" else [None]
    reqs = [Request("a photo of {} on a beach", 0, table, t) for t in truncs]
    cfg = _cfg(negative_prompt="blurry")    # a real negative prompt beside the zeroed empty one below
    fast = Engine(m, cfg).generate(reqs)
    for r, img in zip(reqs, fast):
        assert max_diff(img, generate_reference(m, r, cfg)[0]) <= TOL
    r = Request("a photo of {}", 1, table)
    assert max_diff(Engine(m, _cfg()).generate([r])[0], generate_reference(m, r, _cfg())[0]) <= TOL


def test_seed_independent_of_batch_composition(max_diff, tiny_xl_model, make_concept):
    m = tiny_xl_model
    ta = precompute(make_concept("neti", dim=m.text_dim, seed=7, family=SDXL), truncations=[8], progress=False)
    tb = precompute(make_concept("xti", dim=m.text_dim, seed=8, placeholder="<d>", family=SDXL), progress=False)
    target = Request("a photo of {} in snow", 11, ta, 8)
    alone = Engine(m, _cfg(batch_size=1)).generate([target])[0]
    mixed = [Request("a painting of {}", 2, tb), target, Request("a cat", 9, None),
             Request("{a} beside {b}", 4, {"a": ta, "b": tb})]
    batched = Engine(m, _cfg(batch_size=4)).generate(mixed)
    assert max_diff(alone, batched[1]) <= TOL
    assert int(np.abs(batched[0].astype(int) - batched[2].astype(int)).max()) > 10


def test_compile_backend_is_built_for_sdxl(tiny_xl_model):
    """`--backend compile` is no longer refused on SDXL (its images: tests/engine/test_cudagraph.py;
    `--backend onnx`: tests/export/test_export.py)."""
    from neti_fast.engine.backends import make_denoiser
    from neti_fast.engine.cudagraph import CudaGraphDenoiser
    den, _ = make_denoiser(tiny_xl_model, "compile")
    assert isinstance(den, CudaGraphDenoiser) and den.inner.compiled


def test_clip_skip_counts_from_sdxl_hidden_state(max_diff, tiny_xl_model):
    """CLIP skip 1 is SDXL's own hidden state -2; 2 is diffusers' clip_skip=1 (hidden state -3)."""
    from neti_fast.sd.encoders import encode_plain_all
    m = tiny_xl_model
    with torch.no_grad():
        ours = encode_plain_all(m, "a photo of a dog", clip_skip=2)
        ids = [t("a photo of a dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
               for t in m.tokenizers]
        want = torch.cat([te(x, output_hidden_states=True).hidden_states[-3] for te, x in zip(m.text_encoders, ids)], -1)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    # the deepest skip is one fewer than the encoders' layers (the first layer's output, hidden state 1);
    # the message says both numbers as they are (it once called the 3-layer encoders 2-layer ones)
    from neti_fast.engine.request import check_request
    from neti_fast.errors import NetiError
    check_request(m, Request("a dog", 0, clip_skip=2))
    with pytest.raises(NetiError) as e:
        check_request(m, Request("a dog", 0, clip_skip=3))
    assert e.value.field == "clip_skip" and "from 1 to 2" in str(e.value) and "penultimate" in str(e.value)
    assert "have 3 and 3 layers" in str(e.value) and "\n" not in str(e.value)


def test_multi_vector_ti_equals_diffusers(max_diff, pipe, tiny_xl_model):
    """A 3-vector SDXL embedding (clip_l [3, 768]-style and clip_g rows side by side): 3 token
    positions per encoder, as diffusers' load_textual_inversion expands `<tok>` to `<tok> <tok>_1 <tok>_2`."""
    from neti_fast.concepts.concept import Concept
    m = tiny_xl_model
    emb = torch.randn(3, m.text_dim, generator=torch.Generator().manual_seed(8))
    w = m.text_widths[0]
    for enc, tok in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
        part = emb[:, :w] if enc is pipe.text_encoder else emb[:, w:]
        pipe.load_textual_inversion(part.clone(), token="<xl-m>", text_encoder=enc, tokenizer=tok)
    try:
        d = _diffusers(pipe, "a photo of <xl-m> on a beach", 6, "euler")
    finally:
        for enc, tok in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
            pipe.unload_textual_inversion("<xl-m>", tokenizer=tok, text_encoder=enc)
    table = precompute(Concept("ti", "<xl-m>", m.text_dim, embeds=emb, family=SDXL), progress=False)
    ours = Engine(m, _cfg()).generate([Request("a photo of {} on a beach", 6, table)])
    assert max_diff(d[0], ours[0]) <= TOL


def test_long_a1111_prompt_fast_equals_reference(max_diff, tiny_xl_model, make_concept):
    """A1111 syntax on SDXL: several 77-token chunks per encoder (context 77k x (768 + 1280) at full
    size), emphasis, the pooled embedding from the first chunk; the fast path equals the reference
    path, and a batch mixing it with a one-chunk prompt gives each image as alone."""
    from neti_fast.engine.request import context_chunks
    m = tiny_xl_model
    table = precompute(make_concept("neti", dim=m.text_dim, seed=9, family=SDXL), progress=False)
    long_ = Request("(a photo:1.3) of {} " + ", ".join(["on a sunny [beach]"] * 20), 2, table,
                    negative_prompt="blurry", prompt_syntax="a1111")
    short = Request("a (photo) of {}", 3, table, prompt_syntax="a1111")
    cfg = _cfg()
    assert context_chunks(m, long_, cfg) > 1 and context_chunks(m, short, cfg) == 1
    both = Engine(m, cfg).generate([long_, short])
    assert max_diff(both[0], generate_reference(m, long_, cfg)[0]) <= TOL
    assert max_diff(both[1], generate_reference(m, short, cfg)[0]) <= TOL
    assert max_diff(both[0], Engine(m, cfg).generate([long_])[0]) <= TOL


def test_empty_prompt_is_encoded_not_zeroed(max_diff, pipe, tiny_xl_model):
    """force_zeros_for_empty_prompt zeroes an empty *negative* prompt only: an empty prompt is encoded
    as text (diffusers' pipe("") with no negative prompt; zeroing it too, as before, was 57 levels off)."""
    ours = Engine(tiny_xl_model, _cfg()).generate([Request("", 3)])[0]
    assert max_diff(_diffusers(pipe, "", 3, "euler")[0], ours) <= TOL


def test_time_ids_equal_diffusers_micro_conditioning(max_diff, pipe, tiny_xl_model):
    """A request's own time ids (original size, crop top-left, target size) are diffusers'
    original_size / crops_coords_top_left / target_size, for both guidance halves."""
    ids = (80, 72, 8, 16, 64, 64)
    pipe.scheduler = make_scheduler("euler", dict(pipe.scheduler.config))
    d = pipe("a photo of a dog", num_inference_steps=STEPS, guidance_scale=SDXL.default_guidance,
             original_size=ids[:2], crops_coords_top_left=ids[2:4], target_size=ids[4:],
             generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    ours = Engine(tiny_xl_model, _cfg()).generate([Request("a photo of a dog", 3, time_ids=ids)])[0]
    assert max_diff((d * 255).round().astype("uint8"), ours) <= TOL
    default = Engine(tiny_xl_model, _cfg()).generate([Request("a photo of a dog", 3)])[0]
    assert max_diff(default, ours) > 10
    from neti_fast.errors import NetiError
    with pytest.raises(NetiError) as e:
        Engine(tiny_xl_model, _cfg()).generate([Request("a dog", 3, time_ids=(64, 64, -1, 0, 64, 64))])
    assert e.value.field == "time_ids"


@pytest.fixture(scope="module")
def img2img_pipe(tiny_xl_model):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from neti_fast.sd.models import tiny_model_dir
    p = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(tiny_model_dir("tiny-xl")), add_watermarker=False)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.parametrize("scheduler,strength", [("euler", 0.3), ("euler", 0.75), ("euler", 1.0), ("dpm++", 0.75)])
def test_img2img_equals_diffusers(max_diff, img2img_pipe, tiny_xl_model, init_image, scheduler, strength):
    """img2img = StableDiffusionXLImg2ImgPipeline for the same seed and strength (the last int(steps x
    strength) steps; the VAE sample and the noise from the seed's generator). A base folder has
    requires_aesthetics_score false, so the pipeline's time ids are txt2img's (h, w, 0, 0, h, w)."""
    from neti_fast.engine.img2img import prepare_init
    p = img2img_pipe
    assert not p.config.requires_aesthetics_score
    p.scheduler = make_scheduler(scheduler, dict(p.scheduler.config))
    d = p("a photo of a dog", image=init_image, strength=strength, num_inference_steps=STEPS,
          guidance_scale=SDXL.default_guidance, generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    size = tiny_xl_model.default_size

    def ours(s):
        return Engine(tiny_xl_model, _cfg(scheduler=scheduler)).generate(
            [Request("a photo of a dog", 3, init=prepare_init(init_image, size, size, s))])[0]
    got = ours(strength)
    assert max_diff((d * 255).round().astype("uint8"), got) <= TOL
    assert max_diff(ours(0.5), got) > 10   # the strength matters far beyond the tolerance


def test_inpainting_equals_the_diffusers_blend(max_diff, img2img_pipe, tiny_xl_model, init_image):
    """Inpainting on SDXL's regular U-Net (tests/engine/test_img2img.py's check for SD 1.x): after every
    step the unmasked latents are the init latents noised to the next timestep, done in diffusers'
    SDXL img2img step callback; outside the mask the pixels are the init image's."""
    from inpaint_util import STRENGTH, blended_reference, masked_init

    from neti_fast.engine.img2img import prepare_init
    p = img2img_pipe
    p.scheduler = make_scheduler("euler", dict(p.scheduler.config))
    size = tiny_xl_model.default_size
    init, inside = masked_init(init_image)
    ref = blended_reference(p, "a photo of a dog", init_image, init, STEPS, 3, guidance_scale=SDXL.default_guidance)
    ours = Engine(tiny_xl_model, _cfg()).generate([Request("a photo of a dog", 3, init=init)])[0]
    assert max_diff(ref[inside], ours[inside]) <= TOL
    assert np.array_equal(ours[~inside], np.asarray(init_image)[~inside])
    plain = Engine(tiny_xl_model, _cfg()).generate([Request("a photo of a dog", 3, init=prepare_init(init_image, size, size, STRENGTH))])[0]
    assert max_diff(plain[inside], ours[inside]) > 10
