"""The rungs of the bench ladder, from the official algorithm to the fastest backend (see
ladder.py's docstring): each sets itself up on the ladder's Context, runs a batch of seeds, and
reports conditioning separately."""
from __future__ import annotations

import time
from pathlib import Path


from neti_fast.utils import env_flag

from .measure import UnetTimer

PROMPT = "a photo of {}"                  # NeTI prompt (rungs with the concept)
PLAIN_PROMPT = "a photo of a dog"         # diffusers rung: no concept
GUIDANCE = 7.5
COMPILE_CPU_REASON = "torch.compile rung is GPU-only in the ladder (CPU inductor compile takes minutes)"


class Skip(Exception):
    """A rung that cannot run here (the reason is recorded, the ladder goes on)."""


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
        from neti_fast.engine.request import GenerateConfig
        self.cfg = GenerateConfig(steps=self.a.steps, guidance=GUIDANCE, scheduler="dpm++",
                                  height=self.ctx.height, width=self.ctx.width, batch_size=1)
        self.notes = "B seeds one after the other; 2 batch-1 U-Net calls per step; eager bmm attention"

    def cond(self):
        from neti_fast.engine.request import Request
        from neti_fast.engine.sampling import make_scheduler
        from neti_fast.engine.reference import reference_conditioning
        sched = make_scheduler(self.cfg.scheduler, self.m.scheduler_config)
        sched.set_timesteps(self.cfg.steps)
        reference_conditioning(self.m, Request(PROMPT, 0, self.ctx.table), self.cfg, sched.timesteps)

    def run(self, seeds):
        from neti_fast.engine.request import Request
        from neti_fast.engine.reference import generate_reference
        for s in seeds:
            generate_reference(self.m, Request(PROMPT, s, self.ctx.table), self.cfg)


class DiffusersRung(Rung):
    name, label = "diffusers", "plain diffusers pipeline of the model's family (no concept)"

    def setup(self):
        import inspect

        import diffusers
        from diffusers import DPMSolverMultistepScheduler
        from diffusers.models.attention_processor import AttnProcessor2_0
        m = self.m
        cls = getattr(diffusers, m.family.pipeline)  # StableDiffusionPipeline, StableDiffusionXLPipeline
        parts = {}
        for spec, tok, te in zip(m.family.encoders, m.tokenizers, m.text_encoders):
            parts[spec.tokenizer_subfolder], parts[spec.subfolder] = tok, te
        # the pipeline's optional parts (SD's safety checker, SDXL's image encoder) left out, as build_tiny does
        params = inspect.signature(cls).parameters
        optional = {k: None for k in getattr(cls, "_optional_components", []) if k not in parts and k in params}
        extra = {k: v for k, v in (("requires_safety_checker", False), ("add_watermarker", False),
                                   ("force_zeros_for_empty_prompt", m.zero_empty_negative)) if k in params}
        self.saved = dict(m.unet.attn_processors)  # neti-fast's bound processors, restored in teardown
        m.unet.set_attn_processor(AttnProcessor2_0())
        self.pipe = cls(vae=m.vae, unet=m.unet, scheduler=DPMSolverMultistepScheduler.from_config(m.scheduler_config),
                        **parts, **optional, **extra)
        self.pipe.set_progress_bar_config(disable=True)
        self.notes = f"{m.family.pipeline}, num_images_per_prompt=B, AttnProcessor2_0 (SDPA), DPM-Solver++"

    def cond(self):
        self.pipe.encode_prompt(prompt=PLAIN_PROMPT, device=self.m.device, num_images_per_prompt=1,
                                do_classifier_free_guidance=True, negative_prompt="")

    def run(self, seeds):
        import torch
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
        from neti_fast.engine.engine import Engine
        from neti_fast.engine.request import GenerateConfig
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

    def cond(self):
        e = self.engine
        e.conditionings.clear()
        e.conditioning(PROMPT, self.ctx.table, None, e.make_scheduler().timesteps)
        e.negative(self.cfg.negative_prompt)

    def run(self, seeds):
        from neti_fast.engine.request import Request
        self.engine.conditionings.clear()  # cold: conditioning is part of every measured run
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
        from neti_fast.concepts.concept import random_concept
        from neti_fast.concepts.table import precompute
        self.tables = [precompute(random_concept("neti", self.m.text_dim, 1000 + i, f"<c{i}>", family=self.m.family), (),
                                  progress=False)
                       for i in range(max(self.a.batch_sizes))]
        self.notes = "B concepts in one batch: each sample indexes its own K/V rows (compare with `batched`: one concept)"
        super().setup()

    def run(self, seeds):
        from neti_fast.engine.request import Request
        self.engine.conditionings.clear()
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
        if env_flag("NETI_FAST_DISABLE_TRITON"):
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
        from neti_fast.engine.backends import make_denoiser
        return make_denoiser(self.m, "compile", self.attention)[0]


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
        import torch
        from neti_fast.engine.backends import make_denoiser
        t0 = time.perf_counter()
        try:  # same intra-op thread count as torch, for a like-for-like CPU comparison
            self._den, _ = make_denoiser(self.m, "onnx", height=self.ctx.height, width=self.ctx.width,
                                         export_dir=_export_dir(self.ctx), threads=torch.get_num_threads())
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
        import torch
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
RUNGS = tuple(RUNG_CLASSES)  # the ladder's order
