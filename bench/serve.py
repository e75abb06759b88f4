"""Serving throughput: 16 concurrent clients, each asking one image with its own concept, against
the same 16 requests sent one at a time, over real HTTP to one `neti-fast serve` server.

    python -m neti_fast.bench.serve [--model tiny] [--clients 16] [--steps 8] [--rounds 3] [--json out.json]
    python -m neti_fast.bench.serve --replicas 1 2 [--concepts 4] ...   (Ray Serve: `neti-fast serve --replicas N`)

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
import functools
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


def _one(c, b: dict) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    r = c.post("/sdapi/v1/txt2img", json=b)
    dt = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"request failed: {r.status_code} {r.text[:200]}")
    return dt, decode_png(r.json()["images"][0])


def _sequential(url: str, bodies: list[dict]):
    import httpx
    lat, imgs = [], []
    with httpx.Client(base_url=url, timeout=600) as c:
        t0 = time.perf_counter()
        for b in bodies:
            dt, img = _one(c, b)
            lat.append(dt)
            imgs.append(img)
        return time.perf_counter() - t0, lat, imgs


def _concurrent(url: str, bodies: list[dict]):
    """Every body at once (a barrier releases them): (wall s, latencies s, images)."""
    import httpx
    n = len(bodies)
    lat, imgs, errs = [0.0] * n, [None] * n, []
    barrier = threading.Barrier(n + 1)
    clients = [httpx.Client(base_url=url, timeout=600) for _ in range(n)]

    def go(i):
        try:
            barrier.wait()
            lat[i], imgs[i] = _one(clients[i], bodies[i])
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


def _setup(args):
    """The model on its device, a folder of one random NeTI concept per client, the request bodies."""
    import torch

    from neti_fast.concepts.concept import random_concept
    from neti_fast.sd.models import load_model
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype or ("fp16" if device.startswith("cuda") else "fp32")]
    model = load_model(args.model, device=device, dtype=dtype)
    work = Path(tempfile.mkdtemp(prefix="neti-fast-bench-serve-"))
    concepts = work / "concepts"
    concepts.mkdir()
    for c in range(args.concepts or args.clients):
        random_concept("neti", model.text_dim, 2000 + c, f"<c{c}>").save(concepts / f"c{c}.safetensors")
    size = args.size or model.default_size
    n_concepts = args.concepts or args.clients
    bodies = [{"prompt": f"a photo of {{c{c % n_concepts}}}", "seed": c, "steps": args.steps, "width": size,
               "height": size, "sampler_name": "DPM++ 2M", "scheduler": "uniform", "cfg_scale": 7.5}
              for c in range(args.clients)]
    return model, device, dtype, work, concepts, size, bodies


def run(args) -> dict:
    import torch

    from neti_fast.serve.app import Server, ServeConfig
    from neti_fast.serve.background import BackgroundServer

    load_start = round(os.getloadavg()[0], 2)  # other processes skew CPU timings: recorded
    model, device, dtype, work, concepts, size, bodies = _setup(args)
    cfg = ServeConfig(model=args.model, concepts=str(concepts), device=device, dtype=str(dtype).replace("torch.", ""),
                      max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, state_dir=str(work / "state"))
    server = Server(cfg, model=model)

    sides = {"sequential": functools.partial(_sequential, bodies=bodies),
             "concurrent": functools.partial(_concurrent, bodies=bodies)}
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


def run_replicas(args) -> dict:
    """--replicas N ...: the concurrent side against `neti-fast serve --replicas N` (Ray Serve on a
    local Ray, this machine's CPUs or GPUs), each N in turn: images/s, p50 / p95 latency and the
    routing hit rate (/health), images compared with the first N's."""
    import httpx
    import ray
    import torch
    from ray import serve

    import neti_fast
    from neti_fast.serve.app import ServeConfig
    from neti_fast.serve.ray_app import RayConfig, build
    load_start = round(os.getloadavg()[0], 2)
    model, device, dtype, work, concepts, size, bodies = _setup(args)  # builds the model's cache for the replicas
    del model
    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    env = {"PYTHONPATH": str(Path(neti_fast.__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1",
           **{k: v for k, v in os.environ.items() if k.startswith("NETI_FAST_")}}
    ray.init(num_cpus=max(max(args.replicas), os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    port = args.port
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    out, first_images = {}, None
    try:
        for n in args.replicas:
            cfg = ServeConfig(model=args.model, concepts=str(concepts), device="cuda" if gpus else "cpu",
                              dtype=str(dtype).replace("torch.", ""), max_batch=args.max_batch,
                              max_wait_ms=args.max_wait_ms, state_dir=str(work / f"state-{n}"))
            t0 = time.perf_counter()
            serve.run(build(cfg, RayConfig(replicas=n, gpus_per_replica=1.0 if gpus else 0.0)),
                      name=f"bench-{n}", route_prefix="/")
            startup = time.perf_counter() - t0
            _concurrent(url, bodies)  # warm-up: each concept set placed on a replica
            walls, lats = [], []
            for _ in range(args.rounds):
                wall, lat, imgs = _concurrent(url, bodies)
                walls.append(round(wall, 4))
                lats += [round(x, 4) for x in lat]
            routing = httpx.get(f"{url}/health", timeout=60).json()["routing"]
            first_images = first_images or imgs
            diff = max(int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max()) for a, b in zip(first_images, imgs))
            out[str(n)] = {"images_per_s": round(len(bodies) / statistics.median(walls), 3),
                           "p50_latency_ms": round(1000 * _percentile(lats, 50), 1),
                           "p95_latency_ms": round(1000 * _percentile(lats, 95), 1),
                           "routing_hit_rate": routing["hit_rate"], "startup_s": round(startup, 1),
                           "max_abs_diff_vs_first": diff, "walls_s": walls}
            serve.delete(f"bench-{n}")
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "benchmark": "serve on Ray Serve: concurrent clients with different concepts, N replicas",
        "caveat": "" if gpus else "CPU replicas share this machine's cores: the figures show the routing and its "
                                   "overhead, not the scaling N GPUs give",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device if not gpus else torch.cuda.get_device_name(), "gpus": gpus,
        "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "load_average_1min_start": load_start,
        "load_average_1min_end": round(os.getloadavg()[0], 2), "torch": torch.__version__,
        "settings": {"model": args.model, "clients": args.clients, "concepts": args.concepts or args.clients,
                     "steps": args.steps, "size": size, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
                     "rounds": args.rounds},
        "replicas": out,
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
    p.add_argument("--concepts", type=int, default=None, help="distinct concepts over the clients (default: one each)")
    p.add_argument("--replicas", type=int, nargs="+", default=None, metavar="N",
                   help="instead: the concurrent clients against Ray Serve with N replicas, each N given (needs the ray extra)")
    p.add_argument("--port", type=int, default=8471, help="the Ray Serve proxy's port (--replicas)")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write results as JSON")
    args = p.parse_args(argv)
    if args.replicas:
        from neti_fast.serve.ray_app import ray_missing
        if ray_missing():
            p.error(ray_missing())
        if min(args.replicas) < 1:
            p.error("--replicas: each N must be at least 1")
        result = run_replicas(args)
        for n, r in result["replicas"].items():
            print(f"{n} replica(s): {r['images_per_s']:.2f} images/s, p50 {r['p50_latency_ms']:.0f} ms, "
                  f"p95 {r['p95_latency_ms']:.0f} ms, routing hit rate {r['routing_hit_rate']}, "
                  f"startup {r['startup_s']} s, max image difference {r['max_abs_diff_vs_first']}/255")
        if result["caveat"]:
            print(f"note: {result['caveat']}")
        _write(args, result)
        return result
    result = run(args)
    for k in ("sequential", "concurrent"):
        r = result[k]
        print(f"{k:>10}: {r['images_per_s']:.2f} images/s, p50 {r['p50_latency_ms']:.0f} ms, p95 {r['p95_latency_ms']:.0f} ms")
    print(f"concurrent / sequential images/s: x{result['concurrent_over_sequential_images_per_s']}; "
          f"max image difference {result['max_abs_diff_concurrent_vs_sequential']}/255")
    _write(args, result)
    return result


def _write(args, result: dict) -> None:
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
