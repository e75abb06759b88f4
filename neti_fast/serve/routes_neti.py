"""neti-fast's own routes: server info, concept uploads, training from the page, health."""
from __future__ import annotations

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool

from . import a1111
from .a1111 import FieldError
from .http import read_limited
router = APIRouter()


@router.get("/neti/info")
async def info(request: Request):
    server = request.app.state.server
    from .training import train_defaults
    m = server.model
    return {"model": server.model_name, "default_size": m.default_size, "size_multiple": m.vae_scale_factor,
            "max_batch": server.cfg.max_batch, "max_images": server.cfg.max_images, "samplers": [s.name for s in a1111.SAMPLERS],
            "concepts": server.store.embeddings()["loaded"], "train_defaults": train_defaults(server.model_name),
            "max_upload_mb": server.cfg.max_upload_mb}


@router.post("/neti/concepts")
async def upload_concept(request: Request, file: UploadFile = File(...), name: str | None = Form(None)):
    server = request.app.state.server
    data = await read_limited(file, server.cfg.max_upload_mb * 2**20, "file")
    names = await run_in_threadpool(server.add_upload, file.filename or "", data, name)
    return {"added": names, "concepts": server.store.embeddings()["loaded"]}


@router.post("/neti/train")
async def start_training(request: Request, images: list[UploadFile] = File(...), placeholder: str = Form(...),
                         init_word: str = Form(...), steps: int | None = Form(None), method: str = Form("neti")):
    server = request.app.state.server
    from .training import MAX_IMAGE_BYTES, MAX_IMAGES
    if len(images) > MAX_IMAGES:
        raise FieldError("images", f"at most {MAX_IMAGES} images")
    files = [(u.filename or f"image-{i}", await read_limited(u, MAX_IMAGE_BYTES, "images")) for i, u in enumerate(images)]
    job = await run_in_threadpool(server.trainer.start, files, placeholder, init_word, steps, method)
    return job.describe()


def _train_job(request: Request, job_id: str):
    job = request.app.state.server.trainer.job(job_id)
    if job is None:
        raise FieldError("job_id", f"{job_id!r}: no such training run", 404)
    return job


@router.get("/neti/train/{job_id}")
async def training_status(request: Request, job_id: str):
    return _train_job(request, job_id).describe()


@router.get("/neti/train/{job_id}/validation.png")
async def training_validation(request: Request, job_id: str):
    """The run's latest validation grid (rows the prompts, columns the seeds)."""
    from fastapi.responses import Response
    job = _train_job(request, job_id)
    if job.validation_path is None:
        raise FieldError("job_id", "no validation grid yet (one comes at each quarter of the run)", 404)
    data = await run_in_threadpool(job.validation_path.read_bytes)
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.get("/health")
async def health(request: Request):
    server = request.app.state.server
    return {"status": "ok", "queued_images": server.batcher.queued_images()}
