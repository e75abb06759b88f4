"""Training from the page: one background run at a time on the server's device.

The run trains on its own copy of the model (the serving model's attention processors stay bound to
the engine, so generation goes on meanwhile), from uploaded images that are decoded and re-saved
as PNG under the server's state folder (never under a client-chosen name). When it finishes, the
concept is copied into `<state>/trained/` and joins the server's concepts.

Settings are official NeTI's (train.TrainConfig) except on the built-in `tiny` model, where the
default is a short run (a demo of the workflow, as `neti-fast demo` does). The page sees the run's
step, loss, ETA and a validation grid at each quarter of the run (the official four prompts x two
seeds, 25 steps; `GET /neti/train/{id}/validation.png`).
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import NetiError
from .a1111 import FieldError

log = logging.getLogger("neti_fast.serve")

MIN_IMAGES, MAX_IMAGES = 1, 8
STATUS = "status.json"
LOCK = ".training.lock"  # flock-ed while a run goes on: one run per state folder, whichever replica has it
JOB_ID = re.compile(r"^[0-9a-f]{12}$")
MAX_IMAGE_BYTES = 20 * 2**20


@dataclass
class TrainJob:
    id: str
    placeholder: str
    init_word: str
    steps: int
    state: str = "running"            # running | done | failed
    step: int = 0
    loss: float | None = None
    error: str | None = None
    concept: str | None = None        # the name it joined the list under
    eta_s: float | None = None        # seconds left, from the mean time per step so far
    validation_step: int | None = None  # the step of the latest validation grid
    started: float = field(default_factory=time.time)
    finished: float | None = None
    validation_path: Path | None = None

    def describe(self) -> dict:
        d = asdict(self)
        d.pop("validation_path", None)  # a server-side path: never shown
        d["progress"] = 1.0 if self.state == "done" else (self.step / self.steps if self.steps else 0.0)
        return d

    def save(self, run_dir: Path) -> None:
        """status.json in the run's folder: what another replica sharing the state folder answers."""
        from ..utils import atomic_write
        d = asdict(self)
        d["validation_path"] = self.validation_path.name if self.validation_path else None
        atomic_write(run_dir / STATUS, lambda tmp: Path(tmp).write_text(json.dumps(d)))

    @classmethod
    def read(cls, run_dir: Path) -> "TrainJob":
        d = json.loads((run_dir / STATUS).read_text())
        d["validation_path"] = run_dir / d["validation_path"] if d.get("validation_path") else None
        return cls(**d)


def train_defaults(model_spec: str) -> dict:
    from ..training.config import TrainConfig
    if model_spec == "tiny":
        return {"steps": 30, "batch_size": 2, "grad_accum": 1}
    c = TrainConfig()
    return {"steps": c.steps, "batch_size": c.batch_size, "grad_accum": c.grad_accum}


class Trainer:
    def __init__(self, model_spec: str, device: str, dtype, state_dir: Path, store, gradient_checkpointing: bool = False):
        self.model_spec, self.device, self.dtype = model_spec, device, dtype
        self.gradient_checkpointing = gradient_checkpointing  # serve --train-gradient-checkpointing
        self.state_dir, self.store = Path(state_dir), store
        self.jobs: dict[str, TrainJob] = {}
        self._lock = threading.Lock()
        self._running: TrainJob | None = None
        self._model = None
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None

    def _take_lock(self) -> int | None:
        """The state folder's training lock (flock: the kernel drops it if this process dies), or None."""
        import fcntl
        path = self.state_dir / "train" / LOCK
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError:
            os.close(fd)
            return None

    def job(self, job_id: str) -> TrainJob | None:
        """A run by id: this process's, or one another replica sharing the state folder runs / ran."""
        if job_id in self.jobs or not JOB_ID.match(job_id):
            return self.jobs.get(job_id)
        run_dir = self.state_dir / "train" / job_id
        try:
            job = TrainJob.read(run_dir)
        except (OSError, ValueError, TypeError):
            return None
        if job.state == "running":  # its replica died if nobody holds the lock any more
            fd = self._take_lock()
            if fd is not None:
                os.close(fd)
                job.state, job.error = "failed", "the replica running it stopped"
        return job

    def start(self, images: list[tuple[str, bytes]], placeholder: str, init_word: str, steps: int | None,
              method: str = "neti") -> TrainJob:
        placeholder, init_word = (placeholder or "").strip(), (init_word or "").strip()
        if not placeholder or len(placeholder) > 40 or any(c.isspace() for c in placeholder):
            raise FieldError("placeholder", "give a new token of 1-40 characters without spaces, e.g. <my-cat>")
        if not init_word or len(init_word) > 40 or any(c.isspace() for c in init_word):
            raise FieldError("init_word", "give one word the concept starts from, e.g. cat")
        if method not in ("neti", "xti", "ti"):
            raise FieldError("method", "must be neti, xti or ti")
        if not MIN_IMAGES <= len(images) <= MAX_IMAGES:
            raise FieldError("images", f"give {MIN_IMAGES}-{MAX_IMAGES} images (3-5 is the usual)")
        defaults = train_defaults(self.model_spec)
        steps = defaults["steps"] if steps is None else steps
        if not 1 <= steps <= 100000:
            raise FieldError("steps", "must be between 1 and 100000")
        decoded = [_decode_image(name, data) for name, data in images]
        with self._lock:
            if self._running is not None:
                raise FieldError("train", f"a training run is going on ({self._running.placeholder}, "
                                 f"step {self._running.step}/{self._running.steps}); one at a time per device", 409)
            lock = self._take_lock()
            if lock is None:
                raise FieldError("train", "a training run is going on on another replica; one at a time", 409)
            job = TrainJob(uuid.uuid4().hex[:12], placeholder, init_word, steps)
            self.jobs[job.id], self._running, self._lock_fd = job, job, lock
        run_dir = self.state_dir / "train" / job.id
        try:
            img_dir = run_dir / "images"
            img_dir.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(decoded):
                img.save(img_dir / f"image-{i:02d}.png")
            job.save(run_dir)
        except BaseException:
            self._release()
            raise
        self._thread = threading.Thread(target=self._train, args=(job, run_dir, method, defaults),
                                        name="neti-fast-train", daemon=True)
        self._thread.start()
        return job

    def _train(self, job: TrainJob, run_dir: Path, method: str, defaults: dict) -> None:
        from ..utils import atomic_write
        from ..training.trainer import train
        from ..training.config import TrainConfig
        try:
            if self._model is None:
                from ..sd.models import load_model
                self._model = load_model(self.model_spec, device=self.device, dtype=self.dtype)
            cfg = TrainConfig(images=str(run_dir / "images"), placeholder=job.placeholder, init_word=job.init_word,
                              method=method, model=self.model_spec, out=str(run_dir / "out"), steps=job.steps,
                              batch_size=defaults["batch_size"], grad_accum=defaults["grad_accum"], save_every=0,
                              device=self.device, dtype=str(self.dtype).replace("torch.", ""),
                              validate_every=max(1, job.steps // 4), validation_seeds=[42, 420],
                              validation_steps=25, gradient_checkpointing=self.gradient_checkpointing)
            t0 = time.perf_counter()

            saved = [0.0]

            def on_step(step, loss, _trainable):
                job.step, job.loss = step, float(loss)
                job.eta_s = round((time.perf_counter() - t0) / step * (job.steps - step), 1)
                if time.monotonic() - saved[0] > 2.0:  # a status file for other replicas, not every step
                    job.save(run_dir)
                    saved[0] = time.monotonic()

            def on_validation(step, grid):
                job.validation_path, job.validation_step = grid, step
            path = train(cfg, model=self._model, progress=False, on_step=on_step, on_validation=on_validation)
            from .concepts import clean_name
            base = clean_name(job.placeholder)
            name, k = base, 2
            taken = set(self.store.names())
            trained = self.state_dir / "trained"
            while name in taken or (trained / f"{name}.safetensors").exists():  # never over an earlier file
                name, k = f"{base}-{k}", k + 1
            dest = trained / f"{name}.safetensors"
            data = Path(path).read_bytes()
            atomic_write(dest, lambda tmp: Path(tmp).write_bytes(data))
            self.store.add_file(dest, name, "trained")
            job.concept, job.state = name, "done"
        except NetiError as e:
            job.error, job.state = str(e), "failed"
        except Exception as e:  # a bug: keep the traceback in the server log, a line for the page
            log.exception("training %s failed", job.id)
            job.error, job.state = f"training failed: {type(e).__name__}: {e}", "failed"
        finally:
            job.finished = time.time()
            try:
                job.save(run_dir)
            except NetiError:
                log.warning("training %s: cannot write its status file", job.id)
            self._release()

    def _release(self) -> None:
        with self._lock:
            self._running = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # closing the descriptor releases the flock
                self._lock_fd = None

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)


def _decode_image(name: str, data: bytes):
    """Decode an upload as an image (Pillow), or a 422 naming it; never kept in the client's format."""
    from PIL import Image, UnidentifiedImageError
    if len(data) > MAX_IMAGE_BYTES:
        raise FieldError("images", f"{name}: larger than {MAX_IMAGE_BYTES // 2**20} MB", 413)
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > 40_000_000:
            raise FieldError("images", f"{name}: {img.width}x{img.height} is too many pixels")
        img.load()
        return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise FieldError("images", f"{name}: not an image Pillow can read") from None
