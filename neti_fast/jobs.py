"""`neti-fast run JOB.jsonl`: many requests, packed into full batches, resumable, torchrun-aware.

Job file: one JSON object per line (blank lines and lines starting with # are skipped), e.g.
    {"prompt": "a photo of {} on a beach", "concept": "cat.safetensors", "seeds": "0-63", "truncation": 16}
Keys: prompt (required), concept (a concept / table / bundle file, or {"name": path, ...} for several
`{name}` concepts in one prompt; relative paths are relative to the job file's folder), seeds ("0-63", "0,3,7" or a list),
truncation (K, null or a list), steps, guidance, negative_prompt, scheduler, height, width. Missing
keys take the command-line values.

Order of work:
  1. validate the whole file (JSON, keys, types, seeds; with the model loaded: prompts, truncations,
     sizes) and report every bad line at once; a concept file that cannot be loaded is not a
     validation error: its request is recorded as failed and the job goes on;
  2. flatten into images (line, truncation, seed) and pack them into a fixed plan of batches: images
     that share (steps, guidance, scheduler, height, width) in file order, cut every --batch-size. The
     plan depends only on the job, never on what is already done, so a resumed or sharded run runs
     exactly the batches of an uninterrupted one (CPU float results depend on batch composition;
     same batches -> byte-identical images);
  3. batches with an image still missing are run (whole) and only the missing images written (a PNG
     with no manifest record, left by a killed run, is kept if it equals the regenerated image);
     under torchrun those batches are dealt round-robin to the ranks;
  4. each image is recorded in manifest.jsonl (per rank: manifest.rank{r}.jsonl, merged by rank 0
     at the end) as soon as its batch is written; job.json summarizes the run.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .distributed import Dist, prepare_builtin, setup_distributed
from .errors import NetiError

KEYS = ("prompt", "concept", "seeds", "truncation", "steps", "guidance", "negative_prompt", "scheduler",
        "height", "width")
MANIFEST = "manifest.jsonl"
SUMMARY = "job.json"
# an existing image is the same image when these agree (as outputs.SETTINGS_KEYS for `generate`)
SETTINGS = ("prompt", "concept", "seed", "truncation", "negative_prompt", "steps", "guidance", "scheduler",
            "height", "width", "model", "dtype")


# ----------------------------------------------------------------------------- the job file

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
        """What one U-Net batch must share; prompt, concept, truncation and negative prompt need not."""
        L = self.line
        return (L.steps, float(L.guidance), L.scheduler, self.height, self.width)

    def entry(self, model_name: str, dtype: str) -> dict:
        L = self.line
        return {"file": self.file, "line": L.line, "prompt": L.prompt, "concept": L.concept, "seed": self.seed,
                "truncation": self.truncation, "negative_prompt": L.negative_prompt, "steps": L.steps,
                "guidance": L.guidance, "scheduler": L.scheduler, "height": self.height, "width": self.width,
                "model": model_name, "dtype": dtype, "status": "done"}


_JSON_TYPES = {str: "a string", int: "an integer", float: "a number", bool: "true/false", list: "a list",
               dict: "an object", type(None): "null"}


def _jtype(v) -> str:
    return _JSON_TYPES.get(type(v), type(v).__name__)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _seeds(v) -> list[int]:
    from .cli import parse_seeds
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
    from .pipeline import SCHEDULERS
    problems = []
    for k in obj:
        if k not in KEYS:
            close = difflib.get_close_matches(k, KEYS, n=1)
            problems.append(f"unknown key {k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    # null means "not given" except for truncation (null = full) and concept (null = none)
    given = {k for k in obj if obj[k] is not None or k in ("truncation", "concept")}
    val = {k: obj[k] if k in given else defaults[k] for k in KEYS}
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
    if not (_is_int(val["steps"]) and val["steps"] >= 1):
        problems.append(f"steps must be a positive integer, got {val['steps']!r}")
    if not (isinstance(val["guidance"], (int, float)) and not isinstance(val["guidance"], bool)
            and math.isfinite(val["guidance"])):
        problems.append(f"guidance must be a number, got {val['guidance']!r}")
    if val["scheduler"] not in SCHEDULERS:
        problems.append(f"scheduler {val['scheduler']!r}: must be one of {', '.join(SCHEDULERS)}")
    if not isinstance(val["negative_prompt"], str):
        problems.append(f"negative_prompt must be a string, got {_jtype(val['negative_prompt'])}")
    for key in ("height", "width"):
        if val[key] is not None and not (_is_int(val[key]) and val[key] >= 8):
            problems.append(f"{key} must be an integer of at least 8, got {val[key]!r}")
    if problems:
        return None, problems
    return Line(n, obj["prompt"], obj.get("concept"), out["concept"],
                out["seeds"], out["truncation"], val["steps"], val["guidance"], val["scheduler"],
                val["negative_prompt"], val["height"], val["width"]), []


def parse_job(path: str | Path, defaults: dict) -> tuple[list[Line], list[tuple[int, str]]]:
    """Every line of the job: (good lines, [(line number, what is wrong)])."""
    path = Path(path)
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
    {name: Table}."""

    def __init__(self, budget_mb: int = 4096):
        from collections import OrderedDict
        self.budget = budget_mb * 2**20
        self.tables: OrderedDict = OrderedDict()
        self.errors: dict = {}
        self.evictions = 0

    @staticmethod
    def _paths(L: Line) -> dict:
        return {} if L.paths is None else L.paths if isinstance(L.paths, dict) else {None: L.paths}

    def keys(self, L: Line) -> set:
        return {str(Path(p).resolve()) for p in self._paths(L).values()}

    def _get(self, path: str):
        from .table import load_any
        key = str(Path(path).resolve())
        if key in self.errors:
            raise self.errors[key]
        if key not in self.tables:
            try:
                self.tables[key] = load_any(path)
            except NetiError as e:
                self.errors[key] = e
                raise
        self.tables.move_to_end(key)
        return self.tables[key]

    def for_line(self, L: Line):
        """The line's Table, {name: Table} or None; NetiError naming every file that cannot be loaded."""
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
        def size(t):
            if isinstance(t, dict):
                return sum(size(x) for x in t.values())
            return sum(v.numel() * v.element_size() for d in (t.token, t.bypass) for v in d.values())
        total = sum(size(t) for t in self.tables.values())
        evicted = False
        for key in list(self.tables):
            if total <= self.budget:
                break
            if key not in keep:
                total -= size(self.tables.pop(key))
                evicted = True
        self.evictions += evicted
        return evicted


def check_lines(model, lines: list[Line], concepts: Concepts) -> list[tuple[int, str]]:
    """Model-dependent checks (prompt, placeholder, length, truncation, size); a line whose concept
    file cannot be loaded is marked failed instead (not an error of the job file)."""
    from .conditioning import markers, tokenize
    from .pipeline import Request, check_request
    errors = []
    f = model.vae_scale_factor
    for L in lines:
        problems = []
        h, w = L.height or model.default_size, L.width or model.default_size
        if h % f or w % f:
            problems.append(f"height/width {h}x{w}: must be multiples of {f}")
        if markers(L.negative_prompt):
            problems.append("negative_prompt must not contain {} markers")
        else:
            try:
                tokenize(model.tokenizer, L.negative_prompt, None)
            except NetiError as e:
                problems.append(f"negative_prompt: {e}")
        try:
            tables = concepts.for_line(L)
            concepts.trim()
        except NetiError as e:
            L.failed = str(e)
        for t in L.truncations if L.failed is None else ():
            try:  # the engine's own checks; its messages name CLI flags, a job line has keys
                check_request(model, Request(L.prompt, 0, tables, t))
            except NetiError as e:
                msg = str(e).replace("--truncation", "truncation").replace("no --concept was given", 'the line has no "concept"')
                if msg not in problems:
                    problems.append(msg)
        if problems:
            errors.append((L.line, "; ".join(problems)))
    return errors


def expand(lines: list[Line], model) -> list[Img]:
    from . import outputs
    return [Img(L, t, s, outputs.image_name(L.line, L.prompt, t, s, digits=5), L.height or model.default_size,
                L.width or model.default_size)
            for L in lines if L.failed is None for t in L.truncations for s in L.seeds]


def pack(images: list[Img], batch_size: int) -> list[list[Img]]:
    """The fixed batch plan: images grouped by shared settings (groups and images in file order)."""
    groups: dict = {}
    for im in images:
        groups.setdefault(im.group, []).append(im)
    bs = max(1, batch_size)
    return [g[i:i + bs] for g in groups.values() for i in range(0, len(g), bs)]


# ----------------------------------------------------------------------------- manifests

def manifest_files(out: Path) -> list[Path]:
    """manifest.jsonl (if any), then manifest.rank{r}.jsonl in rank order."""
    ranks = sorted(out.glob("manifest.rank*.jsonl"), key=lambda p: (len(p.name), p.name))
    return ([out / MANIFEST] if (out / MANIFEST).exists() else []) + ranks


def read_manifests(out: Path) -> tuple[dict, int]:
    """Done images of manifest.jsonl and every manifest.rank*.jsonl: ({file: entry}, unreadable lines).

    A torn last line (a killed run) is skipped: its images are checked again before being trusted."""
    done, bad = {}, 0
    for p in manifest_files(out):
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise NetiError(f"{p}: unreadable manifest ({getattr(e, 'strerror', None) or e}); move it away or use another --out") from None
        for raw in text.splitlines():
            if not raw.strip():
                continue
            try:
                e = json.loads(raw)
                ok = isinstance(e, dict) and isinstance(e.get("file"), str)
            except json.JSONDecodeError:
                ok = False
            if not ok:
                bad += 1
            elif e.get("status") == "done":
                done[e["file"]] = e
    return done, bad


def _sort_key(e: dict):
    return (e.get("line") if isinstance(e.get("line"), int) else 0, e.get("file") or "")


def merge_manifests(out: Path, extra: list[dict] = (), keep_failed: bool = True) -> list[dict]:
    """Rank 0: all manifests -> one manifest.jsonl (one entry per file, the latest; sorted), atomically;
    then the rank files are removed. Failed entries are kept only from this run (`keep_failed`)."""
    from .concept import atomic_write
    files = manifest_files(out)
    by_file, failed_lines = {}, []
    for p in files:
        for raw in p.read_text(encoding="utf-8").splitlines():
            try:
                e = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if not isinstance(e, dict):
                continue
            if e.get("status") == "done" and isinstance(e.get("file"), str):
                by_file[e["file"]] = e
            elif e.get("status") == "failed" and keep_failed:
                if isinstance(e.get("file"), str):
                    by_file.setdefault(e["file"], e)
                else:
                    failed_lines.append(e)
    entries = sorted(list(by_file.values()) + failed_lines + list(extra), key=_sort_key)
    text = "".join(json.dumps(e) + "\n" for e in entries)
    atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    for p in files:
        if p.name != MANIFEST:
            p.unlink(missing_ok=True)
    return entries


def _append(path: Path, entries: list[dict]) -> None:
    if not entries:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(e) + "\n" for e in entries))
        f.flush()
        os.fsync(f.fileno())  # a killed job loses at most the batch in flight


def _same_image(path: Path, image) -> bool:
    """An unrecorded file counts as ours when it decodes to this image (within one level: backends)."""
    import numpy as np
    from PIL import Image
    try:
        with Image.open(path) as im:
            old = np.asarray(im.convert("RGB"))
    except (OSError, ValueError):
        return False
    return old.shape == image.shape and int(np.abs(old.astype(np.int16) - image.astype(np.int16)).max()) <= 1


# ----------------------------------------------------------------------------- running

def _format_errors(job: Path, errors: list[tuple[int, str]]) -> str:
    errors = sorted(errors)
    n = len({ln for ln, _ in errors})
    head = f"{job}: {n} bad line{'s' if n != 1 else ''}, nothing was run:"
    return "\n".join([head] + [f"  line {ln}: {msg}" for ln, msg in errors])


def run_job(job: str | Path, out: str | Path, model, cfg=None, *, seeds=(0,), truncation=None,
            model_name: str | None = None, overwrite: bool = False, denoiser_for=None, dist: Dist | None = None,
            concept_cache_mb: int = 4096, progress: bool = True) -> dict:
    """Run a job file into `out`; returns the summary written to job.json.

    `cfg` (GenerateConfig) holds the defaults for keys a line leaves out, and batch_size, attention,
    cache_mb; concept files are held within `concept_cache_mb`. `denoiser_for(height, width)` gives the U-Net backend for a size (None: the engine's own).
    `dist`: `setup_distributed(device)` to share the work among torchrun ranks (default: this process
    alone does everything).
    """
    from . import outputs
    import numpy as np
    from tqdm.auto import tqdm

    from .pipeline import Engine, GenerateConfig, Request
    t_start = time.perf_counter()
    cfg = cfg or GenerateConfig()
    d = dist or Dist(device=str(model.device))
    job, out = Path(job), Path(out)
    model_name = model_name or model.name
    dtype = str(model.dtype).replace("torch.", "")
    err = None
    try:
        defaults = {"prompt": None, "concept": None, "seeds": list(seeds), "truncation": [truncation],
                    "steps": cfg.steps, "guidance": cfg.guidance, "scheduler": cfg.scheduler,
                    "negative_prompt": cfg.negative_prompt, "height": cfg.height, "width": cfg.width}
        lines, errors = parse_job(job, defaults)
        concepts = Concepts(concept_cache_mb)
        errors += check_lines(model, lines, concepts)
        if errors:
            raise NetiError(_format_errors(job, errors))
        outputs.check_writable(out)
        images = expand(lines, model)
        plan = pack(images, cfg.batch_size)
        recorded, torn = read_manifests(out)
        # each planned image: "done" (skip), "new" (write), "unverified" (a file with no record: compare first)
        state, conflicts = {}, []
        for im in images:
            path, old, want = out / im.file, recorded.get(im.file), im.entry(model_name, dtype)
            if not path.exists():
                state[im.file] = "new"
            elif old is None:
                state[im.file] = "unverified"
            elif any(old.get(k) != want.get(k) for k in SETTINGS):
                conflicts.append((im.file, [k for k in SETTINGS if old.get(k) != want.get(k)]))
                state[im.file] = "new"  # replaced only with --overwrite
            else:
                state[im.file] = "done"
        if conflicts and not overwrite:
            f, keys = conflicts[0]
            more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
            raise NetiError(f"{out / f}: exists with different settings ({', '.join(keys)}){more}; "
                            "use --overwrite or another --out")
    except NetiError as e:
        err = e
    if not d.all_ok(err is None):
        if err is not None:
            raise err
        raise NetiError(f"rank {d.rank}: another rank stopped with an error (see its message)")

    failed = [{"line": L.line, "prompt": L.prompt, "concept": L.concept, "status": "failed", "reason": L.failed,
               "images": len(L.seeds) * len(L.truncations)} for L in lines if L.failed]
    d.barrier()  # every rank has read the manifests before rank 0 rewrites them
    if d.rank == 0:
        if torn:
            print(f"{out / MANIFEST}: {torn} unreadable line(s) skipped (an interrupted write); "
                  "their images are checked again", file=sys.stderr)
        merge_manifests(out, failed, keep_failed=False)
    batch_no = {id(b): i for i, b in enumerate(plan)}
    todo = [b for b in plan if any(state[im.file] != "done" for im in b)]
    mine = todo[d.rank::d.world]  # same batches whatever the number of ranks
    d.barrier()  # nothing is written before every rank has planned

    target = out / (MANIFEST if d.world == 1 else f"manifest.rank{d.rank}.jsonl")
    engine = Engine(model, cfg)
    base_denoiser = engine.denoiser
    denoisers: dict = {}
    n_mine = sum(state[im.file] != "done" for b in mine for im in b)
    bar = tqdm(total=n_mine, desc="run" if d.world == 1 else f"run rank {d.rank}/{d.world}", unit="img",
               disable=not progress, position=d.rank if d.world > 1 else None)
    written = verified = img_failed = 0
    t_run = time.perf_counter()
    if d.world > 1:
        _publish_progress(out, d.rank, 0, n_mine, t_run)
    try:
        for b in mine:
            no = batch_no[id(b)]
            steps, guidance, scheduler, h, w = b[0].group
            engine.cfg = dataclasses.replace(cfg, steps=steps, guidance=guidance, scheduler=scheduler,
                                             height=h, width=w)
            if denoiser_for is not None:
                if (h, w) not in denoisers:
                    denoisers[(h, w)] = denoiser_for(h, w)
                engine.denoiser = denoisers[(h, w)] or base_denoiser
            tables, lost = {}, {}
            for L in {id(im.line): im.line for im in b}.values():
                try:
                    tables[L.line] = concepts.for_line(L)
                except NetiError as e:  # loaded at validation, gone since: only its images fail
                    lost[L.line] = str(e)
            # the engine keys conditionings on Table.uid, so a reloaded table never hits a stale one
            concepts.trim(keep=set().union(*(concepts.keys(im.line) for im in b)))
            entries = []
            for im in b:
                if im.line.line in lost and state[im.file] != "done":
                    entries.append({**im.entry(model_name, dtype), "status": "failed", "reason": lost[im.line.line]})
                    img_failed += 1
            b = [im for im in b if im.line.line not in lost]
            reqs = [Request(im.line.prompt, im.seed, tables[im.line.line], im.truncation, im.line.negative_prompt)
                    for im in b]
            pixels = engine.generate_batch(reqs) if reqs else []
            for im, img in zip(b, pixels):
                st = state[im.file]
                if st == "done":
                    continue
                e = im.entry(model_name, dtype)
                e["batch"] = no
                path = out / im.file
                if st == "unverified" and _same_image(path, img):
                    verified += 1  # a killed run wrote it but did not record it
                elif st == "unverified" and not overwrite:
                    e.update(status="failed", reason="exists, is not in the manifest and differs from this job's "
                                                     "image; move it away or use --overwrite")
                    img_failed += 1
                else:
                    outputs.save_png(path, np.ascontiguousarray(img))
                    written += 1
                entries.append(e)
            _append(target, entries)
            bar.update(len(entries))
            if d.world > 1:  # live merged progress: each rank publishes its count, rank 0 shows the sum
                _publish_progress(out, d.rank, bar.n, n_mine, t_run)
                if d.rank == 0:
                    bar.set_postfix_str(_merged_progress(out), refresh=True)
    finally:
        bar.close()
    t_end = time.perf_counter()

    n_done = sum(state[im.file] == "done" for im in images)
    gen, ver, fimg, evicted = d.reduce([written, verified, img_failed, concepts.evictions])
    secs, wall = d.reduce([t_end - t_run, t_end - t_start], op="max")
    d.barrier()  # every rank has written and recorded its batches
    summary = {
        "job": str(job), "out": str(out), "model": model_name, "dtype": dtype, "device": str(model.device),
        "world_size": d.world, "requests": len(lines), "images": len(images) + sum(f["images"] for f in failed),
        "batches": len(plan), "batch_size": cfg.batch_size, "batches_run": len(todo),
        "done": int(gen + ver), "written": int(gen), "verified_unrecorded": int(ver), "skipped": n_done,
        "failed_requests": len(failed), "failed_images": int(fimg) + sum(f["images"] for f in failed),
        "concept_evictions": int(evicted), "seconds": round(secs, 3), "wall_seconds": round(wall, 3),
        "images_per_s": round((gen + ver) / secs, 4) if secs > 0 else None,
        "failures": [{"line": f["line"], "reason": f["reason"]} for f in failed],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if d.rank == 0:
        from .concept import atomic_write
        for f in out.glob("progress.rank*.json"):
            f.unlink(missing_ok=True)
        merge_manifests(out)
        atomic_write(out / SUMMARY, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1) + "\n"))
    d.barrier()
    return summary


def _publish_progress(out: Path, rank: int, done: int, total: int, started: float) -> None:
    from .concept import atomic_write
    data = json.dumps({"done": done, "total": total, "started": time.time() - (time.perf_counter() - started)})
    atomic_write(out / f"progress.rank{rank}.json", lambda tmp: Path(tmp).write_text(data))


def _merged_progress(out: Path) -> str:
    """"all ranks: done/total img, rate, ETA" from the ranks' progress files (a shared --out)."""
    done = total = 0
    start = time.time()
    for f in out.glob("progress.rank*.json"):
        try:
            p = json.loads(f.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now
        done, total, start = done + p["done"], total + p["total"], min(start, p["started"])
    rate = done / max(time.time() - start, 1e-9)
    eta = (total - done) / rate if rate > 0 else float("inf")
    eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
    return f"all ranks {done}/{total} img, {rate:.2f} img/s, ETA {eta_s}"


# ----------------------------------------------------------------------------- CLI

def add_arguments(p) -> None:
    from .cli import _add_model_args, add_runtime_args
    p.add_argument("job", help="JSONL file, one request per line: {\"prompt\": ..., \"concept\": ..., \"seeds\": ...}")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="output folder (PNGs, manifest.jsonl, job.json); re-run to resume")
    p.add_argument("--seeds", nargs="+", default=["0"], help="seeds for lines without \"seeds\" (e.g. 0-15; default 0)")
    p.add_argument("--truncation", type=int, default=None, metavar="K", help="for lines without \"truncation\"")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--scheduler", choices=["dpm++", "ddim", "euler"], default="dpm++")
    p.add_argument("--batch-size", type=int, default=8, help="images per U-Net batch")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    add_runtime_args(p)  # --attention, --backend, --export-dir: as for `generate`
    p.add_argument("--cache-mb", type=int, default=2048, help="memory bound of cached prompt conditionings (MiB)")
    p.add_argument("--concept-cache-mb", type=int, default=4096, help="memory bound of loaded concept files (MiB)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace images made with other settings (images already made with these are still skipped)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> dict:
    from . import cli
    from .models import load_model
    from .pipeline import GenerateConfig
    for name in ("steps", "batch_size", "cache_mb", "concept_cache_mb"):
        if getattr(args, name) < 1:
            raise NetiError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a positive integer")
    if not math.isfinite(args.guidance):
        raise NetiError(f"--guidance {args.guidance}: must be a number")
    seeds = cli.parse_seeds(args.seeds)
    if not Path(args.job).is_file():
        raise NetiError(f"{args.job}: no such job file")
    device, dtype = cli._torch_setup(args)
    d = setup_distributed(device)
    try:
        try:
            prepare_builtin(args.model, d)
            model = load_model(args.model, device=d.device, dtype=dtype)
            cfg = GenerateConfig(steps=args.steps, guidance=args.guidance, scheduler=args.scheduler,
                                 height=args.height, width=args.width, negative_prompt=args.negative_prompt,
                                 batch_size=args.batch_size, cache_mb=args.cache_mb,
                                 attention=cli.attention_choice(args))

            def denoiser_for(h, w):
                return cli._denoiser(args, model, dataclasses.replace(cfg, height=h, width=w))
            s = run_job(args.job, args.out, model, cfg, seeds=seeds, truncation=args.truncation,
                        model_name=args.model, overwrite=args.overwrite,
                        denoiser_for=None if cli.resolve_backend(args) in ("eager", "triton") else denoiser_for,
                        dist=d, concept_cache_mb=args.concept_cache_mb, progress=not args.no_progress)
        except NetiError:
            if d.rank > 0:
                sys.exit(2)  # every rank hit the same error: rank 0 alone prints it
            raise
    finally:
        d.close()
    if d.rank == 0:
        ips = f"{s['images_per_s']:.3g}" if s["images_per_s"] else "-"
        print(f"{s['done']} images made, {s['skipped']} already there, {s['failed_requests']} failed request(s); "
              f"{ips} images/s on {d.world} process(es); {MANIFEST} and {SUMMARY} in {args.out}")
    if s["failed_images"]:
        if d.rank > 0:
            sys.exit(2)
        first = f"; line {s['failures'][0]['line']}: {s['failures'][0]['reason']}" if s["failures"] else ""
        raise NetiError(f"{s['failed_requests']} request(s) failed, {s['failed_images']} image(s) not made "
                        f"(see {Path(args.out) / MANIFEST}){first}")
    return s
