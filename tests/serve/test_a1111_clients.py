"""Client compatibility: the calls SillyTavern's stable-diffusion extension, Open WebUI's automatic1111
engine and webuiapi make, replayed with the request bodies those clients build (read from their public
code: SillyTavern src/endpoints/stable-diffusion.js + public/scripts/extensions/stable-diffusion/index.js,
Open WebUI backend/open_webui/routers/images.py, webuiapi/webuiapi.py), each answered with what the
client parses, or with a documented refusal (README, "Automatic1111 API"). img2img: webuiapi's
img2img() body, plain and inpainting; SillyTavern posts txt2img only (its server forwards every A1111
generation to /sdapi/v1/txt2img), so its body is checked on img2img with init_images added."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from serve_util import SIZE, STEPS, alone, decode_png, make_server, png_b64, smooth_image

from fastapi.testclient import TestClient  # noqa: E402  (serve_util skips without the serve extra)

TOL = 1  # batched vs alone: float summation order only (tests/engine/test_engine.py)


@pytest.fixture(scope="module")
def srv(tiny_model, tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("clients")
    server = make_server(tiny_model, tmp, outputs=str(tmp / "outputs"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(srv):
    from neti_fast.serve.app import create_app
    return TestClient(create_app(srv))


def is_png(b64: str) -> bool:
    return base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- SillyTavern

def sillytavern_body(**kw) -> dict:
    """generateAutoImage()'s payload: getSdRequestBody()'s url + auth (its own server forwards the
    whole body to /sdapi/v1/txt2img), the extension's defaults (DDIM, schedule "normal"), hires-fix
    fields with hires fix off, clip skip twice (override_settings for A1111, clip_skip for SD.Next),
    save_images. `seed` is left out when it is -1 (JSON.stringify drops undefined), as is sd_vae
    while no VAE is listed."""
    body = {"url": "http://127.0.0.1:7860", "auth": "", "prompt": "best quality, a photo of {cat} on the beach",
            "negative_prompt": "lowres, bad anatomy, blurry", "sampler_name": "DDIM", "scheduler": "normal",
            "steps": STEPS, "cfg_scale": 7, "width": SIZE, "height": SIZE, "restore_faces": False, "enable_hr": False,
            "hr_upscaler": "Latent", "hr_scale": 2.0, "hr_additional_modules": [], "denoising_strength": 0.7,
            "hr_second_pass_steps": 0, "seed": 21, "override_settings": {"CLIP_stop_at_last_layers": 1},
            "override_settings_restore_afterwards": True, "clip_skip": 1, "save_images": True, "send_images": True,
            "do_not_save_grid": False, "do_not_save_samples": False}
    body.update(kw)
    return body


def test_sillytavern_connects_and_lists(client, srv):
    """/ping, /get-model, /models, /samplers, /schedulers, /upscalers, /vaes and /set-model of its
    server, each the A1111 call it makes and the keys it reads."""
    opts = client.get("/sdapi/v1/options")
    assert opts.status_code == 200 and opts.json()["sd_model_checkpoint"] == srv.model_title
    assert "forge_preset" not in opts.json()  # it then drops override_settings.forge_additional_modules
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["title"] for m in models] == [srv.model_title]
    samplers = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert "DDIM" in samplers and "Euler a" in samplers
    assert "normal" in [s["name"] for s in client.get("/sdapi/v1/schedulers").json()]
    # upscalers: names, "None" first; then the latent modes spliced in after it
    assert [u["name"] for u in client.get("/sdapi/v1/upscalers").json()][0] == "None"
    assert client.get("/sdapi/v1/latent-upscale-modes").json() == []
    assert client.get("/sdapi/v1/sd-vae").json() == []   # x.model_name of each: none, so no sd_vae is sent
    assert client.get("/sdapi/v1/sd-modules").status_code == 404  # Forge's: Promise.allSettled takes the other
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": models[0]["title"]})
    assert r.status_code == 200
    p = client.get("/sdapi/v1/progress").json()  # it waits until progress 0 and job_count 0
    assert p["progress"] == 0.0 and p["state"]["job_count"] == 0


def test_sillytavern_generate(client, srv, max_diff):
    """Its txt2img body: 200 (no 422 for url / auth / clip_skip / save_images / override_settings),
    `images[0]` a base64 PNG equal to the same request's image generated alone; url and auth are
    ignored and listed back; save_images wrote the PNG and its manifest line."""
    from neti_fast.jobs.manifest import read_entries
    r = client.post("/sdapi/v1/txt2img", json=sillytavern_body())
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["images"]) == 1 and is_png(out["images"][0])
    info = json.loads(out["info"])
    assert info["ignored_fields"] == ["url", "auth"]
    assert info["sampler_name"] == "DDIM" and info["scheduler"] == "normal" and info["engine_scheduler"] == "ddim-normal"
    img = decode_png(out["images"][0])
    want = alone(srv, {"prompt": "best quality, a photo of {cat} on the beach", "negative_prompt": "lowres, bad anatomy, blurry",
                       "sampler_name": "DDIM", "scheduler": "normal", "steps": STEPS, "cfg_scale": 7, "width": SIZE,
                       "height": SIZE, "seed": 21})[0]
    assert max_diff(img, want) <= TOL
    (name,) = info["saved_files"]
    entries = {e["file"]: e for _, e in read_entries(srv.outputs)}
    e = entries[name]
    assert (e["seed"], e["scheduler"], e["sampler_name"], e["clip_skip"], e["status"]) == (21, "ddim-normal", "DDIM", 1, "done")
    assert np.array_equal(np.asarray(__import__("PIL.Image").Image.open(srv.outputs / name).convert("RGB")), img)
    # a second request numbers on: no file is overwritten
    again = json.loads(client.post("/sdapi/v1/txt2img", json=sillytavern_body(seed=22)).json()["info"])["saved_files"]
    assert again != [name] and (srv.outputs / again[0]).is_file() and len(read_entries(srv.outputs)) == len(entries) + 1


def test_sillytavern_clip_skip(client, srv, max_diff):
    """Clip skip 2 from its settings (both fields) is honoured: the image changes, equals clip skip 2
    generated alone, and the infotext says so."""
    body = sillytavern_body(clip_skip=2, override_settings={"CLIP_stop_at_last_layers": 2}, save_images=False)
    out = client.post("/sdapi/v1/txt2img", json=body).json()
    info = json.loads(out["info"])
    assert info["clip_skip"] == 2 and "Clip skip: 2" in info["infotexts"][0] and info["saved_files"] == []
    img = decode_png(out["images"][0])
    one = decode_png(client.post("/sdapi/v1/txt2img", json=sillytavern_body(save_images=False)).json()["images"][0])
    assert max_diff(img, one) > 10
    from neti_fast.serve.a1111 import Txt2Img
    job, _ = srv.prepare(Txt2Img.model_validate(body), "")
    assert [r.clip_skip for r in job.requests] == [2]


def test_sillytavern_adetailer_is_refused(client):
    """Its "ADetailer face fix" adds an enabled always-on script: a feature neti-fast lacks, named."""
    body = sillytavern_body(alwayson_scripts={"ADetailer": {"args": [True, True, {"ad_model": "face_yolov8n.pt"}]}})
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 422 and r.json()["field"] == "alwayson_scripts.ADetailer"


# ----------------------------------------------------------------------------- Open WebUI

def test_open_webui_set_model_posts_back_the_options(client, srv):
    """set_image_model(): GET /options; when the configured model differs from
    options['sd_model_checkpoint'], the whole dict goes back with that key changed. Its model ids are
    /sd-models' titles, names are model_name: selecting this server's model by either is accepted;
    another model is a 422 naming sd_model_checkpoint (Open WebUI logs it and generates on)."""
    models = client.get("/sdapi/v1/sd-models").json()
    listed = [{"id": m["title"], "name": m["model_name"]} for m in models]   # get_models()
    assert listed == [{"id": srv.model_title, "name": "tiny"}]
    for model in ("tiny", srv.model_hash, srv.model_title):
        options = client.get("/sdapi/v1/options").json()
        options["sd_model_checkpoint"] = model
        r = client.post("/sdapi/v1/options", json=options)
        assert r.status_code == 200, (model, r.text)
    options["sd_model_checkpoint"] = "v1-5-pruned-emaonly.safetensors [6ce0161689]"
    r = client.post("/sdapi/v1/options", json=options)
    assert r.status_code == 422 and r.json()["field"] == "sd_model_checkpoint"
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == srv.model_title  # nothing changed
    # a real change of another option is refused by name; an option neti-fast does not know is ignored
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}).json()["field"] == "CLIP_stop_at_last_layers"
    assert client.post("/sdapi/v1/options", json={"show_progressbar": True}).status_code == 200


def test_open_webui_generate(client, srv, max_diff):
    """image_generations(): {prompt, batch_size: n, width, height, steps, negative_prompt} merged with
    AUTOMATIC1111_PARAMS (its documented example: sampler "Euler a", scheduler "normal", cfg_scale);
    it reads res['images'] (base64, decoded as PNG) and stores res['info']."""
    data = {"prompt": "a photo of {dog}", "batch_size": 2, "width": SIZE, "height": SIZE, "steps": STEPS,
            "negative_prompt": "blurry"}
    data = {**data, **{"sampler_name": "Euler a", "scheduler": "normal", "cfg_scale": 7}}
    r = client.post("/sdapi/v1/txt2img", json=data)
    assert r.status_code == 200, r.text
    res = r.json()
    assert len(res["images"]) == 2 and all(is_png(b) for b in res["images"])
    info = json.loads(res["info"])
    assert isinstance(res["info"], str) and info["engine_scheduler"] == "euler-a-normal" and info["ignored_fields"] == []
    seed = info["seed"]  # no seed sent: random, returned
    want = alone(srv, {**data, "seed": seed})
    for b64, w in zip(res["images"], want):
        assert max_diff(decode_png(b64), w) <= TOL


# ----------------------------------------------------------------------------- webuiapi

def webuiapi_body(**kw) -> dict:
    """WebUIApi.txt2img()'s payload with its defaults (sampler "Euler a", scheduler "automatic",
    eta 1.0, every hires-fix field), as it posts it."""
    body = {"enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0,
            "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "",
            "hr_negative_prompt": "", "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0,
            "prompt": "a photo of {ball}", "styles": [], "seed": 31, "subseed": -1, "subseed_strength": 0.0,
            "seed_resize_from_h": 0, "seed_resize_from_w": 0, "batch_size": 1, "n_iter": 1, "steps": STEPS,
            "cfg_scale": 7.0, "width": SIZE, "height": SIZE, "restore_faces": False, "tiling": False,
            "do_not_save_samples": False, "do_not_save_grid": False, "negative_prompt": "", "eta": 1.0, "s_churn": 0,
            "s_tmax": 0, "s_tmin": 0, "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True,
            "sampler_name": "Euler a", "scheduler": "automatic", "sampler_index": "Euler a", "script_name": None,
            "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {}}
    body.update(kw)
    return body


def test_webuiapi_calls(client, srv):
    """util_get_model_names / util_set_model (titles, then POST options), get_options,
    util_get_current_model, get_samplers, get_schedulers, get_progress."""
    names = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
    assert names == [srv.model_title]
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": names[0].lower()})  # it lowercases to match
    assert r.status_code == 200 and r.json() is None
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == names[0]
    assert all({"name", "aliases", "options"} <= set(s) for s in client.get("/sdapi/v1/samplers").json())
    assert all({"name", "label"} <= set(s) for s in client.get("/sdapi/v1/schedulers").json())
    assert {"progress", "eta_relative", "state", "current_image"} <= set(client.get("/sdapi/v1/progress").json())


def test_sizes_round_down_to_8_as_a1111(client, srv, max_diff):
    """A1111 takes any width / height (its latents are height // 8 x width // 8): 70 x 61 makes the 64 x 56
    image of a 64 x 56 request (SD 1.x has no size conditioning), the info reporting the size asked as
    A1111's does. SDXL's crop options are listed and taken per request; on SD 1.x, as in A1111, they
    change nothing. No size: SD 1.x's 512-equivalent native size (A1111's default)."""
    base = {"prompt": "a photo of {ball}", "seed": 7, "steps": STEPS}
    r = client.post("/sdapi/v1/txt2img", json={**base, "width": 70, "height": 61})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert (info["width"], info["height"], info["image_width"], info["image_height"]) == (70, 61, 64, 56)
    img = decode_png(r.json()["images"][0])
    exact = client.post("/sdapi/v1/txt2img", json={**base, "width": 64, "height": 56}).json()
    assert "image_width" not in json.loads(exact["info"])
    assert img.shape == (56, 64, 3) and max_diff(img, decode_png(exact["images"][0])) <= TOL
    crop = client.post("/sdapi/v1/txt2img", json={**base, "width": 64, "height": 56,
                                                   "override_settings": {"sdxl_crop_top": 8}})
    assert crop.status_code == 200 and max_diff(decode_png(crop.json()["images"][0]), img) <= TOL
    assert decode_png(client.post("/sdapi/v1/txt2img", json=base).json()["images"][0]).shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize("sampler,scheduler,engine", [("Euler a", "automatic", "euler-a"), ("DDIM", "automatic", "ddim"),
                                                      ("DPM++ 2M", "automatic", "dpm++-karras"), ("Heun", "karras", "heun-karras")])
def test_webuiapi_txt2img(client, srv, max_diff, sampler, scheduler, engine):
    """Its full ~45-field body, eta 1.0 always: honoured as DDIM's eta (noise from the image's seed),
    the ancestral step's own eta for Euler a, ignored by the deterministic samplers (as in A1111)."""
    body = webuiapi_body(sampler_name=sampler, sampler_index=sampler, scheduler=scheduler, batch_size=2)
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    info = json.loads(out["info"])
    assert info["engine_scheduler"] == engine and info["all_seeds"] == [31, 32] and info["ignored_fields"] == []
    assert info["eta"] == (1.0 if sampler == "DDIM" else None)
    assert out["parameters"]["sampler_name"] == sampler
    want = alone(srv, {"prompt": "a photo of {ball}", "seed": 31, "batch_size": 2, "steps": STEPS, "cfg_scale": 7.0,
                       "width": SIZE, "height": SIZE, "sampler_name": sampler, "scheduler": scheduler, "eta": 1.0})
    tol = 2 if sampler == "DDIM" else TOL  # DDIM at eta 1 scales float-order differences (tests/engine/test_samplers.py)
    for b64, w in zip(out["images"], want):
        assert max_diff(decode_png(b64), w) <= tol


def test_webuiapi_ddim_eta_is_applied(client, max_diff):
    """eta 1.0 with DDIM gives another image than eta 0 (A1111's default for DDIM): it is not ignored."""
    ims = [decode_png(client.post("/sdapi/v1/txt2img", json=webuiapi_body(sampler_name="DDIM", eta=eta)).json()["images"][0])
           for eta in (0.0, 1.0)]
    assert max_diff(*ims) > 4  # measured 8 at 2 steps; same-noise float differences stay within 2


def webuiapi_img2img_body(image: np.ndarray, **kw) -> dict:
    """WebUIApi.img2img()'s payload at its defaults (webuiapi 0.9.17): its own img2img fields (mask
    blur 4, fill 0, "only masked" True, image_cfg_scale 1.5, eta 1.0) beside txt2img's."""
    body = {"init_images": [png_b64(image)], "resize_mode": 0, "denoising_strength": 0.75, "mask_blur": 4,
            "inpainting_fill": 0, "inpaint_full_res": True, "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0,
            "initial_noise_multiplier": 1, "prompt": "a photo of {ball}", "styles": [], "seed": 41, "subseed": -1,
            "subseed_strength": 0, "seed_resize_from_h": 0, "seed_resize_from_w": 0, "batch_size": 1, "n_iter": 1,
            "steps": STEPS, "cfg_scale": 7.0, "image_cfg_scale": 1.5, "width": SIZE, "height": SIZE,
            "restore_faces": False, "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False,
            "negative_prompt": "", "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1,
            "override_settings": {}, "override_settings_restore_afterwards": True, "sampler_name": "Euler a",
            "scheduler": "automatic", "sampler_index": "Euler a", "include_init_images": False, "script_name": None,
            "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {}}
    body.update(kw)
    return body


def test_webuiapi_img2img(client, srv, max_diff):
    """img2img() with its defaults: 200, the image of the engine's own img2img for that seed and
    strength, A1111's info (denoising_strength) and parameters (init images not echoed)."""
    image = smooth_image(1)
    body = webuiapi_img2img_body(image, batch_size=2)
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    info = json.loads(out["info"])
    assert info["denoising_strength"] == 0.75 and info["all_seeds"] == [41, 42] and info["ignored_fields"] == []
    assert out["parameters"]["init_images"] is None and out["parameters"]["denoising_strength"] == 0.75
    want = alone(srv, body)
    got = [decode_png(b) for b in out["images"]]
    for g, w in zip(got, want):
        assert max_diff(g, w) <= TOL
    txt = decode_png(client.post("/sdapi/v1/txt2img", json=webuiapi_body(prompt="a photo of {ball}", seed=41)).json()["images"][0])
    assert max_diff(got[0], txt) > 10 and max_diff(got[0], got[1]) > 10   # the init image and the seed both count
    # a data: URL is the same image; a lower strength stays nearer the init image
    same = client.post("/sdapi/v1/img2img", json={**body, "batch_size": 1,
                                                    "init_images": ["data:image/png;base64," + png_b64(image)]})
    assert max_diff(decode_png(same.json()["images"][0]), got[0]) <= TOL


def test_webuiapi_img2img_lower_strength_stays_nearer(client, srv):
    """At the same step count a lower denoising_strength runs fewer steps and stays nearer the init
    image. Across step counts, strength is diffusers' get_timesteps (the last int(N x s) steps of the
    N-step schedule), so 2 steps at 0.75 and 4 at 0.25 both run only the final step: with the model's
    "leading" spacing it is t = 1 for every N (Euler a's sigma 0.0142 -> 0), the same arithmetic and
    the same noise, hence the same image (what StableDiffusionImg2ImgPipeline gives too)."""
    image = smooth_image(1)
    body = webuiapi_img2img_body(image, batch_size=1, steps=4)
    post = lambda **kw: decode_png(client.post("/sdapi/v1/img2img", json={**body, **kw}).json()["images"][0])
    high, low = post(denoising_strength=0.75), post(denoising_strength=0.25)
    assert np.abs(low.astype(int) - image).mean() < np.abs(high.astype(int) - image).mean()
    assert np.array_equal(post(steps=2, denoising_strength=0.75), low)


def test_webuiapi_inpainting(client, srv, max_diff):
    """img2img(mask_image=...): "only masked" (webuiapi's default) is refused naming the field; whole
    picture inpainting keeps the pixels away from the mask exactly and repaints under it."""
    image = smooth_image(2)
    m = np.zeros((SIZE, SIZE, 3), np.uint8)
    m[16:48, 16:48] = 255
    body = webuiapi_img2img_body(image, mask=png_b64(m))
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 422 and r.json()["field"] == "inpaint_full_res"
    for fill in (0, 1, 3):
        r = client.post("/sdapi/v1/img2img", json={**body, "inpaint_full_res": False, "inpainting_fill": fill})
        assert r.status_code == 200, r.text
        got = decode_png(r.json()["images"][0])
        far = np.ones((SIZE, SIZE), bool)
        far[16 - 10:48 + 10, 16 - 10:48 + 10] = False   # mask_blur 4: the edge blends over ~2.5 x 4 px
        assert np.array_equal(got[far], image[far])
        assert max_diff(got[24:40, 24:40], image[24:40, 24:40]) > 10
        assert max_diff(got, alone(srv, {**body, "inpaint_full_res": False, "inpainting_fill": fill})[0]) <= TOL
    r = client.post("/sdapi/v1/img2img", json={**body, "inpaint_full_res": False, "inpainting_fill": 2})
    assert r.status_code == 422 and r.json()["field"] == "inpainting_fill"


@pytest.mark.parametrize("change,field", [({"resize_mode": 3}, "resize_mode"), ({"init_images": ["not an image"]}, "init_images.0"),
                                          ({"init_images": []}, "init_images"), ({"denoising_strength": 0.1}, "denoising_strength"),
                                          ({"denoising_strength": 1.5}, "denoising_strength"),
                                          ({"initial_noise_multiplier": 0.9}, "initial_noise_multiplier"),
                                          ({"mask": "bad", "inpaint_full_res": False}, "mask")])
def test_img2img_refusals_name_the_field(client, change, field):
    r = client.post("/sdapi/v1/img2img", json={**webuiapi_img2img_body(smooth_image(3)), **change})
    assert r.status_code == 422 and r.json()["field"] == field, r.text
    assert "\n" not in r.json()["error"] and "/" not in r.json()["error"].replace("1/2", "")


def test_img2img_batching_shapes(srv):
    """What may share a U-Net batch: the schedule's start, not the strength or the image."""
    from neti_fast.serve.a1111 import Img2Img
    shape = lambda **kw: srv.prepare(Img2Img.model_validate(webuiapi_img2img_body(smooth_image(kw.pop("img", 4)), steps=4, **kw)), "")[0].shape
    assert shape(denoising_strength=0.5) == shape(denoising_strength=0.55, img=5)   # int(4 x s) = 2 both
    assert shape(denoising_strength=0.5) != shape(denoising_strength=0.75)
    assert shape(denoising_strength=1.0).start == 0


def test_sillytavern_body_on_img2img(client, srv, max_diff):
    """SillyTavern's fields (hires fix off, clip skip twice, DDIM "normal") with init_images added:
    Img2Img takes every txt2img field the same way."""
    body = sillytavern_body(init_images=[png_b64(smooth_image(6))], denoising_strength=0.5)
    for k in ("url", "auth"):
        body.pop(k)
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["denoising_strength"] == 0.5
    assert max_diff(decode_png(r.json()["images"][0]), alone(srv, body)[0]) <= TOL


# ----------------------------------------------------------------------------- request semantics

def test_unknown_fields_are_ignored_listed_and_logged_once(client, caplog):
    """A field neither A1111 nor neti-fast has is ignored (A1111's pydantic models ignore it) and
    listed in info.ignored_fields; unknown override_settings keys too; the log names each once."""
    import logging
    body = {"prompt": "a photo", "steps": STEPS, "width": SIZE, "height": SIZE, "seed": 3, "brand_new_field": 1,
            "override_settings": {"some_extension_option": True}}
    with caplog.at_level(logging.INFO, logger="neti_fast.serve"):
        infos = [json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"]) for _ in range(2)]
    assert infos[0]["ignored_fields"] == infos[1]["ignored_fields"] == ["brand_new_field", "override_settings.some_extension_option"]
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert logged.count("brand_new_field") == 1 and logged.count("some_extension_option") == 1


def test_concept_that_cannot_apply_is_refused(client):
    """neti-fast's own `concept` with a prompt that never says where it goes: a 422, not ignored."""
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a photo of a dog", "concept": "cat", "steps": STEPS,
                                               "width": SIZE, "height": SIZE})
    assert r.status_code == 422 and r.json()["field"] == "prompt" and "cat" in r.json()["error"]


def test_errors_name_the_field_never_a_flag_or_path(client, srv):
    """Every refusal above is one line naming an API field; none mentions a CLI flag or the server's folders."""
    bodies = [sillytavern_body(enable_hr=True), sillytavern_body(sampler_name="DPM++ 2S a"),
              webuiapi_body(restore_faces=True), {"prompt": "x", "override_settings": {"sd_model_checkpoint": "other"}}]
    for b in bodies:
        err = client.post("/sdapi/v1/txt2img", json=b).json()
        assert err["field"] and "\n" not in err["error"] and "--" not in err["error"]
        assert str(srv.state_dir) not in err["error"] and str(srv.outputs) not in err["error"]


# ----------------------------------------------------------------------------- A1111 prompt syntax

LONG_TAGS = ("masterpiece, (best quality:1.2), ((ultra detailed)), [blurry], a photo of {cat} on the beach, "
             + ", ".join(f"tag{i} detail" for i in range(40)))   # SillyTavern / Open WebUI style: > 75 tokens


@pytest.fixture(scope="module")
def biased(tiny_model, tmp_path_factory, one_thread):
    """A server on `tiny` with a final layer norm bias, as real CLIP has: emphasis rescales to the
    encoding's mean, which tiny's zero bias leaves at float noise (tests/sd/test_prompt_syntax.py)."""
    import copy

    import torch
    m = copy.deepcopy(tiny_model)
    ln = getattr(m.text_encoder, "text_model", m.text_encoder).final_layer_norm
    with torch.no_grad():
        ln.bias.copy_(torch.randn(ln.bias.shape, generator=torch.Generator().manual_seed(0)) * 0.3 + 0.2)
    tmp = tmp_path_factory.mktemp("syntax")
    from serve_util import make_concepts
    make_concepts(tmp / "concepts")  # and a 3-vector A1111 embedding beside them
    torch.save({"string_to_param": {"*": torch.randn(3, 32, generator=torch.Generator().manual_seed(1))},
                "name": "tri"}, tmp / "concepts" / "tri.pt")
    server = make_server(m, tmp)
    yield server
    server.close()


def test_long_weighted_prompts_are_answered(biased, max_diff):
    """A1111 syntax is always on: SillyTavern's body with an emphasized tag prompt over 75 tokens and
    an emphasized negative prompt is a 200 (several chunks of 77), its image equal to the same request
    alone; the weights change the image; an escaped \\( is literal; Open WebUI's batch of 2 too."""
    from neti_fast.serve.app import create_app
    client = TestClient(create_app(biased))
    body = sillytavern_body(prompt=LONG_TAGS, negative_prompt="(worst quality:1.4), lowres, [bad anatomy]",
                            save_images=False)
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    img = decode_png(r.json()["images"][0])
    assert max_diff(img, alone(biased, body)[0]) <= TOL
    from neti_fast.serve.a1111 import Txt2Img
    job, _ = biased.prepare(Txt2Img.model_validate(body), "")
    assert job.shape.context > 1 and all(q.prompt_syntax == "a1111" for q in job.requests)
    flat = decode_png(client.post("/sdapi/v1/txt2img", json=sillytavern_body(
        prompt=LONG_TAGS.replace("(best quality:1.2)", "best quality").replace("((ultra detailed))", "ultra detailed")
        .replace("[blurry]", "blurry"), negative_prompt=body["negative_prompt"], save_images=False)).json()["images"][0])
    assert max_diff(img, flat) > 0
    esc = client.post("/sdapi/v1/txt2img", json=sillytavern_body(prompt="a \\(photo\\) of {cat}", save_images=False))
    assert esc.status_code == 200
    data = {"prompt": LONG_TAGS.replace("{cat}", "{dog}"), "batch_size": 2, "width": SIZE, "height": SIZE,
            "steps": STEPS, "negative_prompt": "blurry BREAK lowres", "sampler_name": "Euler a", "scheduler": "normal",
            "cfg_scale": 7}
    res = client.post("/sdapi/v1/txt2img", json=data)
    assert res.status_code == 200, res.text
    seed = json.loads(res.json()["info"])["seed"]
    for b64, w in zip(res.json()["images"], alone(biased, {**data, "seed": seed})):
        assert max_diff(decode_png(b64), w) <= TOL


def test_too_long_prompt_is_refused_by_field(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a dog, " * 400, "steps": STEPS, "width": SIZE, "height": SIZE})
    assert r.status_code == 422 and r.json()["field"] == "prompt" and "chunks" in r.json()["error"]
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a dog", "negative_prompt": "ugly, " * 400, "steps": STEPS,
                                               "width": SIZE, "height": SIZE})
    assert r.status_code == 422 and r.json()["field"] == "negative_prompt"


def test_multi_vector_embedding_is_served(biased, max_diff):
    """An A1111 embedding of 3 vectors: listed with its vector count, used by name inside an
    emphasized span (3 positions, each weighted), the same image as alone."""
    from neti_fast.serve.app import create_app
    client = TestClient(create_app(biased))
    listed = client.get("/sdapi/v1/embeddings").json()["loaded"]
    assert listed["tri"]["vectors"] == 3 and listed["cat"]["vectors"] == 1
    body = sillytavern_body(prompt="a photo of (tri:1.3) on the beach", save_images=False)
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert max_diff(decode_png(r.json()["images"][0]), alone(biased, body)[0]) <= TOL
