"""The fast batched engine: conditionings, K/V packing and the denoising loop.

Per batch of requests (any mix of prompts, concepts, truncations, seeds):
  1. conditioning per (prompt, concept, truncation, schedule), cached: the concept's rows for the
     schedule's timesteps, CLIP run once over all distinct rows (`encode_rows`), then each layer's
     K = W_k enc and V = W_v enc_bypass -> [S, 77 k, C_l] (S = 1 for TI / XTI / no concept; k CLIP
     chunks: 1, or more for a long A1111-syntax prompt, the same for all of one batch);
  2. per layer, one K table and one V table: [negative prompts' rows; each request's rows];
  3. one U-Net call per step for both guidance halves of every sample; sample b's cross-attention
     reads row  base[b] + step * stride[b]  (stride 0 for rows constant over time), computed on
     the device, so the loop has no host sync and no per-step text work.

Requests and their check are request.py, the U-Net call is a denoiser (denoiser.py, backends.py);
the official algorithm the engine is held to is reference.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import NetiError
from ..concepts.table import slot_rows
from ..sd.conditioning import MAX_TOKENS, pad_chunks
from ..sd.encoders import encode_plain_all, encode_rows_all, pooled_all
from ..sd.models import Model
from ..utils import ByteLRU
from .denoiser import TorchDenoiser
from .kv_arena import KVArena
from .request import (GenerateConfig, Request, as_tables, check_request, check_settings, check_size, context_chunks,
                      negative_text, tokenize_request)
from .img2img import batch_start, overlay, start_latents
from .sampling import decode, image_generators, make_scheduler, step_kwargs


@dataclass
class LayerKV:
    """One conditioning's K / V rows, per cross-attention module: [S, 77 k, C_m]; S = steps or 1, k
    CLIP chunks; and where the family has one (SDXL), its pooled text embedding per step [S, P]."""
    k: list
    v: list
    time_varying: bool
    pooled: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        pooled = [] if self.pooled is None else [self.pooled]
        return sum(t.numel() * t.element_size() for t in self.k + self.v + pooled)


def concept_rows(tables: dict, timesteps: torch.Tensor, truncation: int | None):
    """Every concept's rows for a schedule, one slot per vector: ([S, L, K, D], same or None).

    S = len(timesteps) if any concept varies over time, else 1 (one row serves every step). A
    concept without a bypass gets zero rows beside one with it (a zero bypass changes nothing).
    """
    vary = any(t.time_varying for t in tables.values())
    ts = timesteps if vary else timesteps[:1]
    return slot_rows([t.schedule_rows(ts, truncation) for t in tables.values()], [t.vectors for t in tables.values()])


class Engine:
    """The fast path. Keeps the model's processors bound and a bounded cache of conditionings."""

    def __init__(self, model: Model, cfg: GenerateConfig | None = None, denoiser=None):
        self.model = model
        self.cfg = cfg or GenerateConfig()
        self.denoiser = denoiser or TorchDenoiser(model, self.cfg.attention)
        # prepared conditionings (LayerKV) by request content; public so a benchmark can start cold
        self.conditionings = ByteLRU(self.cfg.cache_mb * 2**20, lambda cond: cond.nbytes)
        self._arenas: dict = {}

    def make_scheduler(self):
        """A fresh scheduler for the run's settings, its timesteps set."""
        sched = make_scheduler(self.cfg.scheduler, self.model.scheduler_config)
        sched.set_timesteps(self.cfg.steps)
        return sched

    # ------------------------------------------------------------------ conditioning
    def _kv(self, enc: torch.Tensor, enc_b: torch.Tensor) -> tuple[list, list]:
        """enc, enc_b: [S, L, 77, D] or [S, 77, D] (same for all layers) -> per-module K, V."""
        ks, vs = [], []
        for attn, l in zip(self.model.cross_attention, self.model.attn_layer):
            e, eb = (enc[:, l], enc_b[:, l]) if enc.ndim == 4 else (enc, enc_b)
            ks.append(attn.to_k(e))
            vs.append(attn.to_v(eb))
        return ks, vs

    @staticmethod
    def _key_tail(clip_skip: int, syntax: str, chunks: int) -> tuple:
        # the defaults keep the key they always had: the same cache entries as before they existed
        return (((clip_skip,) if clip_skip != 1 else ())
                + ((syntax, chunks) if (syntax, chunks) != ("plain", 1) else ()))

    def _padded(self, enc: torch.Tensor, chunks: int, clip_skip: int) -> torch.Tensor:
        """enc padded with empty chunks to `chunks` (the request's context, request.context_chunks)."""
        if enc.shape[-2] >= chunks * MAX_TOKENS:
            return enc
        m = self.model
        return pad_chunks(enc, chunks, encode_plain_all(m, "", clip_skip))

    def negative(self, prompt: str, clip_skip: int = 1, syntax: str = "plain", chunks: int = 1,
                 zero_empty: bool = True) -> LayerKV:
        """A negative prompt's K / V rows. An empty one is zero conditioning (context and pooled, every
        chunk) where the model says so (force_zeros_for_empty_prompt) and `zero_empty` (Request.zero_empty_negative)."""
        return self._plain(prompt, clip_skip, syntax, chunks, zero_empty and self.model.zero_empty_negative and not prompt)

    def _plain(self, prompt: str, clip_skip: int, syntax: str, chunks: int, zero: bool) -> LayerKV:
        """A prompt with no concept: its plain encoding, or zeros (`zero`: an empty negative prompt's, as diffusers)."""
        m = self.model

        def build():
            enc = self._padded(encode_plain_all(m, prompt, clip_skip, syntax), chunks, clip_skip)
            pooled = pooled_all(m, tokenize_request(m, prompt, {}, syntax), None)
            if zero:
                enc, pooled = torch.zeros_like(enc), None if pooled is None else torch.zeros_like(pooled)
            return LayerKV(*self._kv(enc, enc), time_varying=False, pooled=pooled)
        # the key SD 1.x always had (never zeroed); a zeroed entry is another one than the same text encoded
        key = ("neg", prompt, m.dtype) + self._key_tail(clip_skip, syntax, chunks) + (("zeros",) if zero else ())
        return self.conditionings.get_or_build(key, build)

    def conditioning(self, prompt: str, table, truncation: int | None, timesteps: torch.Tensor,
                     clip_skip: int = 1, syntax: str = "plain", chunks: int = 1) -> LayerKV:
        """Per-layer K / V rows for `prompt` with `table` (a Table, a MixedTable or {name: table}),
        in `syntax`, padded to `chunks` chunks of 77 keys."""
        m = self.model
        tables = as_tables(table)
        if not tables:
            # a plain prompt is encoded like a negative one, but never zeroed (diffusers and A1111 zero only negatives)
            return self._plain(prompt, clip_skip, syntax, chunks, False)

        def build():
            toks = tokenize_request(m, prompt, tables, syntax)
            token, bypass = concept_rows(tables, timesteps, truncation)     # [S, L, K, D]
            S, L, K, D = token.shape
            dt = m.text_encoder.dtype
            enc, enc_b = encode_rows_all(m, toks, token.reshape(S * L, K, D).to(dt),
                                         None if bypass is None else bypass.reshape(S * L, K, D).to(dt),
                                         dedup=S == 1,  # time-varying rows are all distinct: no point sorting them
                                         clip_skip=clip_skip)
            enc, enc_b = enc.view(S, L, *enc.shape[1:]), enc_b.view(S, L, *enc_b.shape[1:])
            enc, enc_b = self._padded(enc, chunks, clip_skip), self._padded(enc_b, chunks, clip_skip)
            pl = m.family.pooled_layer
            pooled = None if pl is None else pooled_all(m, toks, token[:, pl].to(dt))
            return LayerKV(*self._kv(enc, enc_b), time_varying=S > 1, pooled=pooled)
        key = ("cond", prompt, tuple((n, t.uid) for n, t in tables.items()), truncation,
               tuple(timesteps.tolist()), m.dtype) + self._key_tail(clip_skip, syntax, chunks)
        return self.conditionings.get_or_build(key, build)

    # ------------------------------------------------------------------ denoising
    @torch.no_grad()
    def generate(self, requests: list[Request], progress: bool = False) -> np.ndarray:
        """Images for `requests`, in order: uint8 [N, H, W, 3]. Batches hold requests of one context
        length (request.context_chunks), in order within each."""
        groups: dict = {}
        for i, r in enumerate(requests):
            groups.setdefault(context_chunks(self.model, r, self.cfg), []).append(i)
        out: list = [None] * len(requests)
        bs = max(1, self.cfg.batch_size)
        for idx in groups.values():
            for j in range(0, len(idx), bs):
                part = idx[j:j + bs]
                for i, img in zip(part, self.generate_batch([requests[i] for i in part], progress)):
                    out[i] = img
        return np.stack(out)

    def kv_tables(self, reqs: list[Request], timesteps: torch.Tensor, guided: bool):
        """The batch's conditionings placed in the engine's K / V arena, and each sample's rows.

        Each distinct conditioning is copied into the arena (`kv_arena.KVArena`: one stable
        buffer per layer) the first time a batch needs it and stays there while it is in use, so
        packing computes indices only, and the U-Net always reads the same tensors (a captured CUDA
        graph stays valid; torch.compile sees one row count). Negative prompts are shared rows, not
        copied per sample. U-Net batch row b (negative halves first when `guided`) reads
        `base[b] + step * stride[b]`; stride is 0 for conditionings constant over time.
        Every request's K / V have 77 x `request.context_chunks` keys, the same for all of them
        (NetiError otherwise: the batch planners group by it).
        Returns (k_tables per module [R, 77 k, C_m], v_tables, base [B'], stride [B']).
        """
        m = self.model
        rows = self._rows(reqs, timesteps, guided)
        distinct = list({id(c): c for c in rows}.values())
        arena = self.arena(distinct[0])
        starts = arena.place(distinct)
        base = [starts[id(c)] for c in rows]
        stride = [int(c.time_varying) for c in rows]
        return arena.k, arena.v, torch.tensor(base, device=m.device), torch.tensor(stride, device=m.device)

    def _rows(self, reqs: list[Request], timesteps: torch.Tensor, guided: bool) -> list:
        """The conditioning of each U-Net batch row: negative halves first when `guided`."""
        m, cfg = self.model, self.cfg
        chunks = {context_chunks(m, r, cfg) for r in reqs}
        if len(chunks) > 1:
            raise NetiError(f"one U-Net batch needs one context length; these requests take {sorted(chunks)} "
                            "chunks of 77 tokens (group them by request.context_chunks)")
        k = chunks.pop()
        conds = [self.conditioning(r.prompt, r.table, r.truncation, timesteps, r.clip_skip, r.prompt_syntax, k)
                 for r in reqs]
        negs = [self.negative(negative_text(r, cfg), r.clip_skip, r.prompt_syntax, k, r.zero_empty_negative)
                for r in reqs] if guided else []  # A1111 skips CLIP layers for the negative prompt too
        return negs + conds

    def added_conditioning(self, reqs: list[Request], timesteps: torch.Tensor, guided: bool, h: int, w: int):
        """The U-Net's added inputs where the family has them (SDXL), for kv_tables' rows: (pooled text
        embeddings [steps, B', P], time ids [B', 6]: original size, crop top-left, target size; a
        request's own `time_ids`, else diffusers' _get_add_time_ids defaults (h, w, 0, 0, h, w), the
        same for its negative row, as diffusers and A1111 give both halves one set); None for SD 1.x / 2.x."""
        if not self.model.family.added_conditioning:
            return None
        rows = self._rows(reqs, timesteps, guided)   # cached conditionings: lookups only
        step = torch.arange(len(timesteps))
        pooled = torch.stack([c.pooled[step if c.time_varying else torch.zeros_like(step)] for c in rows], dim=1)
        ids = [tuple(r.time_ids) if r.time_ids is not None else (h, w, 0, 0, h, w) for r in reqs]
        time_ids = torch.tensor(ids * (2 if guided else 1), dtype=pooled.dtype, device=pooled.device)
        return pooled, time_ids

    def arena(self, cond: LayerKV) -> KVArena:
        """The engine's K / V arena for `cond`'s dtype, device and context length (made on first use)."""
        k0 = cond.k[0]
        key = (k0.dtype, k0.device, k0.shape[1])
        if key not in self._arenas:
            self._arenas[key] = KVArena([k.shape[-1] for k in cond.k], [v.shape[-1] for v in cond.v],
                                        k0.shape[1], k0.dtype, k0.device)
        return self._arenas[key]

    @torch.no_grad()
    def generate_batch(self, reqs: list[Request], progress: bool = False, on_step=None) -> np.ndarray:
        """Images for `reqs` in one U-Net batch. `on_step(done, total, latents)` is called after every
        step with the batch's latents (the serving queue's progress preview and interrupt)."""
        m, cfg = self.model, self.cfg
        check_settings(cfg)
        for r in reqs:
            check_request(m, r)
        h, w = check_size(m, cfg.height, cfg.width)
        for r in reqs:
            if r.init is not None:
                r.init.check(h, w)
        sched = self.make_scheduler()
        start = batch_start(reqs, cfg.steps) * sched.order
        img2img = any(r.init is not None for r in reqs)
        if img2img and hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start)  # k-diffusion-style schedulers index their sigmas from here
        ts = sched.timesteps[start:]
        guided = cfg.guidance != 1.0

        k_tables, v_tables, base, stride = self.kv_tables(reqs, ts, guided)
        added = self.added_conditioning(reqs, ts, guided, h, w)
        gens = image_generators([r.seed for r in reqs])
        step_kw = step_kwargs(cfg.scheduler, sched, gens, [r.seed for r in reqs], cfg.eta)
        latents, blend = start_latents(m, sched, ts, reqs, gens, (m.unet.config.in_channels, h // m.vae_scale_factor,
                                                                   w // m.vae_scale_factor))
        ts_dev = ts.to(m.device)  # the U-Net's t, on the device once: no host-to-device copy per step
        # sample b's K/V row at step i, for every step at once: [steps, B] (stride 0: constant rows)
        row_idx = base[None] + torch.arange(len(ts), device=m.device)[:, None] * stride[None]
        from tqdm.auto import tqdm
        for i, t in enumerate(tqdm(ts, desc="denoise", leave=False, disable=not progress)):
            x = torch.cat([latents, latents]) if guided else latents
            x = sched.scale_model_input(x, t)
            extra = {} if added is None else {"added": {"text_embeds": added[0][i], "time_ids": added[1]}}
            eps = self.denoiser(x, ts_dev[i], row_idx[i], k_tables, v_tables, **extra)
            if guided:
                u, c = eps.chunk(2)
                eps = u + cfg.guidance * (c - u)
            latents = sched.step(eps, t, latents, **step_kw).prev_sample
            if blend is not None:
                latents = blend(sched, i, latents)
            if on_step is not None:
                on_step(i + 1, len(ts), latents)
        return self.finish(latents, reqs)

    def finish(self, latents: torch.Tensor, reqs: list[Request]) -> np.ndarray:
        """Latents (finished or partly denoised: an interrupted job's) -> images, with an inpainted
        image's original pasted back outside its mask."""
        images = decode(self.model, latents)
        for i, r in enumerate(reqs):
            if r.init is not None:
                images[i] = overlay(images[i], r.init)
        return images
