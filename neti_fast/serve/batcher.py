"""The one request queue: concurrent users' images packed into shared engine batches.

Every request becomes a Job of images (one `engine.Request` each: prompt, seed, concepts,
truncation, init image). A worker thread takes the oldest waiting image, waits until `max_wait_ms` after its
arrival (or until `max_batch` compatible images wait), and runs every waiting image whose Shape
(steps, size, scheduler, guidance, eta, where the schedule starts and the context length: what one
denoising loop must share; init images, masks and strengths of one start need not) matches, up to `max_batch`,
as one `Engine.generate_batch` - whatever their prompts, concepts and truncations. The packing is
the engine's (`Engine.kv_tables`); this module only decides who rides together.

Independence: an image's noise comes only from its own seed (engine.sampling.image_generators), so what
shares its batch never changes it. That is what makes the two failure rules cheap:
- a batch that raises is re-run one job at a time, so a request that fails inside the engine fails
  alone and its batch-mates still get the same images;
- a cancelled job (its client went away) has its waiting images dropped; a running batch whose
  jobs are all cancelled stops at its next step, one with live batch-mates finishes and the
  cancelled job's images are discarded. Nothing waits on a gone client;
- an interrupted job (A1111's /interrupt) is answered at the next step with its images as far as
  they are denoised (decoded from the batch's latents), as A1111 answers; its batch-mates go on.
While a job runs, `Job.preview` holds the batch's latest latents and the job's first row in them:
/progress draws its `current_image` from them only when asked (engine.sampling.preview).
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field, replace

log = logging.getLogger("neti_fast.serve")


class Abandoned(Exception):
    """Every job of the running batch was cancelled: the denoising loop stops at the next step."""


@dataclass(frozen=True)
class Shape:
    steps: int
    height: int
    width: int
    scheduler: str
    guidance: float
    eta: float | None = None            # DDIM's eta (one per denoising loop)
    start: int = 0                      # the step the schedule starts at (img2img: N - int(N x strength))
    context: int = 1                    # CLIP chunks of 77 tokens in its K / V (engine.request.context_chunks)


@dataclass(eq=False)  # identity: a job is hashed and compared as itself
class Job:
    shape: Shape
    requests: list                      # engine.Request per image
    client: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    images: list = field(default_factory=list)
    error: BaseException | None = None
    cancelled: bool = False
    interrupted: bool = False           # /sdapi/v1/interrupt: answered with the images done so far
    finished: bool = False
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    done_images: int = 0
    running_images: int = 0             # images of this job in the batch now running
    step: int = 0
    steps: int = 0
    preview: tuple | None = None        # (the running batch's latents, this job's first row), per step
    on_done: object = None              # called (from the worker thread) once the job is finished

    def __post_init__(self):
        self.images = [None] * len(self.requests)
        self.total = len(self.requests)

    def release(self) -> None:
        """Drop the images and requests (the answer is sent): the job stays listed for /progress only."""
        self.images, self.requests, self.preview = [], [], None

    @property
    def progress(self) -> float:
        n = self.total
        if self.finished:
            return 1.0
        frac = self.step / self.steps if self.steps else 0.0
        return min(1.0, (self.done_images + self.running_images * frac) / max(1, n))

    def _finish(self, error: BaseException | None = None) -> None:
        if self.finished:
            return
        self.error, self.finished = error, True
        if self.on_done is not None:
            try:
                self.on_done(self)
            except Exception:  # the waiter's loop may be closed: nothing to tell
                log.debug("on_done failed", exc_info=True)


@dataclass
class _Item:
    job: Job
    index: int
    arrived: float


class Batcher:
    """Owns the engine (one thread uses it); `submit` from any thread."""

    def __init__(self, engine, max_batch: int = 16, max_wait_ms: float = 50.0):
        self.engine, self.base_cfg = engine, engine.cfg
        self.max_batch, self.max_wait = max(1, max_batch), max(0.0, max_wait_ms) / 1000.0
        self._cv = threading.Condition()
        self._pending: list[_Item] = []
        self._stop = False
        self.batch_sizes: list[int] = []      # images per engine batch run (stats, tests, bench)
        self.batch_jobs: list[int] = []       # distinct jobs per engine batch
        self.abandoned = 0                    # batches stopped early: all their clients went away
        self.jobs: dict[str, Job] = {}        # recent jobs by id (progress)
        self._thread = threading.Thread(target=self._run, name="neti-fast-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ client side
    def submit(self, job: Job) -> Job:
        now = time.monotonic()
        with self._cv:
            if self._stop:
                raise RuntimeError("the server is shutting down")
            self.jobs[job.id] = job
            self._forget_old()
            self._pending.extend(_Item(job, i, now) for i in range(len(job.requests)))
            self._cv.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        with self._cv:
            job.cancelled = True
            self._pending = [it for it in self._pending if it.job is not job]
        job._finish(ConnectionAbortedError("the client went away"))  # (a batch running it drops its images)

    def interrupt(self, job: Job) -> None:
        """Stop `job` as A1111's interrupt does: its waiting images are dropped; if it has images in
        the running batch, the worker answers it at the next step with them partly denoised (a batch
        of only it then stops), else it is answered now with the images finished so far."""
        with self._cv:
            if job.finished:
                return
            job.cancelled = job.interrupted = True
            self._pending = [it for it in self._pending if it.job is not job]
            running = job.running_images > 0
        if not running:
            job._finish()

    def queued_images(self) -> int:
        with self._cv:
            return len(self._pending)

    def close(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout)

    def _forget_old(self, keep: int = 1000) -> None:
        if len(self.jobs) > keep:
            for jid in [j for j, jb in self.jobs.items() if jb.finished][: len(self.jobs) - keep]:
                del self.jobs[jid]

    # ------------------------------------------------------------------ worker
    def _take(self) -> list[_Item] | None:
        """Wait for work; return the next batch (oldest image's shape, up to max_batch)."""
        with self._cv:
            while True:
                while not self._pending and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return None
                first = self._pending[0]
                deadline = first.arrived + self.max_wait
                while not self._stop:
                    same = sum(1 for it in self._pending if it.job.shape == first.job.shape)
                    left = deadline - time.monotonic()
                    if same >= self.max_batch or left <= 0:
                        break
                    self._cv.wait(left)
                if not self._pending or self._pending[0] is not first:
                    continue  # the first job was cancelled meanwhile: start over
                shape, batch, rest = first.job.shape, [], []
                for it in self._pending:
                    (batch if it.job.shape == shape and len(batch) < self.max_batch else rest).append(it)
                self._pending = rest
                return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._run_batch(batch)
            except BaseException as e:  # never let the worker die: fail what it held
                log.exception("batch failed outside the engine")
                for it in batch:
                    it.job._finish(e)

    def _generate(self, items: list[_Item]):
        shape = items[0].job.shape
        self.engine.cfg = replace(self.base_cfg, steps=shape.steps, height=shape.height, width=shape.width,
                                  scheduler=shape.scheduler, guidance=shape.guidance, eta=shape.eta,
                                  batch_size=self.max_batch)
        jobs = list(dict.fromkeys(it.job for it in items))
        now = time.monotonic()
        for j in jobs:
            j.started = j.started or now
            j.running_images = sum(1 for it in items if it.job is j)
            j.step, j.steps = 0, shape.steps

        reqs = [it.job.requests[it.index] for it in items]
        first = {}
        for row, it in enumerate(items):
            first.setdefault(it.job, row)

        def on_step(done: int, total: int, latents) -> None:
            for j in jobs:
                j.step, j.steps, j.preview = done, total, (latents, first[j])
                if j.interrupted and not j.finished:
                    self._answer_partial(j, items, reqs, latents)
            if all(j.cancelled for j in jobs):
                raise Abandoned
        try:
            return self.engine.generate_batch(reqs, on_step=on_step)
        finally:
            for j in jobs:
                j.running_images, j.preview = 0, None

    def _answer_partial(self, job: Job, items: list[_Item], reqs: list, latents) -> None:
        """An interrupted job's rows of the batch, decoded as far as they are denoised."""
        rows = [r for r, it in enumerate(items) if it.job is job]
        images = self.engine.finish(latents[rows], [reqs[r] for r in rows])
        for r, img in zip(rows, images):
            job.images[items[r].index] = img
        job._finish()

    def _deliver(self, items: list[_Item], images) -> None:
        for it, img in zip(items, images):
            job = it.job
            if job.finished or (job.cancelled and not job.interrupted):
                continue
            job.images[it.index] = img
            job.done_images += 1
            if job.done_images == job.total:
                job._finish()

    def _run_batch(self, items: list[_Item]) -> None:
        items = [it for it in items if not it.job.cancelled]
        if not items:
            return
        try:
            self._run_items(items)
        finally:  # interrupted after its last step (or its batch failed): answered with what it has
            for job in dict.fromkeys(it.job for it in items):
                if job.interrupted:
                    job._finish()

    def _run_items(self, items: list[_Item]) -> None:
        jobs = list(dict.fromkeys(it.job for it in items))
        self.batch_sizes.append(len(items))
        self.batch_jobs.append(len(jobs))
        try:
            self._deliver(items, self._generate(items))
            return
        except Abandoned:
            self.abandoned += 1
            return
        except Exception as e:
            if len(jobs) == 1:
                self._fail(jobs[0], e)
                return
            log.warning("a batch of %d jobs failed (%s); re-running them one at a time", len(jobs), e)
        for job in jobs:  # one request's failure must not take its batch-mates with it
            mine = [it for it in items if it.job is job]
            if job.cancelled:
                continue
            try:
                self._deliver(mine, self._generate(mine))
            except Abandoned:
                self.abandoned += 1
            except Exception as e:
                self._fail(job, e)

    @staticmethod
    def _fail(job: Job, e: Exception) -> None:
        from ..errors import NetiError
        if not isinstance(e, NetiError):
            log.error("job %s failed in the engine", job.id, exc_info=e)
        job._finish(e)
