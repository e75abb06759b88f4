"""What a generation is asked for: the run's settings (`GenerateConfig`), one image's `Request`,
and `check_request`, the one check of a request before any work.

Every front end (the CLI's `generate`, job files, the server, the Python API, the diffusers
adapter) validates through `check_settings` / `check_request` / `check_size`; the NetiError it raises carries the
setting at fault as `field` (errors.py), which each front end names its own way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from ..concepts.table import TableLike
from ..errors import NetiError
from ..sd.conditioning import markers, tokenize
from ..sd.encoders import tokenize_all
from ..sd.models import Model
from ..utils import SAMPLING_RANGES, Range, image_size
from .img2img import Init
from .sampling import scheduler_parts

ETA_RANGE = Range(float, 0, 1)   # DDIM: 0 deterministic .. 1 DDPM-like


@dataclass
class GenerateConfig:
    """Settings shared by a generation run (official NeTI inference defaults)."""
    steps: int = 50
    guidance: float = 7.5
    scheduler: str = "dpm++"          # one of SCHEDULERS (sampling.make_scheduler)
    eta: float | None = None          # DDIM's eta (None: 0, deterministic); only DDIM takes one
    height: int | None = None         # None: the model's native size (512 for SD 1.x)
    width: int | None = None
    negative_prompt: str = ""
    batch_size: int = 8               # images per U-Net batch (each is two rows with guidance)
    attention: str = "auto"           # one of ATTENTIONS (sd/attention.py)
    cache_mb: int = 2048              # bound on cached prepared conditionings
    prompt_syntax: str = "plain"      # what the CLI / API / job files give their requests (Request.prompt_syntax)


Tables = Union[TableLike, dict, None]   # one concept, {name: concept} for several `{name}`s, or none


@dataclass
class Request:
    prompt: str
    seed: int
    table: Tables = None              # None (plain SD), a Table / MixedTable, or {name: table} for several
    truncation: int | None = None     # NeTI nested-dropout truncation (applies to every NeTI concept)
    negative_prompt: str | None = None  # None: GenerateConfig.negative_prompt
    clip_skip: int = 1                # A1111's CLIP skip: 1 = CLIP's last layer; n: the n-th from last (then its final LN)
    init: Init | None = None          # img2img / inpainting input (img2img.py); None: txt2img
    prompt_syntax: str = "plain"      # "plain" or "a1111" (emphasis, BREAK, long prompts: sd/prompt_syntax.py)
    # SDXL's micro-conditioning (U-Net `time_ids`): (original height, width, crop top, crop left, target
    # height, width); None: diffusers' default for the image size, (h, w, 0, 0, h, w). Families
    # without time ids refuse one.
    time_ids: tuple | None = None
    # Where the model zeroes an empty negative prompt (force_zeros_for_empty_prompt), whether this
    # request's is zeroed: diffusers zeroes only a negative prompt not given (None), so the diffusers
    # adapter clears it for an explicit negative_prompt="".
    zero_empty_negative: bool = True

    @property
    def tables(self) -> dict:
        """{name: table}: what the prompt's `{name}` markers may refer to."""
        return as_tables(self.table)


def as_tables(table: Tables) -> dict:
    """None, a Table / MixedTable, or {name: table} -> {name: table}."""
    if table is None:
        return {}
    return dict(table) if isinstance(table, dict) else {table.name: table}


def _default_marker(tables: dict) -> str | None:
    """Bare `{}` means the only concept, or else the only mix (XTI style mixing: `a photo of {}`)."""
    from ..concepts.mixing import MixedTable
    mixes = [n for n, t in tables.items() if isinstance(t, MixedTable)]
    return mixes[0] if len(tables) > 1 and len(mixes) == 1 else None


def tokenize_request(model: Model, prompt: str, tables: dict, syntax: str = "plain") -> list:
    """The prompt's tokens for each of the model's text encoders (sd.encoders.tokenize_all)."""
    return tokenize_all(model, prompt, list(tables) if tables else None, _default_marker(tables),
                        [t.vectors for t in tables.values()], syntax)


def negative_text(req: Request, cfg: GenerateConfig) -> str:
    return cfg.negative_prompt if req.negative_prompt is None else req.negative_prompt


def context_chunks(model: Model, req: Request, cfg: GenerateConfig) -> int:
    """CLIP chunks of 77 tokens in the request's conditioning: its prompt's, or its negative
    prompt's when guidance uses it and it is longer; the shorter of the two is padded with empty
    chunks (conditioning.pad_chunks, A1111's "Pad prompt/negative prompt"). Images of one U-Net
    batch share it (their K / V tables have 77 x chunks keys): the batch planners group by it
    rather than pad a request to its batch-mates' length, which would make an image depend on
    what shares its batch. The family's tokenizers share CLIP's BPE: the first one counts."""
    if req.prompt_syntax == "plain":
        return 1  # one chunk or refused (check_request): no tokenizing per batch for the default
    n = tokenize_request(model, req.prompt, req.tables, req.prompt_syntax)[0].chunks
    if cfg.guidance != 1.0:
        n = max(n, tokenize(model.tokenizer, negative_text(req, cfg), None, syntax=req.prompt_syntax).chunks)
    return n


def check_size(model: Model, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width) of the images (None: the model's native size), each a multiple of the VAE's factor."""
    h, w = image_size(model, height, width)
    f = model.vae_scale_factor
    for name, v in (("height", h), ("width", w)):
        if v % f:
            raise NetiError(f"must be a multiple of {f}", field=name, value=v)
    return h, w


def check_settings(cfg: GenerateConfig) -> None:
    """A run's numbers, each in its range (utils.SAMPLING_RANGES). Names (scheduler, attention)
    are checked where they are looked up (sampling.make_scheduler, sd.attention)."""
    for name, rng in SAMPLING_RANGES.items():
        value = getattr(cfg, name)
        if value is not None or name not in ("height", "width"):
            rng.check(value, name)
    if cfg.eta is not None:
        if not scheduler_parts(cfg.scheduler)[0].eta:
            raise NetiError(f"applies to DDIM only, not scheduler {cfg.scheduler!r}", field="eta", value=cfg.eta)
        ETA_RANGE.check(cfg.eta, "eta")


def _from_last(hidden_state: int) -> str:
    return "the last" if hidden_state == -1 else "the penultimate" if hidden_state == -2 else f"{-hidden_state}th from last"


def check_request(model: Model, req: Request) -> None:
    """Validate a request before any work: CLIP skip, concept widths, truncation, prompt (markers,
    length) and negative prompt (plain text: no markers)."""
    # the deepest CLIP skip every text encoder has layers for (SDXL's start at hidden state -2: one fewer)
    specs = model.family.encoders
    depths = [te.config.num_hidden_layers for te in model.text_encoders]
    layers = min(n + 1 + spec.hidden_state for n, spec in zip(depths, specs))
    if isinstance(req.clip_skip, bool) or not isinstance(req.clip_skip, int) or not 1 <= req.clip_skip <= layers:
        raise NetiError(f"must be an integer from 1 to {layers}: 1 is the layer {model.family.title} reads its text "
                        f"encoder{'s' if len(specs) > 1 else ''} at ({_from_last(specs[0].hidden_state)}), each more "
                        f"one layer earlier (this model's text encoder{'s have' if len(depths) > 1 else ' has'} "
                        f"{' and '.join(map(str, depths))} layers)", field="clip_skip", value=req.clip_skip)
    if req.time_ids is not None:
        if "time_ids" not in model.family.added_conditioning:
            raise NetiError(f"{model.family.title} has no micro-conditioning (SDXL's time ids)", field="time_ids",
                            value=req.time_ids)
        ids = tuple(req.time_ids)
        if len(ids) != 6 or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in ids):
            raise NetiError("must be 6 integers >= 0: original height, width, crop top, crop left, target height, width",
                            field="time_ids", value=req.time_ids)
    tables = req.tables
    for name, t in tables.items():
        t.check(model, req.truncation, f"concept {name!r}")
    if req.truncation is not None and not any(t.truncatable for t in tables.values()):
        if not tables:
            raise NetiError("applies to NeTI concepts, and no concept was given", field="truncation",
                            value=req.truncation)
        names = ", ".join(f"{n!r}" for n in tables)
        raise NetiError(f"applies to NeTI concepts; {names} {'has' if len(tables) == 1 else 'have'} "
                        "no NeTI mapper (TI / XTI)", field="truncation", value=req.truncation)
    tokenize_request(model, req.prompt, tables, req.prompt_syntax)
    if req.negative_prompt:
        if markers(req.negative_prompt):
            raise NetiError("must not contain {} markers (a negative prompt is plain text)",
                            field="negative_prompt", value=req.negative_prompt)
        try:
            tokenize(model.tokenizer, req.negative_prompt, None, syntax=req.prompt_syntax)
        except NetiError as e:
            raise NetiError(e.message, field="negative_prompt", value=req.negative_prompt) from None
