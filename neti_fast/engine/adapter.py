"""NeTI inside an existing diffusers `StableDiffusionPipeline` (SD 1.x, SD 2.x) or `StableDiffusionXLPipeline`.

    from diffusers import StableDiffusionPipeline, DPMSolverMultistepScheduler
    import neti_fast as nf
    pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # NeTI's default
    handle = nf.attach(pipe, nf.load_table("my-cat.table.safetensors"), truncation=None)
    image = pipe("A photo of {} on a beach", generator=torch.Generator("cpu").manual_seed(0)).images[0]
    handle.detach()                                   # the pipeline is plain SD again

`attach` takes what a `Request` takes: a Table, a MixedTable, or {name: table} for `{name}`
markers. Same image as `neti-fast generate` for the same seed, steps, guidance and scheduler (a test
checks it); for a batch, pass one CPU generator per image, as `generate` draws each image's noise
from its own seed.

How: on this pipeline instance only, `encode_prompt` is replaced by one that records each
sample's prompt and negative prompt (and returns their plain CLIP encodings, which the pipeline
only uses for shapes); the U-Net's 16 cross-attention layers get neti-fast's bound processors, and
a pre-hook on the U-Net reads the scheduler's step index and points them at the engine's
per-layer K / V tables and that step's rows (built on the first step of a call, cached across calls).
On SDXL the hook also replaces the U-Net's pooled `text_embeds` by neti-fast's (they follow the
concept, README "Model families"); the pipeline's own time ids are kept. With force_zeros_for_empty_prompt
(SDXL base) no negative prompt (None) is zero conditioning, as in diffusers; an explicit
negative_prompt="" is encoded as text, as diffusers encodes it.
"""
from __future__ import annotations

import torch

from ..errors import NetiError
from ..sd import families
from ..sd.models import Model
from .engine import Engine
from .request import GenerateConfig, Request, check_request


class Attachment:
    def __init__(self, pipe, table, truncation: int | None = None, attention: str = "auto"):
        self.pipe, self.table, self.truncation = pipe, table, truncation
        family = families.detect({"_class_name": type(pipe).__name__}, pipe.text_encoder.config.to_dict(),
                                 "neti_fast.attach")
        more = family.encoders[1:]
        model = Model(pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae, dict(pipe.scheduler.config),
                      name=getattr(pipe, "name_or_path", None) or "pipeline", family=family,
                      more_tokenizers=[getattr(pipe, e.tokenizer_subfolder) for e in more],
                      more_text_encoders=[getattr(pipe, e.subfolder) for e in more],
                      zero_empty_negative=bool(pipe.config.get("force_zeros_for_empty_prompt", False)))
        self.engine = Engine(model, GenerateConfig(attention=attention))  # binds the processors to pipe.unet
        self.state = model.attn_state
        self._requests: list[Request] = []
        self._packed = None
        self._original = pipe.__dict__.get("encode_prompt")
        pipe.encode_prompt = self.encode_prompt
        self._hooks = [pipe.unet.register_forward_pre_hook(self._before, with_kwargs=True),
                       pipe.unet.register_forward_hook(self._after)]

    def encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance,
                      negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None, clip_skip=None,
                      prompt_2=None, negative_prompt_2=None, **_ignored):
        if prompt is None or prompt_embeds is not None or negative_prompt_embeds is not None:
            raise NetiError("neti_fast.attach: pass `prompt` (with {} where the concept goes), not prompt_embeds")
        # SDXL's second encoder reads `prompt` here (diffusers' default for prompt_2 None): another text
        # for it would be dropped, so it is refused
        for name, second, first in (("prompt_2", prompt_2, prompt), ("negative_prompt_2", negative_prompt_2, negative_prompt)):
            if second is not None and second != first:
                raise NetiError(f"neti_fast.attach: {name} is not supported (both text encoders read "
                                f"{name[:-2]}); leave it unset")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negs = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * len(prompts)
        if len(negs) != len(prompts):
            raise NetiError(f"neti_fast.attach: {len(negs)} negative prompts for {len(prompts)} prompts")
        n = num_images_per_prompt
        m = self.engine.model
        # diffusers zeroes the negative conditioning (force_zeros_for_empty_prompt) only when no
        # negative_prompt is given: an explicit "" is encoded like any other text
        zero = negative_prompt is None
        # diffusers' clip_skip=n skips n layers from its family's own one; neti-fast's CLIP skip 1 skips none
        skip = 1 + (clip_skip or 0)
        self._requests = [Request(p, 0, self.table, self.truncation, ng, skip, zero_empty_negative=zero)
                          for p, ng in zip(prompts, negs) for _ in range(n)]
        for r in self._requests:
            check_request(m, r)
        self._packed = None
        enc = self._plain([r.negative_prompt for r in self._requests]).to(device)  # shapes only: tables carry the text
        out = (enc, (enc if do_classifier_free_guidance else None))
        if m.family.added_conditioning:  # SDXL's pooled embeddings: shapes only too, replaced per step (_before)
            width = sum(te.config.projection_dim for te, e in zip(m.text_encoders, m.family.encoders) if e.pooled)
            pooled = enc.new_zeros(len(self._requests), width)
            out += (pooled, pooled if do_classifier_free_guidance else None)
        return out

    def _plain(self, texts: list[str]) -> torch.Tensor:
        from ..sd.encoders import encode_plain_all
        m = self.engine.model
        with torch.no_grad():
            return torch.cat([encode_plain_all(m, t) for t in texts])

    def _before(self, _module, args, kwargs):
        if not self._requests:
            return None
        x = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        ts = self.pipe.scheduler.timesteps
        B = len(self._requests)
        guided = x.shape[0] == 2 * B
        if x.shape[0] not in (B, 2 * B):
            raise NetiError(f"neti_fast.attach: U-Net batch {x.shape[0]} does not match {B} prompts' images")
        # the tables depend on the schedule: rebuilt when set_timesteps made a new tensor (the cached
        # entry holds `ts` itself, so `is` cannot be fooled by a reused id); no host sync per call
        if self._packed is None or self._packed[0] is not ts or self._packed[1] != guided:
            k_tables, v_tables, base, stride = self.engine.kv_tables(self._requests, ts, guided)
            rows = base[None] + torch.arange(len(ts), device=base.device)[:, None] * stride[None]  # [steps, B]
            f = self.engine.model.vae_scale_factor
            added = self.engine.added_conditioning(self._requests, ts, guided, x.shape[-2] * f, x.shape[-1] * f)
            self._packed = (ts, guided, k_tables, v_tables, rows, added)
        _, _, k_tables, v_tables, rows, added = self._packed
        st = self.state
        step = self._step(ts, t)
        st.mode, st.backend, st.k_tables, st.v_tables = "tables", self.engine.cfg.attention, k_tables, v_tables
        st.row_idx = rows[step]
        if added is None:
            return None
        return args, {**kwargs, "added_cond_kwargs": {**kwargs["added_cond_kwargs"], "text_embeds": added[0][step]}}

    def _step(self, ts: torch.Tensor, t) -> int:
        """Index of this U-Net call's timestep in the schedule. Schedulers that count their steps
        (DPM-Solver++, Euler, ...: `step_index`, set by `step()`; None before the first one, which
        starts at `begin_index` when the pipeline set one) are read without touching `t`; others
        (DDIM) are matched by value, one host sync per call."""
        sched = self.pipe.scheduler
        idx = getattr(sched, "step_index", None)
        if idx is None and getattr(sched, "begin_index", None) is not None:
            idx = sched.begin_index
        if idx is None:
            idx = self._match_step(ts, t)
        return int(idx)

    @staticmethod
    def _match_step(ts: torch.Tensor, t) -> int:
        return int(torch.argmin((ts.to(torch.float64).cpu() - float(t)).abs()))

    def _after(self, _module, _args, _output):
        st = self.state
        st.mode, st.row_idx, st.k_tables, st.v_tables = "plain", None, [], []

    def detach(self) -> None:
        """Remove the hooks and the prompt override; the processors stay, in plain mode (= diffusers' math)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._original is None:
            self.pipe.__dict__.pop("encode_prompt", None)
        else:
            self.pipe.encode_prompt = self._original
        self._after(None, None, None)


def attach(pipe, table, truncation: int | None = None, attention: str = "auto") -> Attachment:
    """Make `pipe("... {} ...")` generate with `table` (see the module docstring); returns a handle to `detach()`."""
    for name in ("tokenizer", "text_encoder", "unet", "vae", "scheduler"):
        if getattr(pipe, name, None) is None:
            raise NetiError(f"neti_fast.attach: the pipeline has no {name}; a StableDiffusionPipeline (SD 1.x / 2.x) "
                            "or StableDiffusionXLPipeline is needed")
    return Attachment(pipe, table, truncation, attention)
