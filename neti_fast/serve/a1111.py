"""Automatic1111's txt2img and img2img API, as neti-fast serves it: the request schema, which A1111 fields are
accepted (and at which values), sampler names -> engine schedulers, options, and the `info` it returns.

Rules (issue 25; A1111 builds its request models with pydantic and ignores fields it does not know):
- a field neither A1111's txt2img nor neti-fast's has is ignored, as A1111 ignores it, and listed
  back in `info`'s `ignored_fields` (and logged once per name per server process);
- a field neti-fast understands is honoured: prompts, seeds, sizes, samplers and schedule types
  (docs/samplers.md), `eta` (DDIM), `clip_skip` / `override_settings.CLIP_stop_at_last_layers`,
  `save_images`, options that hold the server's values or name its model;
- one that asks for a feature neti-fast lacks (hires fix, face restoration, scripts with
  arguments, a refiner, ...) is a 422 naming the field: never silently ignored;
- A1111 fields that only matter when such a feature is on are taken at any value (A1111 ignores
  them then too). Errors name the API field, never a CLI flag or a server path.
neti-fast's own fields beside A1111's: `truncation` (one value or a list: the sweep), `concept`
(what a bare `{}` in the prompt means); one that cannot apply is a 422, not ignored.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from ..engine.img2img import INPAINTING_FILL, MASK_BLUR
from ..utils import DEFAULT_STRENGTH, SAMPLERS as ENGINE_SAMPLERS, SCHEDULER_PARTS, SCHEDULES, scheduler_name

log = logging.getLogger("neti_fast.serve")


class FieldError(Exception):
    """A request problem tied to one field: answered as HTTP `status` with {"error", "field"}."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


# ----------------------------------------------------------------------------- samplers

@dataclass(frozen=True)
class Sampler:
    name: str            # A1111's sampler_name
    aliases: tuple       # A1111's k-diffusion aliases
    engine: str          # utils.SAMPLERS key: the diffusers scheduler it is built as
    automatic: str       # the schedule A1111 (>= 1.9) gives it for scheduler "automatic"
    eta: str = ""        # what A1111's eta means for it: "ddim" (DDIM's eta), "ancestral" (only 1 here), "" (ignored)


# A1111's samplers with a diffusers equivalent (the diffusers docs' table, docs/samplers.md), in
# A1111's order. DPM++ SDE is diffusers' DPMSolverSDEScheduler, the port of k-diffusion's
# sample_dpmpp_sde (the docs' table names the deterministic DPMSolverSinglestepScheduler).
SAMPLERS = (
    Sampler("DPM++ 2M", ("k_dpmpp_2m",), "dpm++", "karras"),
    Sampler("DPM++ SDE", ("k_dpmpp_sde",), "dpm++-sde", "karras", "ancestral"),
    Sampler("DPM++ 2M SDE", ("k_dpmpp_2m_sde",), "dpm++-2m-sde", "exponential", "ancestral"),
    Sampler("Euler a", ("k_euler_a", "k_euler_ancestral"), "euler-a", "uniform", "ancestral"),
    Sampler("Euler", ("k_euler",), "euler", "uniform"),
    Sampler("LMS", ("k_lms",), "lms", "uniform"),
    Sampler("Heun", ("k_heun",), "heun", "uniform"),
    Sampler("DPM2", ("k_dpm_2",), "dpm2", "karras"),
    Sampler("DPM2 a", ("k_dpm_2_a",), "dpm2-a", "karras", "ancestral"),
    Sampler("DDIM", ("ddim",), "ddim", "uniform", "ddim"),
    Sampler("PLMS", ("plms",), "plms", "uniform"),
    Sampler("UniPC", ("unipc",), "unipc", "uniform"),
    Sampler("LCM", ("k_lcm",), "lcm", "uniform"),
)
# A1111 samplers diffusers has no scheduler for: refused by name, saying so.
NO_EQUIVALENT = {
    "dpm++ 2s a": "DPM++ 2S a", "k_dpmpp_2s_a": "DPM++ 2S a", "dpm++ 3m sde": "DPM++ 3M SDE",
    "dpm++ 2m sde heun": "DPM++ 2M SDE Heun", "dpm fast": "DPM fast", "dpm adaptive": "DPM adaptive",
    "restart": "Restart", "ddim cfg++": "DDIM CFG++",
}
# A1111's schedule types: name -> label; those not in utils.SCHEDULES have no diffusers equivalent.
SCHEDULE_LABELS = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras", "exponential": "Exponential",
                   "polyexponential": "Polyexponential", "sgm_uniform": "SGM Uniform", "kl_optimal": "KL Optimal",
                   "align_your_steps": "Align Your Steps", "simple": "Simple", "normal": "Normal", "ddim": "DDIM",
                   "beta": "Beta"}
DEFAULT_SAMPLER = "Euler"   # A1111's API default (its sampler_index); `neti-fast generate`'s is "DPM++ 2M" + "uniform"


def _schedule_key(text: str) -> str:
    """A1111 accepts a schedule by name or label ("sgm_uniform", "SGM Uniform", alias "SGMUniform")."""
    key = text.strip().lower().replace(" ", "_")
    return "sgm_uniform" if key == "sgmuniform" else key


def find_sampler(name: str) -> tuple[Sampler | None, str | None]:
    """(sampler, schedule its name implies or None) for an A1111 name or alias, an old combined name
    ("DPM++ 2M Karras", alias k_dpmpp_2m_ka) or a neti-fast scheduler name ("dpm++-karras")."""
    key = name.strip().lower()
    for s in SAMPLERS:
        if key == s.name.lower() or key in s.aliases:
            return s, None
    for s in SAMPLERS:  # A1111 < 1.9 named sampler + schedule together; A1111 >= 1.9 still takes those
        for sched in ("karras", "exponential"):
            if key == f"{s.name.lower()} {sched}" or (sched == "karras" and key in {a + "_ka" for a in s.aliases}):
                return s, sched
    if key in SCHEDULER_PARTS:
        engine, sched = SCHEDULER_PARTS[key]
        return next((s for s in SAMPLERS if s.engine == engine), None), sched
    return None, None


def resolve_sampler(sampler_name: str | None, scheduler: str | None) -> tuple[Sampler, str, str]:
    """(sampler, schedule, engine scheduler name) or a FieldError naming `sampler_name` / `scheduler`."""
    name = sampler_name or DEFAULT_SAMPLER
    s, implied = find_sampler(name)
    if s is None:
        if name.strip().lower() in NO_EQUIVALENT:
            raise FieldError("sampler_name", f"{name!r}: diffusers has no scheduler for A1111's "
                             f"{NO_EQUIVALENT[name.strip().lower()]}, so neti-fast does not offer it")
        names = ", ".join(f'"{x.name}"' for x in SAMPLERS)
        raise FieldError("sampler_name", f"{name!r} is not a sampler neti-fast has; accepted: {names}")
    sched = _schedule_key(scheduler) if scheduler else "automatic"
    if sched == "automatic":
        sched = implied or s.automatic
    elif implied and sched != implied:
        raise FieldError("scheduler", f"{scheduler!r} contradicts sampler_name {name!r} (which means {implied!r})")
    if sched not in SCHEDULE_LABELS:
        raise FieldError("scheduler", f"{scheduler!r} is not a schedule type; accepted: "
                         + ", ".join(f'"{k}"' for k in ["automatic", *ENGINE_SAMPLERS[s.engine].schedules]))
    if sched not in ENGINE_SAMPLERS[s.engine].schedules:
        why = ("diffusers has no such schedule" if sched not in SCHEDULES else
               f"diffusers' {ENGINE_SAMPLERS[s.engine].cls} does not take it")
        raise FieldError("scheduler", f"{scheduler!r} is not available with sampler {s.name!r} ({why}); accepted: "
                         + ", ".join(f'"{k}"' for k in ["automatic", *ENGINE_SAMPLERS[s.engine].schedules]))
    return s, sched, scheduler_name(s.engine, sched)


def samplers_list() -> list[dict]:
    """GET /sdapi/v1/samplers, in A1111's shape ({name, aliases, options})."""
    return [{"name": s.name, "aliases": list(s.aliases),
             "options": {"scheduler": s.automatic} if s.automatic != "uniform" else {}} for s in SAMPLERS]


def schedulers_list() -> list[dict]:
    """GET /sdapi/v1/schedulers, in A1111's shape: the schedule types neti-fast has."""
    return [{"name": k, "label": v, "aliases": ["SGMUniform"] if k == "sgm_uniform" else None,
             "default_rho": 7.0 if k == "karras" else -1, "need_inner_model": False}
            for k, v in SCHEDULE_LABELS.items() if k == "automatic" or k in SCHEDULES]


# ----------------------------------------------------------------------------- request

class Txt2Img(BaseModel):
    """The fields neti-fast acts on; every other field is sorted by `check_extra`."""
    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1                            # -1: random; image i of the request uses seed + i (A1111)
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int = Field(50, ge=1, le=150)
    cfg_scale: float = Field(7.0, ge=0.0, le=30.0)
    # None: the model's native size (SD 1.x: 512, A1111's default; SD 2.x: 768; SDXL: 1024, where A1111
    # itself would give 512, which SDXL was not trained at; clients that care send a size anyway). Any
    # other size is taken, as A1111 takes it: the image is that size rounded down to a multiple of 8.
    width: int | None = Field(None, ge=8, le=2048)
    height: int | None = Field(None, ge=8, le=2048)
    sampler_name: str | None = None
    sampler_index: str | None = None           # deprecated in A1111; used when sampler_name is absent
    scheduler: str | None = None
    eta: float | None = None
    send_images: bool = True
    save_images: bool = False                  # also write the PNGs + manifest lines into the server's output folder
    clip_skip: int | None = Field(None, ge=1)  # SD.Next's name for CLIP_stop_at_last_layers (SillyTavern sends both)
    override_settings: dict | None = None
    force_task_id: str | None = Field(None, max_length=128)
    # neti-fast
    truncation: int | list[int | None] | None = None   # None in a list: full (no truncation)
    concept: str | None = None


class Img2Img(Txt2Img):
    """A1111's img2img: txt2img's fields (checked the same way) and the init images, strength, mask."""
    init_images: list[str] = Field(min_length=1)   # base64 (a data: URL prefix is taken too)
    denoising_strength: float = Field(DEFAULT_STRENGTH, ge=0.0, le=1.0)
    resize_mode: int = 0                       # img2img.RESIZE_MODES; 3 (latent upscale) is refused
    mask: str | None = None                    # base64; white = repaint (inpainting_mask_invert: black)
    mask_blur: int | None = Field(None, ge=0)  # sets mask_blur_x and mask_blur_y (A1111)
    mask_blur_x: int = Field(MASK_BLUR, ge=0)
    mask_blur_y: int = Field(MASK_BLUR, ge=0)
    inpainting_fill: int = INPAINTING_FILL     # img2img.FILLS
    inpaint_full_res: bool = True              # A1111's "only masked": refused with a mask (whole picture only)
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    include_init_images: bool = False


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
    "image_cfg_scale",   # instruct-pix2pix ("edit") models only
}

_logged: set = set()
_logged_lock = threading.Lock()


def note_ignored(fields: list[str], where: str) -> None:
    """Log each ignored field name once per server process (a client sends the same ones every call)."""
    with _logged_lock:
        new = [f for f in fields if (where, f) not in _logged]
        _logged.update((where, f) for f in new)
    if new:
        log.info("%s: ignoring fields neti-fast does not know (as A1111 does): %s", where, ", ".join(new))


def _disabled_script(args) -> bool:
    """An always-on script entry that asks for nothing: no args, or args starting with False (A1111
    extensions' "enabled" flag, e.g. ADetailer's [False])."""
    return args is None or args == [] or (isinstance(args, list) and args[0] is False)


def check_extra(req: Txt2Img) -> list[str]:
    """Every field outside the ones neti-fast acts on: an A1111 feature asked for is a FieldError;
    returns the fields ignored (unknown to A1111 and neti-fast)."""
    ignored = []
    for key, value in (req.model_extra or {}).items():
        if key in INACTIVE:
            ok, feature = INACTIVE[key]
            try:
                fine = ok(value)
            except TypeError:
                fine = False
            if not fine:
                raise FieldError(key, f"{feature} is not available in neti-fast (got {value!r}; leave it at its default)")
        elif key == "alwayson_scripts":
            if not isinstance(value, dict):
                raise FieldError(key, "must be an object")
            for name, entry in value.items():
                args = entry.get("args") if isinstance(entry, dict) else entry
                if not _disabled_script(args):
                    raise FieldError(f"alwayson_scripts.{name}", "scripts are not available in neti-fast "
                                     "(only disabled entries, with no arguments or [false], are accepted)")
        elif key not in IGNORED_WHEN_OFF:
            ignored.append(key)
    return ignored


def decode_image(text, field: str):
    """A base64 image (with or without a data: URL prefix) -> PIL image, or a FieldError naming `field`."""
    import base64
    import binascii
    import io

    from PIL import Image, UnidentifiedImageError
    if not isinstance(text, str) or not text:
        raise FieldError(field, "must be a base64-encoded image")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        img = Image.open(io.BytesIO(base64.b64decode(text, validate=False)))
        img.load()
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as e:
        raise FieldError(field, f"is not a base64-encoded image ({type(e).__name__})") from None
    return img


def init_inputs(req: Img2Img, width: int, height: int) -> list:
    """img2img.Init per init image (A1111: one serves the whole batch, several set batch_size),
    each field checked: a value neti-fast cannot honour is a FieldError naming it."""
    from ..engine.img2img import prepare_init
    from ..errors import NetiError
    if req.resize_mode == 3:
        raise FieldError("resize_mode", "3 (latent upscale) is not available in neti-fast; use 0, 1 or 2")
    if req.initial_noise_multiplier not in (None, 1, 1.0):
        raise FieldError("initial_noise_multiplier", f"{req.initial_noise_multiplier}: only 1 is available in neti-fast")
    if req.include_init_images:
        raise FieldError("include_init_images", "is not available in neti-fast (leave it false)")
    if len(req.init_images) > req.batch_size:
        raise FieldError("init_images", f"{len(req.init_images)} images for batch_size {req.batch_size}: A1111 takes "
                         "one image for the whole batch, or up to batch_size (each its own image)")
    mask = None
    if req.mask:
        mask = decode_image(req.mask, "mask")
        if req.inpaint_full_res:
            raise FieldError("inpaint_full_res", "\"only masked\" inpainting is not available in neti-fast; send "
                             "false (whole picture)")
    blur = (req.mask_blur, req.mask_blur) if req.mask_blur is not None else (req.mask_blur_x, req.mask_blur_y)
    images = [decode_image(b64, f"init_images.{i}") for i, b64 in enumerate(req.init_images)]
    try:
        return [prepare_init(img, width, height, req.denoising_strength, req.resize_mode, mask, blur,
                             req.inpainting_fill, bool(req.inpainting_mask_invert)) for img in images]
    except NetiError as e:
        raise FieldError(e.field or "init_images", e.detail()) from None


# ----------------------------------------------------------------------------- options

def options(server) -> dict:
    """GET /sdapi/v1/options: the A1111 options neti-fast has, at the server's values."""
    return {"sd_model_checkpoint": server.model_title, "sd_checkpoint_hash": server.model_hash,
            "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1, "eta_ddim": 0.0, "eta_ancestral": 1.0,
            "eta_noise_seed_delta": 0, "samples_format": "png", "samples_save": True,
            "sdxl_crop_top": 0, "sdxl_crop_left": 0, "sdxl_clip_l_skip": False}


# override_settings keys that are a request's own settings (A1111: p.<setting> else opts.<key>), and
# the request field that sets each, if any. SDXL's crop options (A1111 lists them whatever the model,
# and they act on SDXL only) set the micro-conditioning's crop top-left, per request.
REQUEST_OPTIONS = {"CLIP_stop_at_last_layers": "clip_skip", "eta_ddim": "eta", "sdxl_crop_top": None,
                   "sdxl_crop_left": None}


def _same(key: str, value, server) -> bool:
    """`value` is what option `key` holds here (the model: by any of its names, as A1111's aliases)."""
    if key == "sd_model_checkpoint":
        return value in server.model_names
    if key == "sd_vae":
        return value in ("Automatic", "None", None)  # neti-fast has the model's own VAE only
    cur = options(server)[key]
    if isinstance(cur, bool) or isinstance(value, bool):
        return value is cur
    if isinstance(cur, (int, float)):
        return isinstance(value, (int, float)) and value == cur
    return value == cur


def check_options(values: dict, server, where: str, prefix: str = "") -> list[str]:
    """A1111 options set (POST /sdapi/v1/options) or overridden for one request (override_settings):
    each known one must hold the server's value (or name its model), else a FieldError naming it;
    returns the unknown keys, which are ignored. REQUEST_OPTIONS are the caller's to apply."""
    known, ignored = options(server), []
    for k, v in values.items():
        if v is None or k in REQUEST_OPTIONS and prefix:
            continue
        if k not in known:
            ignored.append(prefix + k)
        elif not _same(k, v, server):
            what = ("one model per server: start another server for another model" if k == "sd_model_checkpoint"
                    else f"this server's value is {known[k]!r}")
            if k in REQUEST_OPTIONS:
                what += (f"; send `{REQUEST_OPTIONS[k]}` (or override_settings.{k}) with each request instead"
                         if REQUEST_OPTIONS[k] else f"; send override_settings.{k} with each request instead")
            raise FieldError(prefix + k, f"neti-fast cannot change this setting to {v!r} ({what})")
    note_ignored(ignored, where)
    return ignored


def request_settings(req: Txt2Img, sampler: Sampler, server) -> tuple[int, float | None, tuple, list[str]]:
    """(clip_skip, engine eta, SDXL crop (top, left), ignored fields) of a request: its fields and
    override_settings merged as A1111 does (the request's own field first), each checked."""
    ov = req.override_settings or {}
    if not isinstance(ov, dict):
        raise FieldError("override_settings", "must be an object")
    ignored = check_options(ov, server, "img2img" if isinstance(req, Img2Img) else "txt2img", "override_settings.")
    crop = []
    for key in ("sdxl_crop_top", "sdxl_crop_left"):
        v = ov.get(key)
        if v is None:
            v = 0
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise FieldError(f"override_settings.{key}", f"must be an integer >= 0 (got {v!r})")
        crop.append(v)
    crop = tuple(crop)
    clip = ov.get("CLIP_stop_at_last_layers")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, int)):
        raise FieldError("override_settings.CLIP_stop_at_last_layers", f"must be an integer (got {clip!r})")
    if req.clip_skip is not None and clip is not None and req.clip_skip != clip:
        raise FieldError("clip_skip", f"{req.clip_skip} disagrees with override_settings.CLIP_stop_at_last_layers {clip}")
    clip_skip = req.clip_skip or clip or 1
    if clip_skip != 1 and not server.model.family.a1111_clip_skip:
        # A1111 reads SD 2.x's and SDXL's encoders at their fixed layer whatever the setting (Family.a1111_clip_skip)
        ignored.append("clip_skip" if req.clip_skip else "override_settings.CLIP_stop_at_last_layers")
        clip_skip = 1
    eta = req.eta if req.eta is not None else ov.get("eta_ddim") if sampler.eta == "ddim" else None
    eta_field = "eta" if req.eta is not None else "override_settings.eta_ddim"
    if eta is not None and (isinstance(eta, bool) or not isinstance(eta, (int, float))):
        raise FieldError(eta_field, f"must be a number (got {eta!r})")
    if sampler.eta == "ddim":
        if eta is not None and not 0 <= eta <= 1:
            raise FieldError(eta_field, f"{eta}: DDIM's eta is from 0 (deterministic) to 1")
        return clip_skip, None if eta is None else float(eta), crop, ignored
    ancestral = ov.get("eta_ancestral")
    if sampler.eta == "ancestral":  # diffusers' ancestral / SDE steps are A1111's at eta 1
        for field, v in (("eta", req.eta), ("override_settings.eta_ancestral", ancestral)):
            if v is not None and v != 1:
                raise FieldError(field, f"{v}: neti-fast's {sampler.name} is the standard stochastic step (eta 1)")
    return clip_skip, None, crop, ignored   # other samplers ignore eta, in A1111 too


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
             width: int, height: int, model: str, truncation, clip_skip: int = 1, eta: float | None = None) -> str:
    """A1111's per-image generation-parameters text (what its UI shows and PNG info holds)."""
    parts = [f"Steps: {steps}", f"Sampler: {sampler}", f"Schedule type: {SCHEDULE_LABELS.get(schedule, schedule)}",
             f"CFG scale: {cfg:g}", f"Seed: {seed}", f"Size: {width}x{height}", f"Model: {model}"]
    if eta is not None:
        parts.append(f"Eta DDIM: {eta:g}")
    if clip_skip != 1:
        parts.append(f"Clip skip: {clip_skip}")
    if truncation is not None:
        parts.append(f"NeTI truncation: {truncation}")
    head = prompt + (f"\nNegative prompt: {negative}" if negative else "")
    return f"{head}\n{', '.join(parts)}"


def info_json(*, req: Txt2Img, prompts: list, seeds: list, truncs: list, width: int, height: int, sampler: Sampler,
              schedule: str, engine_scheduler: str, model: str, concepts: list, clip_skip: int = 1,
              eta: float | None = None, ignored: list = (), saved: list = (), image_width: int | None = None,
              image_height: int | None = None) -> str:
    """The `info` string A1111 returns: JSON of the settings, the seeds used included; neti-fast's
    keys beside A1111's: truncations, the engine scheduler, concepts, the fields it ignored and the
    files `save_images` wrote (relative to the server's output folder). `width` / `height` are the
    size asked, as A1111 reports it (its infotext's Size re-creates the image); the image is that
    rounded down to a multiple of 8, which `image_width` / `image_height` say where they differ."""
    texts = [infotext(p, req.negative_prompt, req.steps, sampler.name, schedule, req.cfg_scale, s, width, height,
                      model, t, clip_skip, eta) for p, s, t in zip(prompts, seeds, truncs)]
    return json.dumps({
        "prompt": req.prompt, "all_prompts": prompts, "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [req.negative_prompt] * len(prompts), "seed": seeds[0] if seeds else req.seed,
        "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * len(seeds), "subseed_strength": 0, "width": width, "height": height,
        "sampler_name": sampler.name, "scheduler": schedule, "cfg_scale": req.cfg_scale, "steps": req.steps,
        "batch_size": req.batch_size, "restore_faces": False, "face_restoration_model": None, "sd_model_name": model,
        "sd_model_hash": None, "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1,
        "seed_resize_from_h": -1, "denoising_strength": getattr(req, "denoising_strength", None),
        "extra_generation_params": {},
        "index_of_first_image": 0, "infotexts": texts, "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": clip_skip, "eta": eta, "is_using_inpainting_conditioning": False, "version": "neti-fast",
        "truncation": truncs[0] if truncs else None, "all_truncations": truncs, "engine_scheduler": engine_scheduler,
        "concepts": concepts, "ignored_fields": list(ignored), "saved_files": list(saved),
        **({"image_width": image_width, "image_height": image_height}
           if (image_width, image_height) not in ((None, None), (width, height)) else {}),
    })
