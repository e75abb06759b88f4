"""`neti-fast serve`: the API contract, bad requests, failure isolation, uploads, API key (TestClient)."""
from __future__ import annotations

import json
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest

from serve_util import NETI, SIZE, STEPS, alone, decode_png, make_server

from fastapi.testclient import TestClient  # noqa: E402  (serve_util skips without the serve extra)


@pytest.fixture(scope="module")
def srv(tiny_model, tmp_path_factory, one_thread):
    server = make_server(tiny_model, tmp_path_factory.mktemp("serve"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(srv):
    from neti_fast.serve.app import create_app
    return TestClient(create_app(srv))


def body(**kw) -> dict:
    out = {"prompt": "a photo of cat on the beach", "steps": STEPS, "seed": 5, "width": SIZE, "height": SIZE}
    out.update(kw)
    return out


def post(client, **kw):
    return client.post("/sdapi/v1/txt2img", json=body(**kw))


# ----------------------------------------------------------------------------- contract

def test_txt2img_contract(client, srv):
    r = post(client, batch_size=2, n_iter=2, seed=11, truncation=[None, 4], sampler_name="Euler a", width=None,
             height=None)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"images", "parameters", "info"}
    assert len(out["images"]) == 8 and out["parameters"]["seed"] == 11 and out["parameters"]["batch_size"] == 2
    # no size in the body: echoed as the one used, the model's native size (A1111 echoes its default)
    assert (out["parameters"]["width"], out["parameters"]["height"]) == (srv.model.default_size,) * 2
    info = json.loads(out["info"])
    assert info["all_seeds"] == [11, 12, 13, 14] * 2 and info["seed"] == 11
    assert info["all_truncations"] == [None] * 4 + [4] * 4
    assert info["sampler_name"] == "Euler a" and info["engine_scheduler"] == "euler-a" and info["concepts"] == ["cat"]
    assert len(info["infotexts"]) == 8 and "Seed: 12" in info["infotexts"][1] and "NeTI truncation: 4" in info["infotexts"][4]
    imgs = [decode_png(b) for b in out["images"]]
    assert all(i.shape == (SIZE, SIZE, 3) for i in imgs)
    assert len({i.tobytes() for i in imgs}) == 8  # seeds and truncations all differ
    # {name}, the name as a word and a bare {} with `concept` mean the same concept
    a = decode_png(post(client, prompt="a photo of {cat} on the beach").json()["images"][0])
    b = decode_png(post(client, prompt="a photo of cat on the beach").json()["images"][0])
    c = decode_png(post(client, prompt="a photo of {} on the beach", concept="cat").json()["images"][0])
    assert np.array_equal(a, b) and np.array_equal(a, c)
    plain = post(client, prompt="a photo of catalogue on the beach").json()  # "cat" inside a word is no concept
    assert json.loads(plain["info"])["concepts"] == []


def test_random_seed_is_returned_and_reproduces(client):
    r = post(client, seed=-1).json()
    seed = json.loads(r["info"])["seed"]
    assert seed >= 0
    again = post(client, seed=seed).json()
    assert np.array_equal(decode_png(r["images"][0]), decode_png(again["images"][0]))


def test_send_images_false(client):
    r = post(client, send_images=False)
    assert r.status_code == 200 and r.json()["images"] == []


def test_listing_routes(client, srv):
    emb = client.get("/sdapi/v1/embeddings").json()
    assert set(emb["loaded"]) == set(NETI) | {"tee"}
    assert emb["loaded"]["cat"]["shape"] == 32 and emb["loaded"]["tee"]["method"] == "ti"
    names = {s["name"] for s in client.get("/sdapi/v1/samplers").json()}
    assert {"DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE", "Euler", "Euler a", "Heun", "LMS", "DPM2", "DPM2 a", "DDIM",
            "PLMS", "UniPC", "LCM"} == names
    scheds = {s["name"] for s in client.get("/sdapi/v1/schedulers").json()}
    assert scheds == {"automatic", "uniform", "karras", "exponential", "beta", "sgm_uniform", "simple", "normal"}
    assert client.get("/sdapi/v1/sd-models").json()[0]["model_name"] == "tiny"
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == srv.model_title
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    assert client.get("/sdapi/v1/loras").json() == [] and client.get("/sdapi/v1/upscalers").json()[0]["name"] == "None"
    assert client.get("/health").json()["status"] == "ok"
    p = client.get("/sdapi/v1/progress").json()
    assert p["progress"] == 0.0 and "state" in p
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": srv.model_title}).status_code == 200
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other.ckpt"})
    assert r.status_code == 422 and r.json()["field"] == "sd_model_checkpoint"
    assert "<html" in client.get("/").text


# ----------------------------------------------------------------------------- samplers

def test_sampler_mapping():
    """A1111's names (and its >= 1.9 "automatic" defaults, old combined names, aliases, labels) ->
    the engine scheduler; what diffusers lacks is refused naming the field and the value."""
    from neti_fast.serve.a1111 import FieldError, resolve_sampler
    want = {("DPM++ 2M", "uniform"): "dpm++", ("DPM++ 2M", "karras"): "dpm++-karras",
            ("DPM++ 2M", "automatic"): "dpm++-karras", ("DPM++ 2M Karras", None): "dpm++-karras",
            ("k_dpmpp_2m_ka", None): "dpm++-karras", ("DPM++ 2M SDE", None): "dpm++-2m-sde-exponential",
            ("DPM++ 2M SDE", "Karras"): "dpm++-2m-sde-karras", ("DPM++ SDE", "automatic"): "dpm++-sde-karras",
            ("Euler", None): "euler", ("Euler", "karras"): "euler-karras", ("Euler a", "automatic"): "euler-a",
            ("Euler a", "normal"): "euler-a-normal", ("Euler a", "Normal"): "euler-a-normal",
            ("Heun", None): "heun", ("LMS", "Beta"): "lms-beta", ("DPM2", None): "dpm2-karras",
            ("DPM2 a", "Exponential"): "dpm2-a-exponential", ("DDIM", None): "ddim", ("DDIM", "normal"): "ddim-normal",
            ("PLMS", None): "plms", ("UniPC", "SGM Uniform"): "unipc-sgm-uniform", ("UniPC", "SGMUniform"): "unipc-sgm-uniform",
            ("LCM", "simple"): "lcm-simple", ("k_euler_a", None): "euler-a", ("dpm++-karras", None): "dpm++-karras",
            (None, None): "euler"}  # A1111's API default
    for (name, sched), engine in want.items():
        assert resolve_sampler(name, sched)[2] == engine, (name, sched)
    refused = [(("DPM++ 2S a", None), "sampler_name", "DPM++ 2S a"), (("DPM adaptive", None), "sampler_name", "DPM adaptive"),
               (("Bogus", None), "sampler_name", '"Euler a"'), (("Euler a", "karras"), "scheduler", "EulerAncestral"),
               (("DDIM", "karras"), "scheduler", "DDIMScheduler"), (("Euler", "kl_optimal"), "scheduler", "no such schedule"),
               (("Euler", "Align Your Steps"), "scheduler", "no such schedule"), (("Euler", "wavy"), "scheduler", "not a schedule"),
               (("DPM++ 2M Karras", "exponential"), "scheduler", "contradicts")]
    for (name, sched), field, says in refused:
        with pytest.raises(FieldError) as e:
            resolve_sampler(name, sched)
        assert e.value.field == field and says in e.value.message, (name, sched, e.value.message)
        assert repr(sched if field == "scheduler" else name) in e.value.message  # the value is named


def test_every_sampler_runs_and_differs(client):
    imgs = {}
    for name, sched in (("DPM++ 2M", "uniform"), ("DPM++ 2M", "karras"), ("Euler", None), ("Euler a", None),
                        ("Heun", None), ("UniPC", "karras"), ("Euler", "normal")):
        r = post(client, sampler_name=name, scheduler=sched, steps=3)
        assert r.status_code == 200, r.text
        imgs[(name, sched)] = decode_png(r.json()["images"][0]).tobytes()
    assert len(set(imgs.values())) == len(imgs)  # each name reaches a different scheduler


def test_image_equals_neti_fast_generate(client, srv, tmp_path):
    """The API's image for a seed is `neti-fast generate`'s for the same settings, byte for byte."""
    from neti_fast.cli import main
    concept = srv.store.entries["dog"].path
    out = tmp_path / "gen"
    rc = main(["generate", "--model", "tiny", "--device", "cpu", "--concept", f"dog={concept}", "--prompt",
               "a painting of {dog}", "--seeds", "3", "4", "--steps", "3", "--scheduler", "euler-a", "--guidance", "6",
               "--negative-prompt", "blurry", "--truncation", "8", "--out", str(out)])
    assert rc == 0
    from PIL import Image
    files = sorted(p for p in out.glob("*.png") if not p.name.startswith(("grid", "sweep")))
    cli_imgs = {np.asarray(Image.open(p).convert("RGB")).tobytes() for p in files}
    r = post(client, prompt="a painting of dog", seed=3, batch_size=2, steps=3, sampler_name="Euler a",
             cfg_scale=6, negative_prompt="blurry", truncation=8)
    api_imgs = {decode_png(b).tobytes() for b in r.json()["images"]}
    assert len(files) == 2 and api_imgs == cli_imgs


# ----------------------------------------------------------------------------- bad requests

BAD = [
    ({"enable_hr": True}, "enable_hr"),
    ({"restore_faces": True}, "restore_faces"),
    ({"script_name": "X/Y/Z plot", "script_args": [1, 2]}, "script_name"),
    ({"alwayson_scripts": {"ControlNet": {"args": [{"enabled": True}]}}}, "alwayson_scripts.ControlNet"),
    ({"subseed_strength": 0.5}, "subseed_strength"),
    ({"styles": ["cinematic"]}, "styles"),
    ({"override_settings": {"sd_model_checkpoint": "v1-5.ckpt"}}, "override_settings.sd_model_checkpoint"),
    ({"alwayson_scripts": {"ADetailer": {"args": [True, True, {"ad_model": "face_yolov8n.pt"}]}}},
     "alwayson_scripts.ADetailer"),  # SillyTavern's face fix
    ({"refiner_checkpoint": "sd_xl_refiner"}, "refiner_checkpoint"),
    ({"sampler_name": "DPM++ 2S a"}, "sampler_name"),
    ({"sampler_name": "Euler a", "scheduler": "karras"}, "scheduler"),
    ({"sampler_name": "DDIM", "eta": 1.5}, "eta"),
    ({"sampler_name": "DDIM", "override_settings": {"eta_ddim": -1}}, "override_settings.eta_ddim"),
    ({"sampler_name": "Euler a", "eta": 0.5}, "eta"),
    ({"sampler_name": "Euler a", "override_settings": {"eta_ancestral": 0.5}}, "override_settings.eta_ancestral"),
    ({"sampler_name": "LCM", "steps": 80}, "steps"),   # diffusers' LCM takes at most its original 50 steps
    ({"clip_skip": 3}, "clip_skip"),                   # tiny's CLIP has 2 layers
    ({"override_settings": {"CLIP_stop_at_last_layers": 5}}, "override_settings.CLIP_stop_at_last_layers"),
    ({"clip_skip": 2, "override_settings": {"CLIP_stop_at_last_layers": 1}}, "clip_skip"),
    ({"override_settings": {"samples_format": "jpg"}}, "override_settings.samples_format"),
    ({"override_settings": {"sd_vae": "kl-f8-anime.ckpt"}}, "override_settings.sd_vae"),
    ({"override_settings": []}, "override_settings"),
    ({"steps": "many"}, "steps"),
    ({"steps": 0}, "steps"),
    ({"width": 4}, "width"),                          # no image (60 is taken, rounded down to 56, as A1111 does)
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 40, "n_iter": 2}, "batch_size"),
    ({"seed": -5}, "seed"),
    ({"prompt": "a photo of {nope}"}, "prompt"),
    ({"prompt": "a photo of {}"}, "prompt"),
    ({"concept": "nope", "prompt": "a photo of {}"}, "concept"),
    ({"prompt": "a photo of tee", "truncation": 4}, "truncation"),
    ({"truncation": 0}, "truncation"),
    ({"truncation": 500}, "truncation"),
    ({"prompt": "cat " * 700}, "prompt"),   # over 8 chunks of 75 tokens (A1111 syntax takes up to 600)
    ({"negative_prompt": "blurry, dog"}, "negative_prompt"),  # A1111's negative embeddings: not supported
]


@pytest.mark.parametrize("extra,field", BAD, ids=[f for _, f in BAD])
def test_bad_request_names_the_field(client, extra, field):
    r = client.post("/sdapi/v1/txt2img", json=body(**extra))
    assert 400 <= r.status_code < 500, r.text
    err = r.json()
    assert err["field"] == field and err["error"].startswith(field) and "Traceback" not in r.text


def test_malformed_bodies_and_server_goes_on(client):
    r = client.post("/sdapi/v1/txt2img", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] == "body"
    r = client.post("/sdapi/v1/txt2img", json=[1, 2])
    assert r.status_code == 422 and r.json()["field"] == "body"
    assert post(client).status_code == 200


def test_a1111_defaults_are_accepted(client):
    """Every field A1111's own API model has, at its default value, as clients send them."""
    defaults = dict(enable_hr=False, denoising_strength=0.7, firstphase_width=0, firstphase_height=0, hr_scale=2,
                    hr_upscaler="Latent", hr_second_pass_steps=0, hr_resize_x=0, hr_resize_y=0, hr_checkpoint_name=None,
                    hr_sampler_name=None, hr_scheduler=None, hr_prompt="", hr_negative_prompt="", styles=[],
                    subseed=-1, subseed_strength=0, seed_resize_from_h=-1, seed_resize_from_w=-1, restore_faces=None,
                    tiling=None, do_not_save_samples=False, do_not_save_grid=False, eta=None, s_min_uncond=None,
                    s_churn=None, s_tmax=None, s_tmin=None, s_noise=None, override_settings={},
                    override_settings_restore_afterwards=True, refiner_checkpoint=None, refiner_switch_at=None,
                    disable_extra_networks=False, comments=None, sampler_index="Euler", script_name=None,
                    script_args=[], send_images=True, save_images=False, alwayson_scripts={}, force_task_id=None,
                    infotext=None, scheduler=None, sampler_name=None, n_iter=1, batch_size=1, cfg_scale=7.0)
    r = client.post("/sdapi/v1/txt2img", json=body(**defaults))
    assert r.status_code == 200, r.text


# ----------------------------------------------------------------------------- isolation

def test_engine_failure_fails_alone(srv, client, tmp_path):
    """Two requests in one engine batch; one's concept raises inside the engine: it alone fails, the
    other gets the image it gets alone."""
    src = srv.store.entries["ball"].path
    boom_path = tmp_path / "boom.safetensors"
    boom_path.write_bytes(Path(src).read_bytes())
    srv.store.add_file(boom_path, "boom", "upload")
    table = srv.store.get("boom")

    def explode(*_a, **_k):
        raise RuntimeError("boom inside the engine")
    table.schedule_rows = explode  # Table.rows is the older name of schedule_rows
    good = body(prompt="a photo of cup", seed=21)
    want = alone(srv, good)[0]
    srv.batcher.max_wait = 1.0  # both requests land in one batch
    before = len(srv.batcher.batch_jobs)
    results = {}

    def go(key, b):
        results[key] = client.post("/sdapi/v1/txt2img", json=b)
    try:
        ts = [threading.Thread(target=go, args=("bad", body(prompt="a photo of boom", seed=20))),
              threading.Thread(target=go, args=("good", good))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
    finally:
        srv.batcher.max_wait = 0.03
    assert 2 in srv.batcher.batch_jobs[before:]  # they did share a batch
    assert results["bad"].status_code == 500 and "boom inside the engine" in results["bad"].json()["error"]
    assert results["good"].status_code == 200
    assert np.array_equal(decode_png(results["good"].json()["images"][0]), want)
    assert post(client).status_code == 200  # and the server goes on


# ----------------------------------------------------------------------------- uploads

def test_upload_concept(client, srv, tmp_path):
    from neti_fast.concepts.concept import random_concept
    p = random_concept("neti", 32, 42, "<vase>", True).save(tmp_path / "vase.safetensors")
    r = client.post("/neti/concepts", files={"file": ("../../../escape/vase.safetensors", p.read_bytes())})
    assert r.status_code == 200, r.text
    assert r.json()["added"] == ["vase"]
    uploads = srv.state_dir / "uploads"
    assert (uploads / "vase.safetensors").is_file() and not (tmp_path.parent / "escape").exists()
    assert all(f.parent == uploads for f in uploads.rglob("*"))
    assert "vase" in client.get("/sdapi/v1/embeddings").json()["loaded"]
    assert post(client, prompt="a photo of {vase}").status_code == 200
    r = client.post("/neti/concepts", files={"file": ("vase.safetensors", p.read_bytes())})
    assert r.status_code == 409 and r.json()["field"] == "name"
    import torch  # an A1111 embedding (a pickle, read with weights_only) is kept as safetensors only
    emb = tmp_path / "emb.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(torch.randn(1, 32))},
                "name": "emb"}, emb)
    r = client.post("/neti/concepts", files={"file": ("style.pt", emb.read_bytes())}, data={"name": "mystyle2"})
    assert r.status_code == 200 and r.json()["added"] == ["mystyle2"], r.text
    assert (uploads / "mystyle2.safetensors").is_file() and not list(uploads.glob("*.pt")) and not list(uploads.glob(".*"))
    assert post(client, prompt="a mystyle2 painting").status_code == 200
    from neti_fast.serve.app import Server
    restarted = Server(srv.cfg, model=srv.model)  # a restart lists the uploads again
    try:
        assert {"vase", "mystyle2"} <= set(restarted.store.names()) and not restarted.store.skipped
    finally:
        restarted.close()


def test_upload_refuses_bad_files(client, srv, tmp_path):
    uploads = srv.state_dir / "uploads"
    before = sorted(uploads.iterdir()) if uploads.exists() else []
    r = client.post("/neti/concepts", files={"file": ("x.safetensors", b"garbage" * 10)})
    assert r.status_code == 422 and r.json()["field"] == "file"
    r = client.post("/neti/concepts", files={"file": ("x.exe", b"MZ")})
    assert r.status_code == 422 and r.json()["field"] == "file"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    r = client.post("/neti/concepts", files={"file": ("evil.pt", pickle.dumps({"string_to_param": Evil()}))})
    assert r.status_code == 422 and not marker.exists()  # weights_only: nothing in the file ran
    srv.cfg.max_upload_mb = 1
    try:
        r = client.post("/neti/concepts", files={"file": ("big.safetensors", b"\0" * (2 * 2**20))})
        assert r.status_code == 413 and r.json()["field"] == "file"
    finally:
        srv.cfg.max_upload_mb = 256
    assert (sorted(uploads.iterdir()) if uploads.exists() else []) == before  # nothing left behind


# ----------------------------------------------------------------------------- API key, host

def test_api_key(srv):
    import base64

    from neti_fast.serve.app import create_app
    srv.cfg.api_key = "s3cret"
    try:
        c = TestClient(create_app(srv))
    finally:
        srv.cfg.api_key = None
    assert c.get("/health").status_code == 200
    for path in ("/", "/sdapi/v1/samplers", "/sdapi/v1/embeddings", "/neti/info"):
        r = c.get(path)
        assert r.status_code == 401 and r.json()["field"] == "api_key", path
    assert c.post("/sdapi/v1/txt2img", json=body()).status_code == 401
    assert c.get("/sdapi/v1/samplers", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/sdapi/v1/samplers", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/sdapi/v1/samplers", headers={"X-API-Key": "s3cret"}).status_code == 200
    basic = base64.b64encode(b"anyone:s3cret").decode()
    assert c.get("/sdapi/v1/samplers", headers={"Authorization": f"Basic {basic}"}).status_code == 200


def test_non_loopback_needs_api_key(capsys):
    from neti_fast.cli import main
    from neti_fast.errors import NetiError
    from neti_fast.serve.app import ServeConfig, check_config
    with pytest.raises(NetiError, match="--api-key"):
        check_config(ServeConfig(host="0.0.0.0"))
    check_config(ServeConfig(host="0.0.0.0", api_key="k"))
    check_config(ServeConfig(host="::1"))
    assert main(["serve", "--model", "tiny", "--device", "cpu", "--host", "0.0.0.0", "--api-key", ""]) == 2
    err = capsys.readouterr().err
    assert "neti-fast serve: error: --host 0.0.0.0" in err and "Traceback" not in err
    assert main(["serve", "--model", "tiny", "--device", "cpu", "--concepts", "/nonexistent/dir"]) == 2
    assert "--concepts /nonexistent/dir: not a folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------- concept formats

def test_embeddings_every_format(srv, tmp_path):
    """A1111 .pt, a precomputed table, a bundle and a plain concept are all listed (and usable); a
    broken file is listed as skipped with its reason, not a crash."""
    import torch

    from neti_fast.concepts.concept import random_concept
    from neti_fast.serve.app import Server
    from neti_fast.concepts.table import precompute, save_bundle
    from neti_fast.concepts.table import Table
    folder = tmp_path / "formats"
    folder.mkdir()
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(torch.randn(1, 32))},
                "name": "mystyle", "step": 3000}, folder / "mystyle.pt")
    precompute(random_concept("neti", 32, 3, "<t>", True), truncations=[8], progress=False).save(folder / "tabled.safetensors")
    save_bundle({"p1": Table(random_concept("xti", 32, 4, "<p1>")), "p2": Table(random_concept("ti", 32, 5, "<p2>"))},
                folder / "pair.safetensors")
    (folder / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    (folder / "notes.txt").write_text("not a concept")
    cfg = srv.cfg.__class__(**{**srv.cfg.__dict__, "concepts": str(folder), "state_dir": str(tmp_path / "st")})
    other = Server(cfg, model=srv.model)
    try:
        emb = other.store.embeddings()
        assert set(emb["loaded"]) == {"mystyle", "tabled", "p1", "p2"}
        assert emb["loaded"]["mystyle"]["method"] == "ti" and emb["loaded"]["tabled"]["truncations"] == [8]
        assert set(emb["skipped"]) == {"broken.safetensors"} and emb["skipped"]["broken.safetensors"]["error"]
        from neti_fast.serve.app import create_app
        c = TestClient(create_app(other))
        r = c.post("/sdapi/v1/txt2img", json=body(prompt="mystyle painting of {p1} and tabled", truncation=8))
        assert r.status_code == 200, r.text
        assert json.loads(r.json()["info"])["concepts"] == ["mystyle", "p1", "tabled"]
    finally:
        other.close()


# ----------------------------------------------------------------------------- training

def test_training_one_at_a_time_while_serving(client, srv, tmp_path):
    """Training runs in the background: a second one is refused (409), generation is served
    meanwhile, and the trained concept joins the list."""
    import io
    import time

    from PIL import Image
    from neti_fast.demo import make_training_images
    folder = make_training_images(tmp_path / "imgs", n=3, size=SIZE)
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in sorted(folder.glob("*.png"))]
    form = {"placeholder": "<thing>", "init_word": "ball", "steps": "25"}
    r = client.post("/neti/train", files=files, data=form)
    assert r.status_code == 200, r.text
    job = r.json()
    second = client.post("/neti/train", files=files, data=form)
    assert second.status_code == 409 and second.json()["field"] == "train"
    served = post(client, prompt="a photo of cup")
    assert served.status_code == 200
    assert client.get(f"/neti/train/{job['id']}").json()["state"] == "running"  # it went on meanwhile
    t0 = time.monotonic()
    while (st := client.get(f"/neti/train/{job['id']}").json())["state"] == "running":
        assert time.monotonic() - t0 < 300
        time.sleep(0.2)
    assert st["state"] == "done" and st["concept"] == "thing" and st["step"] == 25, st
    # the page's panel: an ETA while running, the latest validation grid (each quarter: steps 6 ... 24)
    assert st["eta_s"] == 0 and st["validation_step"] == 24 and "validation_path" not in st
    grid = client.get(f"/neti/train/{job['id']}/validation.png")
    assert grid.status_code == 200 and grid.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(grid.content)) as im:
        assert im.width > 2 * SIZE and im.height > 4 * SIZE  # 4 prompts x 2 seeds, labelled
    assert client.get("/neti/train/nope/validation.png").status_code == 404
    assert "thing" in client.get("/sdapi/v1/embeddings").json()["loaded"]
    assert post(client, prompt="a photo of {thing}").status_code == 200
    bad = client.post("/neti/train", files=[("images", ("x.png", b"not an image", "image/png"))], data=form)
    assert bad.status_code == 422 and bad.json()["field"] == "images"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    bad = client.post("/neti/train", files=[("images", ("x.png", buf.getvalue(), "image/png"))],
                      data={**form, "placeholder": "two words"})
    assert bad.status_code == 422 and bad.json()["field"] == "placeholder"


def test_concept_cache_budget(srv):
    """Loaded concepts are kept under --concept-cache-mb: with no budget only the last one stays, and
    an evicted one is read again from its file (the same rows)."""
    import torch

    from neti_fast.serve.concepts import ConceptStore
    store = ConceptStore(srv.model, srv.store.folder, budget_mb=0)
    store.scan()
    assert len(store._loaded) == 1
    cat = store.get("cat")
    store.get("dog")
    assert list(store._loaded) == ["dog"]
    again = store.get("cat")
    assert again is not cat and again.name == "cat"
    ts = torch.tensor([999, 500, 1])
    assert torch.equal(again.schedule_rows(ts, None)[0], cat.schedule_rows(ts, None)[0])


def test_serve_flags():
    from neti_fast.cli import build_parser
    from neti_fast.serve.cli import config_from_args
    args = build_parser().parse_args(["serve", "--model", "tiny", "--concepts", "c", "--host", "0.0.0.0", "--port", "9000",
                                      "--device", "cpu", "--dtype", "fp32", "--max-batch", "4", "--max-wait-ms", "10",
                                      "--api-key", "k"])
    cfg = config_from_args(args)
    assert (cfg.model, cfg.concepts, cfg.host, cfg.port, cfg.device, cfg.dtype, cfg.max_batch, cfg.max_wait_ms,
            cfg.api_key) == ("tiny", "c", "0.0.0.0", 9000, "cpu", "float32", 4, 10.0, "k")
    default = config_from_args(build_parser().parse_args(["serve", "--model", "tiny", "--device", "cpu"]))
    assert (default.host, default.port, default.max_batch, default.max_wait_ms) == ("127.0.0.1", 7860, 16, 50.0)


def test_refresh_embeddings(client, srv):
    """A file dropped into --concepts joins the list on POST /sdapi/v1/refresh-embeddings (A1111's)."""
    from neti_fast.concepts.concept import random_concept
    path = random_concept("neti", 32, 55, "<late>", True).save(srv.store.folder / "late.safetensors")
    try:
        assert "late" not in client.get("/sdapi/v1/embeddings").json()["loaded"]
        assert client.post("/sdapi/v1/refresh-embeddings").status_code == 200
        assert "late" in client.get("/sdapi/v1/embeddings").json()["loaded"]
        assert post(client, prompt="a photo of late").status_code == 200
    finally:
        path.unlink()
        client.post("/sdapi/v1/refresh-embeddings")
    assert "late" not in client.get("/sdapi/v1/embeddings").json()["loaded"]
