"""`neti-fast serve` on SD 2.x and SDXL built-ins: the A1111 txt2img route with a concept of the
model's family; a concept of another family is skipped, the listing naming both families."""
from __future__ import annotations

import pytest

from serve_util import STEPS, decode_png

from fastapi.testclient import TestClient  # noqa: E402  (serve_util skips without the serve extra)


@pytest.mark.parametrize("builtin", ["tiny-sd2", "tiny-xl"])
def test_txt2img_on_other_families(builtin, request, tmp_path, one_thread):
    from neti_fast.concepts.concept import random_concept
    from neti_fast.serve.app import Server, ServeConfig, create_app
    model = request.getfixturevalue({"tiny-sd2": "tiny_sd2_model", "tiny-xl": "tiny_xl_model"}[builtin])
    (tmp_path / "concepts").mkdir()
    random_concept("neti", model.text_dim, 1, "<cat>", family=model.family).save(tmp_path / "concepts" / "cat.safetensors")
    random_concept("ti", 32, 2, "<sd1>").save(tmp_path / "concepts" / "sd1.safetensors")   # an SD 1.x concept
    server = Server(ServeConfig(model=builtin, concepts=str(tmp_path / "concepts"), state_dir=str(tmp_path / "state"),
                                max_wait_ms=30, max_batch=8), model=model)
    try:
        client = TestClient(create_app(server))
        size = model.default_size
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a photo of {cat}", "steps": STEPS, "seed": 3,
                                                   "width": size, "height": size, "batch_size": 2})
        assert r.status_code == 200, r.text
        imgs = [decode_png(b) for b in r.json()["images"]]
        assert len(imgs) == 2 and imgs[0].shape == (size, size, 3) and imgs[0].tobytes() != imgs[1].tobytes()
        why = client.get("/sdapi/v1/embeddings").json()["skipped"]["sd1.safetensors"]["error"]  # listed as skipped
        assert "SD 1.x (sd1)" in why and f"{model.family.title} ({model.family.name})" in why and "\n" not in why
    finally:
        server.close()
