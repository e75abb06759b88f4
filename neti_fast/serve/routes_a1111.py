"""Automatic1111's HTTP API: txt2img, img2img, progress, interrupt and the listings its clients read."""
from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import ValidationError

from ..errors import NetiError
from . import a1111
from .a1111 import FieldError
from .http import client_host, error_response, is_loopback, json_body, png_b64
router = APIRouter()


@router.post("/sdapi/v1/txt2img")
async def txt2img(request: Request):
    return await _generate(request, a1111.Txt2Img)


@router.post("/sdapi/v1/img2img")
async def img2img(request: Request):
    return await _generate(request, a1111.Img2Img)


async def _generate(request: Request, model):
    """One txt2img / img2img request: validated (Server.prepare), queued, answered as A1111 does."""
    server = request.app.state.server
    body = await json_body(request)
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = err.get("loc", ())
        field = str(loc[0]) if loc else "body"  # the request field (later parts name union members)
        raise FieldError(field, f"{err.get('msg', 'invalid')} (got {err.get('input')!r})"[:300]) from None
    job, info = await run_in_threadpool(server.prepare, req, client_host(request))
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def wake(_job):
        loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))
    job.on_done = wake
    server.batcher.submit(job)
    while not done.done():
        await asyncio.wait({done}, timeout=0.2)
        if not done.done() and await request.is_disconnected():
            server.batcher.cancel(job)  # its waiting images leave the queue; nobody waits on it
            return Response(status_code=499)
    try:
        if job.error is not None:
            if isinstance(job.error, NetiError):
                raise FieldError("prompt", str(job.error))
            return error_response(f"the engine failed on this request ({type(job.error).__name__}: {job.error})", None, 500)
        if job.interrupted:  # A1111 answers an interrupted job with what it finished
            keep = [i for i, im in enumerate(job.images) if im is not None]
            info.update({k: [info[k][i] for i in keep] for k in ("prompts", "seeds", "truncs")})
            job.images = [job.images[i] for i in keep]
        if req.save_images:  # as A1111 does: also into the server's output folder (+ its manifest line)
            info["saved"] = await run_in_threadpool(server.save_outputs, job.images, info)
        images = await run_in_threadpool(lambda: [png_b64(i) for i in job.images]) if req.send_images else []
        params = req.model_dump()
        params.update(width=info["width"], height=info["height"])  # an omitted size echoed as the one used, as A1111's default is
        if isinstance(req, a1111.Img2Img):  # as A1111: the images are not echoed back
            params.update(init_images=None, mask=None)
        return {"images": images, "parameters": params, "info": a1111.info_json(**info)}
    finally:
        job.release()  # recent jobs stay listed for /progress, without their images


@router.get("/sdapi/v1/progress")
async def progress(request: Request, id_task: str | None = None, skip_current_image: bool = False):
    server = request.app.state.server
    jobs = server.batcher.jobs
    job = jobs.get(id_task) if id_task else None
    if job is None and not id_task:
        mine = [j for j in list(jobs.values()) if j.client == client_host(request) and not j.finished]  # list(): one C call, safe beside the worker
        job = mine[-1] if mine else None
    if job is None:
        state = {"skipped": False, "interrupted": False, "job": "", "job_count": 0, "job_timestamp": "0",
                 "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
    p = job.progress
    elapsed = time.monotonic() - (job.started or job.created)
    eta = elapsed / p - elapsed if p > 0 else 0.0
    state = {"skipped": False, "interrupted": job.cancelled, "job": job.id, "job_count": 1,
             "job_timestamp": "0", "job_no": 0, "sampling_step": job.step, "sampling_steps": job.steps,
             "finished": job.finished, "images_done": job.done_images, "images": job.total}
    text = "queued" if job.started is None else ("done" if job.finished else "running")
    shown = job.preview  # (latents, row): one read, the worker replaces it every step
    current = None
    if shown is not None and not skip_current_image and not job.finished:
        from ..engine.sampling import preview
        latents, row = shown
        current = await run_in_threadpool(lambda: png_b64(preview(latents[row:row + 1])[0]))
    return {"progress": p, "eta_relative": eta, "state": state, "current_image": current, "textinfo": text}


@router.post("/sdapi/v1/interrupt")
async def interrupt(request: Request, id_task: str | None = None):
    """The caller's unfinished jobs (or the one `id_task` names) stop; each answers with the images
    it finished (A1111 interrupts the one job it runs; here every caller has their own)."""
    server = request.app.state.server
    jobs = list(server.batcher.jobs.values())
    mine = [j for j in jobs if not j.finished and (j.id == id_task if id_task else j.client == client_host(request))]
    for j in mine:
        server.batcher.interrupt(j)
    return {"interrupted": [j.id for j in mine]}


@router.get("/sdapi/v1/samplers")
async def samplers():
    return a1111.samplers_list()


@router.get("/sdapi/v1/schedulers")
async def schedulers():
    return a1111.schedulers_list()


@router.get("/sdapi/v1/sd-models")
async def sd_models(request: Request):
    server = request.app.state.server
    return [{"title": server.model_title, "model_name": server.model_name, "hash": server.model_hash,
             "sha256": None, "filename": server.model_name, "config": None}]


@router.get("/sdapi/v1/options")
async def options(request: Request):
    return a1111.options(request.app.state.server)


@router.post("/sdapi/v1/options")
async def set_options(request: Request):
    """A1111 sets options server-wide; neti-fast has one model and fixed options: a POST that keeps
    them (Open WebUI posts back the whole dict it read) or selects the model by any of its names is
    accepted, one that changes a value is a 422 naming the key, unknown keys are ignored (logged)."""
    a1111.check_options(await json_body(request), request.app.state.server, "options")
    return None


@router.get("/sdapi/v1/cmd-flags")
async def cmd_flags(request: Request):
    server = request.app.state.server
    return {"api": True, "listen": not is_loopback(server.cfg.host), "port": server.cfg.port}


@router.get("/sdapi/v1/scripts")
async def scripts():
    return {"txt2img": [], "img2img": []}


@router.get("/sdapi/v1/script-info")
async def script_info():
    return []


def _none_of(path: str, value):
    router.add_api_route(path, lambda: value, methods=["GET"])


# What A1111 lists and neti-fast has none of (clients probe these to fill their menus).
for path in ("latent-upscale-modes", "prompt-styles", "face-restorers", "hypernetworks", "sd-vae", "loras"):
    _none_of(f"/sdapi/v1/{path}", [])
_none_of("/sdapi/v1/upscalers", [{"name": "None", "model_name": None, "model_path": None, "model_url": None,
                                  "scale": 4}])


@router.get("/sdapi/v1/embeddings")
async def embeddings(request: Request):
    server = request.app.state.server
    return server.store.embeddings()


@router.post("/sdapi/v1/refresh-embeddings")
async def refresh_embeddings(request: Request):
    server = request.app.state.server
    await run_in_threadpool(server.store.scan)
    return None
