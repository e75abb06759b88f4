"""`neti-fast generate` through the job runner: manifest.jsonl, resume (killed runs, unrecorded PNGs,
older manifest.json folders), list flags, "no truncation" on the command line, grid labels, and
corrupt concept files."""
import json

import numpy as np
import pytest
from PIL import Image

from neti_fast.cli import build_parser, main

STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield  # subprocesses run with OMP_NUM_THREADS=1 and must match this process's bytes


def manifest(out):
    return [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]


def gen_args(out, table, *extra):
    return ["generate", "--model", "tiny", "--concept", str(table), "--prompt", "a photo of {}", "--prompt",
            "a {} toy", "--seeds", "0-2", "--truncation", "none", "8", "--steps", str(STEPS), "--batch-size", "4",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def table(tmp_path_factory, make_concept):
    from neti_fast.concepts.table import precompute
    d = tmp_path_factory.mktemp("outputs")
    return precompute(make_concept("neti", dim=32, seed=21), truncations=[8], progress=False).save(d / "t.safetensors")


@pytest.fixture(scope="module")
def ref(table, tmp_path_factory, _one_thread):
    """One uninterrupted generate: 2 prompts x 2 truncations x 3 seeds = 12 images in 3 batches of 4."""
    out = tmp_path_factory.mktemp("ref") / "out"
    assert main(gen_args(out, table)) == 0
    files = sorted(p.name for p in out.glob("0*.png"))
    assert len(files) == 12
    return out, files


def test_generate_writes_a_jsonl_manifest_and_sweep(ref):
    out, files = ref
    m = manifest(out)
    assert [e["file"] for e in m] == files
    assert {e["truncation"] for e in m} == {None, 8} and {e["batch"] for e in m} == {0, 1, 2}
    assert all(e["status"] == "done" and e["steps"] == STEPS and e["model"] == "tiny" for e in m)
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("sweep-s*.png")) == ["sweep-s0.png", "sweep-s1.png", "sweep-s2.png"]
    assert len(list(out.glob("grid-*.png"))) == 2


def test_generate_kill_and_resume_is_byte_identical(cli, tmp_path, capsys, table, ref, kill_after_first_image):
    ref_dir, files = ref
    out = tmp_path / "killed"
    kill_after_first_image(gen_args(out, table), out, "0*.png")
    before = sorted(p.name for p in out.glob("0*.png"))
    assert 0 < len(before) < 12
    code, _, err = cli(*gen_args(out, table))
    assert code == 0, err
    assert sorted(p.name for p in out.glob("0*.png")) == files
    for f in files:
        assert (out / f).read_bytes() == (ref_dir / f).read_bytes(), f
    assert [e["file"] for e in manifest(out)] == files


def test_generate_unrecorded_png_is_checked_not_a_crash(cli, one_line_error, tmp_path, capsys, table, ref):
    """Killed between writing a batch's PNGs and appending its manifest lines: the PNGs are there,
    unrecorded. Re-running checks them against the regenerated images (no KeyError, no rewrite);
    a different unrecorded file is a one-line error naming it, replaced only with --overwrite."""
    import shutil
    ref_dir, files = ref
    out = tmp_path / "out"
    shutil.copytree(ref_dir, out)
    entries = manifest(out)
    dropped = [e["file"] for e in entries if e["batch"] == 2]
    (out / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries if e["batch"] != 2))
    mtimes = {f: (out / f).stat().st_mtime_ns for f in files}
    code, _, err = cli(*gen_args(out, table))
    assert code == 0, err
    assert {f: (out / f).stat().st_mtime_ns for f in files} == mtimes  # verified, not rewritten
    assert [e["file"] for e in manifest(out)] == files

    foreign = dropped[0]
    (out / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in manifest(out) if e["file"] != foreign))
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(out / foreign)
    code, _, err = cli(*gen_args(out, table))
    one_line_error(code, err, foreign, "differs", "--overwrite")
    assert not (out / foreign).read_bytes() == (ref_dir / foreign).read_bytes()
    code, _, err = cli(*gen_args(out, table, "--overwrite"))
    assert code == 0, err
    assert (out / foreign).read_bytes() == (ref_dir / foreign).read_bytes()


def test_folder_with_older_manifest_json_resumes(cli, one_line_error, tmp_path, capsys, table, ref):
    """A folder written before manifest.jsonl (manifest.json, {"images": [...]}, entries without
    status / line / batch) resumes: nothing regenerated, the entries folded into manifest.jsonl."""
    import shutil
    ref_dir, files = ref
    out = tmp_path / "old"
    shutil.copytree(ref_dir, out)
    old = [{k: v for k, v in e.items() if k not in ("status", "line", "batch")} for e in manifest(out)]
    (out / "manifest.jsonl").unlink()
    (out / "manifest.json").write_text(json.dumps({"images": old}, indent=1))
    (out / files[5]).unlink()  # one image missing: made again
    mtimes = {f: (out / f).stat().st_mtime_ns for f in files if f != files[5]}
    code, _, err = cli(*gen_args(out, table))
    assert code == 0, err
    assert {f: (out / f).stat().st_mtime_ns for f in mtimes} == mtimes
    assert (out / files[5]).read_bytes() == (ref_dir / files[5]).read_bytes()
    assert [e["file"] for e in manifest(out)] == files and not (out / "manifest.json").exists()
    # other settings against the old manifest are still refused
    code, _, err = cli(*gen_args(out, table, "--guidance", "5"))
    one_line_error(code, err, "different settings", "guidance")


def test_eval_reads_generate_folders(ref):
    from neti_fast.evaluation.inputs import read_manifest_entries
    out, files = ref
    entries = read_manifest_entries(out)
    assert [e["file"] for e in entries] == files
    assert sorted({e["truncation"] for e in entries}, key=str) == [8, None]


def test_list_flags_accumulate_and_no_truncation():
    p = build_parser()
    a = p.parse_args(["generate", "--model", "m", "--out", "o", "--truncation", "8", "--truncation", "none", "64",
                      "--seeds", "0-1", "--seeds", "5", "--concept", "a.safetensors", "--concept", "b.safetensors"])
    assert a.truncation == [8, None, 64] and a.seeds == ["0-1", "5"] and a.concept == ["a.safetensors", "b.safetensors"]
    assert p.parse_args(["generate", "--model", "m", "--out", "o"]).seeds is None  # default 0 comes later
    a = p.parse_args(["precompute", "c", "--out", "o", "--truncation", "8", "--truncation", "64"])
    assert a.truncation == [8, 64]
    a = p.parse_args(["run", "j", "--model", "m", "--out", "o", "--truncation", "full", "--truncation", "16"])
    assert a.truncation == [None, 16]
    a = p.parse_args(["bench", "--batch-sizes", "1", "--batch-sizes", "4"])
    assert a.batch_sizes == [1, 4]
    with pytest.raises(SystemExit):
        p.parse_args(["generate", "--model", "m", "--out", "o", "--truncation", "eight"])


def test_grid_column_labels_fit_their_column(tmp_path):
    from PIL import ImageDraw

    from neti_fast.images import _wrap, write_grid
    from neti_fast.jobs.outputs import truncation_label
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = [truncation_label(t) for t in (None, 8, 128)]
    assert draw.textlength(labels[0]) > 64 - 8  # the label that used to run into its neighbour at 64 px
    for label in labels:
        lines = _wrap(draw, label, 64 - 8)
        assert all(draw.textlength(ln) <= 64 - 8 for ln in lines)
        assert " ".join(lines) == label  # wrapped, nothing lost
    img = np.full((64, 64, 3), 128, np.uint8)
    write_grid(tmp_path / "g.png", [[img] * 3], row_labels=["p"], col_labels=labels)
    g = np.asarray(Image.open(tmp_path / "g.png"))
    top = g.shape[0] - 64
    assert top >= 12 + 12 * 2  # room for two label lines
    assert (g[top:, 160:] == 128).all()  # the labels stay above the images


def test_corrupt_or_foreign_safetensors_is_one_line(cli, one_line_error, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file
    rnd = tmp_path / "random.safetensors"
    rnd.write_bytes(np.random.default_rng(0).bytes(4096))
    gen = ["generate", "--model", "tiny", "--steps", "1", "--prompt", "a {}", "--out", tmp_path / "o"]
    one_line_error(*cli(*gen, "--concept", rnd)[::2], str(rnd))
    one_line_error(*cli("precompute", rnd, "--out", tmp_path / "t.safetensors")[::2], str(rnd))
    for name, tensors in (("linear.safetensors", {"linear.weight": torch.randn(32)}),
                          ("bias.safetensors", {"bias": torch.randn(32)}),
                          ("matrix.safetensors", {"proj": torch.randn(4, 32)})):
        save_file(tensors, tmp_path / name)
        one_line_error(*cli(*gen, "--concept", tmp_path / name)[::2], name, "no known concept tensors")
    save_file({"<cat>": torch.randn(32)}, tmp_path / "learned_embeds.safetensors")  # diffusers TI: read, said so
    from neti_fast.concepts.importers import load_concept
    with pytest.warns(UserWarning, match="learned_embeds.safetensors.*Textual Inversion"):
        assert load_concept(tmp_path / "learned_embeds.safetensors").placeholder == "<cat>"
