"""Generation: the fast batched engine, and the reference path it is held to.

Fast engine, per batch of requests (any mix of prompts, concepts, truncations, seeds):
  1. conditioning per (prompt, concept, truncation, schedule), cached: the concept's rows for the
     schedule's timesteps, CLIP run once over all distinct rows (`encode_rows`), then each layer's
     K = W_k enc and V = W_v enc_bypass -> [S, 77, C_l] (S = 1 for TI / XTI / no concept);
  2. per layer, one K table and one V table: [negative prompts' rows; each request's rows];
  3. one U-Net call per step for both guidance halves of every sample; sample b's cross-attention
     reads row  base[b] + step * stride[b]  (stride 0 for rows constant over time), computed on
     the device, so the loop has no host sync and no per-step text work.

The reference path (the official NeTI algorithm the engine is held to) is reference.py.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ..sd.attention import install_processors
from ..sd.conditioning import encode_plain, encode_rows, tokenize
from ..errors import NetiError
from .kv_arena import KVArena
from ..sd.models import Model
from ..concepts.table import stack_rows
from ..utils import SCHEDULERS, image_size


def make_scheduler(name: str, config: dict):
    """dpm++ (DPM-Solver++ 2M), dpm++-karras (same on Karras sigmas), ddim, euler, euler-a (ancestral)."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler)
    classes = {"dpm++": (DPMSolverMultistepScheduler, {}), "ddim": (DDIMScheduler, {}),
               "euler": (EulerDiscreteScheduler, {}), "euler-a": (EulerAncestralDiscreteScheduler, {}),
               "dpm++-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True})}
    if name not in classes:
        raise NetiError(f"--scheduler {name}: must be one of {', '.join(SCHEDULERS)}")
    cls, extra = classes[name]
    return cls.from_config(config, **extra)


def image_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with its seed: it draws the image's initial latents and then
    any noise an ancestral / stochastic scheduler adds, so an image never depends on its batch-mates
    (diffusers' pipelines with generator=[...] draw the same way)."""
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


@dataclass
class GenerateConfig:
    """Settings shared by a generation run (official NeTI inference defaults)."""
    steps: int = 50
    guidance: float = 7.5
    scheduler: str = "dpm++"          # one of SCHEDULERS (make_scheduler)
    height: int | None = None         # None: the model's native size (512 for SD 1.x)
    width: int | None = None
    negative_prompt: str = ""
    batch_size: int = 8               # images per U-Net batch (each is two rows with guidance)
    attention: str = "auto"           # auto | triton | native | sdpa | xformers | eager
    cache_mb: int = 2048              # bound on cached prepared conditionings


@dataclass
class Request:
    prompt: str
    seed: int
    table: object = None              # None (plain SD), a Table / MixedTable, or {name: table} for several
    truncation: int | None = None     # NeTI nested-dropout truncation (applies to every NeTI concept)
    negative_prompt: str | None = None  # None: GenerateConfig.negative_prompt

    @property
    def tables(self) -> dict:
        """{name: table}: what the prompt's `{name}` markers may refer to."""
        return as_tables(self.table)


def as_tables(table) -> dict:
    """None, a Table / MixedTable, or {name: table} -> {name: table}."""
    if table is None:
        return {}
    return dict(table) if isinstance(table, dict) else {table.name: table}


def _default_marker(tables: dict) -> str | None:
    """Bare `{}` means the only concept, or else the only mix (XTI style mixing: `a photo of {}`)."""
    from ..concepts.mixing import MixedTable
    mixes = [n for n, t in tables.items() if isinstance(t, MixedTable)]
    return mixes[0] if len(tables) > 1 and len(mixes) == 1 else None


def tokenize_request(model: Model, prompt: str, tables: dict):
    return tokenize(model.tokenizer, prompt, list(tables) if tables else None, _default_marker(tables))


@dataclass
class LayerKV:
    """One conditioning's per-layer K / V rows: 16 x [S, 77, C_l]; S = steps or 1."""
    k: list
    v: list
    time_varying: bool

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)



def initial_latents(seed: int, shape: tuple, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """diffusers' draw for one image from `torch.Generator("cpu").manual_seed(seed)` (or `generator`,
    seeded so): batch-independent."""
    from diffusers.utils.torch_utils import randn_tensor
    generator = generator or torch.Generator("cpu").manual_seed(seed)
    return randn_tensor((1, *shape), generator=generator, device=torch.device("cpu"), dtype=dtype)


def decode(model: Model, latents: torch.Tensor) -> np.ndarray:
    """VAE decode to uint8 [B, H, W, 3], rounding exactly like diffusers' image processor."""
    x = model.vae.decode(latents.to(model.vae.dtype) / model.vae.config.scaling_factor).sample
    x = (x / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return (x * 255).round().astype("uint8")


def _size(model: Model, cfg: GenerateConfig) -> tuple[int, int]:
    h, w = image_size(model, cfg.height, cfg.width)
    f = model.vae_scale_factor
    if h % f or w % f:
        raise NetiError(f"--height/--width {h}x{w}: must be multiples of {f}")
    return h, w


def check_request(model: Model, req: Request) -> None:
    """Validate a request before any work: concept widths, truncation, prompt (markers, length)."""
    tables = req.tables
    for name, t in tables.items():
        t.check(model, req.truncation, f"concept {name!r}")
    if req.truncation is not None and not any(t.truncatable for t in tables.values()):
        if not tables:
            raise NetiError(f"--truncation {req.truncation}: applies to NeTI concepts, and no --concept was given")
        names = ", ".join(f"{n!r}" for n in tables)
        raise NetiError(f"--truncation applies to NeTI concepts; {names} {'has' if len(tables) == 1 else 'have'} "
                        "no NeTI mapper (TI / XTI)")
    tokenize_request(model, req.prompt, tables)


def concept_rows(tables: dict, timesteps: torch.Tensor, truncation: int | None):
    """Every concept's rows for a schedule, stacked by slot: ([S, 16, K, D], same or None).

    S = len(timesteps) if any concept varies over time, else 1 (one row serves every step). A
    concept without a bypass gets zero rows beside one with it (a zero bypass changes nothing).
    """
    vary = any(t.time_varying for t in tables.values())
    ts = timesteps if vary else timesteps[:1]
    return stack_rows([t.schedule_rows(ts, truncation) for t in tables.values()], dim=2)


class TorchDenoiser:
    """eps = U-Net(x, t) with every cross-attention reading K/V rows `row_idx` of the per-layer tables.

    This call signature (no dicts, no counters: tensors only) is what every backend implements;
    `export/` writes the same function to ONNX / TensorRT.

    compile=True: `torch.compile` of the U-Net, specialized to every shape except the tables' row
    count (marked dynamic: a job whose batches need different numbers of rows never recompiles,
    where a recompile per row count would soon hit dynamo's limit and silently run eager). The first
    call per latent shape runs eagerly, so the attention dispatcher makes (and checks) its choices on
    real data before tracing bakes them in.
    """

    def __init__(self, model: Model, attention: str = "auto", compile: bool = False,
                 compile_backend: str = "inductor"):
        self.model, self.state, self.attention = model, install_processors(model), attention
        self.compiled = compile
        self.unet = torch.compile(model.unet, dynamic=False, backend=compile_backend) if compile else model.unet
        self._seen: set = set()

    def __call__(self, x, t, row_idx, k_tables, v_tables):
        st = self.state
        st.mode, st.backend, st.row_idx, st.k_tables, st.v_tables = "tables", self.attention, row_idx, k_tables, v_tables
        unet = self.unet
        if self.compiled:
            for tab in k_tables + v_tables:
                torch._dynamo.maybe_mark_dynamic(tab, 0)
            key = (tuple(x.shape[1:]), x.dtype, x.device)
            if key not in self._seen:
                self._seen.add(key)
                unet = self.model.unet
        try:
            return unet(x, t, encoder_hidden_states=None).sample
        finally:
            st.mode, st.row_idx, st.k_tables, st.v_tables = "plain", None, [], []


class Engine:
    """The fast path. Keeps the model's processors bound and a bounded cache of conditionings."""

    def __init__(self, model: Model, cfg: GenerateConfig | None = None, denoiser=None):
        self.model = model
        self.cfg = cfg or GenerateConfig()
        self.denoiser = denoiser or TorchDenoiser(model, self.cfg.attention)
        self._cache: OrderedDict = OrderedDict()
        self._arenas: dict = {}

    def schedule(self):
        sched = make_scheduler(self.cfg.scheduler, self.model.scheduler_config)
        sched.set_timesteps(self.cfg.steps)
        return sched

    # ------------------------------------------------------------------ conditioning
    def _kv(self, enc: torch.Tensor, enc_b: torch.Tensor) -> tuple[list, list]:
        """enc, enc_b: [S, 16, 77, D] or [S, 77, D] (same for all layers) -> per-layer K, V."""
        ks, vs = [], []
        for l, attn in enumerate(self.model.cross_attention):
            e, eb = (enc[:, l], enc_b[:, l]) if enc.ndim == 4 else (enc, enc_b)
            ks.append(attn.to_k(e))
            vs.append(attn.to_v(eb))
        return ks, vs

    def _cached(self, key, build) -> LayerKV:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        cond = build()
        self._cache[key] = cond
        budget = self.cfg.cache_mb * 2**20
        while len(self._cache) > 1 and sum(c.nbytes for c in self._cache.values()) > budget:
            self._cache.popitem(last=False)
        return cond

    def negative(self, prompt: str) -> LayerKV:
        m = self.model

        def build():
            enc = encode_plain(m.text_encoder, m.tokenizer, prompt)
            return LayerKV(*self._kv(enc, enc), time_varying=False)
        return self._cached(("neg", prompt, m.dtype), build)

    def conditioning(self, prompt: str, table, truncation: int | None, timesteps: torch.Tensor) -> LayerKV:
        """Per-layer K / V rows for `prompt` with `table` (a Table, a MixedTable or {name: table})."""
        m = self.model
        tables = as_tables(table)
        if not tables:
            return self.negative(prompt)  # a plain prompt is encoded like a negative one

        def build():
            toks = tokenize_request(m, prompt, tables)
            token, bypass = concept_rows(tables, timesteps, truncation)     # [S, 16, K, D]
            S, L, K, D = token.shape
            dt = m.text_encoder.dtype
            enc, enc_b = encode_rows(m.text_encoder, toks, token.reshape(S * L, K, D).to(dt),
                                     None if bypass is None else bypass.reshape(S * L, K, D).to(dt),
                                     dedup=S == 1)  # time-varying rows are all distinct: no point sorting them
            enc, enc_b = enc.view(S, L, *enc.shape[1:]), enc_b.view(S, L, *enc_b.shape[1:])
            return LayerKV(*self._kv(enc, enc_b), time_varying=S > 1)
        key = ("cond", prompt, tuple((n, t.uid) for n, t in tables.items()), truncation,
               tuple(timesteps.tolist()), m.dtype)
        return self._cached(key, build)

    # ------------------------------------------------------------------ denoising
    @torch.no_grad()
    def generate(self, requests: list[Request], progress: bool = False) -> np.ndarray:
        """Images for `requests`, in order: uint8 [N, H, W, 3]."""
        out = []
        bs = max(1, self.cfg.batch_size)
        for i in range(0, len(requests), bs):
            out.append(self.generate_batch(requests[i:i + bs], progress))
        return np.concatenate(out)

    def kv_tables(self, reqs: list[Request], timesteps: torch.Tensor, guided: bool):
        """The batch's conditionings placed in the engine's K / V arena, and each sample's rows.

        Each distinct conditioning is copied into the arena (`kv_arena.KVArena`: one stable
        buffer per layer) the first time a batch needs it and stays there while it is in use, so
        packing computes indices only, and the U-Net always reads the same tensors (a captured CUDA
        graph stays valid; torch.compile sees one row count). Negative prompts are shared rows, not
        copied per sample. U-Net batch row b (negative halves first when `guided`) reads
        `base[b] + step * stride[b]`; stride is 0 for conditionings constant over time.
        Returns (k_tables 16 x [R, 77, C_l], v_tables, base [B'], stride [B']).
        """
        m, cfg = self.model, self.cfg
        conds = [self.conditioning(r.prompt, r.table, r.truncation, timesteps) for r in reqs]
        negs = [self.negative(cfg.negative_prompt if r.negative_prompt is None else r.negative_prompt) for r in reqs] if guided else []
        rows = negs + conds
        distinct = list({id(c): c for c in rows}.values())
        arena = self.arena(distinct[0])
        starts = arena.place(distinct)
        base = [starts[id(c)] for c in rows]
        stride = [int(c.time_varying) for c in rows]
        return arena.k, arena.v, torch.tensor(base, device=m.device), torch.tensor(stride, device=m.device)

    def arena(self, cond: LayerKV) -> KVArena:
        """The engine's K / V arena for `cond`'s dtype and device (made on first use)."""
        k0 = cond.k[0]
        key = (k0.dtype, k0.device)
        if key not in self._arenas:
            self._arenas[key] = KVArena([k.shape[-1] for k in cond.k], [v.shape[-1] for v in cond.v],
                                        k0.shape[1], k0.dtype, k0.device)
        return self._arenas[key]

    @torch.no_grad()
    def generate_batch(self, reqs: list[Request], progress: bool = False, on_step=None) -> np.ndarray:
        """Images for `reqs` in one U-Net batch. `on_step(done, total)` is called after every step."""
        m, cfg = self.model, self.cfg
        for r in reqs:
            check_request(m, r)
        h, w = _size(m, cfg)
        f = m.vae_scale_factor
        sched = self.schedule()
        ts = sched.timesteps
        guided = cfg.guidance != 1.0

        k_tables, v_tables, base, stride = self.kv_tables(reqs, ts, guided)
        gens = image_generators([r.seed for r in reqs])
        latents = torch.cat([initial_latents(r.seed, (m.unet.config.in_channels, h // f, w // f), m.dtype, g)
                             for r, g in zip(reqs, gens)])
        latents = latents.to(m.device) * sched.init_noise_sigma
        ts_dev = ts.to(m.device)  # the U-Net's t, on the device once: no host-to-device copy per step
        # sample b's K/V row at step i, for every step at once: [steps, B] (stride 0: constant rows)
        row_idx = base[None] + torch.arange(len(ts), device=m.device)[:, None] * stride[None]
        from tqdm.auto import tqdm
        for i, t in enumerate(tqdm(ts, desc="denoise", leave=False, disable=not progress)):
            x = torch.cat([latents, latents]) if guided else latents
            x = sched.scale_model_input(x, t)
            eps = self.denoiser(x, ts_dev[i], row_idx[i], k_tables, v_tables)
            if guided:
                u, c = eps.chunk(2)
                eps = u + cfg.guidance * (c - u)
            latents = sched.step(eps, t, latents, generator=gens).prev_sample
            if on_step is not None:
                on_step(i + 1, len(ts))
        return decode(m, latents)

