"""img2img and inpainting in job files: init images relative to the job file, batches grouped by
where the schedule starts, images equal to the engine's own img2img, resume by content hash, and
every bad img2img field reported with its line."""
import hashlib
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from neti_fast.engine.engine import Engine
from neti_fast.engine.img2img import INPAINTING_FILL, MASK_BLUR, prepare_init
from neti_fast.engine.request import GenerateConfig, Request

STEPS = 4
SIZE = 64
TOL = 1   # batched vs alone: float summation order only (tests/engine/test_img2img.py)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def smooth(seed: int, size=(SIZE, SIZE)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(3))


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def manifest(out):
    return [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]


def write_job(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def alone(model, prompt, seed, image_path, strength, mask_path=None):
    """The engine's img2img image for one request in a batch of one, its Init made from the files
    as the server makes it (prepare_init at A1111's mask defaults)."""
    mask = None if mask_path is None else Image.open(mask_path)
    init = prepare_init(Image.open(image_path), SIZE, SIZE, strength, 0, mask, (MASK_BLUR, MASK_BLUR), INPAINTING_FILL)
    return Engine(model, GenerateConfig(steps=STEPS, batch_size=1)).generate_batch([Request(prompt, seed, init=init)])[0]


@pytest.fixture
def job(tmp_path):
    d = tmp_path / "job"
    (d / "imgs").mkdir(parents=True)
    smooth(1).save(d / "a.png")
    smooth(2).save(d / "imgs" / "b.png")
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[16:48, 16:48] = 255
    Image.fromarray(m).save(d / "imgs" / "m.png")
    lines = [
        {"prompt": "a photo of a dog", "seeds": "0-1", "init_image": "a.png", "strength": 0.5},        # start 2
        {"prompt": "a red car", "seeds": [3], "init_image": "imgs/b.png", "strength": 0.75,           # start 1
         "mask": "imgs/m.png"},
        {"prompt": "a cat", "seeds": [4], "init_image": "imgs/b.png", "strength": 0.55},              # start 2
        {"prompt": "a tree", "seeds": [5]},                                                             # txt2img
    ]
    return write_job(d / "job.jsonl", lines)


def _args(job, out, *more):
    return ["run", job, "--model", "tiny", "--out", out, "--steps", STEPS, "--batch-size", 4, "--no-progress", *more]


def test_job_img2img_images_batches_and_resume(cli, tmp_path, job, tiny_model, max_diff):
    d, out = job.parent, tmp_path / "out"
    code, stdout, err = cli(*_args(job, out))
    assert code == 0, err
    assert "5 images made" in stdout
    s = json.loads((out / "job.json").read_text())
    assert s["batches"] == 3    # strengths 0.5 and 0.55 leave 2 of 4 steps: one batch; 0.75 and txt2img their own
    entries = {e["line"]: e for e in manifest(out) if e["seed"] != 1}
    by_line = {}
    for e in manifest(out):
        by_line.setdefault(e["line"], []).append(e)
    assert {e["batch"] for e in by_line[1] + by_line[3]} == {by_line[1][0]["batch"]}
    assert len({by_line[1][0]["batch"], by_line[2][0]["batch"], by_line[4][0]["batch"]}) == 3

    # the manifest records what makes each image reproducible: the files as written and their content
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    e = entries[2]
    assert (e["init_image"], e["init_image_sha256"], e["strength"], e["resize_mode"]) == \
        ("imgs/b.png", sha(d / "imgs" / "b.png"), 0.75, 0)
    assert (e["mask"], e["mask_sha256"], e["mask_blur"], e["inpainting_fill"]) == ("imgs/m.png", sha(d / "imgs" / "m.png"), 4, 0)
    assert entries[1]["init_image"] == "a.png" and "mask" not in entries[1]
    assert "init_image" not in entries[4]

    # each image is the engine's img2img of its own file and strength (alone: within the batching tolerance)
    for e in manifest(out):
        if e["line"] == 4:
            continue
        got = pixels(out / e["file"])
        want = alone(tiny_model, e["prompt"], e["seed"], d / e["init_image"], e["strength"],
                     d / e["mask"] if "mask" in e else None)
        assert max_diff(got, want) <= TOL, e["file"]
    inpainted = pixels(out / entries[2]["file"])
    far = np.ones((SIZE, SIZE), bool)
    far[6:58, 6:58] = False   # mask_blur 4 blends the edge over ~10 px
    assert np.array_equal(inpainted[far], np.asarray(Image.open(d / "imgs" / "b.png"))[far])
    a0, a1 = (pixels(out / by_line[1][i]["file"]) for i in (0, 1))
    assert max_diff(a0, a1) > 10   # the seed still counts

    # re-run: everything is recognised, nothing rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    code, stdout, err = cli(*_args(job, out))
    assert code == 0 and "0 images made, 5 already there" in stdout, err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == mtimes

    # a changed init image (same path) is not silently skipped: refused as any changed setting...
    smooth(9).save(d / "a.png")
    code, _, err = cli(*_args(job, out))
    errs = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(errs) == 1 and "different settings (init_image_sha256)" in errs[0] and "(and 1 more)" in errs[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == mtimes
    # ...and with --overwrite its images (only those) are made again, from the new file
    code, _, err = cli(*_args(job, out, "--overwrite"))
    assert code == 0, err
    s = json.loads((out / "job.json").read_text())
    assert (s["written"], s["skipped"]) == (2, 3)
    changed = {e["file"] for e in by_line[1]}
    assert {n for n, t in mtimes.items() if (out / n).stat().st_mtime_ns != t} == changed
    for e in by_line[1]:
        new = pixels(out / e["file"])
        assert max_diff(new, alone(tiny_model, e["prompt"], e["seed"], d / "a.png", 0.5)) <= TOL
        assert max_diff(new, a0 if e["seed"] == 0 else a1) > 10
    assert {e["file"]: e.get("init_image_sha256") for e in manifest(out)}[by_line[1][0]["file"]] == sha(d / "a.png")


def test_job_img2img_bad_fields_are_reported_by_line(cli, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    smooth(1).save(d / "a.png")
    smooth(2, (32, 32)).save(d / "small.png")
    (d / "notes.png").write_text("not an image")
    lines = [
        {"prompt": "a", "init_image": "a.png", "strength": 0.5},                    # 1 fine
        {"prompt": "a", "init_image": "gone.png"},                                  # 2 missing
        {"prompt": "a", "init_image": "a.png", "strength": 0},                      # 3 out of range
        {"prompt": "a", "init_image": "a.png", "strength": 1.5},                    # 4
        {"prompt": "a", "init_image": "a.png", "strength": "high"},                 # 5 wrong type
        {"prompt": "a", "init_image": "a.png", "mask": "small.png"},                # 6 other size
        {"prompt": "a", "strength": 0.5},                                           # 7 no init image
        {"prompt": "a", "init_image": "a.png", "resize_mode": 3},                   # 8
        {"prompt": "a", "init_image": "a.png", "strength": 0.1},                    # 9 no step left of 4
        {"prompt": "a", "init_image": "notes.png"},                                 # 10 not an image
        {"prompt": "a", "init_image": 5},                                           # 11 not a path
        {"prompt": "a", "init_image": "a.png", "mask": "nomask.png"},               # 12 missing mask
    ]
    job = write_job(d / "job.jsonl", lines)
    out = tmp_path / "out"
    code, _, err = cli("run", job, "--model", "tiny", "--out", out, "--steps", STEPS, "--no-progress")
    assert code == 2 and "Traceback" not in err
    rows = [ln.strip() for ln in err.strip().splitlines()]
    assert "11 bad lines" in rows[0], err
    bad = {int(r.split(":")[0].split()[1]): r for r in rows[1:]}
    assert sorted(bad) == list(range(2, 13)), err
    for ln, needles in {2: ("init_image 'gone.png'", "cannot read"), 3: ("strength 0", "> 0 and <= 1"),
                        4: ("strength 1.5", "> 0 and <= 1"), 5: ("strength 'high'",),
                        6: ("mask 'small.png'", "32x32", "64x64"), 7: ("strength 0.5", "no init image"),
                        8: ("resize_mode 3", "0 to 2"), 9: ("strength 0.1", "no step"),
                        10: ("init_image 'notes.png'", "not an image"), 11: ("init_image", "path"),
                        12: ("mask 'nomask.png'", "cannot read")}.items():
        for n in needles:
            assert n in bad[ln], (ln, n, bad[ln])
        assert str(d) not in bad[ln]   # named as written in the job file
    assert not out.exists() or not list(out.glob("*.png"))


def test_init_source_prepares_what_it_checked(tmp_path):
    """The Init a line runs with is the server's for that file (prepare_init at its mask defaults),
    and a file changed after the job was checked is refused, not used under the old hash."""
    from neti_fast.errors import NetiError
    from neti_fast.jobs.jobfile import init_source
    smooth(1, (80, 64)).save(tmp_path / "a.png")
    src = init_source("a.png", 0.5, 1, None, base=tmp_path)
    assert (src.image_path, src.strength, src.resize_mode) == (str(tmp_path / "a.png"), 0.5, 1)
    src.check()
    init = src.prepare(SIZE, SIZE)
    want = prepare_init(Image.open(tmp_path / "a.png"), SIZE, SIZE, 0.5, 1)
    assert np.array_equal(init.image, want.image) and init.mask is None and init.strength == 0.5
    smooth(2, (80, 64)).save(tmp_path / "a.png")
    with pytest.raises(NetiError, match="changed while the job ran") as e:
        src.prepare(SIZE, SIZE)
    assert e.value.field == "init_image"
    assert init_source(None) is None
