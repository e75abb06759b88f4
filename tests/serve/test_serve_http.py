"""`neti-fast serve` over real HTTP (uvicorn on 127.0.0.1, a free port): the webuiapi client with its
defaults, 32 concurrent clients, a client that disconnects mid-request, progress, the API key."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from serve_util import NETI, SIZE, STEPS, BackgroundServer, alone, decode_png, make_server

httpx = pytest.importorskip("httpx")

TOL = 1  # batched vs alone: float summation order only (tests/engine/test_engine.py)


@pytest.fixture(scope="module")
def live(tiny_model, tmp_path_factory, one_thread):
    server = make_server(tiny_model, tmp_path_factory.mktemp("serve-http"), max_batch=8, max_wait_ms=100)
    with BackgroundServer(server) as ls:
        ls.server = server
        yield ls
    server.close()


def test_webuiapi_client(max_diff, live):
    """The real `webuiapi` client, unchanged: it probes /scripts on connect and sends its ~45 fields
    with sampler "Euler a" and scheduler "automatic"."""
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=live.port, steps=STEPS)
    assert api.default_sampler == "Euler a" and api.default_scheduler == "automatic"
    r = api.txt2img(prompt="a photo of {cat} on the beach", seed=9, width=SIZE, height=SIZE, batch_size=2)
    assert len(r.images) == 2 and r.images[0].size == (SIZE, SIZE)
    assert r.info["all_seeds"] == [9, 10] and r.info["sampler_name"] == "Euler a"
    assert r.parameters["sampler_name"] == "Euler a" and r.parameters["scheduler"] == "automatic"
    got = np.asarray(r.images[0].convert("RGB"))
    want = alone(live.server, {"prompt": "a photo of {cat} on the beach", "seed": 9, "width": SIZE, "height": SIZE,
                               "steps": STEPS, "sampler_name": "Euler a", "cfg_scale": 7.0})[0]
    assert max_diff(got, want) <= TOL
    assert set(api.get_embeddings()["loaded"]) >= set(NETI)
    assert api.get_sd_models()[0]["model_name"] == "tiny"
    assert "Euler a" in {s["name"] for s in api.get_samplers()}
    with pytest.raises(RuntimeError) as e:  # webuiapi raises (status, text) on an error
        api.txt2img(prompt="a photo", width=SIZE, height=SIZE, enable_hr=True)
    assert e.value.args[0] == 422 and json.loads(e.value.args[1])["field"] == "enable_hr"


def _body(i: int) -> dict:
    """32 different requests: concepts, truncations, prompts, seeds and two shapes (steps)."""
    name = NETI[i % len(NETI)]
    return {"prompt": f"a photo of {{{name}}} number {i}" if i % 3 else f"{name} in a field",
            "seed": 1000 + i, "steps": STEPS + (i % 2), "width": SIZE, "height": SIZE,
            "truncation": [None, 8, 16][i % 3], "sampler_name": "Euler a" if i % 4 else "DPM++ 2M",
            "scheduler": "automatic"}


def test_32_concurrent_clients(max_diff, live):
    """Every response arrives, is the requester's own (its seed, its concept), and equals the image
    generated alone; and the queue really packed different users into shared batches."""
    n = 32
    results, errors = [None] * n, []
    sizes_before = len(live.server.batcher.batch_sizes)
    barrier = threading.Barrier(n)

    def client(i):
        try:
            with httpx.Client(base_url=live.url, timeout=120) as c:
                barrier.wait(30)
                results[i] = c.post("/sdapi/v1/txt2img", json=_body(i))
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append((i, repr(e)))
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    assert all(r is not None and r.status_code == 200 for r in results), [r and r.text for r in results]
    sizes = live.server.batcher.batch_sizes[sizes_before:]
    assert sum(sizes) == n and max(sizes) > 1, sizes                 # nothing lost, nothing doubled; packed
    assert max(live.server.batcher.batch_jobs[sizes_before:]) > 1      # different users in one batch
    for i, r in enumerate(results):
        info = json.loads(r.json()["info"])
        assert info["all_seeds"] == [1000 + i] and info["concepts"] == [NETI[i % len(NETI)]]
        assert info["all_truncations"] == [[None, 8, 16][i % 3]]
        img = decode_png(r.json()["images"][0])
        assert max_diff(img, alone(live.server, _body(i))[0]) <= TOL, i
    imgs = [decode_png(r.json()["images"][0]).tobytes() for r in results]
    assert len(set(imgs)) == n


def test_disconnect_does_not_stall_the_queue(live):
    """A client that gives up while its request waits behind a long one: its images are never
    generated, and the requests after it are served."""
    b = live.server.batcher
    slow = {"prompt": "a photo of {dog}", "seed": 1, "steps": 40, "width": SIZE, "height": SIZE,
            "force_task_id": "slow-job"}
    out = {}

    def run_slow():
        with httpx.Client(base_url=live.url, timeout=120) as c:
            out["slow"] = c.post("/sdapi/v1/txt2img", json=slow)
    t = threading.Thread(target=run_slow)
    t.start()
    with httpx.Client(base_url=live.url, timeout=30) as c:
        t0 = time.monotonic()
        while c.get("/sdapi/v1/progress", params={"id_task": "slow-job"}).json()["state"]["sampling_step"] < 1:
            assert time.monotonic() - t0 < 30, "the slow job never started"
            time.sleep(0.05)
        gone = {"prompt": "a photo of {ball}", "seed": 2, "steps": 3, "width": SIZE, "height": SIZE,
                "force_task_id": "gone-job"}
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{live.url}/sdapi/v1/txt2img", json=gone, timeout=0.5)
        t0 = time.monotonic()
        while not b.jobs["gone-job"].cancelled:  # the server noticed (it polls every 0.2 s)
            assert time.monotonic() - t0 < 10, "the disconnect was not noticed"
            time.sleep(0.05)
        p = c.get("/sdapi/v1/progress", params={"id_task": "slow-job"}).json()
        assert 0 < p["progress"] < 1 and p["state"]["sampling_steps"] == 40
        mine = c.get("/sdapi/v1/progress").json()  # no id: the caller's (this host's) running job
        assert mine["state"]["job"] == "slow-job" and mine["eta_relative"] >= 0
        after = c.post("/sdapi/v1/txt2img", json={"prompt": "a photo of {cup}", "seed": 3, "steps": 3,
                                                   "width": SIZE, "height": SIZE}, timeout=120)
    t.join(120)
    assert out["slow"].status_code == 200 and after.status_code == 200
    gone_job = b.jobs["gone-job"]
    assert gone_job.cancelled and gone_job.started is None and gone_job.done_images == 0
    assert b.queued_images() == 0


def test_disconnect_mid_run_stops_the_batch(live):
    """A client that leaves while its (only) batch is denoising: the loop stops at the next step
    instead of finishing work nobody will receive, and the next request is served."""
    b = live.server.batcher
    abandoned = b.abandoned
    job = {"prompt": "a photo of {dog}", "seed": 5, "steps": 150, "width": SIZE, "height": SIZE,
           "force_task_id": "left-mid-run"}

    def leave():
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{live.url}/sdapi/v1/txt2img", json=job, timeout=1.0)
    t = threading.Thread(target=leave)
    t.start()
    with httpx.Client(base_url=live.url, timeout=60) as c:
        t0 = time.monotonic()
        while "left-mid-run" not in b.jobs or b.jobs["left-mid-run"].step < 1:
            assert time.monotonic() - t0 < 30, "the job never started"
            time.sleep(0.02)
        t.join(30)
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "a photo of {cup}", "seed": 6, "steps": STEPS,
                                              "width": SIZE, "height": SIZE})
    assert r.status_code == 200
    left = b.jobs["left-mid-run"]
    assert left.cancelled and b.abandoned == abandoned + 1 and left.step < 150


def test_progress_preview_and_interrupt(live):
    """While it runs, /progress shows the job's latents through the cheap linear preview (1/8 of the
    side; none with skip_current_image); POST /sdapi/v1/interrupt then answers the job with its
    image partly denoised (as A1111), and its batch stops at the next step."""
    import base64
    import io

    from PIL import Image
    b = live.server.batcher
    abandoned = b.abandoned
    out = {}

    def run():
        out["r"] = httpx.post(f"{live.url}/sdapi/v1/txt2img", timeout=60, json={
            "prompt": "a photo of {dog}", "seed": 8, "steps": 150, "width": SIZE, "height": SIZE,
            "force_task_id": "to-interrupt"})
    t = threading.Thread(target=run)
    t.start()
    t0 = time.monotonic()
    while "to-interrupt" not in b.jobs or b.jobs["to-interrupt"].step < 1:
        assert time.monotonic() - t0 < 30, "the job never started"
        time.sleep(0.02)
    p = httpx.get(f"{live.url}/sdapi/v1/progress", params={"id_task": "to-interrupt"}, timeout=10).json()
    preview = Image.open(io.BytesIO(base64.b64decode(p["current_image"])))
    assert preview.size == (SIZE // 8, SIZE // 8) and np.asarray(preview).std() > 0
    assert httpx.get(f"{live.url}/sdapi/v1/progress", timeout=10,
                     params={"id_task": "to-interrupt", "skip_current_image": True}).json()["current_image"] is None
    r = httpx.post(f"{live.url}/sdapi/v1/interrupt", timeout=10)
    assert r.json()["interrupted"] == ["to-interrupt"]
    t.join(30)
    assert out["r"].status_code == 200 and len(out["r"].json()["images"]) == 1
    partial = decode_png(out["r"].json()["images"][0])
    assert partial.shape == (SIZE, SIZE, 3) and partial.std() > 0
    assert json.loads(out["r"].json()["info"])["all_seeds"] == [8]
    t0 = time.monotonic()
    while b.abandoned == abandoned:  # the worker stops the batch at the step it answered the job
        assert time.monotonic() - t0 < 10, "the interrupted batch did not stop"
        time.sleep(0.02)
    assert b.jobs["to-interrupt"].step < 150


def test_api_key_over_http(tiny_model, tmp_path):
    webuiapi = pytest.importorskip("webuiapi")
    server = make_server(tiny_model, tmp_path, api_key="k3y")
    try:
        with BackgroundServer(server) as ls:
            assert httpx.get(f"{ls.url}/health").status_code == 200
            assert httpx.get(f"{ls.url}/sdapi/v1/sd-models").status_code == 401
            api = webuiapi.WebUIApi(host="127.0.0.1", port=ls.port, steps=STEPS)
            with pytest.raises(RuntimeError) as e:
                api.txt2img(prompt="a photo", width=SIZE, height=SIZE)
            assert e.value.args[0] == 401
            api.set_auth("user", "k3y")  # A1111's --api-auth: HTTP Basic
            assert len(api.txt2img(prompt="a photo", width=SIZE, height=SIZE).images) == 1
    finally:
        server.close()
