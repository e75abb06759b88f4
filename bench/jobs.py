"""Batch-job throughput: one packed `neti-fast run` job vs the same requests one `generate` call each.

    python -m neti_fast.bench.jobs [--steps 20] [--requests 64] [--seeds 4] [--concepts 16] [--json out.json]

Workload: `--requests` requests of `--seeds` seeds each over `--concepts` random concepts (NeTI, XTI
and TI in turn; NeTI requests cycle through truncations full / 8 / 16), one prompt template per
request. Both sides use the same loaded model, batch size, steps and concept files, and both write
PNGs:
  packed:       `neti_fast.jobs.runner.run_job` on a JSONL file of all requests (images from different
                requests, concepts and truncations share full batches);
  per request:  `neti_fast.api.generate_to_folder` once per request, as a user scripting the API or
                the `generate` command would (a fresh engine per call; the model load is excluded);
                each call fills at most `--seeds` images of a batch.
The two image sets are compared (max abs difference, in levels of 255) so the speed-up is not bought
with different images. The load average of the machine is recorded: other processes skew CPU timings.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from neti_fast.utils import CLI_DTYPES, METHODS, default_device, default_dtype_name, torch_dtype

TEMPLATES = ["a photo of {}", "a painting of {} in the snow", "{} on a beach", "a close-up photo of {}",
             "an oil painting of {} at night", "a watercolor of {} in a garden", "{} floating in space",
             "a sketch of {} on paper"]


def build_workload(work: Path, dim: int, n_requests: int, n_seeds: int, n_concepts: int) -> list[dict]:
    """Concept files in `work`, and the requests (job lines with absolute concept paths)."""
    from neti_fast.concepts.concept import random_concept
    paths = []
    for c in range(n_concepts):
        method = METHODS[c % len(METHODS)]
        p = work / f"concept{c:02d}-{method}.safetensors"
        random_concept(method, dim, 1000 + c, f"<c{c}>").save(p)
        paths.append((p, method))
    lines = []
    for i in range(n_requests):
        p, method = paths[i % n_concepts]
        trunc = (None, 8, 16)[(i // n_concepts) % 3] if method == "neti" else None
        lines.append({"prompt": TEMPLATES[i % len(TEMPLATES)], "concept": str(p),
                      "seeds": list(range(i * n_seeds, (i + 1) * n_seeds)), "truncation": trunc})
    return lines


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _busy_others(seconds: float = 1.0) -> list[dict]:
    """Other processes using CPU right now (name, %): they skew the timings."""
    try:
        import psutil
    except ImportError:
        return []
    me = os.getpid()
    procs = [p for p in psutil.process_iter(["pid", "name", "cmdline"]) if p.info["pid"] != me]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(seconds)
    busy = []
    for p in procs:
        try:
            pct = p.cpu_percent(None)
        except psutil.Error:
            continue
        if pct >= 10:
            cmd = " ".join(p.info["cmdline"] or [p.info["name"] or "?"])[:120]
            busy.append({"pid": p.info["pid"], "cpu_percent": round(pct), "cmd": cmd})
    return busy


def run(args) -> dict:
    from neti_fast.bench.report import _device_info, _versions

    from neti_fast.api import generate_to_folder
    from neti_fast.jobs.runner import run_job
    from neti_fast.sd.models import load_model
    from neti_fast.engine.engine import Engine
    from neti_fast.engine.request import GenerateConfig, Request
    from neti_fast.concepts.table import load_table

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or default_device()
    dtype = torch_dtype(args.dtype or default_dtype_name(device))
    model = load_model(args.model, device=device, dtype=dtype)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="neti-bench-jobs-"))
    work.mkdir(parents=True, exist_ok=True)
    lines = build_workload(work, model.text_dim, args.requests, args.seeds, args.concepts)
    job = work / "job.jsonl"
    job.write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    cfg = GenerateConfig(steps=args.steps, batch_size=args.batch_size)
    n_images = args.requests * args.seeds
    log = print
    others = _busy_others()
    load = {"start": _load()}
    log(f"{args.requests} requests x {args.seeds} seeds = {n_images} images, {args.concepts} concepts, "
        f"{args.steps} steps, batch {args.batch_size}, {model.name} on {device}; load average {load['start']}")
    if others:
        busy = ", ".join(f"{o['cmd'][:50]} ({o['cpu_percent']}%)" for o in others)
        log(f"  other busy processes: {busy}")

    # first-call overheads (allocator, scheduler construction) out of both timings
    warm = load_table(lines[0]["concept"])
    Engine(model, GenerateConfig(steps=2, batch_size=2)).generate_batch([Request(lines[0]["prompt"], 0, warm)])

    def packed(r):
        s = run_job(job, work / f"packed-{r}", model, cfg, model_name=args.model, progress=False)
        assert s["done"] == n_images, s
        return s

    def per_request(r):
        for i, ln in enumerate(lines):
            table = load_table(ln["concept"])
            generate_to_folder(model, table, [ln["prompt"]], ln["seeds"], work / f"per-request-{r}" / f"{i:03d}",
                               truncations=[ln["truncation"]], cfg=cfg, model_name=args.model, progress=False)

    times = {"packed": [], "per_request": []}
    for r in range(args.repeats):  # alternate the order: a load change on the machine hits both sides
        for name in (("packed", "per_request") if r % 2 == 0 else ("per_request", "packed")):
            t = time.perf_counter()
            s = (packed if name == "packed" else per_request)(r)
            times[name].append(time.perf_counter() - t)
            if name == "packed":
                batches = s["batches"]
            load[f"after_{name}_{r}"] = _load()
            log(f"  {name:<12} {times[name][-1]:8.1f} s, {n_images / times[name][-1]:.3f} images/s")
    packed_s, per_s = min(times["packed"]), min(times["per_request"])

    from PIL import Image

    from neti_fast.jobs.outputs import image_name
    diff = 0
    for i, ln in enumerate(lines):
        for seed in ln["seeds"]:
            a = np.asarray(Image.open(work / "packed-0" / image_name(i + 1, ln["prompt"], ln["truncation"], seed, digits=5)))
            b = np.asarray(Image.open(work / "per-request-0" / f"{i:03d}" / image_name(0, ln["prompt"], ln["truncation"], seed)))
            diff = max(diff, int(np.abs(a.astype(np.int32) - b).max()))
    ratio = per_s / packed_s
    log(f"  packed / per request (best of {args.repeats}): {ratio:.2f}x images/s; images differ by at most {diff}/255")
    others_end = _busy_others()
    note = ("other processes were running (see load_average / other_processes): timings are noisy"
            if others or others_end or max(load.values()) > (os.cpu_count() or 1) + 0.5 else "machine otherwise idle")
    dev = torch.device(device)
    return {
        "benchmark": "jobs",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "device": _device_info(dev),
        "versions": _versions(),
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "model": model.name, "dtype": str(model.dtype).replace("torch.", ""), "steps": args.steps,
        "height": model.default_size, "width": model.default_size, "batch_size": args.batch_size,
        "workload": {"requests": args.requests, "seeds_per_request": args.seeds, "images": n_images,
                     "concepts": args.concepts, "methods": list(METHODS), "truncations": [None, 8, 16]},
        "packed": {"seconds": round(packed_s, 2), "images_per_s": round(n_images / packed_s, 4),
                   "batches": batches, "all_seconds": [round(x, 2) for x in times["packed"]]},
        "per_request": {"seconds": round(per_s, 2), "images_per_s": round(n_images / per_s, 4),
                        "calls": args.requests, "all_seconds": [round(x, 2) for x in times["per_request"]]},
        "ratio": round(ratio, 3),
        "max_abs_diff_levels": diff,
        "load_average_1min": load,
        "other_processes": {"start": others, "end": others_end},
        "note": note,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m neti_fast.bench.jobs", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=sorted(CLI_DTYPES), default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--seeds", type=int, default=4, help="seeds per request")
    p.add_argument("--concepts", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each side (alternating order); best is kept")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write results as JSON")
    args = p.parse_args(argv)
    result = run(args)
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
