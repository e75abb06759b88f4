"""`neti-fast serve --replicas 2` on a local Ray (2 CPUs): the same app behind Ray Serve's proxy,
requests routed by concept, images equal to the single-process server's, state shared through the
state folder, a replica killed mid-run without a request lost. One Ray cluster for the module."""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from serve_util import NETI, SIZE, alone, decode_png, make_concepts, make_server

pytest.importorskip("ray.serve", reason="the Ray tests need the `ray` extra (pip install -e \".[ray]\")")
httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
TOL = 1   # an image batched with others vs alone: float summation order only (test_serve_http.py)
STARTUP_S, SHUTDOWN_S = 150, 60    # bounds on a loaded 2-core box (typically ~30 s and ~5 s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(concept: str, seed: int, steps: int = STEPS) -> dict:
    return {"prompt": f"a photo of {concept} on the beach", "steps": steps, "seed": seed, "width": SIZE,
            "height": SIZE, "sampler_name": "Euler", "scheduler": "uniform"}


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory, one_thread):
    """2 replicas of the tiny model (its cache built by tiny_model, so the replicas only read it)."""
    import ray
    from ray import serve

    from neti_fast.serve.app import ServeConfig
    from neti_fast.serve.ray_app import RayConfig, build
    tmp = tmp_path_factory.mktemp("ray")
    make_concepts(tmp / "concepts")
    cfg = ServeConfig(model="tiny", concepts=str(tmp / "concepts"), state_dir=str(tmp / "state"), max_batch=8,
                      max_wait_ms=30)
    env = {"PYTHONPATH": str(ROOT), "NETI_FAST_CACHE": os.environ["NETI_FAST_CACHE"], "OMP_NUM_THREADS": "1"}
    port = _free_port()
    t0 = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(cfg, RayConfig(replicas=2, cpus_per_replica=1)), name="neti-test", route_prefix="/")
        startup = time.monotonic() - t0
        assert startup < STARTUP_S, f"startup took {startup:.0f} s"
        local = make_server(tiny_model, tmp)  # the single-process server: the reference images
        yield {"url": f"http://127.0.0.1:{port}", "local": local, "tmp": tmp, "startup_s": startup}
        local.close()
    finally:
        t1 = time.monotonic()
        serve.shutdown()
        ray.shutdown()
        took = time.monotonic() - t1
    assert took < SHUTDOWN_S, f"shutdown took {took:.0f} s"


def post_all(url: str, bodies: list[dict]) -> list:
    """All bodies at once (a barrier releases the threads): [(status, json or text, replica)]."""
    out: list = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def one(i):
        barrier.wait()
        r = httpx.post(f"{url}/sdapi/v1/txt2img", json=bodies[i], timeout=300)
        out[i] = (r.status_code, r.json() if r.headers.get("content-type", "").startswith("application/json")
                  else r.text, r.headers.get("x-neti-replica"))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(320)
    return out


def test_routed_by_concept_and_same_images(cluster, max_diff):
    url, local = cluster["url"], cluster["local"]
    first = {}
    for c in NETI:  # one request per concept: each set lands on the replica with the fewest
        r = httpx.post(f"{url}/sdapi/v1/txt2img", json=body(c, 100), timeout=120)
        assert r.status_code == 200, r.text
        first[c] = r.headers["x-neti-replica"]
        assert np.array_equal(decode_png(r.json()["images"][0]), alone(local, body(c, 100))[0])  # alone: same bytes
    assert len(set(first.values())) == 2, first  # the four sets spread over both replicas
    bodies = [body(c, s) for c in NETI for s in range(4)]  # 16 requests, 4 concepts
    got = post_all(url, bodies)
    for (status, js, replica), b in zip(got, bodies):
        assert status == 200, js
        assert max_diff(decode_png(js["images"][0]), alone(local, b)[0]) <= TOL, b
        concept = b["prompt"].split()[3]
        assert replica == first[concept], (concept, replica, first)  # routed to the replica holding it
    health = httpx.get(f"{url}/health", timeout=30).json()
    routing = health["routing"]
    assert routing["requests"] >= 20 and routing["hits"] >= 16
    assert all(len(per) == 1 for per in routing["by_key"].values()), routing["by_key"]
    assert health["replica"]["keyed"] >= 1 and health["replica"]["loads"] <= health["replica"]["keyed"]
    print(f"\nrouting hit rate {routing['hit_rate']} ({routing['hits']}/{routing['requests']}); "
          f"startup {cluster['startup_s']:.1f} s")


def test_same_bytes_from_either_replica(cluster):
    """A request without concepts is load-balanced: sent one at a time until both replicas answered
    it, every answer is the single-process server's bytes."""
    url, local = cluster["url"], cluster["local"]
    b = {**body("x", 9), "prompt": "a photo of a house"}
    want = alone(local, b)[0]
    seen = set()
    for _ in range(30):
        r = httpx.post(f"{url}/sdapi/v1/txt2img", json=b, timeout=120)
        assert r.status_code == 200, r.text
        assert np.array_equal(decode_png(r.json()["images"][0]), want)
        seen.add(r.headers["x-neti-replica"])
        if len(seen) == 2:
            break
    assert len(seen) == 2


def test_state_shared_across_replicas(cluster):
    """An upload made through one replica is listed, and usable, on every replica."""
    from neti_fast.concepts.concept import random_concept
    url, tmp = cluster["url"], cluster["tmp"]
    path = tmp / "fox.safetensors"
    random_concept("neti", 32, 11, "<fox>", True).save(path)
    r = httpx.post(f"{url}/neti/concepts", files={"file": ("fox.safetensors", path.read_bytes())}, timeout=60)
    assert r.status_code == 200 and r.json()["added"] == ["fox"], r.text
    listings = {}
    for _ in range(40):  # unkeyed requests spread over the replicas: read until both answered
        r = httpx.get(f"{url}/sdapi/v1/embeddings", timeout=30)
        listings[r.headers["x-neti-replica"]] = r.json()
        if len(listings) == 2:
            break
    assert len(listings) == 2
    a, b = listings.values()
    assert a == b and "fox" in a["loaded"]  # the same listing from every replica
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json=body("fox", 3), timeout=120)
    assert r.status_code == 200, r.text
    # a field error is the single-process server's, whichever replica answers
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json={**body("fox", 3), "concept": "nope"}, timeout=60)
    assert r.status_code == 422 and r.json()["field"] == "concept"


def test_replica_killed_mid_run(cluster, max_diff):
    """One replica killed while 8 requests run: each request answered once, with its image; Ray
    starts a new replica."""
    import ray
    from ray import serve
    url, local = cluster["url"], cluster["local"]
    steps = 12
    t0 = time.monotonic()
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json=body(NETI[0], 1, steps), timeout=120)
    alone_s = time.monotonic() - t0
    victim = r.headers["x-neti-replica"]
    # enough steps that one image alone takes ~3 s: a replica's batch of 4 is still running 1 s in,
    # when the kill comes (after the requests reached the replicas, before their answers)
    steps = max(steps, min(300, int(steps * 3.0 / alone_s) + 1))
    bodies = [body(c, 50 + s, steps) for c in NETI for s in range(2)]
    name = next(n["name"] for n in ray.util.list_named_actors(all_namespaces=True) if n["name"].endswith(victim))
    out: list = []
    runner = threading.Thread(target=lambda: out.extend(post_all(url, bodies)))
    runner.start()
    time.sleep(1.0)
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    runner.join(320)
    assert len(out) == len(bodies)
    for (status, js, replica), b in zip(out, bodies):
        assert status == 200, js  # retried on the other replica (txt2img is safe to send again)
        assert replica != victim and decode_png(js["images"][0]).shape == (SIZE, SIZE, 3)
        if NETI[0] in b["prompt"]:  # the victim's concept: made again on the other replica, same image
            assert max_diff(decode_png(js["images"][0]), alone(local, b)[0]) <= TOL
    health = httpx.get(f"{url}/health", timeout=30).json()
    assert health["retried"] >= 1 and health["failed"] == 0, health
    print(f"\nkilled 1 of 2 replicas 1 s into 8 requests of {steps} steps: {health['retried']} retried, "
          f"{health['failed']} failed, all 8 answered")
    deadline = time.monotonic() + 90
    while True:  # the controller replaces the dead replica
        app = serve.status().applications["neti-test"]
        dep = app.deployments["NetiReplica"]
        if dep.status == "HEALTHY" and dep.replica_states.get("RUNNING", 0) == 2:
            break
        assert time.monotonic() < deadline, dep
        time.sleep(1)


def test_serve_run_args():
    """`serve run neti_fast.serve.ray_app:app key=value` / a config file's args: strings, checked."""
    from neti_fast.errors import NetiError
    from neti_fast.serve.ray_app import app
    assert app({"model": "tiny", "replicas": "3", "max_batch": "4"}) is not None
    assert app({"model": "tiny", "autoscale": "1 4"}) is not None
    with pytest.raises(NetiError, match="bogus: not a neti-fast serve setting"):
        app({"model": "tiny", "bogus": "1"})
    with pytest.raises(NetiError, match="--autoscale 3 1"):
        app({"model": "tiny", "autoscale": "3 1"})


def test_ingress_refuses_a_body_over_its_limit():
    """The ingress holds a body whole before a replica gets it: past the limit, a 413 and no forward."""
    import asyncio
    import json

    from starlette.requests import Request

    from neti_fast.serve.ray_app import NetiIngress
    ingress = NetiIngress(replicas=None, max_body_mb=1)
    chunks = [b"x" * 2**19] * 4 + [b""]

    async def receive():
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
    scope = {"type": "http", "method": "POST", "path": "/neti/concepts", "query_string": b"", "headers": [],
             "client": ("127.0.0.1", 1)}
    resp = asyncio.run(ingress(Request(scope, receive)))
    assert resp.status_code == 413 and json.loads(resp.body)["field"] == "body"
