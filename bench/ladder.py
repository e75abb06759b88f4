"""`neti-fast bench`: the latency / throughput ladder, every rung measured side by side in one run.

    neti-fast bench [--model tiny] [--device cuda] [--dtype fp16] [--steps 50] [--batch-sizes 1 4 16]
                    [--rungs reference diffusers eager batched concepts triton compile onnx tensorrt]
                    [--repeats 3] [--json out.json] [--chart out.png] [--quick]
    python -m neti_fast.bench.ladder ...   (same arguments)

Same process, same model weights, same NeTI concept (a random mapper) and the same prompt for
every rung; the rungs, from the official algorithm to the fastest backend:

  reference  `generate_reference`: the official NeTI inference (steps x 16 one-at-a-time text
             encodes, an unconditional and a conditional batch-1 U-Net call per step, eager bmm
             attention); batch B = B seeds one after the other.
  diffusers  plain `StableDiffusionPipeline` (DPM-Solver++, no concept, diffusers' own attention
             processors, `num_images_per_prompt=B`): the floor that personalization should cost
             nothing over.
  eager      neti-fast Engine, PyTorch eager, batch size 1 (one seed at a time; the engine always
             runs both guidance halves in one U-Net call), SDPA attention.
  batched    Engine with batch size B: all seeds of the batch in one U-Net call, SDPA attention.
  concepts   batched, but each image of the batch has its own NeTI concept (B concepts in one
             U-Net call); the summary compares its U-Net ms/step with `batched` (one concept).
  triton     batched + the fused row-gather Triton cross-attention kernel (CUDA only).
  compile    batched + `torch.compile` of the U-Net, replayed as a CUDA graph per batch shape on CUDA
             (attention "auto"); GPU-only unless --compile-on-cpu (then no graphs).
  onnx       batched + the exported ONNX denoiser on onnxruntime (`neti_fast.export.onnx`).
  tensorrt   batched + a TensorRT engine built from that ONNX graph (`neti_fast.export.tensorrt`).

Per rung and batch size B (median of --repeats runs, after one warm-up run per rung):
  cond ms/prompt  cold text conditioning of one prompt (cache cleared): reference = its steps x 16
                  + 1 single encodes; engine rungs = `Engine.conditioning` + the negative prompt;
                  diffusers = `encode_prompt` (prompt + negative).
  unet ms/step    U-Net time to advance the whole batch of B images by one step (both guidance
                  halves; for reference and eager the sum of their sequential calls).
  img/s           B / end-to-end time of the batch, conditioning included (cold cache every run),
                  VAE decode included.
  latency-1 s     end-to-end seconds for one image at batch 1.
  peak mem        CUDA: torch.cuda.max_memory_allocated during the run, minus what was allocated
                  before it. CPU: peak RSS over the run minus RSS before it (psutil, sampled every
                  2 ms; without psutil, the growth of getrusage's max RSS, which is 0 unless the
                  process reaches a new high). The JSON says which (`memory_kind`).
  TFLOP/s         U-Net FLOPs (bench/flops.py, counted on this model at this resolution) / U-Net
                  time; `util` = that / --peak-tflops (default on CUDA: a measured large matmul;
                  none on CPU). The JSON also has `e2e_tflops`: U-Net + counted text-encoder rows
                  + VAE FLOPs / end-to-end time.
  speedup         img/s over the reference rung's img/s at the same batch size.

The summary's two target ratios are measured again after the ladder, the two sides' calls
alternated (`side_by_side`), so that drift of the machine between rungs does not enter them:
reference vs batched cold conditioning, and `concepts` vs `batched` U-Net ms per step at the largest
batch. The JSON keeps every alternated measurement under `side_by_side`.

Timing: CUDA events around every U-Net call and torch.cuda.synchronize around every measured
region on GPU; time.perf_counter on CPU. A rung that cannot run here is recorded with
`status: "skipped"` and the reason; a rung that fails is recorded with `status: "failed"`.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import threading
import time
import traceback
from pathlib import Path

import torch

RUNGS = ("reference", "diffusers", "eager", "batched", "concepts", "triton", "compile", "onnx", "tensorrt")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROMPT = "a photo of {}"                  # NeTI prompt (rungs with the concept)
PLAIN_PROMPT = "a photo of a dog"         # diffusers rung: no concept
GUIDANCE = 7.5
COMPILE_CPU_REASON = "torch.compile rung is GPU-only in the ladder (CPU inductor compile takes minutes)"
SCHEMA = "neti-fast-bench/1"


class Skip(Exception):
    """A rung that cannot run on this machine; the message is the reason."""


# ----------------------------------------------------------------------------- arguments

def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default="tiny", help="tiny | sd15-shaped | a diffusers folder (default tiny)")
    p.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default fp16 on cuda, fp32 on cpu")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; 4 with --quick)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 4 16 (1 4 with --quick)")
    p.add_argument("--height", type=int, default=None, help="default: the model's native size")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--rungs", nargs="+", choices=RUNGS, default=None, help="subset of rungs (default all)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement, median (default 3; 1 with --quick)")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write results as JSON")
    p.add_argument("--chart", default=None, metavar="PATH", help="write a PNG bar chart of images/s")
    p.add_argument("--quick", action="store_true", help="steps 4, batch sizes 1 4, repeats 1 (tests / CI)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak for utilization (default: measured matmul on CUDA, none on CPU)")
    p.add_argument("--compile-on-cpu", action="store_true", help="run the torch.compile rung on CPU too (slow)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run (CPU)")
    p.add_argument("--onnx-dir", default=None, help="where ONNX / TensorRT exports are cached "
                   "(default $NETI_FAST_CACHE/exports)")
    return p


def _resolve(args) -> argparse.Namespace:
    a = argparse.Namespace(**vars(args))
    for k, v in dict(model="tiny", device=None, dtype=None, steps=None, batch_sizes=None, height=None, width=None,
                     rungs=None, repeats=None, json_path=None, chart=None, quick=False, peak_tflops=None,
                     compile_on_cpu=False, threads=None, onnx_dir=None).items():
        if not hasattr(a, k):
            setattr(a, k, v)
    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = str(a.device).startswith("cuda")
    if a.dtype is None:
        a.dtype = "fp16" if cuda else "fp32"
    if a.steps is None:
        a.steps = 4 if a.quick else 50
    if a.batch_sizes is None:
        a.batch_sizes = [1, 4] if a.quick else [1, 4, 16]
    if a.repeats is None:
        a.repeats = 1 if a.quick else 3
    if a.rungs is None:
        a.rungs = list(RUNGS)
    a.rungs = [r for r in RUNGS if r in a.rungs]  # ladder order
    a.batch_sizes = sorted(dict.fromkeys(a.batch_sizes))
    if a.steps < 1 or a.repeats < 1 or min(a.batch_sizes) < 1:
        raise SystemExit("neti-fast bench: --steps, --repeats and --batch-sizes must be >= 1")
    return a


# ----------------------------------------------------------------------------- measurement helpers

class Clock:
    """Wall-clock regions: CUDA-synchronized on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn):
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t0, out


class UnetTimer:
    """Sums the time spent in U-Net calls: CUDA events (no host sync) on GPU, perf_counter on CPU.

    Attach either as forward hooks on a module (`hook`) or around a denoiser callable (`wrap`).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self):
        self._events, self._cpu, self._t0, self.calls = [], 0.0, None, 0

    def start(self):
        self.calls += 1
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self._t0 = e
        else:
            self._t0 = time.perf_counter()

    def stop(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self._events.append((self._t0, e))
        else:
            self._cpu += time.perf_counter() - self._t0

    def seconds(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self._events) / 1000.0
        return self._cpu

    def hook(self, module):
        h1 = module.register_forward_pre_hook(lambda *_: self.start())
        h2 = module.register_forward_hook(lambda *_: self.stop())
        return [h1, h2]

    def wrap(self, denoiser):
        timer = self

        class Timed:
            def __init__(self):
                self.inner = denoiser

            def __call__(self, *a, **k):
                timer.start()
                try:
                    return denoiser(*a, **k)
                finally:
                    timer.stop()

            def __getattr__(self, name):
                return getattr(denoiser, name)
        return Timed()


class TextRows:
    """Counts text-encoder rows (prompts encoded) through a forward pre-hook."""

    def __init__(self, text_encoder):
        self.rows = 0

        def pre(_m, args, kwargs):
            ids = args[0] if args else kwargs.get("input_ids")
            self.rows += int(ids.shape[0]) if ids is not None and ids.ndim > 1 else 1
        self.handle = text_encoder.register_forward_pre_hook(pre, with_kwargs=True)

    def remove(self):
        self.handle.remove()


def _rss() -> int | None:
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        return None


class PeakMemory:
    """Peak memory of a region over its starting point; `kind` says what was measured."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.kind = "cuda max_memory_allocated over the pre-run allocation"
        elif _rss() is not None:
            self.kind = "cpu peak RSS over the pre-run RSS (psutil, sampled every 2 ms)"
        else:
            self.kind = "cpu growth of getrusage max RSS (0 unless a new process high)"
        self.peak = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = _rss()
        if self._base is None:
            import resource
            self._ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
            return self
        self._max, self._stop = self._base, threading.Event()

        def sample():
            while not self._stop.wait(0.002):
                r = _rss()
                if r and r > self._max:
                    self._max = r
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = max(0, torch.cuda.max_memory_allocated() - self._base)
        elif self._base is None:
            import resource
            self.peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._ru)
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, _rss() or 0)
            self.peak = max(0, self._max - self._base)
        return False


def measure_peak_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense matmul throughput on CUDA (8192^3, median of 10): the utilization reference."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1000.0)
    return 2 * n ** 3 / statistics.median(times) / 1e12


# ----------------------------------------------------------------------------- rungs

class Rung:
    """One way of generating: `setup`, `cond` (cold conditioning of one prompt), `run(seeds)`."""
    name = ""
    label = ""
    warmup_per_batch = False

    def __init__(self, ctx):
        self.ctx, self.m, self.a = ctx, ctx.model, ctx.args
        self.notes = ""

    def setup(self):
        pass

    def attach(self, timer: UnetTimer):
        """Start timing U-Net calls; returns a detach callable."""
        handles = timer.hook(self.m.unet)
        return lambda: [h.remove() for h in handles]

    def cond(self):
        raise NotImplementedError

    def run(self, seeds: list[int]):
        raise NotImplementedError

    def teardown(self):
        pass


class ReferenceRung(Rung):
    name, label = "reference", "official NeTI algorithm (generate_reference)"

    def setup(self):
        from neti_fast.pipeline import GenerateConfig
        self.cfg = GenerateConfig(steps=self.a.steps, guidance=GUIDANCE, scheduler="dpm++",
                                  height=self.ctx.height, width=self.ctx.width, batch_size=1)
        self.notes = "B seeds one after the other; 2 batch-1 U-Net calls per step; eager bmm attention"

    def cond(self):
        from neti_fast.pipeline import Request, make_scheduler, reference_conditioning
        sched = make_scheduler(self.cfg.scheduler, self.m.scheduler_config)
        sched.set_timesteps(self.cfg.steps)
        reference_conditioning(self.m, Request(PROMPT, 0, self.ctx.table), self.cfg, sched.timesteps)

    def run(self, seeds):
        from neti_fast.pipeline import Request, generate_reference
        for s in seeds:
            generate_reference(self.m, Request(PROMPT, s, self.ctx.table), self.cfg)


class DiffusersRung(Rung):
    name, label = "diffusers", "plain diffusers StableDiffusionPipeline (no concept)"

    def setup(self):
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
        from diffusers.models.attention_processor import AttnProcessor2_0
        m = self.m
        self.saved = dict(m.unet.attn_processors)  # neti-fast's bound processors, restored in teardown
        m.unet.set_attn_processor(AttnProcessor2_0())
        self.pipe = StableDiffusionPipeline(
            vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
            scheduler=DPMSolverMultistepScheduler.from_config(m.scheduler_config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)
        self.notes = "num_images_per_prompt=B, AttnProcessor2_0 (SDPA), DPM-Solver++"

    @torch.no_grad()
    def cond(self):
        self.pipe.encode_prompt(PLAIN_PROMPT, self.m.device, 1, True, "")

    @torch.no_grad()
    def run(self, seeds):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        self.pipe(PLAIN_PROMPT, height=self.ctx.height, width=self.ctx.width, num_inference_steps=self.a.steps,
                  guidance_scale=GUIDANCE, num_images_per_prompt=len(seeds), generator=gens, output_type="np")

    def teardown(self):
        self.m.unet.set_attn_processor(self.saved)


class EngineRung(Rung):
    """The neti-fast Engine with some denoiser and attention backend."""
    attention = "sdpa"
    per_seed = False  # True: batch size 1, seeds one after the other

    def make_denoiser(self):
        return None  # the Engine's default TorchDenoiser

    def setup(self):
        from neti_fast.pipeline import Engine, GenerateConfig
        self.cfg = GenerateConfig(steps=self.a.steps, guidance=GUIDANCE, scheduler="dpm++", height=self.ctx.height,
                                  width=self.ctx.width, batch_size=1 if self.per_seed else max(self.a.batch_sizes),
                                  attention=self.attention)
        den = self.make_denoiser()
        self.engine = Engine(self.m, self.cfg, denoiser=den)
        self.notes = self.notes or f"attention {self.attention}"

    def attach(self, timer):
        inner = self.engine.denoiser
        self.engine.denoiser = timer.wrap(inner)

        def detach():
            self.engine.denoiser = inner
        return detach

    @torch.no_grad()
    def cond(self):
        e = self.engine
        e._cache.clear()
        e.conditioning(PROMPT, self.ctx.table, None, e.schedule().timesteps)
        e.negative(self.cfg.negative_prompt)

    @torch.no_grad()
    def run(self, seeds):
        from neti_fast.pipeline import Request
        self.engine._cache.clear()  # cold: conditioning is part of every measured run
        reqs = [Request(PROMPT, s, self.ctx.table) for s in seeds]
        if self.per_seed:
            for r in reqs:
                self.engine.generate_batch([r])
        else:
            self.engine.generate_batch(reqs)


class EagerRung(EngineRung):
    name, label, per_seed = "eager", "neti-fast eager, batch 1", True

    def setup(self):
        self.notes = "one seed per U-Net call; CFG halves batched together (the engine always does); SDPA"
        super().setup()


class BatchedRung(EngineRung):
    name, label = "batched", "neti-fast batched (all seeds in one U-Net call), SDPA"


class ConceptsRung(BatchedRung):
    """Serving many users at once: batch B holds B *different* NeTI concepts (one per seed)."""
    name, label = "concepts", "neti-fast batched, a different concept per image"

    def setup(self):
        from neti_fast.concept import random_concept
        from neti_fast.table import precompute
        self.tables = [precompute(random_concept("neti", self.m.text_dim, 1000 + i, f"<c{i}>"), (), progress=False)
                       for i in range(max(self.a.batch_sizes))]
        self.notes = "B concepts in one batch: each sample indexes its own K/V rows (compare with `batched`: one concept)"
        super().setup()

    @torch.no_grad()
    def run(self, seeds):
        from neti_fast.pipeline import Request
        self.engine._cache.clear()
        self.engine.generate_batch([Request(PROMPT, s, self.tables[i]) for i, s in enumerate(seeds)])


class TritonRung(EngineRung):
    name, label, attention = "triton", "neti-fast batched + Triton cross-attention", "triton"

    def setup(self):
        if self.m.device.type != "cuda":
            raise Skip("the Triton cross-attention kernel needs a CUDA device")
        try:
            from neti_fast.kernels.cross_attention import HAS_TRITON
        except ImportError as e:
            raise Skip(f"neti_fast.kernels unavailable ({e})") from None
        if not HAS_TRITON:
            raise Skip("triton is not installed")
        if os.environ.get("NETI_FAST_DISABLE_TRITON"):
            raise Skip("NETI_FAST_DISABLE_TRITON is set")
        super().setup()


class CompileRung(EngineRung):
    name, label, attention = "compile", "neti-fast batched + torch.compile", "auto"
    warmup_per_batch = True  # dynamic=False: every new batch size compiles

    def setup(self):
        if self.m.device.type != "cuda" and not self.a.compile_on_cpu:
            raise Skip(COMPILE_CPU_REASON)
        self.notes = ("torch.compile(unet, dynamic=False)" + (" + CUDA graph per batch shape" if self.m.device.type == "cuda" else "")
                      + "; attention auto; warm-up (compile, capture) per batch size")
        super().setup()

    def make_denoiser(self):
        from neti_fast.cudagraph import CudaGraphDenoiser
        from neti_fast.pipeline import TorchDenoiser
        return CudaGraphDenoiser(TorchDenoiser(self.m, self.attention, compile=True))


def _export_dir(ctx) -> Path:
    """`--onnx-dir`, else the shared export cache (the CLI and the tests use the same folders)."""
    from neti_fast.export.onnx import default_export_dir
    a = ctx.args
    if a.onnx_dir:
        return Path(a.onnx_dir) / f"{ctx.height}x{ctx.width}-{a.dtype}"
    return default_export_dir(a.model, ctx.height, ctx.width, ctx.model.dtype)


class OnnxRung(EngineRung):
    name, label = "onnx", "neti-fast batched + ONNX Runtime denoiser"

    def setup(self):
        try:
            from neti_fast.export.onnx import OnnxDenoiser, export_cached
        except ImportError as e:
            raise Skip(f"neti_fast.export.onnx unavailable ({e})") from None
        t0 = time.perf_counter()
        try:
            self.onnx_path = export_cached(self.m, _export_dir(self.ctx), height=self.ctx.height, width=self.ctx.width)
            try:  # same intra-op thread count as torch, for a like-for-like CPU comparison
                self._den = OnnxDenoiser(self.onnx_path, threads=torch.get_num_threads())
            except TypeError:
                self._den = OnnxDenoiser(self.onnx_path, device=self.m.device)
        except (ImportError, RuntimeError) as e:
            raise Skip(f"ONNX export / onnxruntime unavailable ({type(e).__name__}: {e})") from None
        providers = getattr(getattr(self._den, "session", None), "get_providers", lambda: ["?"])()
        self.notes = f"export (or cache hit) {time.perf_counter() - t0:.1f} s; onnxruntime {providers[0]}"
        super().setup()

    def make_denoiser(self):
        return self._den


class TensorRTRung(EngineRung):
    name, label = "tensorrt", "neti-fast batched + TensorRT engine"

    def setup(self):
        if self.m.device.type != "cuda":
            raise Skip("TensorRT needs an NVIDIA GPU (no CUDA device)")
        try:
            from neti_fast.export.onnx import export_cached
            from neti_fast.export.tensorrt import TensorRTDenoiser, build_engine
        except ImportError as e:
            raise Skip(f"neti_fast.export.tensorrt unavailable ({e})") from None
        try:
            import tensorrt  # noqa: F401
        except ImportError as e:
            raise Skip(f"tensorrt not installed ({e})") from None
        t0 = time.perf_counter()
        # A failed export or build is a failure of the rung (recorded "failed"), not a skip. The
        # build is cached by build_engine's own check (ONNX fingerprint, TensorRT version, GPU,
        # profiles): a stale .plan is never reused.
        onnx_path = export_cached(self.m, _export_dir(self.ctx), height=self.ctx.height, width=self.ctx.width)
        sizes = self.a.batch_sizes
        engine_path = build_engine(onnx_path, Path(onnx_path).with_suffix(".plan"), fp16=self.m.dtype != torch.float32,
                                   max_batch=max(sizes), opt_batches=sizes)
        self._den = TensorRTDenoiser(engine_path, device=self.m.device)
        self.notes = f"export + engine build (or cache hit) {time.perf_counter() - t0:.1f} s"
        super().setup()

    def make_denoiser(self):
        return self._den


RUNG_CLASSES = {c.name: c for c in (ReferenceRung, DiffusersRung, EagerRung, BatchedRung, ConceptsRung, TritonRung,
                                    CompileRung, OnnxRung, TensorRTRung)}


# ----------------------------------------------------------------------------- the ladder

class Context:
    def __init__(self, args, model, table, height, width, flops, peak):
        self.args, self.model, self.table, self.height, self.width = args, model, table, height, width
        self.flops, self.peak = flops, peak


def _median(xs):
    return statistics.median(xs) if xs else None


def measure_rung(ctx: Context, rung: Rung, log=print) -> list[dict]:
    a, m = ctx.args, ctx.model
    dev = m.device
    clock, timer = Clock(dev), UnetTimer(dev)
    t0 = time.perf_counter()
    rung.setup()
    setup_s = time.perf_counter() - t0
    rows = []
    try:
        # warm-up once (smallest batch), then cold conditioning.
        clock.time(lambda: rung.run(list(range(a.batch_sizes[0]))))
        cond_s = _median([clock.time(rung.cond)[0] for _ in range(a.repeats)])
        for B in a.batch_sizes:
            if rung.warmup_per_batch and B != a.batch_sizes[0]:
                clock.time(lambda: rung.run(list(range(B))))
            totals, unets, peaks, text_rows, calls = [], [], [], [], []
            for _ in range(a.repeats):
                timer.reset()
                texts = TextRows(m.text_encoder)
                detach = rung.attach(timer)
                try:
                    with PeakMemory(dev) as mem:
                        total, _ = clock.time(lambda: rung.run(list(range(B))))
                finally:
                    detach()
                    texts.remove()
                totals.append(total)
                unets.append(timer.seconds())
                peaks.append(mem.peak)
                text_rows.append(texts.rows)
                calls.append(timer.calls)
            total, unet = _median(totals), _median(unets)
            f = ctx.flops
            unet_flops = a.steps * 2 * B * f["unet_per_sample"]
            e2e_flops = unet_flops + _median(text_rows) * f["text_encoder_pass"] + B * f["vae_decode"]
            unet_tflops = unet_flops / unet / 1e12 if unet > 0 else None
            row = {
                "rung": rung.name, "label": rung.label, "status": "ok", "batch": B, "notes": rung.notes,
                "cond_ms_per_prompt": cond_s * 1e3,
                "unet_ms_per_step": unet / a.steps * 1e3,
                "images_per_s": B / total,
                "batch_latency_s": total,
                "latency1_s": None,
                "peak_mem_bytes": int(max(peaks)),
                "unet_tflops": unet_tflops,
                "e2e_tflops": e2e_flops / total / 1e12,
                "utilization": (unet_tflops / ctx.peak) if (ctx.peak and unet_tflops) else None,
                "unet_calls": int(_median(calls)),
                "text_encoder_rows": int(_median(text_rows)),
                "setup_s": setup_s,
                "repeats": a.repeats,
                "all_totals_s": totals,
            }
            rows.append(row)
            log(f"  {rung.name:<10} B={B:<3} {row['images_per_s']:.3g} img/s, "
                f"U-Net {row['unet_ms_per_step']:.3g} ms/step, cond {row['cond_ms_per_prompt']:.4g} ms")
        lat1 = next((r["batch_latency_s"] for r in rows if r["batch"] == 1), None)
        for r in rows:
            r["latency1_s"] = lat1
    finally:
        rung.teardown()
    return rows


def _alternate(measure: dict, min_pairs: int, budget_s: float = 30.0, max_pairs: int = 15) -> dict:
    """Call each of `measure`'s functions (each returns seconds) in turn, round after round: at
    least `min_pairs` rounds, then more up to `max_pairs` while under `budget_s`. Returns the
    per-name lists of seconds."""
    times = {name: [] for name in measure}
    start, rounds = time.perf_counter(), 0
    while rounds < min_pairs or (rounds < max_pairs and time.perf_counter() - start < budget_s):
        for name, f in measure.items():
            times[name].append(f())
        rounds += 1
    return times


def side_by_side(ctx: Context, ran: set[str], log=print) -> dict:
    """The two ratios of the issue's targets, each from calls alternated one by one.

    The rungs' own columns are measured minutes apart (each in its rung's turn), so drift of the
    machine (CPU frequency, neighbours) lands in their ratios; alternating the two sides puts both
    under the same conditions. Returns {"conditioning": reference vs batched cold conditioning,
    "concepts": `concepts` vs `batched` U-Net ms per step at the largest batch}, each present when
    both of its rungs are in `ran` (the rungs that ran without error).
    """
    a, dev = ctx.args, ctx.model.device
    clock, timer = Clock(dev), UnetTimer(dev)
    out = {}
    rungs = {n: RUNG_CLASSES[n](ctx) for n in ("reference", "batched", "concepts") if n in ran}
    for r in rungs.values():
        r.setup()
    try:
        if {"reference", "batched"} <= set(rungs):
            ref, bat = rungs["reference"], rungs["batched"]
            ref.cond(), bat.cond()  # warm-up
            t = _alternate({"reference": lambda: clock.time(ref.cond)[0],
                            "batched": lambda: clock.time(bat.cond)[0]}, a.repeats)
            r, b = _median(t["reference"]), _median(t["batched"])
            out["conditioning"] = {"pairs": len(t["reference"]), "reference_ms": r * 1e3, "batched_ms": b * 1e3,
                                   "speedup": r / b, "all_reference_ms": [x * 1e3 for x in t["reference"]],
                                   "all_batched_ms": [x * 1e3 for x in t["batched"]]}
            log(f"  conditioning, {len(t['reference'])} alternated pairs: reference {r * 1e3:.4g} ms, "
                f"batched {b * 1e3:.4g} ms, {r / b:.1f}x")
        if {"batched", "concepts"} <= set(rungs):
            B, seeds = max(a.batch_sizes), list(range(max(a.batch_sizes)))

            def unet_ms_per_step(rung):
                timer.reset()
                detach = rung.attach(timer)
                try:
                    rung.run(seeds)
                finally:
                    detach()
                return timer.seconds() / a.steps * 1e3

            for r in (rungs["batched"], rungs["concepts"]):
                r.run(seeds)  # warm-up at this batch size
            t = _alternate({"batched": lambda: unet_ms_per_step(rungs["batched"]),
                            "concepts": lambda: unet_ms_per_step(rungs["concepts"])}, a.repeats)
            one, many = _median(t["batched"]), _median(t["concepts"])
            out["concepts"] = {"batch": B, "pairs": len(t["batched"]), "batched_unet_ms_per_step": one,
                               "concepts_unet_ms_per_step": many, "ratio": many / one,
                               "all_batched_ms": t["batched"], "all_concepts_ms": t["concepts"]}
            log(f"  {B} concepts vs one, {len(t['batched'])} alternated pairs: U-Net {many:.4g} vs {one:.4g} ms/step, "
                f"x{many / one:.3f}")
    finally:
        for r in rungs.values():
            r.teardown()
    return out


def _device_info(dev: torch.device) -> dict:
    info = {"type": dev.type, "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    if dev.type == "cuda":
        info["name"] = torch.cuda.get_device_name(dev)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(dev)))
    else:
        info["name"] = f"CPU {info['cpu']} ({info['cpu_count']} cores), no GPU used"
    return info


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "transformers", "triton", "onnxruntime", "tensorrt", "neti-fast"):
        try:
            from importlib.metadata import version
            out[name] = version(name)
        except Exception:  # noqa: BLE001 - not installed
            out[name] = None
    return out


def summary(rows: list[dict], side: dict | None = None) -> dict:
    """Headline ratios. `side`: `side_by_side`'s result; its alternated measurements, where
    present, give the conditioning speedup and the concepts-vs-one U-Net ratio, otherwise the
    rungs' own columns do."""
    side = side or {}
    ok = {(r["rung"], r["batch"]): r for r in rows if r["status"] == "ok"}
    out = {}
    ref = [r for (n, _), r in ok.items() if n == "reference"]
    bat = [r for (n, _), r in ok.items() if n == "batched"]
    if ref and bat:
        out["conditioning_speedup"] = (side["conditioning"]["speedup"] if "conditioning" in side else
                                       ref[0]["cond_ms_per_prompt"] / bat[0]["cond_ms_per_prompt"])
        common = sorted({r["batch"] for r in ref} & {r["batch"] for r in bat})
        if common:
            B = common[-1]
            out["largest_common_batch"] = B
            out["images_per_s_speedup_largest_batch"] = ok[("batched", B)]["images_per_s"] / ok[("reference", B)]["images_per_s"]
        # the best neti-fast rung at its largest batch vs the reference at its largest batch
    fast = [r for r in ok.values() if r["rung"] not in ("reference", "diffusers")]
    if ref and fast:
        best = max(fast, key=lambda r: r["images_per_s"])
        refB = ok.get(("reference", best["batch"])) or max(ref, key=lambda r: r["batch"])
        out["best"] = {"rung": best["rung"], "batch": best["batch"], "images_per_s": best["images_per_s"],
                       "speedup_vs_reference": best["images_per_s"] / refB["images_per_s"]}
    many = [r for (n, _), r in ok.items() if n == "concepts"]
    if many and bat:
        common = sorted({r["batch"] for r in many} & {r["batch"] for r in bat})
        if common:
            B = common[-1]
            # denoising cost of B different concepts vs one (target: within 5%); img/s also pays B conditionings
            out["concepts_vs_one_concept"] = {
                "batch": B,
                "unet_ms_per_step_ratio": (side["concepts"]["ratio"] if side.get("concepts", {}).get("batch") == B else
                                           ok[("concepts", B)]["unet_ms_per_step"] / ok[("batched", B)]["unet_ms_per_step"]),
                "images_per_s_ratio": ok[("concepts", B)]["images_per_s"] / ok[("batched", B)]["images_per_s"]}
    dif = [r for (n, _), r in ok.items() if n == "diffusers"]
    if dif and bat:
        common = sorted({r["batch"] for r in dif} & {r["batch"] for r in bat})
        if common:
            B = common[-1]
            out["batched_vs_diffusers_largest_batch"] = ok[("batched", B)]["images_per_s"] / ok[("diffusers", B)]["images_per_s"]
    return out


def _fmt(x, spec):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _mem(b):
    if b is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024


def format_table(result: dict) -> str:
    rows = result["rows"]
    ref = {r["batch"]: r for r in rows if r["rung"] == "reference" and r["status"] == "ok"}
    head = ["rung", "batch", "cond ms/prompt", "unet ms/step", "img/s", "latency-1 s", "peak mem", "TFLOP/s", "util",
            "speedup"]
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append([r["rung"], "-", f"{r['status']}: {r['reason']}"])
            continue
        sp = r["images_per_s"] / ref[r["batch"]]["images_per_s"] if r["batch"] in ref else None
        lines.append([r["rung"], str(r["batch"]), _fmt(r["cond_ms_per_prompt"], ".4g"), _fmt(r["unet_ms_per_step"], ".4g"),
                      _fmt(r["images_per_s"], ".4g"), _fmt(r["latency1_s"], ".3g"), _mem(r["peak_mem_bytes"]),
                      _fmt(r["unet_tflops"], ".3g"), _fmt(None if r["utilization"] is None else 100 * r["utilization"], ".1f")
                      + ("%" if r["utilization"] is not None else ""), _fmt(sp, ".2f") + ("x" if sp else "")])
    widths = [max(len(head[i]), *(len(l[i]) for l in lines if len(l) == len(head))) for i in range(len(head))]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out.append("  ".join("-" * w for w in widths))
    for l in lines:
        if len(l) == len(head):
            out.append("  ".join(c.ljust(w) for c, w in zip(l, widths)))
        else:
            out.append(f"{l[0].ljust(widths[0])}  {l[2]}")
    s = result["summary"]
    out.append("")
    if "concepts_vs_one_concept" in s:
        c = s["concepts_vs_one_concept"]
        alt = (result.get("side_by_side") or {}).get("concepts")
        how = f"median of {alt['pairs']} alternated pairs" if alt and alt["batch"] == c["batch"] else "the rungs' columns"
        out.append(f"{c['batch']} different concepts vs one, batch {c['batch']}: U-Net ms/step x{c['unet_ms_per_step_ratio']:.3f} "
                   f"({how}), img/s x{c['images_per_s_ratio']:.3f} (rung columns; includes {c['batch']} cold conditionings)")
    if "conditioning_speedup" in s:
        side = (result.get("side_by_side") or {}).get("conditioning")
        how = (f"median of {side['pairs']} alternated pairs, {side['reference_ms']:.4g} / {side['batched_ms']:.4g} ms"
               if side else "the two rungs' cond columns")
        out.append(f"conditioning speedup (reference / batched, {how}): {s['conditioning_speedup']:.1f}x")
    if "images_per_s_speedup_largest_batch" in s:
        out.append(f"end-to-end images/s, batched vs reference at batch {s['largest_common_batch']}: "
                   f"{s['images_per_s_speedup_largest_batch']:.1f}x")
    if "batched_vs_diffusers_largest_batch" in s:
        out.append(f"batched (with NeTI concept) vs plain diffusers (no concept), images/s at the largest batch: "
                   f"{s['batched_vs_diffusers_largest_batch']:.2f}x")
    if "best" in s:
        b = s["best"]
        out.append(f"fastest rung: {b['rung']} at batch {b['batch']}: {b['images_per_s']:.3g} img/s, "
                   f"{b['speedup_vs_reference']:.1f}x the reference")
    out.append(f"memory: {result['memory_kind']}; TFLOP/s = counted U-Net FLOPs / U-Net time")
    return "\n".join(out)


def write_chart(result: dict, path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    rungs = [r for r in RUNGS if any(x["rung"] == r for x in rows)]
    batches = sorted({r["batch"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(batches) * max(1, len(rungs)) / 3), 4.5))
    width = 0.8 / max(1, len(rungs))
    for i, rung in enumerate(rungs):
        xs, ys = [], []
        for j, B in enumerate(batches):
            r = next((x for x in rows if x["rung"] == rung and x["batch"] == B), None)
            if r is not None:
                xs.append(j + (i - (len(rungs) - 1) / 2) * width)
                ys.append(r["images_per_s"])
        ax.bar(xs, ys, width=width, label=rung)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_yscale("log")
    ax.set_ylabel("images / s (log)")
    a = result["args"]
    ax.set_title(f"neti-fast bench: {a['model']} {result['height']}x{result['width']}, {a['steps']} steps, "
                 f"{a['dtype']}\n{result['device']['name']}", fontsize=9)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_ladder(args, log=print) -> dict:
    from neti_fast.concept import random_concept
    from neti_fast.models import load_model
    from neti_fast.table import precompute

    from . import flops as flops_mod

    a = _resolve(args)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    dtype = DTYPES[a.dtype]
    log(f"loading {a.model} on {dev} ({a.dtype}) ...")
    model = load_model(a.model, dev, dtype)
    f = model.vae_scale_factor
    height, width = a.height or model.default_size, a.width or model.default_size
    if height % f or width % f:
        raise SystemExit(f"neti-fast bench: --height/--width must be multiples of {f}")
    table = precompute(random_concept("neti", model.text_dim, seed=0), (), progress=False)
    fl = flops_mod.count(model, height, width)
    peak = a.peak_tflops if a.peak_tflops else measure_peak_tflops(dev, dtype)
    ctx = Context(a, model, table, height, width, fl, peak)
    rows = []
    for name in a.rungs:
        rung = RUNG_CLASSES[name](ctx)
        log(f"[{name}] {rung.label}")
        try:
            rows.extend(measure_rung(ctx, rung, log))
        except Skip as e:
            log(f"  skipped: {e}")
            rows.append({"rung": name, "label": rung.label, "status": "skipped", "reason": str(e)})
        except Exception as e:  # noqa: BLE001 - one broken backend must not lose the other rungs
            log(f"  failed: {type(e).__name__}: {e}")
            rows.append({"rung": name, "label": rung.label, "status": "failed",
                         "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
    log("[side by side] the targets' ratios, alternated call by call")
    try:
        side = side_by_side(ctx, {r["rung"] for r in rows if r["status"] == "ok"}, log)
    except Exception as e:  # noqa: BLE001 - keep the ladder's rows; the summary falls back to them
        log(f"  failed: {type(e).__name__}: {e}")
        side = {"failed": f"{type(e).__name__}: {e}"}
    args_out = {k: v for k, v in vars(a).items() if k != "func"}
    result = {
        "schema": SCHEMA,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_info(dev),
        "versions": _versions(),
        "args": args_out,
        "model": model.name,
        "height": height,
        "width": width,
        "dtype": a.dtype,
        "steps": a.steps,
        "guidance": GUIDANCE,
        "scheduler": "dpm++",
        "flops": fl,
        "peak_tflops": peak,
        "memory_kind": PeakMemory(dev).kind,
        "rows": rows,
        "side_by_side": side,
    }
    result["summary"] = summary(rows, side)
    return result


def main(args) -> dict:
    threads = torch.get_num_threads()
    try:
        result = run_ladder(args)
    finally:
        torch.set_num_threads(threads)  # --threads applies to this run only
    print()
    print(format_table(result))
    a = result["args"]
    if a.get("json_path"):
        p = Path(a["json_path"])
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {p}")
    if a.get("chart"):
        print(f"wrote {write_chart(result, a['chart'])}")
    return result


def cli(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="neti-fast bench", description=__doc__.split("\n")[0])
    add_arguments(p)
    return main(p.parse_args(argv))


if __name__ == "__main__":
    cli()
