"""`neti-fast run JOB.jsonl` (and `neti-fast generate`): many requests, packed into full batches,
resumable, torchrun-aware. Job files are parsed and validated in jobfile.py, manifests are
manifest.py; this module runs the plan.

Order of work:
  1. validate the whole file (JSON, keys, types, seeds; with the model loaded: prompts, truncations,
     sizes) and report every bad line at once; a concept file that cannot be loaded is not a
     validation error: its request is recorded as failed and the job goes on;
  2. flatten into images (line, truncation, seed) and pack them into a fixed plan of batches: images
     that share (steps, guidance, scheduler, height, width, the img2img schedule's start) in file
     order, cut every --batch-size. The plan depends only on the job, never on what is already done,
     so a resumed or sharded run runs
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
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import manifest
from ..engine.distributed import Dist, prepare_builtin, setup_distributed
from ..errors import NetiError
from .jobfile import Concepts, Img, check_lines, expand, parse_job, plan_batches
from .manifest import MANIFEST
from ..utils import atomic_write, dtype_name

SUMMARY = "job.json"


def _format_errors(job: Path, errors: list[tuple[int, object]]) -> str:
    """Every bad line at once; a problem is a parse message or a NetiError named by its job key."""
    by_line: dict = {}
    for ln, problem in errors:
        msg = problem.render() if isinstance(problem, NetiError) else str(problem)
        if msg not in by_line.setdefault(ln, []):
            by_line[ln].append(msg)
    n = len(by_line)
    head = f"{job}: {n} bad line{'s' if n != 1 else ''}, nothing was run:"
    return "\n".join([head] + [f"  line {ln}: {'; '.join(msgs)}" for ln, msgs in sorted(by_line.items())])


def _agree(d: Dist, err: NetiError | None) -> None:
    """Every rank goes on, or every rank stops: the one that failed with its error, the others saying so."""
    if not d.all_ok(err is None):
        if err is not None:
            raise err
        raise NetiError(f"rank {d.rank}: another rank stopped with an error (see its message)")


# ----------------------------------------------------------------------------- planning

@dataclass
class Plan:
    """The fixed batch plan of a run into `out`, and what each image's file already is."""
    out: Path
    images: list
    batches: list
    state: dict                    # file -> "done" (skip) | "new" (write) | "unverified" (a file with no record)
    torn: int = 0                  # unreadable manifest lines (a killed write)
    model_name: str = ""
    dtype: str = ""

    @property
    def todo(self) -> list:
        return [b for b in self.batches if any(self.state[im.file] != "done" for im in b)]


def make_plan(out: Path, images: list[Img], batch_size: int, model_name: str, dtype: str, overwrite: bool) -> Plan:
    """Plan the batches and classify every image against the folder's manifests; an image recorded
    with other settings is an error (naming it) unless `overwrite`."""
    from ..utils import check_writable
    check_writable(out)
    recorded, torn = manifest.read_done(out)
    state, conflicts = {}, []
    for im in images:
        path, old = out / im.file, recorded.get(im.file)
        if not path.exists():
            state[im.file] = "new"
        elif old is None:
            state[im.file] = "unverified"
        else:
            diff = manifest.differences(old, im.manifest_entry(model_name, dtype))
            if diff:
                conflicts.append((im.file, diff))
                state[im.file] = "new"  # replaced only with --overwrite
            else:
                state[im.file] = "done"
    if conflicts and not overwrite:
        f, keys = conflicts[0]
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise NetiError(f"{out / f}: exists with different settings ({', '.join(keys)}){more}; "
                        "use --overwrite or another --out")
    return Plan(out, images, plan_batches(images, batch_size), state, torn, model_name, dtype)


# ----------------------------------------------------------------------------- running

@dataclass
class Counts:
    written: int = 0
    verified: int = 0              # unrecorded files that equal the regenerated image
    failed: int = 0
    failures: list = field(default_factory=list)   # the failed manifest entries of this process
    seconds: float = 0.0


def execute(plan: Plan, model, cfg, concepts: Concepts, *, overwrite: bool = False, denoiser_for=None,
            engine=None, dist: Dist | None = None, progress: bool = True, desc: str = "run",
            failed_requests: list = ()) -> Counts:
    """Run this process's share of the plan's batches: write missing PNGs, append their entries to
    the manifest after every batch (fsynced). Rank 0 first folds older manifests into manifest.jsonl."""
    import numpy as np
    from tqdm.auto import tqdm

    from . import outputs
    from ..engine.engine import Engine
    from ..engine.request import Request
    d = dist or Dist(device=str(model.device))
    out = plan.out
    d.barrier()  # every rank has read the manifests before rank 0 rewrites them
    if d.rank == 0:
        if plan.torn:
            print(f"{out / MANIFEST}: {plan.torn} unreadable line(s) skipped (an interrupted write); "
                  "their images are checked again", file=sys.stderr)
        manifest.merge(out, list(failed_requests), keep_failed=False)
    batch_no = {id(b): i for i, b in enumerate(plan.batches)}
    mine = plan.todo[d.rank::d.world]  # same batches whatever the number of ranks
    d.barrier()  # nothing is written before every rank has planned

    target = out / (MANIFEST if d.world == 1 else f"manifest.rank{d.rank}.jsonl")
    engine = engine or Engine(model, cfg)
    base_cfg, base_denoiser = engine.cfg, engine.denoiser  # restored at the end (a caller's engine)
    denoisers: dict = {}
    inits: dict = {}   # line number -> its prepared img2img Init, kept while its images' batches run
    state = plan.state
    n_mine = sum(state[im.file] != "done" for b in mine for im in b)
    bar = tqdm(total=n_mine, desc=desc if d.world == 1 else f"{desc} rank {d.rank}/{d.world}", unit="img",
               disable=not progress, position=d.rank if d.world > 1 else None)
    c = Counts()
    t_run = time.perf_counter()
    if d.world > 1:
        _publish_progress(out, d.rank, 0, n_mine, t_run)
    try:
        for b in mine:
            no = batch_no[id(b)]
            steps, guidance, scheduler, h, w = b[0].group[:5]
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
            ready = {}
            for L in {id(im.line): im.line for im in b}.values():
                if L.init is not None and L.line not in lost:
                    try:   # a line's images are consecutive: its Init is made once, for its first batch
                        ready[L.line] = inits[L.line] if L.line in inits else L.init.prepare(h, w)
                    except NetiError as e:  # checked at validation, changed or gone since: only its images fail
                        lost[L.line] = e.render()
            inits = ready
            entries = []
            for im in b:
                if im.line.line in lost and state[im.file] != "done":
                    entries.append({**im.manifest_entry(plan.model_name, plan.dtype), "status": "failed",
                                    "reason": lost[im.line.line]})
            b = [im for im in b if im.line.line not in lost]
            reqs = [Request(im.line.prompt, im.seed, tables[im.line.line], im.truncation, im.line.negative_prompt,
                            init=inits.get(im.line.line), prompt_syntax=im.line.prompt_syntax) for im in b]
            pixels = engine.generate_batch(reqs) if reqs else []
            for im, img in zip(b, pixels):
                st = state[im.file]
                if st == "done":
                    continue
                e = im.manifest_entry(plan.model_name, plan.dtype)
                e["batch"] = no
                path = out / im.file
                if st == "unverified" and manifest.same_image(path, img):
                    c.verified += 1  # a killed run wrote it but did not record it
                elif st == "unverified" and not overwrite:
                    e.update(status="failed", reason="exists, is not in the manifest and differs from this job's "
                                                     "image; move it away or use --overwrite")
                else:
                    outputs.save_png(path, np.ascontiguousarray(img))
                    c.written += 1
                entries.append(e)
            failed = [e for e in entries if e["status"] == "failed"]
            c.failed += len(failed)
            c.failures += failed
            manifest.append(target, entries)
            bar.update(len(entries))
            if d.world > 1:  # live merged progress: each rank publishes its count, rank 0 shows the sum
                _publish_progress(out, d.rank, bar.n, n_mine, t_run)
                if d.rank == 0:
                    bar.set_postfix_str(_merged_progress(out), refresh=True)
    finally:
        bar.close()
        engine.cfg, engine.denoiser = base_cfg, base_denoiser
    c.seconds = time.perf_counter() - t_run
    return c


def run(lines: list, out: str | Path, model, cfg, concepts: Concepts, *, model_name: str | None = None,
        overwrite: bool = False, engine=None, denoiser_for=None, dist: Dist | None = None, progress: bool = True,
        desc: str = "run", numbering=None, errors: list = ()) -> tuple[dict, list]:
    """The one runner of `neti-fast generate` and `neti-fast run`: validated request lines -> images
    in `out`, resumable and shared among torchrun ranks. Returns (the run's summary: job.json's body,
    this process's failed images' manifest entries).

    Lines are checked against the model first (`check_lines`: every problem of every line, before
    any work; a line whose concept file cannot be loaded is recorded as failed instead), flattened
    into images (`numbering`: the number and width in their file names, see jobfile.expand), packed
    into the fixed batch plan, classified against the folder's manifests, and this process's share
    of the batches is run; `errors`: problems found before ([(line, message)]: a job file's parse
    errors), reported with the lines' own in one LineErrors. `cfg` (GenerateConfig): batch_size,
    attention, cache_mb and the defaults;
    `engine`: a caller's Engine to reuse; `denoiser_for(height, width)`: the U-Net backend per size.
    """
    from ..engine.request import check_settings   # engine modules load torch: not at --help time
    t_start = time.perf_counter()
    d = dist or Dist(device=str(model.device))
    out = Path(out)
    model_name = model_name or model.name
    dtype = dtype_name(model.dtype)
    err, plan = None, None
    try:
        check_settings(cfg)
        problems = list(errors) + check_lines(model, lines, concepts)
        if problems:
            raise LineErrors(problems)
        plan = make_plan(out, expand(lines, model, numbering), cfg.batch_size, model_name, dtype, overwrite)
    except NetiError as e:
        err = e
    _agree(d, err)

    failed = [{"line": L.line, "prompt": L.prompt, "concept": L.concept, "status": "failed", "reason": L.failed,
               "images": len(L.seeds) * len(L.truncations)} for L in lines if L.failed]
    c = execute(plan, model, cfg, concepts, overwrite=overwrite, denoiser_for=denoiser_for, engine=engine, dist=d,
                progress=progress, desc=desc, failed_requests=failed)
    t_end = time.perf_counter()

    n_done = sum(plan.state[im.file] == "done" for im in plan.images)
    gen, ver, fimg, evicted = d.reduce([c.written, c.verified, c.failed, concepts.evictions])
    secs, wall = d.reduce([c.seconds, t_end - t_start], op="max")
    d.barrier()  # every rank has written and recorded its batches
    summary = {
        "out": str(out), "model": model_name, "dtype": dtype, "device": str(model.device),
        "world_size": d.world, "requests": len(lines), "images": len(plan.images) + sum(f["images"] for f in failed),
        "batches": len(plan.batches), "batch_size": cfg.batch_size, "batches_run": len(plan.todo),
        "done": int(gen + ver), "written": int(gen), "verified_unrecorded": int(ver), "skipped": n_done,
        "failed_requests": len(failed), "failed_images": int(fimg) + sum(f["images"] for f in failed),
        "concept_evictions": int(evicted), "seconds": round(secs, 3), "wall_seconds": round(wall, 3),
        "images_per_s": round((gen + ver) / secs, 4) if secs > 0 else None,
        "failures": [{"line": f["line"], "reason": f["reason"]} for f in failed],
    }
    return summary, c.failures


class LineErrors(NetiError):
    """Every line's problems: [(line number, NetiError or message)], rendered by each caller."""

    def __init__(self, problems: list):
        super().__init__("; ".join(e.render() if isinstance(e, NetiError) else str(e) for _, e in problems))
        self.problems = problems


def run_job(job: str | Path, out: str | Path, model, cfg=None, *, seeds=(0,), truncation=None,
            model_name: str | None = None, overwrite: bool = False, denoiser_for=None, dist: Dist | None = None,
            concept_cache_mb: int = 4096, progress: bool = True) -> dict:
    """Run a job file into `out` (see `run`); returns the summary written to job.json.

    `cfg` (GenerateConfig) holds the defaults for keys a line leaves out, and batch_size, attention,
    cache_mb; concept files are held within `concept_cache_mb`. `denoiser_for(height, width)` gives
    the U-Net backend for a size (None: the engine's own; see backends.make_denoiser).
    `dist`: `setup_distributed(device)` to share the work among torchrun ranks (default: this process
    alone does everything).
    """
    from ..engine.request import GenerateConfig
    cfg = cfg or GenerateConfig()
    d = dist or Dist(device=str(model.device))
    job, out = Path(job), Path(out)
    err, lines, errors = None, [], []
    try:
        defaults = {"prompt": None, "concept": None, "seeds": list(seeds), "truncation": list(truncation)
                    if isinstance(truncation, (list, tuple)) else [truncation],
                    "steps": cfg.steps, "guidance": cfg.guidance, "scheduler": cfg.scheduler,
                    "negative_prompt": cfg.negative_prompt, "height": cfg.height, "width": cfg.width,
                    "prompt_syntax": cfg.prompt_syntax}
        lines, errors = parse_job(job, defaults)  # reported with the model-dependent checks' problems
    except NetiError as e:
        err = e
    _agree(d, err)
    try:
        summary, _ = run(lines, out, model, cfg, Concepts(concept_cache_mb), model_name=model_name, overwrite=overwrite,
                         denoiser_for=denoiser_for, dist=d, progress=progress, errors=errors)
    except LineErrors as e:
        raise NetiError(_format_errors(job, e.problems)) from None
    summary = {"job": str(job), **summary, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if d.rank == 0:
        for f in out.glob("progress.rank*.json"):
            f.unlink(missing_ok=True)
        manifest.merge(out)
        atomic_write(out / SUMMARY, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1) + "\n"))
    d.barrier()
    return summary


def _publish_progress(out: Path, rank: int, done: int, total: int, started: float) -> None:
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
    from .. import options
    p.add_argument("job", help="JSONL file, one request per line: {\"prompt\": ..., \"concept\": ..., \"seeds\": ...}")
    options.add_model_args(p)
    p.add_argument("--out", required=True, help="output folder (PNGs, manifest.jsonl, job.json); re-run to resume")
    options.add_seeds_arg(p, "seeds for lines without \"seeds\" (e.g. 0-15; default 0)")
    p.add_argument("--truncation", type=options.truncation_value, nargs="+", action="extend", default=None,
                   metavar="K", help="for lines without \"truncation\" (K, or none / full for no truncation; several allowed)")
    options.add_sampling_args(p)
    options.add_runtime_args(p)  # --attention, --backend, --export-dir: as for `generate`
    p.add_argument("--cache-mb", type=options.megabytes(), default=2048, help="memory bound of cached prompt conditionings (MiB)")
    p.add_argument("--concept-cache-mb", type=options.megabytes(), default=4096, help="memory bound of loaded concept files (MiB)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace images made with other settings (images already made with these are still skipped)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def denoisers_for(model, backend: str, cfg, export_dir=None, model_name=None):
    """`denoiser_for(height, width)` for run_job on `backend`, or None when the engine's own serves
    every size (eager / triton)."""
    from ..engine import backends
    if not backends.needs_size(backend):
        return None

    def denoiser_for(h, w):
        return backends.make_denoiser(model, backend, cfg.attention, height=h, width=w, batch_size=cfg.batch_size,
                                      export_dir=export_dir, model_name=model_name)[0]
    return denoiser_for


def main(args) -> dict:
    from .. import options
    from ..engine import backends
    from ..sd.models import load_model
    from ..engine.request import GenerateConfig
    for name in ("steps", "batch_size", "cache_mb", "concept_cache_mb"):
        if getattr(args, name) < 1:
            raise NetiError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a positive integer")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise NetiError(f"--guidance {args.guidance}: must be a number")
    seeds = options.seeds_of(args)
    if not Path(args.job).is_file():
        raise NetiError(f"{args.job}: no such job file")
    device, dtype = options.torch_setup(args)
    d = setup_distributed(device)
    try:
        try:
            prepare_builtin(args.model, d)
            model = load_model(args.model, device=d.device, dtype=dtype)
            guidance, scheduler = options.sampling_defaults(args, model.family)
            cfg = GenerateConfig(steps=args.steps, guidance=guidance, scheduler=scheduler,
                                 height=args.height, width=args.width, negative_prompt=args.negative_prompt,
                                 batch_size=args.batch_size, cache_mb=args.cache_mb, prompt_syntax=args.prompt_syntax,
                                 attention=backends.resolve(args.backend, args.attention).attention)
            truncs = options.dedup(args.truncation) if args.truncation else None
            s = run_job(args.job, args.out, model, cfg, seeds=seeds, truncation=truncs,
                        model_name=args.model, overwrite=args.overwrite,
                        denoiser_for=denoisers_for(model, args.backend, cfg, args.export_dir, args.model),
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
