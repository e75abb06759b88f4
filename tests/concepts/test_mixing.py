"""Several concepts in one prompt, style mixing over layers and time, merge bundles, truncation
sweeps, and the diffusers adapter; every fast path held to the reference (official) algorithm."""
import numpy as np
import pytest
import torch
from PIL import Image

from neti_fast.cli import main
from neti_fast.sd.conditioning import tokenize
from neti_fast.errors import NetiError
from neti_fast.concepts.mixing import add_mixes, parse_layer_mix, parse_time_mix
from neti_fast.sd.models import UNET_LAYERS
from neti_fast.engine.engine import Engine
from neti_fast.engine.request import GenerateConfig, Request
from neti_fast.engine.reference import generate_reference
from neti_fast.concepts.table import Table, load_tables, precompute

STEPS = 3
CFG = GenerateConfig(steps=STEPS, batch_size=4)
TOL = 1  # see tests/engine/test_engine.py: float summation order only, at most one uint8 level


@pytest.fixture(scope="module")
def concepts(tiny_model, make_concept):
    d = tiny_model.text_dim
    return {
        "cat": precompute(make_concept("neti", dim=d, seed=21, placeholder="<cat>"), truncations=[8], progress=False),
        "painting": precompute(make_concept("xti", dim=d, seed=22, placeholder="<painting>"), progress=False),
        "ti": precompute(make_concept("ti", dim=d, seed=23, placeholder="<ti>"), progress=False),
    }


def test_tokenize_slots(tiny_model):
    toks = tokenize(tiny_model.tokenizer, "a photo of {cat} in the style of {painting} and {cat}",
                    ["cat", "painting"])
    slots = toks.slot[toks.slot >= 0].tolist()
    assert slots == [0, 1, 0]
    with pytest.raises(NetiError, match="ambiguous"):
        tokenize(tiny_model.tokenizer, "a photo of {}", ["cat", "painting"])
    with pytest.raises(NetiError, match="dog"):
        tokenize(tiny_model.tokenizer, "a photo of {dog}", ["cat"])
    one = tokenize(tiny_model.tokenizer, "a photo of {}", ["cat"])  # bare {} = the only concept
    assert one.slot.tolist() == tokenize(tiny_model.tokenizer, "a photo of {cat}", ["cat"]).slot.tolist()


def test_two_concepts_equal_reference(max_diff, tiny_model, concepts):
    both = {"cat": concepts["cat"], "painting": concepts["painting"]}
    reqs = [Request("a photo of {cat} in the style of {painting}", 0, both),
            Request("a photo of {cat} in the style of {painting}", 1, both, 8),
            Request("a photo of {painting} next to {cat}", 2, both)]
    fast = Engine(tiny_model, CFG).generate(reqs)
    for r, img in zip(reqs, fast):
        assert max_diff(img, generate_reference(tiny_model, r, CFG)[0]) <= TOL
    # the second concept matters: swapping in a TI concept changes the image
    other = Engine(tiny_model, CFG).generate([Request(reqs[0].prompt, 0, {"cat": concepts["cat"], "painting": concepts["ti"]})])
    assert max_diff(other[0], fast[0]) > 0


def test_clashing_placeholders(max_diff, tiny_model, make_concept):
    """Two TI files with the same placeholder (`*`, which is also a real BPE token) work side by
    side: each {name} is its own slot token, so the image equals the one with distinct placeholders."""
    d = tiny_model.text_dim
    a = Table(make_concept("ti", dim=d, seed=31, placeholder="*"), name="a")
    b = Table(make_concept("ti", dim=d, seed=32, placeholder="*"), name="b")
    a2 = Table(make_concept("ti", dim=d, seed=31, placeholder="<x1>"), name="a")
    b2 = Table(make_concept("ti", dim=d, seed=32, placeholder="<x2>"), name="b")
    p = "a photo of {a} and {b}"
    eng = Engine(tiny_model, CFG)
    img1, img2, only_a = eng.generate([Request(p, 0, {"a": a, "b": b}), Request(p, 0, {"a": a2, "b": b2}),
                                       Request(p, 0, {"a": a, "b": a})])
    assert max_diff(img1, img2) <= TOL  # batch position only (float summation order)
    assert max_diff(img1, only_a) > 10  # b's embedding is really used at its own position


def test_layer_mix_rows_and_reference(max_diff, tiny_model, concepts):
    tables = {"cat": concepts["cat"], "painting": concepts["painting"]}
    mix = parse_layer_mix("IN01-IN08:cat,MID-OUT11:{painting}", tables)
    ts = torch.tensor([999.0, 500.0, 3.0])
    tok, byp = mix.schedule_rows(ts)
    cat_tok, cat_byp = concepts["cat"].schedule_rows(ts)
    pai_tok, _ = concepts["painting"].schedule_rows(ts)
    coarse = UNET_LAYERS.index("IN08") + 1
    assert torch.equal(tok[:, :coarse], cat_tok[:, :coarse]) and torch.equal(tok[:, coarse:], pai_tok[:, coarse:])
    assert torch.equal(byp[:, :coarse], cat_byp[:, :coarse]) and not byp[:, coarse:].any()  # XTI: no bypass
    # the prompt's bare {} means the mix; engine equals the reference algorithm
    with_mix = add_mixes(tables, layer_mix="IN01-IN08:cat,MID-OUT11:painting")
    r = Request("a photo of {}", 3, with_mix)
    fast = Engine(tiny_model, CFG).generate([r])[0]
    assert max_diff(fast, generate_reference(tiny_model, r, CFG)[0]) <= TOL
    # a "mix" of one concept on every layer is that concept, exactly
    whole = parse_layer_mix("all:cat", tables)
    e = Engine(tiny_model, CFG)
    a, b = e.generate([Request("a photo of {}", 3, whole), Request("a photo of {}", 3, concepts["cat"])])
    assert max_diff(a, b) == 0


def test_time_mix(max_diff, tiny_model, concepts):
    tables = {"cat": concepts["cat"], "ti": concepts["ti"]}
    mix = parse_time_mix("t>=600:cat,t<600:ti", tables)
    ts = torch.tensor([999.0, 600.0, 599.5, 10.0])
    tok, byp = mix.schedule_rows(ts)
    cat_tok, _ = concepts["cat"].schedule_rows(ts)
    ti_tok, _ = concepts["ti"].schedule_rows(ts)
    assert torch.equal(tok[:2], cat_tok[:2]) and torch.equal(tok[2:], ti_tok[2:])
    assert not byp[2:].any()
    r = Request("a painting of {mix}", 4, add_mixes(tables, time_mix="t>=600:cat,t<600:ti"))
    assert max_diff(Engine(tiny_model, CFG).generate([r])[0], generate_reference(tiny_model, r, CFG)[0]) <= TOL


@pytest.mark.parametrize("parse,spec,match", [
    (parse_layer_mix, "IN01-IN08:cat", "no concept for layer"),
    (parse_layer_mix, "IN01-OUT11:cat,MID:painting", "given twice"),
    (parse_layer_mix, "IN01-IN09:cat,MID-OUT11:painting", "unknown layer"),
    (parse_layer_mix, "OUT11-IN01:cat", "backwards"),
    (parse_layer_mix, "IN01-OUT11:dog", "not a concept"),
    (parse_layer_mix, "IN01-OUT11", "RANGE:NAME"),
    (parse_time_mix, "t>=600:cat", "no concept for t in 0..599"),
    (parse_time_mix, "t>=500:cat,t<600:ti", "covered twice"),
    (parse_time_mix, "t>600.5:cat,t<600:ti", "should be"),
])
def test_mix_spec_errors(concepts, parse, spec, match):
    with pytest.raises(NetiError, match=match):
        parse(spec, dict(concepts))


def test_truncation_applies_to_neti_parts_only(tiny_model, concepts):
    """With a NeTI and an XTI concept, a truncation truncates the NeTI one and leaves the XTI one."""
    both = {"cat": concepts["cat"], "painting": concepts["painting"]}
    Engine(tiny_model, CFG).generate([Request("{cat} by {painting}", 0, both, 8)])  # accepted
    with pytest.raises(NetiError, match="applies to NeTI concepts; 'painting' has no NeTI mapper"):
        Engine(tiny_model, CFG).generate([Request("{painting}", 0, {"painting": concepts["painting"]}, 8)])
    with pytest.raises(NetiError, match="no concept was given"):
        Engine(tiny_model, CFG).generate([Request("a cat", 0, None, 8)])


def test_merge_bundle_and_cli(tiny_model, concepts, tmp_path, capsys):
    a, b = tmp_path / "cat.safetensors", tmp_path / "painting.safetensors"
    concepts["cat"].save(a)
    concepts["painting"].save(b)
    bundle = tmp_path / "both.safetensors"
    assert main(["merge", str(a), f"style={b}", "--out", str(bundle)]) == 0
    loaded = load_tables([str(bundle)])
    assert list(loaded) == ["cat", "style"]
    assert torch.equal(loaded["cat"].token[8], concepts["cat"].token[8])  # precomputed rows kept
    assert loaded["style"].concept.method == "xti"
    assert main(["merge", str(a), str(a), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "already used" in capsys.readouterr().err
    # generate from the bundle == generate from the two files
    common = ["--model", "tiny", "--prompt", "a photo of {cat} in the style of {style}", "--steps", str(STEPS), "--seeds", "0"]
    assert main(["generate", "--concept", str(bundle), *common, "--out", str(tmp_path / "o1")]) == 0
    assert main(["generate", "--concept", str(a), "--concept", f"style={b}", *common, "--out", str(tmp_path / "o2")]) == 0
    f1 = sorted((tmp_path / "o1").glob("000-*_s0.png"))
    f2 = sorted((tmp_path / "o2").glob("000-*_s0.png"))
    assert f1 and [p.name for p in f1] == [p.name for p in f2]
    assert np.array_equal(np.asarray(Image.open(f1[0])), np.asarray(Image.open(f2[0])))


def test_cli_mix_and_errors(tiny_model, concepts, tmp_path, capsys):
    a, b = tmp_path / "cat.safetensors", tmp_path / "painting.safetensors"
    concepts["cat"].save(a)
    concepts["painting"].save(b)
    base = ["generate", "--model", "tiny", "--concept", str(a), "--concept", str(b), "--steps", "2"]
    assert main([*base, "--prompt", "a photo of {}", "--layer-mix", "IN01-IN08:cat,MID-OUT11:painting",
                 "--out", str(tmp_path / "mix")]) == 0
    assert list((tmp_path / "mix").glob("*.png"))
    capsys.readouterr()
    for extra, match in [(["--prompt", "a photo of {}"], "ambiguous"),
                         (["--prompt", "{cat}", "--layer-mix", "IN01:cat"], "no concept for layer"),
                         (["--prompt", "{cat}", "--layer-mix", "all:cat", "--time-mix", "t>=0:cat"], "give one of them")]:
        assert main([*base, *extra, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_truncation_sweep_grid(max_diff, tiny_model, concepts, tmp_path):
    a = tmp_path / "cat.safetensors"
    concepts["cat"].save(a)
    out = tmp_path / "sweep"
    assert main(["generate", "--model", "tiny", "--concept", str(a), "--prompt", "a photo of {}",
                 "--prompt", "a painting of {}", "--truncation", "2", "8", "128", "--seeds", "0", "1",
                 "--steps", "2", "--out", str(out)]) == 0
    size = tiny_model.default_size
    for s in (0, 1):
        grid = np.asarray(Image.open(out / f"sweep-s{s}.png").convert("RGB"))
        top = grid.shape[0] - 2 * size  # column labels wrap to the cell width: 1-2 lines here
        assert grid.shape[1:] == (160 + 3 * size, 3) and top in (24, 36)  # labels + 2 prompts x 3 truncations
        # the cell at (prompt 1, truncation 8) is that image
        img = np.asarray(Image.open(next(out.glob(f"001-*_t8_s{s}.png"))).convert("RGB"))
        assert np.array_equal(grid[top + size:top + 2 * size, 160 + size:160 + 2 * size], img)
        assert (grid[:top, 160:] < 128).any() and (grid[top:, :160] < 128).any()  # labels drawn
    a_, b_ = (np.asarray(Image.open(next(out.glob(f"000-*_t{k}_s0.png")))) for k in (2, 128))
    assert max_diff(a_, b_) > 0  # truncation really changes the image


def test_diffusers_adapter(max_diff, tiny_model, concepts):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    import neti_fast
    from neti_fast.sd.models import tiny_model_dir
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir()), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    table = concepts["cat"]
    handle = neti_fast.attach(pipe, table, truncation=8)
    gens = [torch.Generator("cpu").manual_seed(s) for s in (5, 6)]
    out = pipe(["a photo of {} on a beach"], num_images_per_prompt=2, num_inference_steps=STEPS,
               generator=gens, output_type="np", negative_prompt="blurry").images
    out = (out * 255).round().astype("uint8")
    ours = Engine(tiny_model, GenerateConfig(steps=STEPS, negative_prompt="blurry")).generate(
        [Request("a photo of {} on a beach", s, table, 8) for s in (5, 6)])
    assert max_diff(out[0], ours[0]) <= TOL and max_diff(out[1], ours[1]) <= TOL
    assert max_diff(out[0], out[1]) > 0
    with pytest.raises(NetiError, match="prompt_embeds"):
        pipe(prompt_embeds=torch.zeros(1, 77, tiny_model.text_dim), num_inference_steps=STEPS)
    handle.detach()  # plain SD again: same as the engine with no concept
    plain = pipe("a photo of a dog", num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(3),
                 output_type="np").images
    plain = (plain * 255).round().astype("uint8")
    ours = Engine(tiny_model, GenerateConfig(steps=STEPS)).generate([Request("a photo of a dog", 3)])
    assert max_diff(plain[0], ours[0]) <= TOL


def test_multi_vector_concepts_cannot_be_mixed():
    from neti_fast.concepts.concept import Concept
    from neti_fast.concepts.table import Table
    one = Table(Concept("ti", "<a>", 32, embeds=torch.randn(1, 32)))
    two = Table(Concept("ti", "<b>", 32, embeds=torch.randn(2, 32)))
    with pytest.raises(NetiError, match=r"'b' is a multi-vector"):
        parse_layer_mix("IN01-IN08:a,MID-OUT11:b", {"a": one, "b": two})
