"""The reference path: the official NeTI inference, re-implemented, that the fast engine is held to.

50 x 16 text-encoder calls one at a time (official PromptManager.embed_prompt), then per step an
unconditional and a conditional batch-1 U-Net call with the official bmm attention, one seed at a
time. Slow on purpose; tests and the `reference` rung of the bench use it.
"""
from __future__ import annotations

import numpy as np
import torch

from ..sd.attention import install_processors
from ..sd.conditioning import pad_chunks
from ..sd.encoders import encode_plain_all, encode_tokens_all, pooled_all, tokenize_all
from ..sd.models import Model
from .request import (GenerateConfig, Request, check_request, check_settings, check_size, context_chunks, negative_text,
                      tokenize_request)
from .sampling import decode, image_generators, initial_latents, make_scheduler, step_kwargs
from ..concepts.table import slot_rows


@torch.no_grad()
def reference_conditioning(model: Model, req: Request, cfg: GenerateConfig, timesteps: torch.Tensor):
    """The official PromptManager.embed_prompt: the negative prompt once, then every (t, l) encoded
    on its own. Returns (negative [1, 77 k, D], per step: per layer (enc, enc_bypass)), and the
    pooled embeddings where the family has them (SDXL: (negative [1, P], per step [1, P]), the
    step's from the concept rows of the family's pooled layer), else None; k chunks, the shorter of
    prompt and negative prompt padded with empty ones as the engine does."""
    m = model
    cs, syntax, k = req.clip_skip, req.prompt_syntax, context_chunks(m, req, cfg)
    empty = encode_plain_all(m, "", cs)

    def pad(e):
        return pad_chunks(e, k, empty)
    negative = negative_text(req, cfg)
    neg_toks = tokenize_all(m, negative, None, syntax=syntax)
    neg, neg_pooled = pad(encode_tokens_all(m, neg_toks, clip_skip=cs)[0]), pooled_all(m, neg_toks, None)
    if m.zero_empty_negative and req.zero_empty_negative and not negative:  # force_zeros_for_empty_prompt
        neg, neg_pooled = torch.zeros_like(neg), None if neg_pooled is None else torch.zeros_like(neg_pooled)
    tables = req.tables
    toks = tokenize_request(m, req.prompt, tables, syntax)
    dt = m.text_encoder.dtype
    per_step, pooled = [], []
    for t in timesteps:
        layers, rows = [], []
        for l in range(m.family.num_layers):
            if not tables:
                enc = pad(encode_tokens_all(m, toks, clip_skip=cs)[0])
                layers.append((enc, enc))
                continue
            token, bypass = slot_rows([tb.embeddings_at(t.float().view(1), torch.tensor([float(l)]), req.truncation)
                                       for tb in tables.values()], [tb.vectors for tb in tables.values()])  # [1, K, D]
            rows.append(token.to(dt))
            enc, enc_b = encode_tokens_all(m, toks, token.to(dt), None if bypass is None else bypass.to(dt), cs)
            layers.append((pad(enc), pad(enc_b)))
        per_step.append(layers)
        pl = m.family.pooled_layer
        pooled.append(None if pl is None else pooled_all(m, toks, rows[pl] if rows else None))
    return neg, per_step, (None if neg_pooled is None else (neg_pooled, pooled))


@torch.no_grad()
def generate_reference(model: Model, req: Request, cfg: GenerateConfig) -> np.ndarray:
    """The official NeTI inference algorithm for one image (uint8 [1, H, W, 3]); slow on purpose."""
    m, st = model, install_processors(model)
    check_settings(cfg)
    check_request(m, req)
    h, w = check_size(m, cfg.height, cfg.width)
    f = m.vae_scale_factor
    sched = make_scheduler(cfg.scheduler, m.scheduler_config)
    sched.set_timesteps(cfg.steps)
    neg, per_step, pooled = reference_conditioning(m, req, cfg, sched.timesteps)
    ids = tuple(req.time_ids) if req.time_ids is not None else (h, w, 0, 0, h, w)  # diffusers' defaults
    time_ids = torch.tensor([ids], dtype=neg.dtype, device=neg.device)
    gens = image_generators([req.seed])
    step_kw = step_kwargs(cfg.scheduler, sched, gens, [req.seed], cfg.eta)
    latents = initial_latents(req.seed, (m.unet.config.in_channels, h // f, w // f), m.dtype, gens[0]).to(m.device)
    latents = latents * sched.init_noise_sigma
    st.backend = "math"
    try:
        for i, (t, layers) in enumerate(zip(sched.timesteps, per_step)):
            x = sched.scale_model_input(latents, t)
            added_u = added_c = None
            if pooled is not None:
                added_u = {"text_embeds": pooled[0], "time_ids": time_ids}
                added_c = {"text_embeds": pooled[1][i], "time_ids": time_ids}
            st.mode = "plain"
            u = m.unet(x, t, encoder_hidden_states=neg, added_cond_kwargs=added_u).sample
            st.mode, st.enc, st.enc_bypass = "layers", [e for e, _ in layers], [eb for _, eb in layers]
            c = m.unet(x, t, encoder_hidden_states=layers[0][0], added_cond_kwargs=added_c).sample
            eps = u + cfg.guidance * (c - u)
            latents = sched.step(eps, t, latents, **step_kw).prev_sample
    finally:
        st.mode, st.enc, st.enc_bypass, st.backend = "plain", None, None, "auto"
    return decode(m, latents)
