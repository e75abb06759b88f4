"""The command line end to end on `tiny`, resume, and bad input (one-line errors, nothing lost)."""
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
    from neti_fast.sd.models import UNET_LAYERS, cross_attention_modules
    assert len(cross_attention_modules(pipe.unet)) == len(UNET_LAYERS) == 16
    code, _, err = cli("tiny-model", tmp_path / "tiny")
    one_line_error(code, err, "not empty")


def test_tiny_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    from neti_fast.sd.models import build_tiny, tiny_model_dir
    build_tiny(tmp_path / "again")
    for part in ("unet", "text_encoder"):
        a = load_file(next((tmp_path / "again" / part).glob("*.safetensors")))
        b = load_file(next((tiny_model_dir() / part).glob("*.safetensors")))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_precompute_generate_resume(cli, one_line_error, tmp_path, capsys, neti_file):
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
    pngs = sorted(p.name for p in out_dir.glob("0*.png"))
    assert len(pngs) == 2 * 2 * 2 and len(list(out_dir.glob("grid-*.png"))) == 2
    manifest = [json.loads(x) for x in (out_dir / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 8 and {e["truncation"] for e in manifest} == {8, 128}
    assert all(e["steps"] == 3 and e["scheduler"] == "dpm++" and e["model"] == "tiny" for e in manifest)
    # resume: nothing is regenerated
    mtimes = {p: p.stat().st_mtime_ns for p in out_dir.glob("0*.png")}
    os.remove(out_dir / pngs[0])  # ... except what is missing
    code, _, err = cli(*args)
    assert code == 0, err
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
