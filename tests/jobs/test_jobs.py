"""`neti-fast run`: JSONL jobs packed into batches, validation, failures, kill-and-resume, torchrun."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from neti_fast.cli import main
from neti_fast.engine.engine import Engine
from neti_fast.engine.request import GenerateConfig, Request
from neti_fast.concepts.table import load_bundle, load_table, precompute, save_bundle

STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    # one thread everywhere: subprocesses below run with OMP_NUM_THREADS=1 and must match bytes
    yield


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def write_job(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int32)


def manifest(out):
    return [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def concepts(tmp_path_factory, make_concept):
    d = tmp_path_factory.mktemp("job-concepts")
    make_concept("neti", dim=32, seed=11).save(d / "neti.safetensors")
    make_concept("xti", dim=32, seed=12, placeholder="<x>").save(d / "xti.safetensors")
    make_concept("ti", dim=32, seed=13, placeholder="<t>").save(d / "ti.safetensors")
    precompute(make_concept("neti", dim=32, seed=14), truncations=[16], progress=False).save(d / "neti-table.safetensors")
    save_bundle({"cat": load_table(d / "neti.safetensors"), "toy": load_table(d / "ti.safetensors")},
                d / "bundle.safetensors")  # `neti-fast merge`
    return d


def test_job_equals_one_request_at_a_time(cli, tmp_path, capsys, concepts, tiny_model):
    lines = [
        {"prompt": "a photo of {}", "concept": "neti.safetensors", "seeds": "0-1", "truncation": [None, 8]},
        {"prompt": "a painting of {}", "concept": "xti.safetensors", "seeds": [3]},
        {"prompt": "a {} toy", "concept": "ti.safetensors", "seeds": "4", "negative_prompt": "blurry"},
        {"prompt": "a cat", "seeds": [5], "scheduler": "ddim", "steps": 2},   # its own batch group
        {"prompt": "a {} dog", "concept": "missing.safetensors", "seeds": "0-2"},  # fails, the job goes on
        {"prompt": "a photo of {cat} in the style of {style}", "seeds": [6], "truncation": 8,
         "concept": {"cat": "neti.safetensors", "style": "xti.safetensors"}},   # two concepts in one prompt
        {"prompt": "{cat} playing with {toy}", "concept": "bundle.safetensors", "seeds": [2]},
    ]
    job = write_job(concepts / "job-a.jsonl", lines)  # concept paths are relative to the job file
    out = tmp_path / "out"
    args = ["run", job, "--model", "tiny", "--out", out, "--steps", STEPS, "--batch-size", 3, "--no-progress"]
    code, stdout, err = cli(*args)
    errs = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(errs) == 1 and "line 5" in errs[0] and "missing.safetensors" in errs[0], err
    n = 9
    assert f"{n} images made" in stdout

    entries = manifest(out)
    done = [e for e in entries if e["status"] == "done"]
    failed = [e for e in entries if e["status"] == "failed"]
    assert len(done) == n and len({e["file"] for e in done}) == n
    assert len(failed) == 1 and failed[0]["line"] == 5 and "missing.safetensors" in failed[0]["reason"]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(e["file"] for e in done)
    for key in ("file", "prompt", "seed", "truncation", "concept", "steps", "guidance", "scheduler", "height",
                "width", "model", "line", "status"):
        assert all(key in e for e in done), key
    summary = json.loads((out / "job.json").read_text())
    assert (summary["done"], summary["skipped"], summary["failed_requests"], summary["failed_images"]) == (n, 0, 1, 3)
    assert summary["images_per_s"] > 0

    # every image equals its request generated alone (batch of one). The job packs 3 per batch, and
    # CPU float sums depend on the batch composition (~1e-6 relative), so allow one level of 255
    loaded = {}

    def load(p):
        if p not in loaded:
            loaded[p] = load_bundle(concepts / p) if p.startswith("bundle") else load_table(concepts / p)
        return loaded[p]
    engines = {}
    for e in done:
        c = e["concept"]
        table = None if c is None else {k: load(v) for k, v in c.items()} if isinstance(c, dict) else load(c)
        key = (e["steps"], e["scheduler"])
        if key not in engines:
            engines[key] = Engine(tiny_model, GenerateConfig(steps=e["steps"], scheduler=e["scheduler"], batch_size=1))
        solo = engines[key].generate_batch([Request(e["prompt"], e["seed"], table, e["truncation"], e["negative_prompt"])])[0]
        assert int(np.abs(solo.astype(np.int32) - pixels(out / e["file"])).max()) <= 1, e["file"]
    # truncation, negative prompt and seed really change the image
    a, b = pixels(out / "00001-a-photo-of_full_s0.png"), pixels(out / "00001-a-photo-of_t8_s0.png")
    assert np.abs(a - b).max() > 0 and np.abs(a - pixels(out / "00001-a-photo-of_full_s1.png")).max() > 10

    # re-run: everything is skipped, nothing rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    code, stdout, err = cli(*args)
    assert code == 2 and "0 images made" in stdout and f"{n} already there" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == mtimes
    assert manifest(out) == entries
    # same names, other settings: refused in one line, nothing touched
    code, _, err = cli(*args[:-1], "--guidance", "5", "--no-progress")
    errs = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(errs) == 1 and "different settings (guidance)" in errs[0] and "--overwrite" in errs[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == mtimes


def test_validation_reports_every_bad_line(cli, tmp_path, capsys, concepts):
    neti, ti = concepts / "neti.safetensors", concepts / "ti.safetensors"
    lines = [
        {"prompt": "a photo of {}", "concept": str(neti)},                    # 1 fine
        '{"prompt": "a photo of {}", ',                                        # 2 bad JSON
        {"prompt": "a cat", "seed": 3},                                        # 3 unknown key
        {"prompt": 5},                                                         # 4 wrong type
        {"prompt": "a cat", "seeds": "3-1"},                                   # 5 bad seeds
        {"prompt": "a photo of {}"},                                           # 6 {} without a concept
        {"prompt": "a {}", "concept": str(ti), "truncation": 8},               # 7 truncation on TI
        {"prompt": "a {} " + "very " * 80, "concept": str(neti)},              # 8 too long
        {"prompt": "a {}", "concept": str(tmp_path / "gone.safetensors")},     # 9 not a validation error
        "",
        "[1, 2]",                                                              # 11 not an object
        {"prompt": "a cat", "steps": 0, "guidance": "high"},                   # 12 two problems
    ]
    job = write_job(tmp_path / "bad.jsonl", lines)
    out = tmp_path / "out"
    code, _, err = cli("run", job, "--model", "tiny", "--out", out, "--steps", STEPS, "--no-progress")
    assert code == 2 and "Traceback" not in err
    rows = [ln.strip() for ln in err.strip().splitlines()]
    assert "9 bad lines" in rows[0]
    bad = {int(r.split(":")[0].split()[1]): r for r in rows[1:]}
    assert sorted(bad) == [2, 3, 4, 5, 6, 7, 8, 11, 12], err
    for ln, needle in ((2, "bad JSON"), (3, "unknown key 'seed'"), (3, "did you mean 'seeds'"), (4, "string"),
                       (5, "seeds"), (6, "no concept was given"), (7, "NeTI"), (8, "77"), (11, "object"),
                       (12, "steps"), (12, "guidance")):
        assert needle in bad[ln], (ln, bad[ln])
    assert not list(out.glob("*.png")) and not (out / "manifest.jsonl").exists()
    # a bad command-line value is one line too
    code, _, err = cli("run", job, "--model", "tiny", "--out", out, "--batch-size", 0)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--batch-size" in err


# ----------------------------------------------------------------------------- resume and processes

JOB_B = [
    {"prompt": "a photo of {}", "concept": "neti-table.safetensors", "seeds": "0-3", "truncation": [None, 16]},
    {"prompt": "a {} in the snow", "concept": "xti.safetensors", "seeds": "7-9"},
    {"prompt": "a {} toy", "concept": "ti.safetensors", "seeds": [1]},
]  # 12 images: 6 batches of 2


def _job_b_args(job, out):
    return ["run", str(job), "--model", "tiny", "--out", str(out), "--steps", str(STEPS), "--batch-size", "2",
            "--no-progress"]


@pytest.fixture(scope="module")
def job_b(concepts, tmp_path_factory, _one_thread):
    """JOB_B run once, uninterrupted, in this process: the bytes every other run must reproduce."""
    job = write_job(concepts / "job-b.jsonl", JOB_B)
    ref = tmp_path_factory.mktemp("job-b") / "ref"
    assert main(_job_b_args(job, ref)) == 0
    files = sorted(p.name for p in ref.glob("*.png"))
    assert len(files) == 12
    return job, ref, files


def test_kill_and_resume_is_byte_identical(cli, tmp_path, capsys, job_b, kill_after_first_image):
    job, ref, files = job_b
    out = tmp_path / "killed"
    kill_after_first_image(_job_b_args(job, out), out)
    before = sorted(p.name for p in out.glob("*.png"))
    assert 0 < len(before) < 12  # killed mid-job
    code, _, err = cli(*_job_b_args(job, out))
    assert code == 0, err
    summary = json.loads((out / "job.json").read_text())
    # what the killed run left is kept: recorded images skipped, unrecorded ones (killed between the
    # PNG and the manifest write) checked against the regenerated image, not rewritten
    assert summary["skipped"] + summary["verified_unrecorded"] == len(before)
    assert summary["written"] == 12 - len(before)
    assert sorted(p.name for p in out.glob("*.png")) == files
    for f in files:
        assert (out / f).read_bytes() == (ref / f).read_bytes(), f
    assert [e["file"] for e in manifest(out)] == files

    # one image lost from every batch: each batch is re-run whole (not re-packed from the 6 missing
    # images, which would change batch composition and so, on CPU, a few pixels) and only it is written
    last = {e["batch"]: e["file"] for e in manifest(out)}
    assert len(last) == 6
    for f in last.values():
        (out / f).unlink()
    code, _, err = cli(*_job_b_args(job, out))
    assert code == 0, err
    summary = json.loads((out / "job.json").read_text())
    assert (summary["batches_run"], summary["written"], summary["skipped"]) == (6, 6, 6)
    for f in files:
        assert (out / f).read_bytes() == (ref / f).read_bytes(), f


def test_unrecorded_images_are_checked_not_overwritten(cli, tmp_path, capsys, job_b):
    job, ref, files = job_b
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    entries = manifest(out)
    ours = [e["file"] for e in entries if e["batch"] == 0]       # unrecorded, but this job's images
    foreign = next(e["file"] for e in entries if e["batch"] == 1)  # unrecorded and different
    (out / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries
                                                if e["file"] not in ours + [foreign]))
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(out / foreign)
    mtimes = {f: (out / f).stat().st_mtime_ns for f in files}
    code, _, err = cli(*_job_b_args(job, out))
    assert code == 2 and "1 image(s) not made" in err, err
    s = json.loads((out / "job.json").read_text())
    assert (s["verified_unrecorded"], s["failed_images"], s["written"], s["batches_run"]) == (2, 1, 0, 2)
    assert {f: (out / f).stat().st_mtime_ns for f in files} == mtimes  # nothing rewritten
    bad = [e for e in manifest(out) if e["status"] == "failed"]
    assert [e["file"] for e in bad] == [foreign] and "differs" in bad[0]["reason"]
    code, _, err = cli(*_job_b_args(job, out), "--overwrite")
    assert code == 0, err
    assert (out / foreign).read_bytes() == (ref / foreign).read_bytes()
    assert manifest(out) == manifest(ref)


def test_torchrun_two_processes(tmp_path, job_b):
    """Two CPU processes (gloo): each image made exactly once, same bytes and manifest as one process."""
    job, ref, files = job_b
    out = tmp_path / "dist"
    # --concept-cache-mb 1: the 8 MB table is evicted and reloaded, bytes unchanged; progress bars on
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "neti_fast", *[a for a in _job_b_args(job, out) if a != "--no-progress"], "--concept-cache-mb", "1"]
    r = subprocess.run(cmd, check=False, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "job.json").read_text())
    assert summary["world_size"] == 2 and summary["written"] == 12 and summary["batches_run"] == 6
    assert summary["concept_evictions"] >= 1
    assert sorted(p.name for p in out.glob("*.png")) == files
    for f in files:
        assert (out / f).read_bytes() == (ref / f).read_bytes(), f
    assert not list(out.glob("manifest.rank*.jsonl"))  # merged by rank 0
    assert not list(out.glob("progress.rank*.json"))  # live progress files removed at the end
    assert "all ranks" in r.stderr  # rank 0's bar showed the merged count
    assert manifest(out) == manifest(ref)  # one entry per image, same order and content
    assert r.stdout.count("images made") == 1  # rank 0 alone reports


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (its child processes, read from /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            env = (stat.parent / "environ").read_bytes().split(b"\0") if ppid == parent else []
        except (OSError, IndexError, ValueError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(stat.parent.name)
    return None


def test_torchrun_rank_lost_then_resumed(tmp_path, job_b):
    """A rank killed mid-job (a node lost): torchrun stops the run; the same command again finishes
    it, each image made exactly once, the same bytes and manifest as one uninterrupted process."""
    import signal
    job, ref, files = job_b
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "neti_fast", *_job_b_args(job, out)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not list(out.glob("*.png")):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no image after 300 s"
            time.sleep(0.02)
        pid = _rank_pid(proc.pid, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(120) != 0  # torchrun ends the other rank and fails
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    before = sorted(p.name for p in out.glob("*.png"))
    assert 0 < len(before) < 12
    r = subprocess.run(cmd, check=False, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "job.json").read_text())
    assert summary["world_size"] == 2
    assert summary["written"] + summary["skipped"] + summary["verified_unrecorded"] == 12
    assert summary["written"] < 12  # what the first run made was kept
    assert sorted(p.name for p in out.glob("*.png")) == files
    for f in files:
        assert (out / f).read_bytes() == (ref / f).read_bytes(), f
    assert manifest(out) == manifest(ref)


DDP_SCRIPT = r'''
import json, os, sys
from pathlib import Path
import torch, torch.distributed as dist
import neti_fast.concepts.concept as C, neti_fast.training.checkpoints as K, neti_fast.training.trainer as T
from neti_fast.training.config import TrainConfig
from neti_fast.training.data import TextualInversionDataset
from neti_fast.sd.models import load_model

out, images = Path(sys.argv[1]), sys.argv[2]
rank = int(os.environ["RANK"])
dist.init_process_group("gloo")  # as accelerate does: train() must use the existing group
writes, seen = [], []
orig_write, orig_items = C.atomic_write, TextualInversionDataset.next_items
def spy_write(path, write):
    writes.append(Path(path).name)
    return orig_write(path, write)
def spy_items(self, n):
    items = orig_items(self, n)
    seen.append([[float(self.pixels[i].sum()), flip] for i, flip, _ in items] + [[c for _, _, c in items]])
    return items
K.atomic_write = C.atomic_write = spy_write
TextualInversionDataset.next_items = spy_items
model = load_model("tiny")
def cfg(run, steps, **kw):
    return TrainConfig(images=images, placeholder="<ddp>", init_word="cat", out=str(out / run), steps=steps,
                         batch_size=1, grad_accum=1, resolution=64, save_every=1, device="cpu", **kw)
T.train(cfg("full", 3), model, progress=False)
final = {}
T.train(cfg("half", 1), model, progress=False)
T.train(cfg("half", 3, resume="latest"), model, progress=False,
        on_step=lambda s, l, tr: final.update({k: v.tolist() for k, v in tr.tensors().items()}))
(out / f"rank{rank}.json").write_text(json.dumps({"writes": writes, "seen": seen, "final": final}))
dist.destroy_process_group()
'''


def test_ddp_training(tmp_path, tiny_model):  # tiny_model: the cached model exists before the ranks load it
    """torchrun, 2 CPU processes: different data per rank, identical weights, rank 0 alone writes, exact resume."""
    rs = np.random.RandomState(0)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        Image.fromarray((rs.rand(40, 48, 3) * 255).astype(np.uint8)).save(imgs / f"{i}.png")
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(out), str(imgs)]
    r = subprocess.run(cmd, check=False, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["seen"] != r1["seen"]  # each rank its own data stream
    assert r0["final"] == r1["final"]  # gradients averaged: the ranks stay identical
    assert r1["writes"] == []  # rank 0 alone writes
    assert {"checkpoint-1.safetensors", "checkpoint-3.safetensors", "concept.safetensors"} <= set(r0["writes"])
    from safetensors.torch import load_file
    full = load_file(str(out / "full" / "concept.safetensors"))
    resumed = load_file(str(out / "half" / "concept.safetensors"))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)  # exact resume
    assert all(torch.equal(full[k], torch.tensor(v)) for k, v in r0["final"].items())
    ck = load_file(str(out / "full" / "checkpoint-3.safetensors"))
    assert any(k.startswith("rank1.rng.") for k in ck)  # every rank's stream is in the checkpoint


def test_bench_jobs_smoke(tmp_path, tiny_model):
    """`python -m neti_fast.bench.jobs` on a toy workload: both sides run and make the same images."""
    from neti_fast.bench.jobs import main as bench
    r = bench(["--requests", "3", "--seeds", "1", "--concepts", "3", "--steps", "2", "--batch-size", "3",
               "--out", str(tmp_path / "w"), "--json", str(tmp_path / "r.json")])
    assert r["packed"]["batches"] == 1 and r["per_request"]["calls"] == 3
    assert r["max_abs_diff_levels"] <= 1 and r["ratio"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["versions"]["torch"] == torch.__version__


def test_merged_progress(tmp_path):
    from neti_fast.jobs.runner import _merged_progress, _publish_progress
    t0 = time.perf_counter() - 10  # both ranks started 10 s ago
    _publish_progress(tmp_path, 0, 30, 50, t0)
    _publish_progress(tmp_path, 1, 10, 40, t0)
    note = _merged_progress(tmp_path)
    assert note.startswith("all ranks 40/90 img, 4.0")  # 40 images in ~10 s
    assert "ETA 00:00:1" in note  # 50 left at 4 img/s: 12.5 s


def test_prompt_syntax_key_and_flag(cli, tmp_path, concepts, tiny_model):
    """`prompt_syntax` per line (default --prompt-syntax): A1111 lines with long prompts and a
    multi-vector embedding run beside plain ones (batched by context length), each image equal
    to its request alone; the manifest records the syntax of A1111 lines only (plain entries stay
    as before); a bad value is named by its key, a plain prompt over 77 tokens by its."""
    from neti_fast.concepts.concept import Concept
    Concept("ti", "<mv>", 32, embeds=torch.randn(4, 32, generator=torch.Generator().manual_seed(2))).save(
        tmp_path / "mv.safetensors")
    long_ = "a photo of {}, " + ", ".join(["red house by the river"] * 20)
    lines = [
        {"prompt": long_, "concept": str(tmp_path / "mv.safetensors"), "seeds": "0-1", "prompt_syntax": "a1111",
         "negative_prompt": "blurry BREAK lowres"},
        {"prompt": "a (photo:1.3) of {}", "concept": str(tmp_path / "mv.safetensors"), "seeds": [2]},  # --prompt-syntax
        {"prompt": "a photo of {}", "concept": str(tmp_path / "mv.safetensors"), "seeds": [3], "prompt_syntax": "plain"},
    ]
    job = write_job(tmp_path / "syntax.jsonl", lines)
    out = tmp_path / "out"
    code, stdout, err = cli("run", job, "--model", "tiny", "--out", out, "--steps", STEPS, "--batch-size", 4,
                            "--prompt-syntax", "a1111", "--no-progress")
    assert code == 0, err
    done = manifest(out)
    assert [e.get("prompt_syntax") for e in done] == ["a1111", "a1111", "a1111", None]
    table = load_table(tmp_path / "mv.safetensors")
    eng = Engine(tiny_model, GenerateConfig(steps=STEPS, batch_size=1))
    for e in done:
        r = Request(e["prompt"], e["seed"], table, None, e["negative_prompt"], prompt_syntax=e.get("prompt_syntax", "plain"))
        assert int(np.abs(eng.generate_batch([r])[0].astype(np.int32) - pixels(out / e["file"])).max()) <= 1, e["file"]
    job = write_job(tmp_path / "bad.jsonl", [{"prompt": "a cat", "prompt_syntax": "comfy"}, {"prompt": long_.replace("{}", "cat")}])
    code, _, err = cli("run", job, "--model", "tiny", "--out", tmp_path / "o2", "--steps", STEPS, "--no-progress")
    assert code == 2 and "Traceback" not in err
    assert "prompt_syntax must be one of plain, a1111" in err and "tokens long" in err
    code, _, err = cli("generate", "--model", "tiny", "--prompt", "a cat", "--prompt-syntax", "comfy", "--out", tmp_path / "o3")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--prompt-syntax" in err
