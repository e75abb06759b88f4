"""Automatic1111's txt2img API, as neti-fast serves it: the request schema, which A1111 fields are
accepted (and at which values), sampler names -> engine schedulers, and the `info` it returns.

Rules (the issue's contract):
- every field A1111's `/sdapi/v1/txt2img` takes is known here; a field at its default or disabled
  value is accepted, so clients that send all ~45 fields (webuiapi) work unchanged;
- a feature neti-fast does not have, asked for (hires fix, face restoration, scripts with arguments,
  variation seeds, ...), is a 422 naming the field: never silently ignored;
- a field A1111 does not have either is a 422 too (a typo would otherwise be ignored).
neti-fast's own fields beside A1111's: `truncation` (one value or a list: the sweep), `concept`
(what a bare `{}` in the prompt means).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class FieldError(Exception):
    """A request problem tied to one field: answered as HTTP `status` with {"error", "field"}."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


# ----------------------------------------------------------------------------- samplers

@dataclass(frozen=True)
class Sampler:
    name: str            # A1111's sampler_name
    aliases: tuple       # A1111's k-diffusion aliases, and neti-fast's own scheduler name
    schedules: dict      # A1111 `scheduler` value -> engine scheduler (utils.SCHEDULERS)


# A1111 >= 1.9 splits "DPM++ 2M Karras" into sampler "DPM++ 2M" + scheduler "karras", and its
# "automatic" schedule for DPM++ 2M is Karras; "uniform" is the plain schedule (neti-fast's and
# official NeTI's default `dpm++`). The old combined name is kept as A1111 keeps it (an alias).
SAMPLERS = (
    Sampler("DPM++ 2M", ("k_dpmpp_2m", "dpm++"), {"automatic": "dpm++-karras", "karras": "dpm++-karras", "uniform": "dpm++"}),
    Sampler("DPM++ 2M Karras", ("k_dpmpp_2m_ka", "dpm++-karras"), {"automatic": "dpm++-karras", "karras": "dpm++-karras"}),
    Sampler("Euler a", ("k_euler_a", "k_euler_ancestral", "euler-a"), {"automatic": "euler-a", "uniform": "euler-a"}),
    Sampler("Euler", ("k_euler", "euler"), {"automatic": "euler", "uniform": "euler"}),
    Sampler("DDIM", ("ddim",), {"automatic": "ddim", "uniform": "ddim"}),
)
SCHEDULE_LABELS = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras"}
DEFAULT_SAMPLER = "Euler"   # A1111's API default (its sampler_index); `neti-fast generate`'s is "DPM++ 2M" + "uniform"


def find_sampler(name: str) -> Sampler | None:
    key = name.strip().lower()
    for s in SAMPLERS:
        if key == s.name.lower() or key in s.aliases:
            return s
    return None


def resolve_sampler(sampler_name: str | None, scheduler: str | None) -> tuple[Sampler, str, str]:
    """(sampler, A1111 schedule, engine scheduler name) or a FieldError listing what is accepted."""
    s = find_sampler(sampler_name or DEFAULT_SAMPLER)
    if s is None:
        names = ", ".join(f'"{x.name}"' for x in SAMPLERS)
        raise FieldError("sampler_name", f"{sampler_name!r} is not a sampler neti-fast has; accepted: {names}")
    sched = (scheduler or "automatic").strip().lower()
    if sched not in s.schedules:
        accepted = ", ".join(f'"{k}"' for k in s.schedules)
        raise FieldError("scheduler", f"{scheduler!r} is not available with sampler {s.name!r}; accepted: {accepted}")
    return s, sched, s.schedules[sched]


def samplers_list() -> list[dict]:
    """GET /sdapi/v1/samplers, in A1111's shape ({name, aliases, options})."""
    out = []
    for s in SAMPLERS:
        opts = {"scheduler": "karras"} if s.schedules.get("automatic", "").endswith("karras") else {}
        out.append({"name": s.name, "aliases": list(s.aliases), "options": opts})
    return out


def schedulers_list() -> list[dict]:
    """GET /sdapi/v1/schedulers, in A1111's shape."""
    return [{"name": k, "label": v, "aliases": None, "default_rho": None, "need_inner_model": None}
            for k, v in SCHEDULE_LABELS.items()]


# ----------------------------------------------------------------------------- request

class Txt2Img(BaseModel):
    """The fields neti-fast acts on; every other A1111 field is checked by `check_inactive`."""
    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1                            # -1: random; image i of the request uses seed + i (A1111)
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int = Field(50, ge=1, le=150)
    cfg_scale: float = Field(7.0, ge=0.0, le=30.0)
    width: int | None = Field(None, ge=8, le=2048)    # None: the model's native size
    height: int | None = Field(None, ge=8, le=2048)
    sampler_name: str | None = None
    sampler_index: str | None = None           # deprecated in A1111; used when sampler_name is absent
    scheduler: str | None = None
    eta: float | None = None
    send_images: bool = True
    force_task_id: str | None = Field(None, max_length=128)
    # neti-fast
    truncation: int | list[int | None] | None = None   # None in a list: full (no truncation)
    concept: str | None = None


def _zero(v) -> bool:
    return v is None or v == 0 or v is False


def _empty(v) -> bool:
    return v is None or v == "" or v == [] or v == {} or v == "None"


# A1111 fields that neti-fast accepts only at their default / disabled value: field -> (is-inactive, feature).
INACTIVE = {
    "enable_hr": (_zero, "hires fix"),
    "styles": (_empty, "prompt styles"),
    "subseed_strength": (_zero, "variation seeds"),
    "seed_resize_from_h": (lambda v: v is None or v <= 0, "resize seed from height"),
    "seed_resize_from_w": (lambda v: v is None or v <= 0, "resize seed from width"),
    "restore_faces": (_zero, "face restoration"),
    "tiling": (_zero, "tiling"),
    "s_churn": (_zero, "sampler noise (s_churn)"),
    "s_tmin": (_zero, "sampler noise (s_tmin)"),
    "s_tmax": (lambda v: v is None or v == 0 or (isinstance(v, (int, float)) and math.isinf(v)), "sampler noise (s_tmax)"),
    "s_noise": (lambda v: v is None or v == 1, "sampler noise (s_noise)"),
    "s_min_uncond": (_zero, "negative guidance minimum sigma"),
    "script_name": (_empty, "scripts"),
    "script_args": (_empty, "scripts with arguments"),
    "save_images": (_zero, "saving images on the server"),
    "refiner_checkpoint": (_empty, "refiner"),
    "token_merging_ratio": (_zero, "token merging"),
    "token_merging_ratio_hr": (_zero, "token merging"),
    "infotext": (_empty, "settings from an infotext"),
    "seed_enable_extras": (lambda v: True, ""),  # its extras are checked one by one above
}
# A1111 fields that only matter for a feature that is off (hires fix, refiner, variation seeds) or
# only for A1111's own disk output: any value is accepted, as A1111 itself ignores them then.
IGNORED_WHEN_OFF = {
    "denoising_strength", "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler",
    "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name",
    "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_additional_modules", "subseed",
    "refiner_switch_at", "do_not_save_samples", "do_not_save_grid", "override_settings_restore_afterwards",
    "disable_extra_networks", "do_not_reload_embeddings", "comments",
}
# override_settings keys neti-fast can honour (by checking they already hold): key -> check(value, server)
OVERRIDES = {
    "sd_model_checkpoint": lambda v, srv: v in (srv.model_name, srv.model_title),
    "CLIP_stop_at_last_layers": lambda v, srv: v in (1, None),
    "eta_ancestral": lambda v, srv: v in (1, 1.0, None),
    "eta_noise_seed_delta": lambda v, srv: v in (0, None),
}


def _disabled_script(args) -> bool:
    """An always-on script entry that asks for nothing: no args, or args starting with False (A1111
    extensions' "enabled" flag, e.g. ADetailer's [False])."""
    return args is None or args == [] or (isinstance(args, list) and args[0] is False)


def check_inactive(req: Txt2Img, server) -> None:
    """Every field outside the ones neti-fast acts on must be known to A1111 and ask for nothing."""
    for key, value in (req.model_extra or {}).items():
        if key in INACTIVE:
            ok, feature = INACTIVE[key]
            try:
                fine = ok(value)
            except TypeError:
                fine = False
            if not fine:
                raise FieldError(key, f"{feature} is not available in neti-fast (got {value!r}; leave it at its default)")
        elif key == "override_settings":
            if not isinstance(value, dict):
                raise FieldError(key, "must be an object")
            for k, v in value.items():
                check = OVERRIDES.get(k)
                if check is None or not check(v, server):
                    raise FieldError(f"override_settings.{k}", f"neti-fast cannot apply this setting ({v!r}); "
                                     f"it honours only {', '.join(OVERRIDES)} at the server's values")
        elif key == "alwayson_scripts":
            if not isinstance(value, dict):
                raise FieldError(key, "must be an object")
            for name, entry in value.items():
                args = entry.get("args") if isinstance(entry, dict) else entry
                if not _disabled_script(args):
                    raise FieldError(f"alwayson_scripts.{name}", "scripts are not available in neti-fast "
                                     "(only disabled entries, with no arguments or [false], are accepted)")
        elif key not in IGNORED_WHEN_OFF:
            raise FieldError(key, "unknown field (neither Automatic1111's txt2img nor neti-fast's)")


def check_eta(eta: float | None, sampler: Sampler) -> None:
    """A1111's eta: the ancestral noise scale (Euler a: diffusers' ancestral step is eta = 1) or
    DDIM's (neti-fast's DDIM is eta = 0); the other samplers ignore it, in A1111 too."""
    if eta is None:
        return
    if sampler.name == "Euler a" and eta != 1:
        raise FieldError("eta", f"{eta}: neti-fast's Euler a is the standard ancestral step (eta 1)")
    if sampler.name == "DDIM" and eta != 0:
        raise FieldError("eta", f"{eta}: neti-fast's DDIM is deterministic (eta 0)")


def truncations(value) -> list:
    """The request's truncation(s): [None] (full), or the sweep's values in order, without repeats."""
    if value is None:
        return [None]
    vals = value if isinstance(value, list) else [value]
    if not vals:
        return [None]
    if any(v is not None and v < 1 for v in vals):
        raise FieldError("truncation", "values must be positive integers (nested-dropout truncation K)")
    return list(dict.fromkeys(vals))


# ----------------------------------------------------------------------------- response

def infotext(prompt: str, negative: str, steps: int, sampler: str, schedule: str, cfg: float, seed: int,
             width: int, height: int, model: str, truncation) -> str:
    """A1111's per-image generation-parameters text (what its UI shows and PNG info holds)."""
    parts = [f"Steps: {steps}", f"Sampler: {sampler}", f"Schedule type: {SCHEDULE_LABELS.get(schedule, schedule)}",
             f"CFG scale: {cfg:g}", f"Seed: {seed}", f"Size: {width}x{height}", f"Model: {model}"]
    if truncation is not None:
        parts.append(f"NeTI truncation: {truncation}")
    head = prompt + (f"\nNegative prompt: {negative}" if negative else "")
    return f"{head}\n{', '.join(parts)}"


def info_json(*, req: Txt2Img, prompts: list, seeds: list, truncs: list, width: int, height: int, sampler: Sampler,
              schedule: str, engine_scheduler: str, model: str, concepts: list) -> str:
    """The `info` string A1111 returns: JSON of the settings, the seeds used included."""
    texts = [infotext(p, req.negative_prompt, req.steps, sampler.name, schedule, req.cfg_scale, s, width, height,
                      model, t) for p, s, t in zip(prompts, seeds, truncs)]
    return json.dumps({
        "prompt": req.prompt, "all_prompts": prompts, "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [req.negative_prompt] * len(prompts), "seed": seeds[0] if seeds else req.seed,
        "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * len(seeds), "subseed_strength": 0, "width": width, "height": height,
        "sampler_name": sampler.name, "scheduler": schedule, "cfg_scale": req.cfg_scale, "steps": req.steps,
        "batch_size": req.batch_size, "restore_faces": False, "face_restoration_model": None, "sd_model_name": model,
        "sd_model_hash": None, "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1,
        "seed_resize_from_h": -1, "denoising_strength": None, "extra_generation_params": {},
        "index_of_first_image": 0, "infotexts": texts, "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1, "is_using_inpainting_conditioning": False, "version": "neti-fast",
        "truncation": truncs[0] if truncs else None, "all_truncations": truncs, "engine_scheduler": engine_scheduler,
        "concepts": concepts,
    })
