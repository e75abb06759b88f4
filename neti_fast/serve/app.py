"""The FastAPI app: Automatic1111's routes, neti-fast's page and its upload / training routes.

`Server` holds the state (model, engine, concepts, queue, trainer); `create_app(server)` adds the
routes. Every error is JSON {"error": one line, "field": the request field or null}: a FieldError
(4xx) for what the client sent, 500 with a one-line message for a bug (traceback in the log only).
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import io
import ipaddress
import json
import logging
import random
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from ..errors import NetiError
from ..utils import image_size
from . import a1111
from .a1111 import FieldError

log = logging.getLogger("neti_fast.serve")
STATIC = Path(__file__).parent / "static"


@dataclass
class ServeConfig:
    model: str = "tiny"
    concepts: str | None = None          # folder of concept / table / bundle files
    host: str = "127.0.0.1"
    port: int = 7860
    device: str = "cpu"
    dtype: str = "float32"
    max_batch: int = 16                  # images per engine batch
    max_wait_ms: float = 50.0            # how long the oldest waiting image waits for batch-mates
    api_key: str | None = None
    state_dir: str = "neti-fast-serve"   # uploads, training runs and trained concepts
    max_upload_mb: int = 256             # concept uploads (a full SD table with truncations is ~100-300 MB)
    cache_mb: int = 2048                 # prepared conditionings (the engine's cache)
    concept_cache_mb: int = 1024         # loaded concept tables
    max_images: int = 64                 # per request: batch_size x n_iter x truncations
    attention: str = "auto"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_config(cfg: ServeConfig) -> None:
    if not is_loopback(cfg.host) and not cfg.api_key:
        raise NetiError(f"--host {cfg.host}: serving beyond this machine needs --api-key (or NETI_FAST_API_KEY)")
    if cfg.concepts and not Path(cfg.concepts).is_dir():
        raise NetiError(f"--concepts {cfg.concepts}: not a folder")
    if cfg.max_batch < 1:
        raise NetiError("--max-batch: must be at least 1")
    if cfg.max_wait_ms < 0:
        raise NetiError("--max-wait-ms: must be 0 or more")


class Server:
    """The serving state. `model` may be given already loaded (tests); else it is loaded from cfg."""

    def __init__(self, cfg: ServeConfig, model=None):
        import torch

        from ..sd.conditioning import ensure_placeholder, slot_token
        from ..engine.engine import Engine, GenerateConfig
        from .batcher import Batcher
        from .concepts import ConceptStore
        from .training import Trainer
        check_config(cfg)
        self.cfg = cfg
        self.dtype = getattr(torch, cfg.dtype)
        if model is None:
            from ..sd.models import load_model
            model = load_model(cfg.model, device=cfg.device, dtype=self.dtype)
        self.model = model
        self.dtype = model.dtype
        self.model_name = cfg.model
        self.model_title = f"{cfg.model} [neti-fast]"
        # Slot tokens are added to the tokenizer on first use; adding them now means request
        # validation (HTTP threads) and the engine (worker thread) only ever read the tokenizer.
        for k in range(16):
            ensure_placeholder(model.tokenizer, slot_token(k))
        self.validate_lock = threading.Lock()
        self.state_dir = Path(cfg.state_dir)
        self.store = ConceptStore(model, cfg.concepts, cfg.concept_cache_mb)
        self.store.scan()
        for origin in ("uploads", "trained"):  # what earlier runs of this server added
            folder = self.state_dir / origin
            for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
                try:
                    self.store.add_file(path, path.stem, "upload" if origin == "uploads" else origin)
                except NetiError as e:
                    self.store.skipped[path.name] = str(e)
        gcfg = GenerateConfig(cache_mb=cfg.cache_mb, batch_size=cfg.max_batch, attention=cfg.attention)
        self.engine = Engine(model, gcfg)
        self.batcher = Batcher(self.engine, cfg.max_batch, cfg.max_wait_ms)
        self.trainer = Trainer(cfg.model, str(model.device), self.dtype, self.state_dir, self.store)

    def close(self) -> None:
        self.batcher.close()

    # ------------------------------------------------------------------ txt2img
    def prepare(self, req: a1111.Txt2Img, client: str):
        """Validate everything and build the job (no engine work). Returns (job, info dict)."""
        from ..engine.engine import Request, check_request
        from .batcher import Job, Shape
        m = self.model
        a1111.check_inactive(req, self)
        sampler, schedule, engine_sched = a1111.resolve_sampler(req.sampler_name or req.sampler_index, req.scheduler)
        a1111.check_eta(req.eta, sampler)
        f = m.vae_scale_factor
        h, w = image_size(m, req.height, req.width)
        for name, v in (("width", w), ("height", h)):
            if v % f:
                raise FieldError(name, f"{v}: must be a multiple of {f}")
        truncs = a1111.truncations(req.truncation)
        n_seeds = req.batch_size * req.n_iter
        if n_seeds * len(truncs) > self.cfg.max_images:
            raise FieldError("batch_size", f"batch_size x n_iter x truncations = {n_seeds * len(truncs)} images; "
                             f"this server takes at most {self.cfg.max_images} per request")
        if req.seed < -1 or req.seed >= 2**63 - n_seeds:
            raise FieldError("seed", "must be -1 (random) or between 0 and 2^63 - 1")
        seed = random.randrange(2**32) if req.seed == -1 else req.seed
        seeds = [seed + i for i in range(n_seeds)]
        prompt, tables = self.store.resolve(req.prompt, req.concept)
        self.store.check_negative(req.negative_prompt)
        for t in truncs:
            if t is None:
                continue
            if not any(tb.truncatable for tb in tables.values()):
                raise FieldError("truncation", "applies to NeTI concepts, and the prompt names none"
                                 + (f" ({', '.join(tables)}: TI / XTI)" if tables else ""))
            for name, tb in tables.items():
                try:
                    tb.check(m, t, f"concept {name!r}")
                except NetiError as e:
                    raise FieldError("truncation", str(e)) from None
        with self.validate_lock:
            for t in truncs:
                try:
                    check_request(m, Request(prompt, 0, tables or None, t, req.negative_prompt))
                except NetiError as e:
                    raise FieldError("prompt", str(e)) from None
        requests = [Request(prompt, s, tables or None, t, req.negative_prompt) for t in truncs for s in seeds]
        shape = Shape(req.steps, h, w, engine_sched, float(req.cfg_scale))
        job = Job(shape, requests, client)
        if req.force_task_id:
            if req.force_task_id in self.batcher.jobs and not self.batcher.jobs[req.force_task_id].finished:
                raise FieldError("force_task_id", "a job with this id is running", 409)
            job.id = req.force_task_id
        info = dict(req=req, prompts=[req.prompt] * len(requests), seeds=[r.seed for r in requests],
                    truncs=[r.truncation for r in requests], width=w, height=h, sampler=sampler, schedule=schedule,
                    engine_scheduler=engine_sched, model=self.model_name, concepts=list(tables))
        return job, info

    # ------------------------------------------------------------------ uploads
    def add_upload(self, filename: str, data: bytes, name: str | None) -> list[str]:
        import uuid

        from ..utils import atomic_write
        from .concepts import NAME_RE, SUFFIXES, clean_name
        suffix = Path(filename or "").suffix.lower()
        if suffix not in SUFFIXES:
            raise FieldError("file", f"{filename!r}: expected a concept file ({', '.join(SUFFIXES)})")
        name = (name or "").strip() or clean_name(Path(filename).stem)
        if not NAME_RE.match(name):
            raise FieldError("name", f"{name!r}: must be 1-64 of A-Z a-z 0-9 _ . + -")
        if name in self.store.names():
            raise FieldError("name", f"{name!r} is already a concept here; give another name", 409)
        folder = self.state_dir / "uploads"
        # Never the client's file name on disk: a server-chosen one in the server's folder.
        raw = folder / f".{uuid.uuid4().hex}{suffix}"
        atomic_write(raw, lambda tmp: Path(tmp).write_bytes(data))
        try:
            names = self.store.add_file(raw, name, "upload")
        except NetiError as e:
            raw.unlink(missing_ok=True)
            raise FieldError("file", str(e)) from None
        # Kept as safetensors under a name a restart lists again; a pickle never stays on disk.
        final = folder / f"{name}.safetensors"
        if final.exists() or len(names) != 1:  # never over a file already there (one a restart skipped)
            final = folder / f"{name if len(names) == 1 else 'bundle'}-{raw.stem.lstrip('.')[:8]}.safetensors"
        if suffix != ".safetensors":
            self.store.get(name).concept.save(final)
            raw.unlink()
        else:
            raw.rename(final)
        self.store.moved(raw, final)
        return names


# ----------------------------------------------------------------------------- the app

def _error(message: str, field: str | None, status: int):
    return JSONResponse({"error": message, "field": field}, status_code=status)


def _png_b64(img) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class ApiKeyMiddleware:
    """Every route but /health needs the key: `Authorization: Bearer KEY`, `X-API-Key: KEY`, or HTTP
    Basic with KEY as the password (A1111 clients' --api-auth; browsers ask for it themselves)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    def _ok(self, headers: dict) -> bool:
        auth = headers.get(b"authorization", b"")
        given = headers.get(b"x-api-key")
        if given is None and auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        if given is None and auth[:6].lower() == b"basic ":
            try:
                given = base64.b64decode(auth[6:].strip()).split(b":", 1)[1]
            except (ValueError, IndexError):
                given = None
        return given is not None and hmac.compare_digest(given, self.key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health" or self._ok(dict(scope["headers"])):
            return await self.app(scope, receive, send)
        body = json.dumps({"error": "this server needs its API key (Authorization: Bearer KEY, X-API-Key, "
                                    "or HTTP Basic with the key as password)", "field": "api_key"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b'Basic realm="neti-fast"')]})
        await send({"type": "http.response.body", "body": body})


def create_app(server: Server):
    @asynccontextmanager
    async def lifespan(_app):
        yield
        server.close()

    app = FastAPI(title="neti-fast", version="0.1.0", lifespan=lifespan)
    app.state.server = server
    cfg = server.cfg

    @app.exception_handler(FieldError)
    async def _field_error(_request, e: FieldError):
        return _error(str(e), e.field, e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request, e: RequestValidationError):
        errs = e.errors()
        loc = [str(x) for x in errs[0].get("loc", ()) if x not in ("body", "query", "path", "form")] if errs else []
        field = ".".join(loc) or None
        return _error(f"{field or 'request'}: {errs[0].get('msg') if errs else 'invalid'}", field, 422)

    @app.exception_handler(HTTPException)
    async def _http(_request, e: HTTPException):
        return _error(str(e.detail), None, e.status_code)

    @app.exception_handler(Exception)
    async def _bug(_request, e: Exception):
        log.error("unhandled error", exc_info=e)
        return _error(f"internal error ({type(e).__name__}); the server log has the details", None, 500)

    async def _json_body(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise FieldError("body", "is not valid JSON") from None
        if not isinstance(body, dict):
            raise FieldError("body", "must be a JSON object")
        return body

    def _client(request: Request) -> str:
        return request.client.host if request.client else ""

    # ------------------------------------------------------------------ A1111 routes
    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        body = await _json_body(request)
        try:
            req = a1111.Txt2Img.model_validate(body)
        except ValidationError as e:
            err = e.errors()[0]
            loc = err.get("loc", ())
            field = str(loc[0]) if loc else "body"  # the request field (later parts name union members)
            raise FieldError(field, f"{err.get('msg', 'invalid')} (got {err.get('input')!r})"[:300]) from None
        job, info = await run_in_threadpool(server.prepare, req, _client(request))
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
                return _error(f"the engine failed on this request ({type(job.error).__name__}: {job.error})", None, 500)
            if job.interrupted:  # A1111 answers an interrupted job with what it finished
                keep = [i for i, im in enumerate(job.images) if im is not None]
                info.update({k: [info[k][i] for i in keep] for k in ("prompts", "seeds", "truncs")})
                job.images = [job.images[i] for i in keep]
            images = await run_in_threadpool(lambda: [_png_b64(i) for i in job.images]) if req.send_images else []
            return {"images": images, "parameters": req.model_dump(), "info": a1111.info_json(**info)}
        finally:
            job.release()  # recent jobs stay listed for /progress, without their images

    @app.get("/sdapi/v1/progress")
    async def progress(request: Request, id_task: str | None = None, skip_current_image: bool = False):
        jobs = server.batcher.jobs
        job = jobs.get(id_task) if id_task else None
        if job is None and not id_task:
            mine = [j for j in list(jobs.values()) if j.client == _client(request) and not j.finished]  # list(): one C call, safe beside the worker
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
        return {"progress": p, "eta_relative": eta, "state": state, "current_image": None, "textinfo": text}

    @app.post("/sdapi/v1/interrupt")
    async def interrupt(request: Request, id_task: str | None = None):
        """The caller's unfinished jobs (or the one `id_task` names) stop; each answers with the images
        it finished (A1111 interrupts the one job it runs; here every caller has their own)."""
        jobs = list(server.batcher.jobs.values())
        mine = [j for j in jobs if not j.finished and (j.id == id_task if id_task else j.client == _client(request))]
        for j in mine:
            server.batcher.interrupt(j)
        return {"interrupted": [j.id for j in mine]}

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return a1111.samplers_list()

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return a1111.schedulers_list()

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [{"title": server.model_title, "model_name": server.model_name, "hash": None, "sha256": None,
                 "filename": server.model_name, "config": None}]

    def _options() -> dict:
        return {"sd_model_checkpoint": server.model_title, "sd_checkpoint_hash": None, "CLIP_stop_at_last_layers": 1,
                "samples_format": "png", "eta_ancestral": 1.0, "eta_noise_seed_delta": 0}

    @app.get("/sdapi/v1/options")
    async def options():
        return _options()

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        body = await _json_body(request)
        for k, v in body.items():
            check = a1111.OVERRIDES.get(k)
            if check is None or not check(v, server):
                raise FieldError(k, f"neti-fast cannot change this setting to {v!r} (one model per server: "
                                 "start another server for another model)")
        return None

    @app.get("/sdapi/v1/cmd-flags")
    async def cmd_flags():
        return {"api": True, "listen": not is_loopback(cfg.host), "port": cfg.port}

    @app.get("/sdapi/v1/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/script-info")
    async def script_info():
        return []

    # What A1111 lists and neti-fast has none of (clients probe these to fill their menus).
    def _none_of(path: str, value):
        app.add_api_route(path, lambda: value, methods=["GET"])
    for path in ("latent-upscale-modes", "prompt-styles", "face-restorers", "hypernetworks", "sd-vae", "loras"):
        _none_of(f"/sdapi/v1/{path}", [])
    _none_of("/sdapi/v1/upscalers", [{"name": "None", "model_name": None, "model_path": None, "model_url": None,
                                      "scale": 4}])

    @app.get("/sdapi/v1/embeddings")
    async def embeddings():
        return server.store.embeddings()

    @app.post("/sdapi/v1/refresh-embeddings")
    async def refresh_embeddings():
        await run_in_threadpool(server.store.scan)
        return None

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued_images": server.batcher.queued_images()}

    # ------------------------------------------------------------------ neti-fast routes and page
    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/neti/info")
    async def info():
        from .training import train_defaults
        m = server.model
        return {"model": server.model_name, "default_size": m.default_size, "size_multiple": m.vae_scale_factor,
                "max_batch": cfg.max_batch, "max_images": cfg.max_images, "samplers": [s.name for s in a1111.SAMPLERS],
                "concepts": server.store.embeddings()["loaded"], "train_defaults": train_defaults(server.model_name),
                "max_upload_mb": cfg.max_upload_mb}

    async def _read_limited(upload: UploadFile, limit: int, field: str) -> bytes:
        chunks, size = [], 0
        while True:
            chunk = await upload.read(1 << 20)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                raise FieldError(field, f"{upload.filename}: larger than the server's limit of {limit // 2**20} MB", 413)
            chunks.append(chunk)

    @app.post("/neti/concepts")
    async def upload_concept(file: UploadFile = File(...), name: str | None = Form(None)):
        data = await _read_limited(file, cfg.max_upload_mb * 2**20, "file")
        names = await run_in_threadpool(server.add_upload, file.filename or "", data, name)
        return {"added": names, "concepts": server.store.embeddings()["loaded"]}

    @app.post("/neti/train")
    async def start_training(images: list[UploadFile] = File(...), placeholder: str = Form(...),
                             init_word: str = Form(...), steps: int | None = Form(None), method: str = Form("neti")):
        from .training import MAX_IMAGE_BYTES, MAX_IMAGES
        if len(images) > MAX_IMAGES:
            raise FieldError("images", f"at most {MAX_IMAGES} images")
        files = [(u.filename or f"image-{i}", await _read_limited(u, MAX_IMAGE_BYTES, "images")) for i, u in enumerate(images)]
        job = await run_in_threadpool(server.trainer.start, files, placeholder, init_word, steps, method)
        return job.describe()

    @app.get("/neti/train/{job_id}")
    async def training_status(job_id: str):
        job = server.trainer.jobs.get(job_id)
        if job is None:
            raise FieldError("job_id", f"{job_id!r}: no such training run", 404)
        return job.describe()

    if cfg.api_key:
        app.add_middleware(ApiKeyMiddleware, key=cfg.api_key)
    return app
