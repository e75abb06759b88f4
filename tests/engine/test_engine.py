"""Every fast path is held to the reference path (the official per-(t, l) algorithm)."""
import pytest
import torch

from neti_fast.errors import NetiError
from neti_fast.engine.engine import Engine
from neti_fast.engine.request import GenerateConfig, Request
from neti_fast.engine.reference import generate_reference
from neti_fast.concepts.table import precompute

STEPS = 4
CFG = GenerateConfig(steps=STEPS, batch_size=8)


# Fast and reference paths differ only in float summation order (batched CLIP, SDPA vs bmm,
# batched U-Net), ~1e-6 relative in fp32; after uint8 rounding that is at most one level.
TOL = 1


@pytest.mark.parametrize("method", ["neti", "xti", "ti"])
def test_fast_equals_reference(max_diff, tiny_model, make_concept, method):
    c = make_concept(method, dim=tiny_model.text_dim, seed=4)
    table = precompute(c, truncations=[16] if method == "neti" else [], progress=False)
    truncs = [None, 16] if method == "neti" else [None]
    reqs = [Request("a photo of {} on a beach", s, table, t) for t in truncs for s in (0, 1)]
    fast = Engine(tiny_model, CFG).generate(reqs)
    for r, img in zip(reqs, fast):
        ref = generate_reference(tiny_model, r, CFG)[0]
        assert max_diff(img, ref) <= TOL
    assert max_diff(fast[0], fast[1]) > 10  # different seeds really differ


def test_concept_changes_the_image(max_diff, tiny_model, make_concept):
    t1 = precompute(make_concept("neti", dim=tiny_model.text_dim, seed=5), progress=False)
    t2 = precompute(make_concept("neti", dim=tiny_model.text_dim, seed=6), progress=False)
    a, b = Engine(tiny_model, CFG).generate([Request("a photo of {}", 0, t1), Request("a photo of {}", 0, t2)])
    assert max_diff(a, b) > 0


def test_plain_prompt_equals_diffusers(max_diff, tiny_model):
    """With no concept the engine is plain SD: same image as diffusers' pipeline for the same seed."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from neti_fast.sd.models import tiny_model_dir
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir()), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    d = pipe("a photo of a dog", num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(3),
             output_type="np").images
    d = (d * 255).round().astype("uint8")
    ours = Engine(tiny_model, CFG).generate([Request("a photo of a dog", 3)])
    assert max_diff(d[0], ours[0]) <= TOL


@pytest.mark.parametrize("vectors", [1, 2, 4])
def test_ti_embedding_equals_diffusers(max_diff, tiny_model, tmp_path, vectors):
    """A (multi-vector) TI embedding gives diffusers' image: `load_textual_inversion` adds the tokens
    <mv>, <mv>_1, ... and expands the prompt; neti-fast gives the concept `vectors` positions."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from neti_fast.concepts.table import load_table
    from neti_fast.sd.models import tiny_model_dir
    vec = torch.randn(vectors, tiny_model.text_dim, generator=torch.Generator().manual_seed(vectors)) * 0.5
    torch.save({"<mv>": vec}, tmp_path / "learned_embeds.bin")
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir()), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(tmp_path / "learned_embeds.bin"))
    d = pipe("a photo of <mv> on a beach", num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(3),
             output_type="np").images
    d = (d * 255).round().astype("uint8")
    table = load_table(tmp_path / "learned_embeds.bin")
    assert table.vectors == vectors
    ours, plain = Engine(tiny_model, CFG).generate([Request("a photo of {} on a beach", 3, table),
                                                    Request("a photo of on a beach", 3)])
    print(f"TI {vectors} vector(s) vs diffusers: max abs diff {max_diff(d[0], ours)}/255")
    assert max_diff(d[0], ours) <= TOL
    assert max_diff(ours, plain) > 0
    assert max_diff(ours, generate_reference(tiny_model, Request("a photo of {} on a beach", 3, table), CFG)[0]) <= TOL


def test_seed_independent_of_batch_composition(max_diff, tiny_model, make_concept):
    """Seed s gives the same image alone, in a batch, and beside other prompts / concepts / truncations."""
    ta = precompute(make_concept("neti", dim=tiny_model.text_dim, seed=7), truncations=[8], progress=False)
    tb = precompute(make_concept("xti", dim=tiny_model.text_dim, seed=8, placeholder="<d>"), progress=False)
    target = Request("a photo of {} in snow", 11, ta, 8)
    alone = Engine(tiny_model, GenerateConfig(steps=STEPS, batch_size=1)).generate([target])[0]
    mixed = [Request("a painting of {}", 2, tb), target, Request("a photo of {}", 5, ta, None),
             Request("a cat", 9, None), Request("a photo of {} in snow", 12, ta, 8)]
    batched = Engine(tiny_model, GenerateConfig(steps=STEPS, batch_size=5)).generate(mixed)
    assert max_diff(alone, batched[1]) <= TOL
    # and each other member equals its own solo run
    solo = Engine(tiny_model, GenerateConfig(steps=STEPS, batch_size=1)).generate(mixed)
    for a, b in zip(solo, batched):
        assert max_diff(a, b) <= TOL


def test_schedulers_and_negative_prompt(max_diff, tiny_model, make_concept):
    table = precompute(make_concept("neti", dim=tiny_model.text_dim, seed=9), progress=False)
    for sched in ("ddim", "euler"):  # euler's timesteps are fractional: rows come from the mapper
        cfg = GenerateConfig(steps=STEPS, scheduler=sched, negative_prompt="blurry")
        r = Request("a photo of {}", 1, table)
        assert max_diff(Engine(tiny_model, cfg).generate([r])[0], generate_reference(tiny_model, r, cfg)[0]) <= TOL
    a = Engine(tiny_model, GenerateConfig(steps=STEPS)).generate([Request("a photo of {}", 1, table)])
    b = Engine(tiny_model, GenerateConfig(steps=STEPS, negative_prompt="blurry")).generate([Request("a photo of {}", 1, table)])
    assert max_diff(a, b) > 0


def test_conditioning_cache_and_dedup(tiny_model, make_concept):
    table = precompute(make_concept("ti", dim=tiny_model.text_dim), progress=False)
    eng = Engine(tiny_model, CFG)
    ts = eng.make_scheduler().timesteps
    c1 = eng.conditioning("a photo of {}", table, None, ts)
    assert c1.k[0].shape[0] == 1 and not c1.time_varying  # TI: one row serves every step
    assert eng.conditioning("a photo of {}", table, None, ts) is c1
    neti = precompute(make_concept("neti", dim=tiny_model.text_dim), progress=False)
    c2 = eng.conditioning("a photo of {}", neti, None, ts)
    assert c2.k[0].shape[0] == STEPS and c2.time_varying


def test_conditioning_cache_evicts_least_recently_used(tiny_model, make_concept):
    import dataclasses
    neti = precompute(make_concept("neti", dim=tiny_model.text_dim, seed=7), progress=False)
    ts = Engine(tiny_model, CFG).make_scheduler().timesteps
    one = Engine(tiny_model, CFG).conditioning("a photo of {}", neti, None, ts).nbytes
    mb = int(2.5 * one) // 2**20  # room for two conditionings, not three
    assert 2 * one <= mb * 2**20 < 3 * one, (one, mb)
    eng = Engine(tiny_model, dataclasses.replace(CFG, cache_mb=mb))
    keys = []
    for prompt in ("a photo of {}", "a painting of {}"):
        eng.conditioning(prompt, neti, None, ts)
        keys.append(list(eng.conditionings)[-1])
    first = eng.conditioning("a photo of {}", neti, None, ts)  # a hit: now the most recently used
    eng.conditioning("a sketch of {}", neti, None, ts)          # over budget: the painting goes
    assert list(eng.conditionings)[:1] == [keys[0]] and keys[1] not in eng.conditionings and len(eng.conditionings) == 2
    assert eng.conditioning("a photo of {}", neti, None, ts) is first
    again = eng.conditioning("a painting of {}", neti, None, ts)  # rebuilt, equal
    ref = Engine(tiny_model, CFG).conditioning("a painting of {}", neti, None, ts)
    assert all(torch.equal(a, b) for a, b in zip(again.k + again.v, ref.k + ref.v))
    tiny = Engine(tiny_model, dataclasses.replace(CFG, cache_mb=0))  # a budget below one: the newest stays
    tiny.conditioning("a photo of {}", neti, None, ts)
    tiny.conditioning("a painting of {}", neti, None, ts)
    assert len(tiny.conditionings) == 1


def test_bad_prompts(tiny_model, make_concept):
    table = precompute(make_concept("ti", dim=tiny_model.text_dim), progress=False)
    eng = Engine(tiny_model, CFG)
    with pytest.raises(NetiError, match="no \\{\\}"):
        eng.generate([Request("a photo", 0, table)])
    with pytest.raises(NetiError, match="77"):
        eng.generate([Request("a photo of {} " + "very " * 80, 0, table)])
    wide = precompute(make_concept("ti", dim=768), progress=False)
    with pytest.raises(NetiError, match="768"):
        eng.generate([Request("a photo of {}", 0, wide)])


def test_clip_skip(max_diff, tiny_model, make_concept):
    """clip_skip 2 (A1111's CLIP skip) changes the image, prompt and negative prompt alike, equals the
    reference path with it, and leaves a batch-mate at clip_skip 1 as it is alone; 1 is the default."""
    from neti_fast.concepts.table import Table
    a = Table(make_concept(seed=3), name="a")
    cfg = GenerateConfig(steps=3, scheduler="euler", batch_size=8, negative_prompt="blurry")
    eng = Engine(tiny_model, cfg)
    one, two = Request("a photo of {}", 5, a), Request("a photo of {}", 5, a, clip_skip=2)
    batch = eng.generate_batch([one, two])
    assert max_diff(batch[0], eng.generate_batch([Request("a photo of {}", 5, a)])[0]) <= 1
    assert max_diff(batch[0], batch[1]) > 10
    assert max_diff(generate_reference(tiny_model, two, cfg)[0], batch[1]) <= 1
    with pytest.raises(NetiError) as e:
        eng.generate_batch([Request("a photo", 1, clip_skip=3)])  # tiny's CLIP has 2 layers
    assert e.value.field == "clip_skip"
