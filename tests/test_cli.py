"""The command line end to end on `tiny`, resume, and bad input (one-line errors, nothing lost)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from neti_fast.options import parse_seeds
from neti_fast.errors import NetiError


@pytest.fixture(scope="module")
def neti_file(tmp_path_factory, make_concept):
    p = tmp_path_factory.mktemp("concepts") / "neti.safetensors"
    make_concept("neti", dim=32, seed=3).save(p)
    return p


def test_parse_seeds():
    assert parse_seeds(["0-3", "7", "2,9"]) == [0, 1, 2, 3, 7, 9]
    with pytest.raises(NetiError):
        parse_seeds(["5-2"])
    with pytest.raises(NetiError):
        parse_seeds(["x"])


def test_tiny_model_folder_loads_in_diffusers(cli, one_line_error, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline
    code, out, _ = cli("tiny-model", tmp_path / "tiny")
    assert code == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "tiny"))
    from neti_fast.sd.families import SD1
    from neti_fast.sd.models import UNET_LAYERS, cross_attention_modules
    assert len(cross_attention_modules(pipe.unet, SD1)[0]) == len(UNET_LAYERS) == 16
    code, _, err = cli("tiny-model", tmp_path / "tiny")
    one_line_error(code, err, "not empty")


def test_tiny_xl_folder_loads_in_diffusers(cli, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from neti_fast.sd.families import SDXL
    from neti_fast.sd.models import cross_attention_modules
    code, out, _ = cli("tiny-model", tmp_path / "xl", "--model", "tiny-xl")
    assert code == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "xl"), add_watermarker=False)
    mods, layers = cross_attention_modules(pipe.unet, SDXL)
    assert (len(mods), max(layers) + 1) == (70, 11) and pipe.text_encoder_2.config.projection_dim == 64


def test_sampling_defaults_are_the_familys(cli, tmp_path, tiny_xl_model):
    """Without --scheduler / --guidance, generate uses the model family's defaults (SDXL: Euler, 5.0,
    as diffusers' pipeline; SD 1.x keeps DPM++ and 7.5, test_precompute_generate_resume); given, they win."""
    for extra, want in (([], ("euler", 5.0)), (["--scheduler", "ddim", "--guidance", "3"], ("ddim", 3.0))):
        out = tmp_path / f"xl{len(extra)}"
        code, _, err = cli("generate", "--model", "tiny-xl", "--prompt", "a cat", "--seeds", "0", "--steps", "1",
                           "--out", out, *extra)
        assert code == 0, err
        (e,) = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
        assert (e["scheduler"], e["guidance"]) == want


def test_tiny_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    from neti_fast.sd.models import build_tiny, tiny_model_dir
    build_tiny(tmp_path / "again")
    for part in ("unet", "text_encoder"):
        a = load_file(next((tmp_path / "again" / part).glob("*.safetensors")))
        b = load_file(next((tiny_model_dir() / part).glob("*.safetensors")))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_precompute_generate_resume(cli, one_line_error, tmp_path, capsys, neti_file, monkeypatch):
    table = tmp_path / "table.safetensors"
    code, out, err = cli("precompute", neti_file, "--out", table, "--truncation", "8")
    assert code == 0, err
    code, _, err = cli("precompute", neti_file, "--out", table)
    one_line_error(code, err, "exists")
    out_dir = tmp_path / "gen"
    args = ["generate", "--model", "tiny", "--concept", table, "--prompt", "a photo of {}", "--prompt", "a {} toy",
            "--seeds", "0-1", "--truncation", "8", "128", "--steps", "3", "--batch-size", "3", "--out", out_dir]
    code, out, err = cli(*args)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == (f"{out_dir}: 8 images made, 0 already there; 2 grid-*.png (rows "
                                            "truncations, columns seeds), 2 sweep-s*.png (rows prompts, columns "
                                            "truncations); manifest.jsonl")
    pngs = sorted(p.name for p in out_dir.glob("0*.png"))
    assert len(pngs) == 2 * 2 * 2 and len(list(out_dir.glob("grid-*.png"))) == 2
    from PIL import Image
    with Image.open(next(out_dir.glob("grid-000-*.png"))) as g:   # labelled: a label column and row on top
        assert g.width > 2 * 64 and g.height > 2 * 64
    import neti_fast.api as api
    from neti_fast import images
    drawn = []
    monkeypatch.setattr(images, "write_grid", lambda path, rows, row_labels=None, col_labels=None:
                        drawn.append((path.name[:4], row_labels, col_labels)))
    api._write_grids(out_dir, ["a photo of {}"], [0, 1], [8, 128])
    assert drawn[0] == ("grid", ["truncation 8", "truncation 128"], ["seed 0", "seed 1"])
    manifest = [json.loads(x) for x in (out_dir / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 8 and {e["truncation"] for e in manifest} == {8, 128}
    assert all(e["steps"] == 3 and e["scheduler"] == "dpm++" and e["model"] == "tiny" for e in manifest)
    # resume: nothing is regenerated
    mtimes = {p: p.stat().st_mtime_ns for p in out_dir.glob("0*.png")}
    os.remove(out_dir / pngs[0])  # ... except what is missing
    code, out, err = cli(*args)
    assert code == 0, err
    assert "1 images made, 7 already there" in out
    assert (out_dir / pngs[0]).exists()
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if p.name != pngs[0])
    # same names, other settings: refused, not overwritten
    code, _, err = cli(*[a if a != "3" else "4" for a in args])
    one_line_error(code, err, "different settings", "--overwrite")
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if p.name != pngs[0])


def test_generate_accepts_every_concept_format(cli, tmp_path, capsys):
    ti = tmp_path / "learned_embeds.bin"
    torch.save({"<ti>": torch.randn(32) * 0.1}, ti)
    code, _, err = cli("generate", "--model", "tiny", "--concept", ti, "--prompt", "a photo of {}",
                       "--steps", "2", "--out", tmp_path / "g")
    assert code == 0, err
    code, _, err = cli("import", ti, "--out", tmp_path / "ti.safetensors")
    assert code == 0, err
    from neti_fast.concepts.importers import load_concept
    assert load_concept(tmp_path / "ti.safetensors").placeholder == "<ti>"


def test_bad_inputs(cli, one_line_error, tmp_path, capsys, neti_file):
    gen = ["generate", "--model", "tiny", "--steps", "2", "--out", tmp_path / "o"]
    one_line_error(*cli(*gen, "--concept", neti_file, "--prompt", "a photo")[::2], "no {}")
    one_line_error(*cli(*gen, "--concept", neti_file, "--prompt", "{} " + "very " * 90)[::2], "77")
    one_line_error(*cli(*gen, "--concept", tmp_path / "nope.safetensors", "--prompt", "{}")[::2], "nope.safetensors")
    one_line_error(*cli(*gen, "--prompt", "a cat", "--seeds", "x")[::2], "--seeds")
    one_line_error(*cli("generate", "--model", tmp_path, "--prompt", "a", "--out", tmp_path / "o")[::2], "--model")
    wide = tmp_path / "wide.bin"
    torch.save({"<w>": torch.randn(768)}, wide)
    one_line_error(*cli(*gen, "--concept", wide, "--prompt", "a {}")[::2], "768")
    nan = tmp_path / "nan.bin"
    torch.save({"<n>": torch.full((32,), float("nan"))}, nan)
    one_line_error(*cli(*gen, "--concept", nan, "--prompt", "a {}")[::2], "NaN")
    one_line_error(*cli(*gen, "--concept", neti_file, "--prompt", "a {}", "--truncation", "0")[::2], "truncation")
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        one_line_error(*cli("generate", "--model", "tiny", "--prompt", "a", "--out", ro / "x")[::2], "not writable")
    blocker = tmp_path / "file"
    blocker.write_text("")
    one_line_error(*cli("generate", "--model", "tiny", "--prompt", "a", "--steps", "1", "--out", blocker / "x")[::2], "--out")


def test_console_script_prints_one_line(tmp_path):
    """The real entry point, in a subprocess: a pickle that tries to run code is refused, nothing runs."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    evil = tmp_path / "evil.pt"
    torch.save({"string_to_param": Evil()}, evil)
    r = subprocess.run([sys.executable, "-m", "neti_fast", "precompute", str(evil), "--out", str(tmp_path / "t.st")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "refused" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()
    r = subprocess.run([sys.executable, "-m", "neti_fast", "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "demo" in r.stdout and "precompute" in r.stdout


# ----------------------------------------------------------------------------- numbers, Ctrl-C, start-up

# the least each command needs besides the flag under test (nothing here exists: a bad number must be
# refused before any file is read or written)
REQUIRED = {
    "generate": ["--model", "tiny", "--prompt", "x", "--out", "o"],
    "run": ["job.jsonl", "--model", "tiny", "--out", "o"],
    "train": ["imgs", "--placeholder", "<x>", "--init-word", "cat", "--model", "tiny", "--out", "o"],
    "precompute": ["c.safetensors", "--out", "o.safetensors"],
    "export": ["--model", "tiny", "--out", "o"],
    "bench": ["--json", "o.json"],
    "eval": ["o"],
    "serve": ["--model", "tiny", "--state-dir", "o"],
}


def _numeric_flags():
    """(command, flag, Range) of every flag of every subcommand that takes a number."""
    import argparse

    from neti_fast.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    found, bare = [], []
    for cmd, p in sub.choices.items():
        for a in p._actions:
            if a.type in (int, float):
                bare.append(f"{cmd} {a.option_strings}")
            elif hasattr(a.type, "range"):
                found.append((cmd, a.option_strings[0], a.type.range, a.nargs if isinstance(a.nargs, int) else 1))
    return found, bare


def _bad_values(rng):
    bad = ["abc"]
    if rng.lo is not None:
        bad.append(str(rng.lo if rng.lo_open else (rng.lo - 1 if rng.kind is int else rng.lo - 0.5)))
    if rng.hi is not None:
        bad.append(str(rng.hi + 1))
    if rng.kind is float:
        bad += ["nan", "inf"]
    else:
        bad.append("1.5")
    return bad


def test_every_numeric_flag_refuses_impossible_values(cli, one_line_error, tmp_path, monkeypatch):
    flags, bare = _numeric_flags()
    assert not bare, f"numeric flags without a range (use options.number / count / megabytes): {bare}"
    names = {(c, f) for c, f, _, _ in flags}
    assert {("generate", "--steps"), ("generate", "--guidance"), ("generate", "--batch-size"), ("run", "--steps"),
            ("train", "--lr"), ("serve", "--port"), ("bench", "--batch-sizes"), ("eval", "--batch-size")} <= names
    monkeypatch.chdir(tmp_path)
    tried = 0
    for cmd, flag, rng, nargs in flags:
        assert cmd in REQUIRED, cmd
        for bad in _bad_values(rng):
            code, _, err = cli(cmd, *REQUIRED[cmd], flag, *[bad] * nargs)  # nargs: --autoscale MIN MAX
            one_line_error(code, err, f"argument {flag}", bad if bad != "abc" else "'abc'", rng.describe())
            assert list(tmp_path.iterdir()) == [], (cmd, flag, bad)
            tried += 1
    assert tried >= 3 * len(flags)


def test_the_engine_job_file_and_flags_share_one_range(tmp_path):
    """The Python API and job files hold the same numbers to the same ranges as the flags."""
    import dataclasses

    from neti_fast.engine.request import GenerateConfig, check_settings
    from neti_fast.jobs.jobfile import parse_job
    from neti_fast.utils import SAMPLING_RANGES
    check_settings(GenerateConfig())
    for field, value in (("steps", 0), ("steps", 1001), ("guidance", -5.0), ("guidance", float("nan")),
                         ("batch_size", 0), ("height", 0), ("width", -8), ("cache_mb", -1), ("steps", 2.5)):
        with pytest.raises(NetiError) as e:
            check_settings(dataclasses.replace(GenerateConfig(), **{field: value}))
        assert e.value.field == field and SAMPLING_RANGES[field].describe() in str(e.value)
    job = tmp_path / "job.jsonl"
    job.write_text('{"prompt": "a", "steps": 0}\n{"prompt": "b", "guidance": -5}\n{"prompt": "c", "steps": 1001}\n')
    defaults = dict(concept=None, seeds=[0], truncation=[None], steps=4, guidance=7.5, negative_prompt="",
                    scheduler="dpm++", height=None, width=None)
    lines, problems = parse_job(job, defaults)
    assert lines == [] and [n for n, _ in problems] == [1, 2, 3]
    assert "steps must be an integer from 1 to 1000, got 0" in problems[0][1]
    assert "guidance must be a number >= 0, got -5" in problems[1][1]


def test_seed_ranges_backwards_say_so():
    with pytest.raises(NetiError, match=r"--seeds 5-2: the range is backwards \(write 2-5\)"):
        parse_seeds(["0", "5-2"])


def test_ctrl_c_stops_the_caller_with_one_line(cli, monkeypatch, capsys):
    """In-process (tests) Ctrl-C reaches the caller, so pytest stops; the console script exits 130."""
    import neti_fast.cli as cli_mod

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli_mod, "cmd_precompute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli_mod.main(["precompute", "c", "--out", "o"])
    assert capsys.readouterr().err.strip() == "neti-fast precompute: interrupted"
    monkeypatch.setattr(cli_mod, "cmd_generate", interrupted)
    monkeypatch.setattr(sys, "argv", ["neti-fast", "generate", "--model", "tiny", "--prompt", "x", "--out", "o"])
    assert cli_mod.entry() == 130
    assert capsys.readouterr().err.strip() == "neti-fast generate: interrupted; re-run the same command to resume"


HELP_PROBE = """
import contextlib, io, sys, time
t = time.perf_counter()
from neti_fast.cli import build_parser
commands = ["", "demo", "train", "import", "precompute", "merge", "generate", "run", "tiny-model", "export",
            "bench", "eval", "serve"]
for c in commands:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        build_parser().parse_args([c, "--help"] if c else ["--help"])
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "numpy", "PIL", "safetensors") if m in sys.modules)
print(f"{time.perf_counter() - t:.3f} {','.join(heavy)}")
"""


def test_help_is_fast_and_loads_no_heavy_library():
    """--help of every subcommand, in a fresh interpreter: no torch / diffusers / transformers / numpy
    import (what made it take seconds), and a generous time bound for all 13 of them together."""
    r = subprocess.run([sys.executable, "-c", HELP_PROBE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    seconds, heavy = r.stdout.split()[0], r.stdout.split()[1:]
    assert heavy == [], f"--help imported {heavy}"
    assert float(seconds) < 10, seconds


@pytest.mark.parametrize("command", ["generate", "run", "bench", "serve"])
def test_model_help_names_every_builtin(cli, command):
    """--model's help (written out: --help must not import sd.models, which imports torch) lists
    every built-in model sd.models has."""
    from neti_fast.sd.models import BUILTIN_MODELS
    code, out, _ = cli(command, "--help")
    text = " ".join(out.split())
    assert code == 0 and all(name in text for name in BUILTIN_MODELS), (command, text)


def test_scheduler_flag_error_is_short(cli, one_line_error):
    """A bad --scheduler names the shape of a valid one, not the ~80 sampler x schedule names."""
    code, _, err = cli("generate", "--model", "tiny", "--prompt", "x", "--out", "o", "--scheduler", "warp-9")
    one_line_error(code, err, "--scheduler", "'warp-9'", "SAMPLER-SCHEDULE", "docs/samplers.md")
    assert len(err) < 400 and "dpm2-a-karras" not in err


# ----------------------------------------------------------------------------- img2img

def _img2img_files(folder):
    """A smooth 96x64 init image (not the run's shape: resize modes matter), a square one and a mask."""
    import numpy as np
    from PIL import Image, ImageFilter
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    for name, (w, h) in (("wide.png", (96, 64)), ("square.png", (64, 64))):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(3)).save(folder / name)
    m = np.zeros((64, 64), np.uint8)
    m[8:40, 20:56] = 255
    Image.fromarray(m).save(folder / "mask.png")
    return folder


@pytest.mark.parametrize("builtin", ["tiny-sd2", "tiny-xl"])
def test_generate_and_run_img2img_on_other_families(cli, tmp_path, builtin, request):
    """`generate --init-image --mask` and a job file's init_image on SD 2.x / SDXL: the engine's image at
    the family's default sampler and guidance, the init image prepared as the server prepares it."""
    import numpy as np
    from PIL import Image

    from neti_fast.engine.engine import Engine
    from neti_fast.engine.img2img import INPAINTING_FILL, MASK_BLUR, prepare_init
    from neti_fast.engine.request import GenerateConfig, Request
    model = request.getfixturevalue({"tiny-sd2": "tiny_sd2_model", "tiny-xl": "tiny_xl_model"}[builtin])
    fam = model.family
    d = _img2img_files(tmp_path / "in")
    cfg = GenerateConfig(steps=4, batch_size=1, guidance=fam.default_guidance, scheduler=fam.default_scheduler)
    for i, (flags, mask) in enumerate(((["--strength", "0.6"], None), (["--mask", d / "mask.png"], d / "mask.png"))):
        out = tmp_path / f"out{i}"
        code, _, err = cli("generate", "--model", builtin, "--prompt", "a photo of a dog", "--seeds", "3",
                           "--steps", "4", "--out", out, "--init-image", d / "square.png", *flags)
        assert code == 0, err
        with Image.open(out / "000-a-photo-of-a-dog_full_s3.png") as im:
            got = np.asarray(im.convert("RGB"))
        init = prepare_init(Image.open(d / "square.png"), 64, 64, 0.6 if mask is None else 0.75, 0,
                            None if mask is None else Image.open(mask), (MASK_BLUR, MASK_BLUR), INPAINTING_FILL)
        want = Engine(model, cfg).generate_batch([Request("a photo of a dog", 3, init=init)])[0]
        assert np.array_equal(got, want)
    job = tmp_path / "job.jsonl"
    job.write_text(json.dumps({"prompt": "a photo of a dog", "seeds": [3], "init_image": str(d / "square.png"),
                               "strength": 0.6}) + "\n")
    code, _, err = cli("run", job, "--model", builtin, "--out", tmp_path / "run", "--steps", "4", "--no-progress")
    assert code == 0, err
    (png,) = (tmp_path / "run").glob("*.png")
    with Image.open(png) as im, Image.open(tmp_path / "out0" / "000-a-photo-of-a-dog_full_s3.png") as ref:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(ref.convert("RGB")))


def test_generate_img2img_equals_the_servers(cli, one_line_error, tmp_path, tiny_model):
    """`generate --init-image` makes the server's img2img image for the same seed and strength,
    exactly: the init image is prepared by the server's code (a1111.init_inputs -> prepare_init, at
    its defaults: resize_mode 0, mask blur 4, fill 0) and runs in a batch of one either way."""
    pytest.importorskip("pydantic")
    import base64

    import numpy as np
    from PIL import Image

    from neti_fast.engine.engine import Engine
    from neti_fast.engine.request import GenerateConfig, Request
    from neti_fast.serve.a1111 import Img2Img, init_inputs
    d = _img2img_files(tmp_path / "in")
    b64 = lambda p: base64.b64encode(p.read_bytes()).decode()
    for i, (flags, body) in enumerate((
            (["--init-image", d / "wide.png", "--strength", "0.6", "--resize-mode", "2"],
             {"init_images": [b64(d / "wide.png")], "denoising_strength": 0.6, "resize_mode": 2}),
            (["--init-image", d / "square.png", "--mask", d / "mask.png"],   # default strength 0.75
             {"init_images": [b64(d / "square.png")], "mask": b64(d / "mask.png"), "inpaint_full_res": False}))):
        out = tmp_path / f"out{i}"
        code, _, err = cli("generate", "--model", "tiny", "--prompt", "a photo of a dog", "--seeds", "3",
                           "--steps", "4", "--out", out, *flags)
        assert code == 0, err
        with Image.open(out / "000-a-photo-of-a-dog_full_s3.png") as im:
            got = np.asarray(im.convert("RGB"))
        init = init_inputs(Img2Img.model_validate({"prompt": "a photo of a dog", **body}), 64, 64)[0]
        want = Engine(tiny_model, GenerateConfig(steps=4, batch_size=1)).generate_batch(
            [Request("a photo of a dog", 3, init=init)])[0]
        assert np.array_equal(got, want)
        entry = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
        assert entry["init_image"] == str(flags[1]) and entry["strength"] == body.get("denoising_strength", 0.75)
        assert ("mask_sha256" in entry) == ("mask" in body)
    # resume: the same command is recognised; another strength or a changed init image is refused
    code, stdout, err = cli("generate", "--model", "tiny", "--prompt", "a photo of a dog", "--seeds", "3", "--steps",
                            "4", "--out", out, *flags)
    assert code == 0 and "0 images made, 1 already there" in stdout, err
    code, _, err = cli("generate", "--model", "tiny", "--prompt", "a photo of a dog", "--seeds", "3", "--steps",
                       "4", "--out", out, *flags, "--strength", "0.5")
    one_line_error(code, err, "different settings (strength)", "--overwrite")
    Image.open(d / "wide.png").crop((0, 0, 64, 64)).save(d / "square.png")
    code, _, err = cli("generate", "--model", "tiny", "--prompt", "a photo of a dog", "--seeds", "3", "--steps",
                       "4", "--out", out, *flags)
    one_line_error(code, err, "different settings (init_image_sha256)")


def test_generate_img2img_bad_input_is_one_line(cli, one_line_error, tmp_path):
    d = _img2img_files(tmp_path / "in")
    (d / "notes.png").write_text("not an image")
    out = tmp_path / "o"
    gen = ["generate", "--model", "tiny", "--prompt", "a cat", "--steps", "4", "--out", out]
    for flags, needles in (
            (["--init-image", d / "gone.png"], ("--init-image", "gone.png", "cannot read")),
            (["--init-image", d / "notes.png"], ("--init-image", "not an image")),
            (["--init-image", d / "square.png", "--mask", d / "wide.png"], ("--mask", "96x64", "64x64")),
            (["--init-image", d / "square.png", "--mask", d / "gone.png"], ("--mask", "cannot read")),
            (["--strength", "0.5"], ("--strength 0.5", "no init image")),
            (["--mask", d / "mask.png"], ("--mask", "no init image")),
            (["--init-image", d / "square.png", "--strength", "0.1"], ("--strength 0.1", "4 steps", "no step")),
            (["--init-image", d / "square.png", "--strength", "1.5"], ("argument --strength", "> 0 and <= 1")),
            (["--init-image", d / "square.png", "--strength", "0"], ("argument --strength", "> 0 and <= 1")),
            (["--init-image", d / "square.png", "--resize-mode", "3"], ("argument --resize-mode", "from 0 to 2"))):
        code, _, err = cli(*gen, *flags)
        one_line_error(code, err, *needles)
        assert not out.exists(), flags


def test_serve_replicas_flags_are_one_line(cli, one_line_error, tmp_path, monkeypatch):
    """--replicas / --autoscale: without Ray one line naming the extra; bad combinations one line each
    (all before a model is loaded or Ray started)."""
    pytest.importorskip("fastapi")
    monkeypatch.chdir(tmp_path)
    base = ("serve", "--model", "tiny", "--state-dir", "s")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "ray", None)  # as if Ray were not installed
        code, _, err = cli(*base, "--replicas", "2")
        one_line_error(code, err, "--replicas", 'pip install -e ".[ray]"')
    code, _, err = cli(*base, "--replicas", "2", "--autoscale", "1", "2")
    one_line_error(code, err, "--replicas", "--autoscale")
    if importlib.util.find_spec("ray") is not None:
        code, _, err = cli(*base, "--autoscale", "3", "1")
        one_line_error(code, err, "--autoscale 3 1", "MIN <= MAX")
    assert list(tmp_path.iterdir()) == []
