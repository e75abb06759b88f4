"""`neti-fast serve` on SD 2.x and SDXL built-ins: every A1111 route a client uses (txt2img, img2img
and inpainting, options, sd-models, embeddings) with a concept of the model's family (a concept of
another family is skipped, the listing naming both), and A1111's SDXL conventions: the size asked
is SDXL's original / target size (the image that size rounded down to a multiple of 8), the crop
top-left comes from the sdxl_crop_* options, an empty negative prompt is zero conditioning."""
from __future__ import annotations

import json

import numpy as np
import pytest

from serve_util import STEPS, alone_with_job, decode_png, png_b64, smooth_image

from fastapi.testclient import TestClient  # noqa: E402  (serve_util skips without the serve extra)

TOL = 1   # batched vs alone: float summation order only (tests/engine/test_engine.py)


@pytest.fixture(scope="module", params=["tiny-sd2", "tiny-xl"])
def fam(request, tmp_path_factory, one_thread):
    """(model, server, client) for one family's built-in, with a NeTI concept of its family and an SD 1.x one."""
    from neti_fast.concepts.concept import random_concept
    from neti_fast.serve.app import Server, ServeConfig, create_app
    builtin = request.param
    model = request.getfixturevalue({"tiny-sd2": "tiny_sd2_model", "tiny-xl": "tiny_xl_model"}[builtin])
    tmp = tmp_path_factory.mktemp(builtin)
    (tmp / "concepts").mkdir()
    random_concept("neti", model.text_dim, 1, "<cat>", family=model.family).save(tmp / "concepts" / "cat.safetensors")
    random_concept("ti", 32, 2, "<sd1>").save(tmp / "concepts" / "sd1.safetensors")   # an SD 1.x concept
    server = Server(ServeConfig(model=builtin, concepts=str(tmp / "concepts"), state_dir=str(tmp / "state"),
                                max_wait_ms=30, max_batch=8), model=model)
    yield model, server, TestClient(create_app(server))
    server.close()


def engine_image(server, body: dict, **request_kw):
    """The image of `body`'s first request (its Request fields replaced) made by the server's engine
    alone in a batch, and the job (call only while the server is idle)."""
    images, job = alone_with_job(server, body, **request_kw)
    return images[0], job


def test_txt2img_and_listings(fam):
    model, server, client = fam
    size = model.default_size
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a photo of {cat}", "steps": STEPS, "seed": 3,
                                               "width": size, "height": size, "batch_size": 2})
    assert r.status_code == 200, r.text
    imgs = [decode_png(b) for b in r.json()["images"]]
    assert len(imgs) == 2 and imgs[0].shape == (size, size, 3) and imgs[0].tobytes() != imgs[1].tobytes()
    listing = client.get("/sdapi/v1/embeddings").json()
    assert listing["loaded"]["cat"]["shape"] == model.text_dim
    why = listing["skipped"]["sd1.safetensors"]["error"]  # listed as skipped
    assert "SD 1.x (sd1)" in why and f"{model.family.title} ({model.family.name})" in why and "\n" not in why
    opts = client.get("/sdapi/v1/options").json()
    assert opts["sd_model_checkpoint"] == server.model_title and (opts["sdxl_crop_top"], opts["sdxl_crop_left"]) == (0, 0)
    assert [m["title"] for m in client.get("/sdapi/v1/sd-models").json()] == [server.model_title]
    assert client.post("/sdapi/v1/options", json=opts).status_code == 200     # Open WebUI posts the dict back


def test_img2img_and_inpainting(fam, max_diff):
    """webuiapi's img2img body (init image, strength, a mask for inpainting) with the family's concept:
    the engine's image for the same request alone; the mask keeps the init image outside it."""
    model, server, client = fam
    init = smooth_image(1)
    body = {"init_images": [png_b64(init)], "prompt": "an oil painting of {cat}", "negative_prompt": "blurry",
            "denoising_strength": 0.6, "steps": 4, "seed": 5, "cfg_scale": 7.0, "sampler_name": "Euler a",
            "width": 64, "height": 64, "resize_mode": 0, "batch_size": 1}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    got = decode_png(r.json()["images"][0])
    want, job = engine_image(server, body)
    assert job.shape.start == 2 and max_diff(got, want) <= TOL     # 4 - int(4 x 0.6)
    assert max_diff(got, np.asarray(init)) > 10
    m = np.zeros((64, 64), np.uint8)
    m[16:48, 16:48] = 255
    r = client.post("/sdapi/v1/img2img", json={**body, "mask": png_b64(np.stack([m] * 3, -1)), "mask_blur": 0,
                                                "inpaint_full_res": False, "inpainting_fill": 1})
    assert r.status_code == 200, r.text
    painted = decode_png(r.json()["images"][0])
    assert np.array_equal(painted[m == 0], np.asarray(init)[m == 0])
    assert max_diff(painted[m > 0], np.asarray(init)[m > 0]) > 10


def test_sizes_as_a1111(fam, max_diff):
    """No size: the model's native one (A1111 would give 512 on any model; the family's size is the
    one the model was trained at). A size that is no multiple of 8 is taken, as A1111 takes it: the
    image is rounded down, the info reports the size asked (A1111's Size), and on SDXL the size asked
    is the micro-conditioning's original and target size, as A1111 gives it."""
    model, server, client = fam
    base = {"prompt": "a photo of {cat}", "steps": STEPS, "seed": 4}
    info = json.loads(client.post("/sdapi/v1/txt2img", json=base).json()["info"])
    assert (info["width"], info["height"]) == (model.default_size,) * 2
    r = client.post("/sdapi/v1/txt2img", json={**base, "width": 70, "height": 61})
    assert r.status_code == 200, r.text
    img, info = decode_png(r.json()["images"][0]), json.loads(r.json()["info"])
    assert img.shape == (56, 64, 3) and (info["width"], info["height"]) == (70, 61)
    assert (info["image_width"], info["image_height"]) == (64, 56) and "Size: 70x61" in info["infotexts"][0]
    want, job = engine_image(server, {**base, "width": 70, "height": 61})
    assert max_diff(img, want) <= TOL
    exact = decode_png(client.post("/sdapi/v1/txt2img", json={**base, "width": 64, "height": 56}).json()["images"][0])
    if model.family.added_conditioning:
        assert job.requests[0].time_ids == (61, 70, 0, 0, 61, 70)
        assert max_diff(img, exact) > 0       # another original / target size conditions another image
        assert max_diff(img, engine_image(server, {**base, "width": 64, "height": 56})[0]) > 0
    else:
        assert job.requests[0].time_ids is None and max_diff(img, exact) <= TOL   # SD 2.x: the rounded size alone


def test_sdxl_crop_options_and_zero_negative(fam, max_diff):
    """override_settings.sdxl_crop_top / _left set the crop top-left of one request (A1111: per request,
    SDXL only); POST /options cannot change them server-wide. An empty negative prompt is zero
    conditioning (A1111's force_zero_negative_prompt, diffusers' force_zeros_for_empty_prompt)."""
    model, server, client = fam
    if not model.family.added_conditioning:
        pytest.skip(f"{model.family.title} has no micro-conditioning or zeroed negative prompt")
    base = {"prompt": "a photo of {cat}", "steps": STEPS, "seed": 4, "width": 64, "height": 64}
    plain = decode_png(client.post("/sdapi/v1/txt2img", json=base).json()["images"][0])
    body = {**base, "override_settings": {"sdxl_crop_top": 8, "sdxl_crop_left": 16}}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    cropped = decode_png(r.json()["images"][0])
    want, job = engine_image(server, body)
    assert job.requests[0].time_ids == (64, 64, 8, 16, 64, 64) and max_diff(cropped, want) <= TOL
    assert max_diff(cropped, plain) > 10
    r = client.post("/sdapi/v1/txt2img", json={**base, "override_settings": {"sdxl_crop_top": -1}})
    assert r.status_code == 422 and r.json()["field"] == "override_settings.sdxl_crop_top"
    r = client.post("/sdapi/v1/options", json={"sdxl_crop_left": 32})
    assert r.status_code == 422 and r.json()["field"] == "sdxl_crop_left" and "override_settings" in r.json()["error"]
    assert model.zero_empty_negative
    encoded, job = engine_image(server, base, zero_empty_negative=False)   # "" encoded as text instead
    assert job.requests[0].negative_prompt == "" and job.requests[0].zero_empty_negative
    assert max_diff(plain, encoded) > 10


def test_clip_skip_is_ignored_as_a1111_ignores_it(fam):
    """A1111 applies CLIP_stop_at_last_layers to SD 1.x's CLIP only: SD 2.x's OpenCLIP and SDXL's
    encoders are read at their fixed layer whatever it says (Family.a1111_clip_skip). Same image,
    the field reported as ignored; sdxl_clip_l_skip (A1111's opt-in for SDXL's CLIP-L) stays off."""
    model, server, client = fam
    assert not model.family.a1111_clip_skip
    body = {"prompt": "a photo of {cat}", "steps": STEPS, "seed": 4, "width": 64, "height": 64}
    plain = client.post("/sdapi/v1/txt2img", json=body).json()
    for extra, field in (({"override_settings": {"CLIP_stop_at_last_layers": 2}}, "override_settings.CLIP_stop_at_last_layers"),
                         ({"clip_skip": 2}, "clip_skip")):
        r = client.post("/sdapi/v1/txt2img", json={**body, **extra}).json()
        info = json.loads(r["info"])
        assert r["images"] == plain["images"] and info["clip_skip"] == 1 and field in info["ignored_fields"], info
    r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sdxl_clip_l_skip": True}})
    assert r.status_code == 422 and r.json()["field"] == "override_settings.sdxl_clip_l_skip", r.text
