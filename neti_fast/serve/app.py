"""The server's state and the FastAPI app.

`Server` holds the state (model, engine, concepts, queue, trainer) and validates txt2img requests;
`create_app(server)` builds the app from the route modules (routes_a1111.py, routes_neti.py,
routes_page.py; shared HTTP pieces in http.py). Every error is JSON {"error": one line, "field": the request field or null}: a FieldError
(4xx) for what the client sent, 500 with a one-line message for a bug (traceback in the log only).
"""
from __future__ import annotations

import logging
import random
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from ..errors import NetiError
from . import a1111
from .a1111 import FieldError
from .http import ApiKeyMiddleware, error_response, is_loopback
from . import routes_a1111, routes_neti, routes_page

log = logging.getLogger("neti_fast.serve")


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
    outputs: str | None = None           # where save_images writes (PNGs + manifest.jsonl); None: state_dir/outputs
    max_upload_mb: int = 256             # concept uploads (a full SD table with truncations is ~100-300 MB)
    cache_mb: int = 2048                 # prepared conditionings (the engine's cache)
    concept_cache_mb: int = 1024         # loaded concept tables
    max_images: int = 64                 # per request: batch_size x n_iter x truncations
    attention: str = "auto"
    # training runs (/neti/train) recompute activations in the backward pass: less memory beside the
    # served model (whose dtypes training uses as they are: --dtype for the U-Net, VAE and text encoders)
    train_gradient_checkpointing: bool = False


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
        from ..engine.engine import Engine
        from ..engine.request import GenerateConfig
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
        # A1111 lists a checkpoint with a short hash of its file; a model here may be a folder or a hub
        # id, so the hash names the model (an identifier for clients, not a checksum of its weights)
        import hashlib
        self.model_hash = hashlib.sha256(cfg.model.encode()).hexdigest()[:10]
        self.model_names = (self.model_title, self.model_name, self.model_hash)  # what selects it (A1111's aliases)
        self.outputs = Path(cfg.outputs) if cfg.outputs else Path(cfg.state_dir) / "outputs"
        self._save_lock = threading.Lock()
        # Slot tokens are added to the tokenizer on first use; adding them now means request
        # validation (HTTP threads) and the engine (worker thread) only ever read the tokenizer
        # (128: a prompt's concepts' vectors, multi-vector embeddings taking one slot each).
        for k in range(128):
            ensure_placeholder(model.tokenizer, slot_token(k))
        self.validate_lock = threading.Lock()
        self._schedules_ok: set = set()   # (engine scheduler, steps) that check_scheduler accepted
        self.state_dir = Path(cfg.state_dir)
        self.store = ConceptStore(model, cfg.concepts, cfg.concept_cache_mb)
        self.store.scan()
        self._state_lock = threading.Lock()   # an upload is renamed and listed before a sync looks
        self._stamp = self._shared_stamp()
        self.load_state()  # what earlier runs of this server (or other replicas) added
        gcfg = GenerateConfig(cache_mb=cfg.cache_mb, batch_size=cfg.max_batch, attention=cfg.attention)
        self.engine = Engine(model, gcfg)
        self.batcher = Batcher(self.engine, cfg.max_batch, cfg.max_wait_ms)
        self.trainer = Trainer(cfg.model, str(model.device), self.dtype, self.state_dir, self.store,
                               gradient_checkpointing=cfg.train_gradient_checkpointing)

    def close(self) -> None:
        self.batcher.close()

    # ------------------------------------------------------------------ txt2img
    def prepare(self, req: a1111.Txt2Img, client: str):
        """Validate everything and build the job (no engine work). Returns (job, info dict). An
        Img2Img request is a txt2img one plus its init images (a1111.init_inputs), and its schedule's
        start (Shape.start: what lets it share a U-Net batch)."""
        from ..engine.request import GenerateConfig, Request, check_request, check_size, context_chunks
        from .batcher import Job, Shape
        from ..engine.sampling import check_scheduler
        from ..utils import image_size
        m = self.model
        ignored = a1111.check_extra(req)
        sampler, schedule, engine_sched = a1111.resolve_sampler(req.sampler_name or req.sampler_index, req.scheduler)
        clip_skip, eta, crop, ignored_ov = a1111.request_settings(req, sampler, self)
        ignored += ignored_ov
        img2img = isinstance(req, a1111.Img2Img)
        a1111.note_ignored([f for f in ignored if not f.startswith("override_settings.")],
                           "img2img" if img2img else "txt2img")
        try:
            if (engine_sched, req.steps) not in self._schedules_ok:  # building one costs ms: once per pair
                check_scheduler(engine_sched, m.scheduler_config, req.steps)
                self._schedules_ok.add((engine_sched, req.steps))
        except NetiError as e:  # a scheduler needing a package the server lacks is the client's choice of sampler
            raise FieldError("sampler_name" if e.field == "scheduler" else e.field, e.detail()) from None
        # A1111's sizes: what the request asks (default: the model's native size, a1111.Txt2Img), the
        # image that size rounded down to the VAE's factor (A1111's latents are height // 8 x width // 8)
        asked_h, asked_w = image_size(m, req.height, req.width)
        f = m.vae_scale_factor
        try:
            h, w = check_size(m, asked_h // f * f, asked_w // f * f)
        except NetiError as e:
            raise FieldError(e.field, e.detail()) from None
        # SDXL's micro-conditioning as A1111 gives it: original and target size = the size asked,
        # crop top-left from the sdxl_crop_top / sdxl_crop_left options (0, 0)
        time_ids = ((asked_h, asked_w, *crop, asked_h, asked_w) if "time_ids" in m.family.added_conditioning
                    else None)
        inits, start = [None], 0
        if img2img:
            from ..engine.img2img import schedule_start
            try:
                start = schedule_start(req.steps, req.denoising_strength)
            except NetiError as e:
                raise FieldError("denoising_strength", e.detail()) from None
            inits = a1111.init_inputs(req, w, h)
            if len(inits) > 1:
                req.batch_size = len(inits)   # A1111: several init images are the batch
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
        # A1111's prompt syntax always, as A1111: emphasis, BREAK, prompts longer than 75 tokens
        with self.validate_lock:  # the engine's one request check; its field is the API's field
            for t in truncs:
                try:
                    check_request(m, Request(prompt, 0, tables or None, t, req.negative_prompt, clip_skip,
                                             prompt_syntax="a1111"))
                except NetiError as e:
                    field = e.field or "prompt"
                    if field == "clip_skip" and req.clip_skip is None:
                        field = "override_settings.CLIP_stop_at_last_layers"
                    raise FieldError(field, e.detail()) from None
            requests = [Request(prompt, s, tables or None, t, req.negative_prompt, clip_skip, inits[i % len(inits)],
                                prompt_syntax="a1111", time_ids=time_ids) for t in truncs for i, s in enumerate(seeds)]
            context = context_chunks(m, requests[0], GenerateConfig(guidance=float(req.cfg_scale)))
        shape = Shape(req.steps, h, w, engine_sched, float(req.cfg_scale), eta, start, context)
        job = Job(shape, requests, client)
        if req.force_task_id:
            if req.force_task_id in self.batcher.jobs and not self.batcher.jobs[req.force_task_id].finished:
                raise FieldError("force_task_id", "a job with this id is running", 409)
            job.id = req.force_task_id
        info = dict(req=req, prompts=[req.prompt] * len(requests), seeds=[r.seed for r in requests],
                    truncs=[r.truncation for r in requests], width=asked_w, height=asked_h, image_width=w,
                    image_height=h, sampler=sampler, schedule=schedule,
                    engine_scheduler=engine_sched, model=self.model_name, concepts=list(tables), clip_skip=clip_skip,
                    eta=eta, ignored=ignored)
        return job, info

    def save_outputs(self, images: list, info: dict) -> list[str]:
        """save_images: each PNG written (atomically) into the output folder and recorded in its
        manifest.jsonl, the format `neti-fast generate` / `run` write (jobs/manifest.py). Returns the
        file names, relative to the folder; numbering goes on from the files already there."""
        from ..jobs import manifest, outputs
        from ..utils import dtype_name
        req = info["req"]
        with self._save_lock:  # concurrent requests: distinct numbers, whole manifest lines
            taken = [p.name.split("-", 1)[0] for p in self.outputs.glob("*.png")] if self.outputs.is_dir() else []
            n = max([int(x) for x in taken if x.isdigit()] or [-1]) + 1
            entries = []
            for img, prompt, seed, trunc in zip(images, info["prompts"], info["seeds"], info["truncs"]):
                name = outputs.image_name(n, prompt, trunc, seed, digits=5)
                n += 1
                outputs.save_png(self.outputs / name, img)
                entries.append({"file": name, "line": None, "prompt": prompt, "concept": req.concept, "seed": seed,
                                "truncation": trunc, "negative_prompt": req.negative_prompt, "steps": req.steps,
                                "guidance": float(req.cfg_scale), "scheduler": info["engine_scheduler"],
                                "height": info["image_height"], "width": info["image_width"], "model": self.model_name,
                                "dtype": dtype_name(self.dtype), "status": "done", "sampler_name": info["sampler"].name,
                                "schedule": info["schedule"], "clip_skip": info["clip_skip"], "eta": info["eta"],
                                "concepts": info["concepts"]})
            manifest.append(self.outputs / manifest.MANIFEST, entries)
        return [e["file"] for e in entries]

    # ------------------------------------------------------------------ state shared by replicas
    REFRESHED = "concepts.refreshed"  # touched after a rescan of --concepts: the other replicas rescan too

    def load_state(self) -> None:
        """List the uploads and trained concepts of state_dir not listed yet."""
        with self._state_lock:
            for origin in ("uploads", "trained"):
                folder = self.state_dir / origin
                for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
                    if path.name.startswith(".") or path.name in self.store.skipped:
                        continue  # .name: an upload being written
                    try:
                        self.store.add_file(path, path.stem, "upload" if origin == "uploads" else origin)
                    except NetiError as e:
                        self.store.skipped[path.name] = str(e)

    def _shared_stamp(self) -> tuple:
        def mtime(p: Path):
            try:
                return p.stat().st_mtime_ns
            except OSError:
                return None
        return tuple(mtime(self.state_dir / n) for n in ("uploads", "trained", self.REFRESHED))

    def sync_shared(self) -> None:
        """Replicas sharing one state_dir (neti_fast.serve.ray_app): take in what another replica
        added or rescanned. Three stat calls when nothing changed, so it runs before every request."""
        stamp = self._shared_stamp()
        if stamp == self._stamp:
            return
        if stamp[2] != self._stamp[2]:
            self.store.scan()
        self._stamp = stamp  # before reading: a change made meanwhile is seen next time
        self.load_state()

    def mark_refreshed(self) -> None:
        """This replica rescanned --concepts (/sdapi/v1/refresh-embeddings): the others follow."""
        from ..utils import atomic_write
        atomic_write(self.state_dir / self.REFRESHED, lambda tmp: Path(tmp).write_text(str(time.time())))

    # ------------------------------------------------------------------ uploads
    def add_upload(self, filename: str, data: bytes, name: str | None) -> list[str]:
        with self._state_lock:
            return self._add_upload(filename, data, name)

    def _add_upload(self, filename: str, data: bytes, name: str | None) -> list[str]:
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
            # the loaders name the file they read: the client's name, not the server's path, is the one to show
            shown = Path(filename).name
            raise FieldError("file", str(e).replace(str(raw), shown).replace(raw.name, shown)) from None
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
        return error_response(str(e), e.field, e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request, e: RequestValidationError):
        errs = e.errors()
        loc = [str(x) for x in errs[0].get("loc", ()) if x not in ("body", "query", "path", "form")] if errs else []
        field = ".".join(loc) or None
        return error_response(f"{field or 'request'}: {errs[0].get('msg') if errs else 'invalid'}", field, 422)

    @app.exception_handler(HTTPException)
    async def _http(_request, e: HTTPException):
        return error_response(str(e.detail), None, e.status_code)

    @app.exception_handler(Exception)
    async def _bug(_request, e: Exception):
        log.error("unhandled error", exc_info=e)
        return error_response(f"internal error ({type(e).__name__}); the server log has the details", None, 500)

    for routes in (routes_a1111, routes_neti, routes_page):  # handlers read app.state.server
        app.include_router(routes.router)
    if cfg.api_key:
        app.add_middleware(ApiKeyMiddleware, key=cfg.api_key)
    return app
