"""img2img and inpainting held to diffusers: StableDiffusionImg2ImgPipeline for the same seed and
strength, and the same pipeline with the inpainting blend done in its step callback (diffusers'
StableDiffusionInpaintPipeline's rule for 4-channel U-Nets, on the pipeline we already match)."""
import numpy as np
import pytest
import torch

from neti_fast.concepts.table import precompute
from neti_fast.engine.engine import Engine
from neti_fast.engine.img2img import gaussian_blur, latent_mask, prepare_init, resize_image, schedule_start
from neti_fast.engine.request import GenerateConfig, Request
from neti_fast.errors import NetiError
from inpaint_util import STRENGTH, blended_reference, masked_init

STEPS = 8
SIZE = 64          # tiny's native size (latents 8x8)
TOL = 1            # float summation order only (tests/engine/test_engine.py)
PROMPT = "a photo of a dog"


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline

    from neti_fast.sd.models import tiny_model_dir
    p = StableDiffusionImg2ImgPipeline.from_pretrained(str(tiny_model_dir()), safety_checker=None,
                                                       requires_safety_checker=False)
    p.scheduler = DPMSolverMultistepScheduler.from_config(p.scheduler.config)
    p.set_progress_bar_config(disable=True)
    return p


def _u8(x):
    return (x * 255).round().astype("uint8")


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_img2img_equals_diffusers(max_diff, tiny_model, pipe, init_image, strength):
    d = _u8(pipe(PROMPT, image=init_image, strength=strength, num_inference_steps=STEPS,
                 generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0])
    ours = Engine(tiny_model, GenerateConfig(steps=STEPS)).generate(
        [Request(PROMPT, 3, init=prepare_init(init_image, SIZE, SIZE, strength))])[0]
    assert max_diff(d, ours) <= TOL
    # the strength matters far beyond the tolerance: another one is another image
    other = Engine(tiny_model, GenerateConfig(steps=STEPS)).generate(
        [Request(PROMPT, 3, init=prepare_init(init_image, SIZE, SIZE, 0.5))])[0]
    assert max_diff(other, ours) > 10


# On the random tiny model the blended DPM++ steps amplify float-order differences (~50x a step at
# the end): at 8 steps the summation order of the machine's kernels alone moves the repainted area by
# up to 6/255 against diffusers; at 4 it stays within 1/255, and the effects checked are > 10/255.
INPAINT_STEPS = 4


def test_inpainting_equals_the_diffusers_blend(max_diff, tiny_model, pipe, init_image):
    """After every step the unmasked latents are the init latents noised to the next timestep
    (clean after the last), done here in diffusers' step callback with the init latent and noise
    drawn from the seed exactly as the pipeline draws them; outside the mask the pixels are the
    init image's (A1111's overlay), inside within 1/255 of the reference."""
    init, inside = masked_init(init_image)
    assert latent_mask(init.mask, SIZE // 8, SIZE // 8).sum() == 4 * 5 + 8 * 3   # the 8x8 blocks under the mask, no more
    ref = blended_reference(pipe, PROMPT, init_image, init, INPAINT_STEPS, 3)
    ours = Engine(tiny_model, GenerateConfig(steps=INPAINT_STEPS)).generate([Request(PROMPT, 3, init=init)])[0]
    assert max_diff(ref[inside], ours[inside]) <= TOL
    assert np.array_equal(ours[~inside], np.asarray(init_image)[~inside])
    plain = Engine(tiny_model, GenerateConfig(steps=INPAINT_STEPS)).generate(
        [Request(PROMPT, 3, init=prepare_init(init_image, SIZE, SIZE, STRENGTH))])[0]
    assert max_diff(plain[inside], ours[inside]) > 10   # the pinned surroundings change the repainted area
    assert max_diff(plain[~inside], np.asarray(init_image)[~inside]) > 10   # ...which plain img2img would not keep


def test_batched_with_concepts_equals_alone(max_diff, tiny_model, make_concept, init_image):
    """img2img rows (different images, strengths of one start, masks) beside each other and a NeTI
    concept: each equals its own solo run; the concept reads the rows of the img2img timesteps.
    X's second-order extrapolation over blended latents amplifies float summation
    order on the random tiny model (~1e-5 -> 5e-2 in 4 steps), for a masked row alone as much."""
    from PIL import Image
    table = precompute(make_concept("neti", dim=tiny_model.text_dim, seed=4), truncations=[8], progress=False)
    flipped = init_image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[16:48, 16:48] = 255
    reqs = [Request("a photo of {}", 1, table, 8, init=prepare_init(init_image, SIZE, SIZE, 0.5)),
            Request(PROMPT, 2, init=prepare_init(flipped, SIZE, SIZE, 0.55)),   # int(4 x 0.55) = 2 = int(4 x 0.5)
            Request("a photo of {}", 3, table, init=prepare_init(init_image, SIZE, SIZE, 0.5, mask=Image.fromarray(m)))]
    batched = Engine(tiny_model, GenerateConfig(steps=4, batch_size=3)).generate(reqs)
    solo = Engine(tiny_model, GenerateConfig(steps=4, batch_size=1)).generate(reqs)
    for a, b in zip(solo, batched):
        assert max_diff(a, b) <= TOL
    with pytest.raises(NetiError, match="different steps") as e:
        Engine(tiny_model, GenerateConfig(steps=4)).generate_batch(
            [reqs[0], Request(PROMPT, 2, init=prepare_init(init_image, SIZE, SIZE, 0.9))])
    assert e.value.field == "strength"


def test_strength_and_size_checks(tiny_model, init_image):
    with pytest.raises(NetiError, match="no step to run") as e:
        schedule_start(8, 0.1)
    assert e.value.field == "strength"
    assert schedule_start(8, 0.125) == 7 and schedule_start(8, 1.0) == 0
    small = prepare_init(init_image, 32, 32, 0.5)
    with pytest.raises(NetiError, match="32x32") as e:
        Engine(tiny_model, GenerateConfig(steps=STEPS)).generate([Request(PROMPT, 0, init=small)])
    assert e.value.field == "init_image"


def test_resize_modes_and_blur():
    from PIL import Image
    wide = np.zeros((10, 40, 3), np.uint8)
    wide[:, :20] = 200                      # left half bright
    img = Image.fromarray(wide)
    crop = np.asarray(resize_image(img, 20, 20, 1))     # covers: 20 high, centre 20 of 80 wide -> split in the middle
    assert crop.shape == (20, 20, 3) and crop[:, :8].mean() > 190 and crop[:, 12:].mean() < 10
    fill = np.asarray(resize_image(img, 20, 20, 2))     # fits: 5 high in the middle, bands stretched from its edges
    assert fill.shape == (20, 20, 3) and np.array_equal(fill[0], fill[7]) and fill[0, :8].mean() > 190
    assert np.asarray(resize_image(img, 20, 20, 0)).shape == (20, 20, 3)
    with pytest.raises(NetiError) as e:
        resize_image(img, 20, 20, 3)
    assert e.value.field == "resize_mode"
    # the blur keeps the mass and spreads an edge over about 2.5 sigma each side
    step = np.zeros((1, 40), np.float32)
    step[:, 20:] = 255
    b = gaussian_blur(step, 4, 0)[0]
    assert b[:10].max() == 0 and abs(b[19] + b[20] - 255) < 1 and 25 < b[15] < 40 and abs(b[30:] - 255).max() < 1e-3
