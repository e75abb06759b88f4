"""Job files of `neti-fast run`: parsing, validation and the fixed batch plan (no running: runner.py).

Job file: one JSON object per line (blank lines and lines starting with # are skipped), e.g.
    {"prompt": "a photo of {} on a beach", "concept": "cat.safetensors", "seeds": "0-63", "truncation": 16}
Keys: prompt (required), concept (a concept / table / bundle file, or {"name": path, ...} for several
`{name}` concepts in one prompt; relative paths are relative to the job file's folder), seeds ("0-63", "0,3,7" or a list),
truncation (K, null or a list), steps, guidance, negative_prompt, scheduler, height, width,
prompt_syntax ("plain" or "a1111": A1111's emphasis, BREAK and long prompts). Missing keys take the
command-line values.
img2img: init_image (an image file, relative to the job file's folder like concept), strength (A1111's
denoising_strength, > 0 and <= 1, default 0.75), resize_mode (0 just resize, default; 1 crop and resize;
2 resize and fill), mask (inpainting: an image of the init image's size, white = repaint, with the
server's defaults: blur 4, fill 0). Images share a U-Net batch only when their strengths leave the
same number of steps (`Img.group`); the manifest records the files' SHA-256, so resume sees a changed one.

`neti-fast generate` builds the same `Line`s from its flags (with its concepts already loaded), so
both commands share the planner, the manifest and resume.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import NetiError
from ..options import parse_seeds
from ..sd.prompt_syntax import SYNTAXES
from ..utils import (DEFAULT_STRENGTH, RESIZE_MODE_RANGE, SAMPLING_RANGES, STRENGTH_RANGE, ByteLRU, image_size,
                     scheduler_problem)

if TYPE_CHECKING:   # annotations only: the engine loads torch, not at --help time
    from ..engine.img2img import Init

INIT_KEYS = ("init_image", "strength", "resize_mode", "mask")
KEYS = ("prompt", "concept", "seeds", "truncation", "steps", "guidance", "negative_prompt", "scheduler",
        "height", "width", "prompt_syntax", *INIT_KEYS)


@dataclass
class InitSource:
    """A line's img2img input: the files as written (what the manifest records) and resolved, and
    their SHA-256 once `check`ed (what makes its images reproducible: resume compares them)."""
    image: str                          # as written
    image_path: str                     # resolved (a job file: against its folder; the CLI: as given)
    strength: float = DEFAULT_STRENGTH
    resize_mode: int = 0
    mask: str | None = None
    mask_path: str | None = None
    image_sha256: str | None = None     # set by check()
    mask_sha256: str | None = None

    def check(self, seen: dict | None = None) -> None:
        """Read and decode the files, record their hashes; a mask must be the init image's size.
        NetiError naming init_image / mask. `seen`: path -> (sha256, size), shared by the lines of a job."""
        seen = {} if seen is None else seen

        def probe(path, written, field):
            key = str(Path(path).resolve())
            if key not in seen:
                img, sha = _read_image(path, written, field)
                seen[key] = (sha, img.size)
            return seen[key]
        self.image_sha256, size = probe(self.image_path, self.image, "init_image")
        if self.mask is not None:
            self.mask_sha256, msize = probe(self.mask_path, self.mask, "mask")
            if msize != size:
                raise NetiError(f"is {msize[0]}x{msize[1]}, the init image is {size[0]}x{size[1]}: a mask must be "
                                "the init image's size", field="mask", value=self.mask)

    def prepare(self, height: int, width: int) -> "Init":
        """The engine's Init at the run's size, made as the server makes it (img2img.prepare_init, with
        A1111's mask defaults); NetiError if a file is not what `check` read."""
        from ..engine.img2img import INPAINTING_FILL, MASK_BLUR, prepare_init
        image, _ = _read_image(self.image_path, self.image, "init_image", self.image_sha256)
        mask = None if self.mask is None else _read_image(self.mask_path, self.mask, "mask", self.mask_sha256)[0]
        return prepare_init(image, width, height, self.strength, self.resize_mode, mask, (MASK_BLUR, MASK_BLUR),
                            INPAINTING_FILL)

    def manifest_fields(self) -> dict:
        """What the manifest records of it (manifest.SETTINGS compares them on resume)."""
        e = {"init_image": self.image, "init_image_sha256": self.image_sha256, "strength": self.strength,
             "resize_mode": self.resize_mode}
        if self.mask is not None:
            from ..engine.img2img import INPAINTING_FILL, MASK_BLUR
            e.update(mask=self.mask, mask_sha256=self.mask_sha256, mask_blur=MASK_BLUR, inpainting_fill=INPAINTING_FILL)
        return e


def _read_image(path: str, written: str, field: str, sha256: str | None = None):
    """(PIL image, its file's SHA-256), or NetiError naming `field` (and the path as written)."""
    import hashlib
    import io

    from PIL import Image, UnidentifiedImageError
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise NetiError(f"cannot read it ({e.strerror or e})", field=field, value=written) from None
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise NetiError("changed while the job ran; re-run to make its images from the new file", field=field,
                        value=written)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
        raise NetiError(f"is not an image file PIL can read ({type(e).__name__})", field=field, value=written) from None
    return img, digest


def init_source(init_image=None, strength=None, resize_mode=None, mask=None, base: Path | None = None) -> InitSource | None:
    """A line's (or the flags') img2img input, each value checked; None values are not given (None
    without init_image: txt2img). Paths are resolved against `base` (None: as given). NetiError
    naming the key at fault."""
    if init_image is None:
        for field, v in (("strength", strength), ("resize_mode", resize_mode), ("mask", mask)):
            if v is not None:
                raise NetiError("applies to img2img, and no init image was given", field=field, value=v)
        return None
    for field, v in (("init_image", init_image), ("mask", mask)):
        if v is not None and not (isinstance(v, str) and v):
            raise NetiError(f"must be an image file's path, got {_jtype(v)}", field=field)
    strength = STRENGTH_RANGE.check(DEFAULT_STRENGTH if strength is None else strength, "strength")
    resize_mode = RESIZE_MODE_RANGE.check(0 if resize_mode is None else resize_mode, "resize_mode")
    where = (lambda p: p) if base is None else (lambda p: str(base / p))
    return InitSource(init_image, where(init_image), float(strength), resize_mode, mask,
                      None if mask is None else where(mask))


@dataclass
class Line:
    """One validated request of the job."""
    line: int                       # 1-based line number in the job file
    prompt: str
    concept: object                 # as written (str, {name: str} or None): recorded in the manifest
    paths: object                   # the same, resolved against the job file's folder
    seeds: list
    truncations: list
    steps: int
    guidance: float
    scheduler: str
    negative_prompt: str
    height: int | None
    width: int | None
    failed: str | None = None       # why the concept could not be loaded
    init: InitSource | None = None  # img2img input (None: txt2img)
    prompt_syntax: str = "plain"
    chunks: int = 1                 # CLIP chunks of its conditioning (request.context_chunks; set by check_lines)


@dataclass
class Img:
    line: Line
    truncation: int | None
    seed: int
    file: str
    height: int
    width: int

    @property
    def group(self) -> tuple:
        """What one U-Net batch must share; prompt, concept, truncation, negative prompt and init
        image need not: then the step the schedule starts at (one loop, one schedule; the server's
        batcher groups by the same Shape.start), and the context length in chunks of 77 (K / V tables
        of one batch share it: request.context_chunks)."""
        L = self.line
        start = 0
        if L.init is not None:
            from ..engine.img2img import schedule_start
            start = schedule_start(L.steps, L.init.strength)
        return (L.steps, float(L.guidance), L.scheduler, self.height, self.width, start, L.chunks)

    def manifest_entry(self, model_name: str, dtype: str) -> dict:
        """What the manifest records for this image (its `manifest.SETTINGS` decide resume)."""
        L = self.line
        return {"file": self.file, "line": L.line, "prompt": L.prompt, "concept": L.concept, "seed": self.seed,
                "truncation": self.truncation, "negative_prompt": L.negative_prompt, "steps": L.steps,
                "guidance": L.guidance, "scheduler": L.scheduler, "height": self.height, "width": self.width,
                **(L.init.manifest_fields() if L.init is not None else {}),
                **({"prompt_syntax": L.prompt_syntax} if L.prompt_syntax != "plain" else {}),  # absent: plain, as before
                "model": model_name, "dtype": dtype, "status": "done"}


_JSON_TYPES = {str: "a string", int: "an integer", float: "a number", bool: "true/false", list: "a list",
               dict: "an object", type(None): "null"}


def _jtype(v) -> str:
    return _JSON_TYPES.get(type(v), type(v).__name__)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _seeds(v) -> list[int]:
    if isinstance(v, str):
        tokens = v.split()
    elif isinstance(v, list) and all(_is_int(x) or isinstance(x, str) for x in v):
        tokens = [str(x) for x in v]
    else:
        raise NetiError(f"seeds must be a string like \"0-63\" or a list of integers, got {_jtype(v)}")
    try:
        seeds = parse_seeds(tokens)
    except NetiError:
        raise NetiError(f"bad seeds {v!r}: expected integers 0 <= seed < 2^63 or ranges like \"0-63\"") from None
    if not seeds:
        raise NetiError("seeds is empty")
    return seeds


def _truncations(v) -> list:
    vals = v if isinstance(v, list) else [v]
    if not vals or not all(x is None or _is_int(x) for x in vals):
        raise NetiError(f"truncation must be an integer K, null or a list of them, got {v!r}")
    return list(dict.fromkeys(vals))


def _concept_paths(v, base: Path):
    if v is None:
        return None
    if isinstance(v, str) and v:
        return str(base / v)
    if isinstance(v, dict) and v and all(isinstance(k, str) and k and "{" not in k and "}" not in k
                                         and isinstance(p, str) and p for k, p in v.items()):
        return {k: str(base / p) for k, p in v.items()}
    raise NetiError(f"concept must be a file path, null or {{\"name\": path, ...}}, got {v!r}")


def _parse_line(n: int, obj: dict, defaults: dict, base: Path) -> tuple[Line | None, list[str]]:
    problems = []
    for k in obj:
        if k not in KEYS:
            close = difflib.get_close_matches(k, KEYS, n=1)
            problems.append(f"unknown key {k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    # null means "not given" except for truncation (null = full) and concept (null = none)
    given = {k for k in obj if obj[k] is not None or k in ("truncation", "concept")}
    val = {k: obj[k] if k in given else defaults[k] for k in KEYS if k not in INIT_KEYS}
    try:   # no command-line defaults: img2img is per line
        init = init_source(*(obj.get(k) for k in INIT_KEYS), base=base)
    except NetiError as e:
        problems.append(e.render())
    if "prompt" not in obj:
        problems.append('no "prompt"')
    elif not isinstance(obj["prompt"], str):
        problems.append(f"prompt must be a string, got {_jtype(obj['prompt'])}")
    out = {}
    for key, conv in (("seeds", _seeds), ("truncation", _truncations),
                      ("concept", lambda v: _concept_paths(v, base))):
        try:
            out[key] = conv(val[key]) if key in given else defaults[key]  # defaults are already converted
        except NetiError as e:
            problems.append(str(e))
    for key in ("steps", "guidance"):
        if not SAMPLING_RANGES[key].ok(val[key]):
            problems.append(f"{key} must be {SAMPLING_RANGES[key].describe()}, got {val[key]!r}")
    if scheduler_problem(val["scheduler"]):
        problems.append(f"scheduler {val['scheduler']!r}: {scheduler_problem(val['scheduler'])}")
    if val["prompt_syntax"] not in SYNTAXES:
        problems.append(f"prompt_syntax must be one of {', '.join(SYNTAXES)}, got {val['prompt_syntax']!r}")
    if not isinstance(val["negative_prompt"], str):
        problems.append(f"negative_prompt must be a string, got {_jtype(val['negative_prompt'])}")
    for key in ("height", "width"):     # None: the model's size; multiples of its VAE factor: check_size
        if val[key] is not None and not SAMPLING_RANGES[key].ok(val[key]):
            problems.append(f"{key} must be {SAMPLING_RANGES[key].describe()}, got {val[key]!r}")
    if problems:
        return None, problems
    return Line(n, obj["prompt"], obj.get("concept"), out["concept"],
                out["seeds"], out["truncation"], val["steps"], val["guidance"], val["scheduler"],
                val["negative_prompt"], val["height"], val["width"], init=init,
                prompt_syntax=val["prompt_syntax"]), []


def parse_job(path: str | Path, defaults: dict) -> tuple[list[Line], list[tuple[int, str]]]:
    """Every line of the job: (good lines, [(line number, what is wrong)])."""
    path = Path(path)
    defaults = {"prompt_syntax": "plain", **defaults}  # callers from before the key existed
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise NetiError(f"{path}: cannot read the job file ({getattr(e, 'strerror', None) or e})") from None
    lines, errors = [], []
    for n, raw in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            errors.append((n, f"bad JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(obj, dict):
            errors.append((n, f"expected a JSON object {{...}}, got {_jtype(obj)}"))
            continue
        line, problems = _parse_line(n, obj, defaults, path.parent)
        if problems:
            errors.append((n, "; ".join(problems)))
        else:
            lines.append(line)
    if not lines and not errors:
        raise NetiError(f"{path}: the job has no requests")
    return lines, errors


class Concepts:
    """Concept files by path, loaded on first use and kept within `budget_mb` (least recently used
    first out): a precomputed SD 1.x table is ~50 MB per truncation, too many to hold for a big job.
    A file that cannot be loaded is remembered as its error. A bundle (`neti-fast merge`) loads as
    {name: Table}. `generate` gives its concepts already loaded (`loaded`: what every line uses)."""

    def __init__(self, budget_mb: int = 4096, loaded=None):
        from ..concepts.table import nbytes
        self.tables = ByteLRU(budget_mb * 2**20, nbytes)    # resolved path -> Table or bundle
        self.errors: dict = {}
        self.loaded = loaded

    @property
    def evictions(self) -> int:
        return self.tables.evictions

    @staticmethod
    def _paths(L: Line) -> dict:
        return {} if L.paths is None else L.paths if isinstance(L.paths, dict) else {None: L.paths}

    def keys(self, L: Line) -> set:
        return {str(Path(p).resolve()) for p in self._paths(L).values()}

    def _get(self, path: str):
        from ..concepts.table import load_any
        key = str(Path(path).resolve())
        if key in self.errors:
            raise self.errors[key]
        if key not in self.tables:
            try:
                self.tables.put(key, load_any(path), trim=False)  # evicted by trim(), which knows what a batch needs
            except NetiError as e:
                self.errors[key] = e
                raise
        return self.tables.get(key)

    def for_line(self, L: Line):
        """The line's Table, {name: Table} or None; NetiError naming every file that cannot be loaded."""
        if self.loaded is not None:
            return self.loaded
        got, bad = {}, []
        for name, p in self._paths(L).items():
            try:
                got[name] = self._get(p)
                if name is not None and isinstance(got[name], dict):
                    raise NetiError(f"{p}: a bundle of concepts ({', '.join(got[name])}) cannot be one named "
                                    "concept; give it as \"concept\": path, its names are its own")
            except NetiError as e:
                bad.append(str(e))
        if bad:
            raise NetiError("; ".join(bad))
        return got[None] if None in got else (got or None)  # one file (a Table, or a bundle's {name: Table}) or a dict

    def trim(self, keep: set = frozenset()) -> bool:
        """Evict least recently used tables not in `keep` until within budget; True if any was."""
        return self.tables.trim(keep)


def check_lines(model, lines: list[Line], concepts: Concepts) -> list[tuple[int, NetiError]]:
    """Model-dependent checks of every line (the engine's one request check: prompt, concepts,
    truncation, negative prompt, size), each problem named by the line's key; a line whose concept
    file cannot be loaded is marked failed instead (not an error of the job file)."""
    from ..engine.img2img import schedule_start
    from ..engine.request import GenerateConfig, Request, check_request, check_size, context_chunks
    errors, seen = [], {}
    for L in lines:
        problems = []

        def note(e: NetiError):
            if e.render() not in (p.render() for p in problems):
                problems.append(e)
        try:
            check_size(model, L.height, L.width)
        except NetiError as e:
            note(e)
        if L.init is not None:   # the files readable (and hashed), the strength leaving a step to run
            for check in (lambda: L.init.check(seen), lambda: schedule_start(L.steps, L.init.strength)):
                try:
                    check()
                except NetiError as e:
                    note(e)
        try:
            tables = concepts.for_line(L)
            concepts.trim()
        except NetiError as e:
            L.failed = str(e)
        for t in L.truncations if L.failed is None else ():
            try:
                req = Request(L.prompt, 0, tables, t, L.negative_prompt, prompt_syntax=L.prompt_syntax)
                check_request(model, req)
                L.chunks = context_chunks(model, req, GenerateConfig(guidance=L.guidance))
            except NetiError as e:
                note(e)
        if L.failed is not None:
            try:  # the negative prompt can still be checked
                check_request(model, Request("", 0, None, None, L.negative_prompt, prompt_syntax=L.prompt_syntax))
            except NetiError as e:
                note(e)
        errors += [(L.line, e) for e in problems]
    return errors


def expand(lines: list[Line], model, numbering=None) -> list[Img]:
    """The images of the lines (those whose concepts loaded): line, then truncation, then seed.
    `numbering(line) -> (number, digits)` of the file names (default: the job-file line, 5 digits)."""
    from .outputs import image_name
    numbering = numbering or (lambda L: (L.line, 5))
    out = []
    for L in lines:
        if L.failed is not None:
            continue
        number, digits = numbering(L)
        out += [Img(L, t, s, image_name(number, L.prompt, t, s, digits=digits), *image_size(model, L.height, L.width))
                for t in L.truncations for s in L.seeds]
    return out


def plan_batches(images: list[Img], batch_size: int) -> list[list[Img]]:
    """The fixed batch plan: images grouped by shared settings (groups and images in file order)."""
    groups: dict = {}
    for im in images:
        groups.setdefault(im.group, []).append(im)
    bs = max(1, batch_size)
    return [g[i:i + bs] for g in groups.values() for i in range(0, len(g), bs)]

