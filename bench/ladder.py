"""`neti-fast bench`: the latency / throughput ladder, every rung measured side by side in one run.

    neti-fast bench [--model tiny] [--device cuda] [--dtype fp16] [--steps 50] [--batch-sizes 1 4 16]
                    [--rungs reference diffusers eager batched concepts triton compile onnx tensorrt]
                    [--repeats 3] [--json out.json] [--chart out.png] [--quick]
    python -m neti_fast.bench.ladder ...   (same arguments)

Same process, same model weights, same NeTI concept (a random mapper) and the same prompt for
every rung; the rungs, from the official algorithm to the fastest backend:

  reference  `generate_reference`: the official NeTI inference (steps x 16 one-at-a-time text
             encodes, an unconditional and a conditional batch-1 U-Net call per step, eager bmm
             attention); batch B = B seeds one after the other.
  diffusers  the model family's plain diffusers pipeline (`StableDiffusionPipeline`, SDXL's
             `StableDiffusionXLPipeline`; DPM-Solver++, no concept, diffusers' own attention
             processors, `num_images_per_prompt=B`): the floor that personalization should cost
             nothing over.
  eager      neti-fast Engine, PyTorch eager, batch size 1 (one seed at a time; the engine always
             runs both guidance halves in one U-Net call), SDPA attention.
  batched    Engine with batch size B: all seeds of the batch in one U-Net call, SDPA attention.
  concepts   batched, but each image of the batch has its own NeTI concept (B concepts in one
             U-Net call); the summary compares its U-Net ms/step with `batched` (one concept).
  triton     batched + the fused row-gather Triton cross-attention kernel (CUDA only).
  compile    batched + `torch.compile` of the U-Net, replayed as a CUDA graph per batch shape on CUDA
             (attention "auto"); GPU-only unless --compile-on-cpu (then no graphs).
  onnx       batched + the exported ONNX denoiser on onnxruntime (`neti_fast.export.onnx`).
  tensorrt   batched + a TensorRT engine built from that ONNX graph (`neti_fast.export.tensorrt`).

Per rung and batch size B (median of --repeats runs, after one warm-up run per rung):
  cond ms/prompt  cold text conditioning of one prompt (cache cleared): reference = its steps x 16
                  + 1 single encodes; engine rungs = `Engine.conditioning` + the negative prompt;
                  diffusers = `encode_prompt` (prompt + negative).
  unet ms/step    U-Net time to advance the whole batch of B images by one step (both guidance
                  halves; for reference and eager the sum of their sequential calls).
  img/s           B / end-to-end time of the batch, conditioning included (cold cache every run),
                  VAE decode included.
  latency-1 s     end-to-end seconds for one image at batch 1.
  peak mem        CUDA: torch.cuda.max_memory_allocated during the run, minus what was allocated
                  before it. CPU: peak RSS over the run minus RSS before it (psutil, sampled every
                  2 ms; without psutil, the growth of getrusage's max RSS, which is 0 unless the
                  process reaches a new high). The JSON says which (`memory_kind`).
  TFLOP/s         U-Net FLOPs (bench/flops.py, counted on this model at this resolution) / U-Net
                  time; `util` = that / --peak-tflops (default on CUDA: a measured large matmul;
                  none on CPU). The JSON also has `e2e_tflops`: U-Net + counted text-encoder rows
                  + VAE FLOPs / end-to-end time.
  speedup         img/s over the reference rung's img/s at the same batch size.

The summary's two target ratios are measured again after the ladder, the two sides' calls
alternated (`side_by_side`), so that drift of the machine between rungs does not enter them:
reference vs batched cold conditioning, and `concepts` vs `batched` U-Net ms per step at the largest
batch. The JSON keeps every alternated measurement under `side_by_side`.

Timing: CUDA events around every U-Net call and torch.cuda.synchronize around every measured
region on GPU; time.perf_counter on CPU. A rung that cannot run here is recorded with
`status: "skipped"` and the reason; a rung that fails is recorded with `status: "failed"`.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import time
import traceback
from pathlib import Path

from neti_fast.options import count, number
from neti_fast.utils import CLI_DTYPES, SAMPLING_RANGES, Range, default_device, default_dtype_name, image_size, torch_dtype

from .measure import Clock, PeakMemory, TextRows, UnetTimer, measure_peak_tflops
from .report import _device_info, _versions, format_table, summary, write_chart
from .rungs import GUIDANCE, RUNG_CLASSES, RUNGS, Rung, Skip

SCHEMA = "neti-fast-bench/1"


# ----------------------------------------------------------------------------- arguments

def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default="tiny", help="tiny | tiny-sd2 | tiny-xl | sd15-shaped | sd2-shaped | sdxl-shaped | "
                   "a diffusers folder (default tiny)")
    p.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=CLI_DTYPES, default=None, help="default fp16 on cuda, fp32 on cpu")
    p.add_argument("--steps", type=number(SAMPLING_RANGES["steps"]), default=None, help="denoising steps (default 50; 4 with --quick)")
    p.add_argument("--batch-sizes", type=count(), nargs="+", action="extend", default=None, help="default 1 4 16 (1 4 with --quick)")
    p.add_argument("--height", type=number(SAMPLING_RANGES["height"]), default=None, help="default: the model's native size")
    p.add_argument("--width", type=number(SAMPLING_RANGES["width"]), default=None, help="default: the model's native size")
    p.add_argument("--rungs", nargs="+", action="extend", choices=RUNGS, default=None, help="subset of rungs (default all)")
    p.add_argument("--repeats", type=count(), default=None, help="timed runs per measurement, median (default 3; 1 with --quick)")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write results as JSON")
    p.add_argument("--chart", default=None, metavar="PATH", help="write a PNG bar chart of images/s")
    p.add_argument("--quick", action="store_true", help="steps 4, batch sizes 1 4, repeats 1 (tests / CI)")
    p.add_argument("--peak-tflops", type=number(Range(float, 0, lo_open=True)), default=None,
                   help="peak for utilization (default: measured matmul on CUDA, none on CPU)")
    p.add_argument("--compile-on-cpu", action="store_true", help="run the torch.compile rung on CPU too (slow)")
    p.add_argument("--threads", type=count(), default=None, help="torch.set_num_threads for the run (CPU)")
    p.add_argument("--onnx-dir", default=None, help="where ONNX / TensorRT exports are cached "
                   "(default $NETI_FAST_CACHE/exports)")
    return p


def _resolve(args) -> argparse.Namespace:
    a = argparse.Namespace(**vars(args))
    for k, v in dict(model="tiny", device=None, dtype=None, steps=None, batch_sizes=None, height=None, width=None,
                     rungs=None, repeats=None, json_path=None, chart=None, quick=False, peak_tflops=None,
                     compile_on_cpu=False, threads=None, onnx_dir=None).items():
        if not hasattr(a, k):
            setattr(a, k, v)
    if a.device is None:
        a.device = default_device()
    if a.dtype is None:
        a.dtype = default_dtype_name(a.device)
    if a.steps is None:
        a.steps = 4 if a.quick else 50
    if a.batch_sizes is None:
        a.batch_sizes = [1, 4] if a.quick else [1, 4, 16]
    if a.repeats is None:
        a.repeats = 1 if a.quick else 3
    if a.rungs is None:
        a.rungs = list(RUNGS)
    a.rungs = [r for r in RUNGS if r in a.rungs]  # ladder order
    a.batch_sizes = sorted(dict.fromkeys(a.batch_sizes))
    if a.steps < 1 or a.repeats < 1 or min(a.batch_sizes) < 1:
        raise SystemExit("neti-fast bench: --steps, --repeats and --batch-sizes must be >= 1")
    return a


# ----------------------------------------------------------------------------- the ladder

class Context:
    def __init__(self, args, model, table, height, width, flops, peak):
        self.args, self.model, self.table, self.height, self.width = args, model, table, height, width
        self.flops, self.peak = flops, peak


def _median(xs):
    return statistics.median(xs) if xs else None


def measure_rung(ctx: Context, rung: Rung, log=print) -> list[dict]:
    a, m = ctx.args, ctx.model
    dev = m.device
    clock, timer = Clock(dev), UnetTimer(dev)
    t0 = time.perf_counter()
    rung.setup()
    setup_s = time.perf_counter() - t0
    rows = []
    try:
        # warm-up once (smallest batch), then cold conditioning.
        clock.time(lambda: rung.run(list(range(a.batch_sizes[0]))))
        cond_s = _median([clock.time(rung.cond)[0] for _ in range(a.repeats)])
        for B in a.batch_sizes:
            if rung.warmup_per_batch and B != a.batch_sizes[0]:
                clock.time(lambda: rung.run(list(range(B))))
            totals, unets, peaks, text_rows, calls = [], [], [], [], []
            for _ in range(a.repeats):
                timer.reset()
                texts = TextRows(m.text_encoder)
                detach = rung.attach(timer)
                try:
                    with PeakMemory(dev) as mem:
                        total, _ = clock.time(lambda: rung.run(list(range(B))))
                finally:
                    detach()
                    texts.remove()
                totals.append(total)
                unets.append(timer.seconds())
                peaks.append(mem.peak)
                text_rows.append(texts.rows)
                calls.append(timer.calls)
            total, unet = _median(totals), _median(unets)
            f = ctx.flops
            unet_flops = a.steps * 2 * B * f["unet_per_sample"]
            e2e_flops = unet_flops + _median(text_rows) * f["text_encoder_pass"] + B * f["vae_decode"]
            unet_tflops = unet_flops / unet / 1e12 if unet > 0 else None
            row = {
                "rung": rung.name, "label": rung.label, "status": "ok", "batch": B, "notes": rung.notes,
                "cond_ms_per_prompt": cond_s * 1e3,
                "unet_ms_per_step": unet / a.steps * 1e3,
                "images_per_s": B / total,
                "batch_latency_s": total,
                "latency1_s": None,
                "peak_mem_bytes": int(max(peaks)),
                "unet_tflops": unet_tflops,
                "e2e_tflops": e2e_flops / total / 1e12,
                "utilization": (unet_tflops / ctx.peak) if (ctx.peak and unet_tflops) else None,
                "unet_calls": int(_median(calls)),
                "text_encoder_rows": int(_median(text_rows)),
                "setup_s": setup_s,
                "repeats": a.repeats,
                "all_totals_s": totals,
            }
            rows.append(row)
            log(f"  {rung.name:<10} B={B:<3} {row['images_per_s']:.3g} img/s, "
                f"U-Net {row['unet_ms_per_step']:.3g} ms/step, cond {row['cond_ms_per_prompt']:.4g} ms")
        lat1 = next((r["batch_latency_s"] for r in rows if r["batch"] == 1), None)
        for r in rows:
            r["latency1_s"] = lat1
    finally:
        rung.teardown()
    return rows


def _alternate(measure: dict, min_pairs: int, budget_s: float = 30.0, max_pairs: int = 15) -> dict:
    """Call each of `measure`'s functions (each returns seconds) in turn, round after round: at
    least `min_pairs` rounds, then more up to `max_pairs` while under `budget_s`. Returns the
    per-name lists of seconds."""
    times = {name: [] for name in measure}
    start, rounds = time.perf_counter(), 0
    while rounds < min_pairs or (rounds < max_pairs and time.perf_counter() - start < budget_s):
        for name, f in measure.items():
            times[name].append(f())
        rounds += 1
    return times


def side_by_side(ctx: Context, ran: set[str], log=print) -> dict:
    """The two ratios of the issue's targets, each from calls alternated one by one.

    The rungs' own columns are measured minutes apart (each in its rung's turn), so drift of the
    machine (CPU frequency, neighbours) lands in their ratios; alternating the two sides puts both
    under the same conditions. Returns {"conditioning": reference vs batched cold conditioning,
    "unet": reference / diffusers / batched U-Net ms per step at the smallest batch (min, median,
    max over the rounds), "concepts": `concepts` vs `batched` U-Net ms per step at the largest
    batch}, each present when (two of) its rungs are in `ran` (the rungs that ran without error).
    """
    a, dev = ctx.args, ctx.model.device
    clock, timer = Clock(dev), UnetTimer(dev)
    out = {}
    rungs = {n: RUNG_CLASSES[n](ctx) for n in ("reference", "batched", "concepts") if n in ran}

    def unet_ms_per_step(rung, seeds):
        timer.reset()
        detach = rung.attach(timer)
        try:
            rung.run(seeds)
        finally:
            detach()
        return timer.seconds() / a.steps * 1e3

    def alone(name, seeds):
        """One rung's U-Net ms/step, set up and torn down around it: the diffusers pipeline and the
        engine install different attention processors on the one U-Net, so they cannot coexist."""
        rung = RUNG_CLASSES[name](ctx)
        rung.setup()
        try:
            return unet_ms_per_step(rung, seeds)
        finally:
            rung.teardown()

    same = [n for n in ("reference", "diffusers", "batched") if n in ran]
    if len(same) >= 2:  # the same U-Net at the smallest batch, rung after rung, round after round
        B = min(a.batch_sizes)
        for n in same:
            alone(n, list(range(B)))  # warm-up
        t = _alternate({n: (lambda n=n: alone(n, list(range(B)))) for n in same}, a.repeats)
        out["unet"] = {"batch": B, "rounds": len(t[same[0]]),
                       "ms_per_step": {n: {"min": min(t[n]), "median": _median(t[n]), "max": max(t[n]),
                                           "all": t[n]} for n in same}}
        log(f"  U-Net ms/step at batch {B}, {len(t[same[0]])} alternated rounds: " + ", ".join(
            f"{n} {_median(t[n]):.4g} ({min(t[n]):.4g}-{max(t[n]):.4g})" for n in same))
    for r in rungs.values():
        r.setup()
    try:
        if {"reference", "batched"} <= set(rungs):
            ref, bat = rungs["reference"], rungs["batched"]
            ref.cond(), bat.cond()  # warm-up
            t = _alternate({"reference": lambda: clock.time(ref.cond)[0],
                            "batched": lambda: clock.time(bat.cond)[0]}, a.repeats)
            r, b = _median(t["reference"]), _median(t["batched"])
            out["conditioning"] = {"pairs": len(t["reference"]), "reference_ms": r * 1e3, "batched_ms": b * 1e3,
                                   "speedup": r / b, "all_reference_ms": [x * 1e3 for x in t["reference"]],
                                   "all_batched_ms": [x * 1e3 for x in t["batched"]]}
            log(f"  conditioning, {len(t['reference'])} alternated pairs: reference {r * 1e3:.4g} ms, "
                f"batched {b * 1e3:.4g} ms, {r / b:.1f}x")
        if {"batched", "concepts"} <= set(rungs) and max(a.batch_sizes) < 2:
            log("  different concepts vs one: needs a batch of 2 or more (--batch-sizes); not measured")
        elif {"batched", "concepts"} <= set(rungs):
            B, seeds = max(a.batch_sizes), list(range(max(a.batch_sizes)))
            for r in (rungs["batched"], rungs["concepts"]):
                r.run(seeds)  # warm-up at this batch size
            t = _alternate({"batched": lambda: unet_ms_per_step(rungs["batched"], seeds),
                            "concepts": lambda: unet_ms_per_step(rungs["concepts"], seeds)}, a.repeats)
            one, many = _median(t["batched"]), _median(t["concepts"])
            out["concepts"] = {"batch": B, "pairs": len(t["batched"]), "batched_unet_ms_per_step": one,
                               "concepts_unet_ms_per_step": many, "ratio": many / one,
                               "all_batched_ms": t["batched"], "all_concepts_ms": t["concepts"]}
            log(f"  {B} concepts vs one, {len(t['batched'])} alternated pairs: U-Net {many:.4g} vs {one:.4g} ms/step, "
                f"x{many / one:.3f}")
    finally:
        for r in rungs.values():
            r.teardown()
    return out


def run_ladder(args, log=print) -> dict:
    import torch
    from neti_fast.concepts.concept import random_concept
    from neti_fast.sd.models import load_model
    from neti_fast.concepts.table import precompute

    from . import flops as flops_mod

    a = _resolve(args)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    dtype = torch_dtype(a.dtype)
    log(f"loading {a.model} on {dev} ({a.dtype}) ...")
    model = load_model(a.model, dev, dtype)
    f = model.vae_scale_factor
    height, width = image_size(model, a.height, a.width)
    if height % f or width % f:
        raise SystemExit(f"neti-fast bench: --height/--width must be multiples of {f}")
    table = precompute(random_concept("neti", model.text_dim, seed=0, family=model.family), (), progress=False)
    fl = flops_mod.count(model, height, width)
    peak = a.peak_tflops if a.peak_tflops else measure_peak_tflops(dev, dtype)
    ctx = Context(a, model, table, height, width, fl, peak)
    rows = []
    for name in a.rungs:
        rung = RUNG_CLASSES[name](ctx)
        log(f"[{name}] {rung.label}")
        try:
            with torch.no_grad():  # inference only; the rungs hold no autograd state
                rows.extend(measure_rung(ctx, rung, log))
        except Skip as e:
            log(f"  skipped: {e}")
            rows.append({"rung": name, "label": rung.label, "status": "skipped", "reason": str(e)})
        except Exception as e:  # noqa: BLE001 - one broken backend must not lose the other rungs
            log(f"  failed: {type(e).__name__}: {e}")
            rows.append({"rung": name, "label": rung.label, "status": "failed",
                         "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
    log("[side by side] the targets' ratios, alternated call by call")
    try:
        with torch.no_grad():
            side = side_by_side(ctx, {r["rung"] for r in rows if r["status"] == "ok"}, log)
    except Exception as e:  # noqa: BLE001 - keep the ladder's rows; the summary falls back to them
        log(f"  failed: {type(e).__name__}: {e}")
        side = {"failed": f"{type(e).__name__}: {e}"}
    args_out = {k: v for k, v in vars(a).items() if k != "func"}
    result = {
        "schema": SCHEMA,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_info(dev),
        "versions": _versions(),
        "args": args_out,
        "model": model.name,
        "height": height,
        "width": width,
        "dtype": a.dtype,
        "steps": a.steps,
        "guidance": GUIDANCE,
        "scheduler": "dpm++",
        "flops": fl,
        "peak_tflops": peak,
        "memory_kind": PeakMemory(dev).kind,
        "rows": rows,
        "side_by_side": side,
    }
    result["summary"] = summary(rows, side)
    return result


def main(args) -> dict:
    import torch
    threads = torch.get_num_threads()
    try:
        result = run_ladder(args)
    finally:
        torch.set_num_threads(threads)  # --threads applies to this run only
    print()
    print(format_table(result))
    a = result["args"]
    if a.get("json_path"):
        p = Path(a["json_path"])
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {p}")
    if a.get("chart"):
        print(f"wrote {write_chart(result, a['chart'])}")
    return result


def cli(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="neti-fast bench", description=__doc__.split("\n")[0])
    add_arguments(p)
    return main(p.parse_args(argv))


if __name__ == "__main__":
    cli()
