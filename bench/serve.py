"""Serving throughput: 16 concurrent clients, each asking one image with its own concept, against
the same 16 requests sent one at a time, over real HTTP to one `neti-fast serve` server.

    python -m neti_fast.bench.serve [--model tiny] [--clients 16] [--steps 8] [--rounds 3] [--json out.json]

The server runs in this process (uvicorn on 127.0.0.1, a free port; the model is loaded once and
both sides share it, its engine and its caches). Each client posts `/sdapi/v1/txt2img` with its own
random NeTI concept ("a photo of {cN}") and seed:
  concurrent:  all clients at once (a barrier releases them): the queue packs them, up to
               --max-batch images per engine batch, within --max-wait-ms;
  sequential:  the same requests, one after the other, each waiting for the previous answer.
The two sides alternate round by round (this VM's speed drifts over minutes), after one warm-up of
each. Reported per side: images/s (requests / wall time of the round; median over rounds), p50 /
p95 latency of single requests (over all rounds), the engine batch sizes seen; and the concurrent
images are compared to the sequential ones (max abs difference in levels of 255), so the speed-up
is not bought with different images.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def decode_png(b64: str) -> np.ndarray:
    import base64
    import io

    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(args) -> dict:
    import httpx
    import torch

    from neti_fast.concepts.concept import random_concept
    from neti_fast.sd.models import load_model
    from neti_fast.serve.app import Server, ServeConfig
    from neti_fast.serve.background import BackgroundServer

    load_start = round(os.getloadavg()[0], 2)  # other processes skew CPU timings: recorded
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype or ("fp16" if device.startswith("cuda") else "fp32")]
    model = load_model(args.model, device=device, dtype=dtype)
    work = Path(tempfile.mkdtemp(prefix="neti-fast-bench-serve-"))
    concepts = work / "concepts"
    concepts.mkdir()
    for c in range(args.clients):
        random_concept("neti", model.text_dim, 2000 + c, f"<c{c}>").save(concepts / f"c{c}.safetensors")
    size = args.size or model.default_size
    cfg = ServeConfig(model=args.model, concepts=str(concepts), device=device, dtype=str(dtype).replace("torch.", ""),
                      max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, state_dir=str(work / "state"))
    server = Server(cfg, model=model)
    bodies = [{"prompt": f"a photo of {{c{c}}}", "seed": c, "steps": args.steps, "width": size, "height": size,
               "sampler_name": "DPM++ 2M", "scheduler": "uniform", "cfg_scale": 7.5} for c in range(args.clients)]

    def one(c: httpx.Client, b: dict) -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        r = c.post("/sdapi/v1/txt2img", json=b)
        dt = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"request failed: {r.status_code} {r.text[:200]}")
        return dt, decode_png(r.json()["images"][0])

    def sequential(url):
        lat, imgs = [], []
        with httpx.Client(base_url=url, timeout=600) as c:
            t0 = time.perf_counter()
            for b in bodies:
                dt, img = one(c, b)
                lat.append(dt)
                imgs.append(img)
            return time.perf_counter() - t0, lat, imgs

    def concurrent(url):
        n = len(bodies)
        lat, imgs, errs = [0.0] * n, [None] * n, []
        barrier = threading.Barrier(n + 1)
        clients = [httpx.Client(base_url=url, timeout=600) for _ in range(n)]

        def go(i):
            try:
                barrier.wait()
                lat[i], imgs[i] = one(clients[i], bodies[i])
            except Exception as e:  # noqa: BLE001
                errs.append(repr(e))
        ts = [threading.Thread(target=go, args=(i,)) for i in range(n)]
        for t in ts:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in ts:
            t.join()
        wall = time.perf_counter() - t0
        for c in clients:
            c.close()
        if errs:
            raise RuntimeError(errs[0])
        return wall, lat, imgs

    sides = {"sequential": sequential, "concurrent": concurrent}
    res = {k: {"walls_s": [], "latencies_s": [], "batch_sizes": []} for k in sides}
    images = {}
    try:
        with BackgroundServer(server) as live:
            for k, f in sides.items():  # warm-up: conditionings cached, allocator warm, for both
                f(live.url)
            for _ in range(args.rounds):
                for k, f in sides.items():
                    before = len(server.batcher.batch_sizes)
                    wall, lat, imgs = f(live.url)
                    res[k]["walls_s"].append(round(wall, 4))
                    res[k]["latencies_s"] += [round(x, 4) for x in lat]
                    res[k]["batch_sizes"].append(server.batcher.batch_sizes[before:])
                    images[k] = imgs
    finally:
        server.close()
    n = len(bodies)
    out = {}
    for k, r in res.items():
        out[k] = {"images_per_s": round(n / statistics.median(r["walls_s"]), 3),
                  "p50_latency_ms": round(1000 * _percentile(r["latencies_s"], 50), 1),
                  "p95_latency_ms": round(1000 * _percentile(r["latencies_s"], 95), 1), **r}
    diff = max(int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())
               for a, b in zip(images["sequential"], images["concurrent"]))
    return {
        "benchmark": "serve: concurrent clients with different concepts vs the same requests one at a time",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device if not device.startswith("cuda") else torch.cuda.get_device_name(),
        "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "load_average_1min_start": load_start,
        "load_average_1min_end": round(os.getloadavg()[0], 2),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "settings": {"model": args.model, "dtype": str(dtype).replace("torch.", ""), "clients": args.clients,
                     "steps": args.steps, "size": size, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
                     "rounds": args.rounds, "sampler": "DPM++ 2M (uniform) = engine dpm++", "guidance": 7.5},
        "concurrent_over_sequential_images_per_s": round(out["concurrent"]["images_per_s"] / out["sequential"]["images_per_s"], 3),
        "max_abs_diff_concurrent_vs_sequential": diff,
        **out,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m neti_fast.bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=None, help="image size (default: the model's)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=50.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write results as JSON")
    args = p.parse_args(argv)
    result = run(args)
    for k in ("sequential", "concurrent"):
        r = result[k]
        print(f"{k:>10}: {r['images_per_s']:.2f} images/s, p50 {r['p50_latency_ms']:.0f} ms, p95 {r['p95_latency_ms']:.0f} ms")
    print(f"concurrent / sequential images/s: x{result['concurrent_over_sequential_images_per_s']}; "
          f"max image difference {result['max_abs_diff_concurrent_vs_sequential']}/255")
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
