"""Helpers shared by the serve tests: a concepts folder, PNG decoding, images generated alone (one
request per engine batch); the in-process uvicorn server is neti_fast.serve.background."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="neti-fast serve needs the `serve` extra (FastAPI, uvicorn)")

NETI = ("cat", "dog", "ball", "cup")   # NeTI concepts (tiny width 32) in the test folder
SIZE = 64                              # tiny's native size (latents 8x8)
STEPS = 2


def make_concepts(folder: Path) -> Path:
    from neti_fast.concepts.concept import random_concept
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(NETI):
        random_concept("neti", 32, i, f"<{name}>", True).save(folder / f"{name}.safetensors")
    random_concept("ti", 32, 7, "<tee>", False).save(folder / "tee.safetensors")
    return folder


def make_server(model, tmp: Path, **kw):
    from neti_fast.serve.app import Server, ServeConfig
    concepts = tmp / "concepts"
    if not concepts.exists():
        make_concepts(concepts)
    kw.setdefault("max_wait_ms", 30)
    kw.setdefault("max_batch", 8)
    return Server(ServeConfig(model="tiny", concepts=str(concepts), state_dir=str(tmp / "state"), **kw), model=model)


def png_b64(img: np.ndarray) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def smooth_image(seed: int = 0) -> np.ndarray:
    """A smooth random SIZE x SIZE RGB image (an init image for img2img)."""
    from PIL import Image, ImageFilter
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(3))
    return np.asarray(img)


def decode_png(b64: str) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def alone(server, body: dict) -> list[np.ndarray]:
    """The images of `body` generated one request per engine batch (nothing else in it), on the
    server's own engine, in the caller's thread: call it only while the server is idle."""
    return alone_with_job(server, body)[0]


def alone_with_job(server, body: dict, **request_kw) -> tuple[list[np.ndarray], object]:
    """`alone`'s images, each request's given Request fields replaced, and the prepared job."""
    from dataclasses import replace

    from neti_fast.serve.a1111 import Img2Img, Txt2Img
    job, _ = server.prepare((Img2Img if "init_images" in body else Txt2Img).model_validate(body), "")
    e, s = server.engine, job.shape
    saved = e.cfg
    e.cfg = replace(saved, steps=s.steps, height=s.height, width=s.width, scheduler=s.scheduler, guidance=s.guidance,
                    eta=s.eta)
    try:
        return [e.generate_batch([replace(r, **request_kw)])[0] for r in job.requests], job
    finally:
        e.cfg = saved


from neti_fast.serve.background import BackgroundServer  # noqa: E402,F401
