"""The engine with and without the native kernels (neti_fast._C), side by side in one run.

    python -m neti_fast.bench.native [--models tiny sd15-shaped] [--steps 3] [--pairs 9] [--sd15-pairs 3] [--threads N]
                                     [--json bench/results/cpu-tiny-sd15-native.json]

For each model, two Engines that differ only in the cross-attention backend -- `native` (the C++
kernel, rows gathered inside it) and `sdpa` (what `auto` runs on CPU without the extension:
gather rows, then PyTorch SDPA) -- are measured with their calls alternated one by one, so that
drift of the machine lands on both sides alike:

- conditioning ms per prompt: a cold `Engine.conditioning` + `negative` (cache cleared).  The native
  kernels are not used there today (no CLIP kernel was built, see README "Native extension"), so
  this ratio is expected to be ~1 and is reported to show exactly that;
- U-Net ms per step: the denoiser's wall time over a generate call, divided by the steps;
- cross-attention ms per step: the part of it spent in `attend_rows` (the 16 cross-attention
  calls; the kernel's own effect, which the U-Net figure dilutes by the rest of the network).

`tiny` runs at its native 64x64 with a NeTI concept (time-varying rows, as in bench/ladder.py).
`sd15-shaped` (SD 1.5's configs, random weights) runs at a reduced size (default 128x128, latent
16x16) with a Textual Inversion concept: its CLIP is ViT-L, and NeTI's 16 x steps rows through it
would make the conditioning dominate a short CPU run; TI gives one row, which is what the engine
encodes for it.  Both sides' images are compared too (`max_abs_diff_uint8`).  CPU only by design:
on CUDA the Triton kernel is the engine's path (bench/attention.py times it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

PROMPT = "a photo of {} on a beach"
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "cpu-tiny-sd15-native.json"


class _TimedDenoiser:
    """Sums the wall time of the denoiser's calls (CPU: perf_counter is exact)."""

    def __init__(self, inner):
        self.inner, self.seconds, self.calls = inner, 0.0, 0

    def __call__(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return self.inner(*a, **k)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _AttentionClock:
    """Wall time inside `attend_rows` (the 16 cross-attention calls of a U-Net step), by wrapping the
    module global the processors call."""

    def __init__(self):
        import neti_fast.sd.attention as A
        self.module, self.inner, self.seconds = A, A.attend_rows, 0.0

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return self.inner(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0
        self.timed = timed

    def __enter__(self):
        self.module.attend_rows = self.timed
        return self

    def __exit__(self, *exc):
        self.module.attend_rows = self.inner


def _engine(model, attention, steps, size, batch):
    from neti_fast.engine.engine import Engine
    from neti_fast.engine.request import GenerateConfig
    cfg = GenerateConfig(steps=steps, height=size, width=size, batch_size=batch, attention=attention)
    eng = Engine(model, cfg)
    eng.denoiser = _TimedDenoiser(eng.denoiser)
    return eng


def measure_model(spec: str, size: int | None, steps: int, batch: int, pairs: int, log=print) -> dict:
    from neti_fast.concepts.concept import random_concept
    from neti_fast.sd.models import load_model
    from neti_fast.engine.request import Request
    from neti_fast.concepts.table import precompute

    model = load_model(spec)
    size = size or model.default_size
    method = "neti" if spec == "tiny" else "ti"
    table = precompute(random_concept(method, model.text_dim, 0, "<c>", method == "neti"), truncations=[],
                       progress=False)
    reqs = [Request(PROMPT, s, table) for s in range(batch)]
    engines = {name: _engine(model, name, steps, size, batch) for name in ("native", "sdpa")}

    def cond(e):
        e.conditionings.clear()
        t0 = time.perf_counter()
        e.conditioning(PROMPT, table, None, e.make_scheduler().timesteps)
        e.negative(e.cfg.negative_prompt)
        return (time.perf_counter() - t0) * 1e3

    def unet(e):
        e.conditionings.clear()
        e.denoiser.seconds, e.denoiser.calls = 0.0, 0
        with _AttentionClock() as clock:
            images = e.generate_batch(reqs)
        return e.denoiser.seconds / steps * 1e3, clock.seconds / steps * 1e3, images

    with torch.no_grad():
        for e in engines.values():  # warm-up (first calls allocate, and load _C)
            cond(e)
            unet(e)
        ms = {f"{k}_{n}": [] for k in ("cond", "unet", "xattn") for n in engines}
        images = {}
        for i in range(pairs):
            order = list(engines.items())[::1 if i % 2 == 0 else -1]  # who goes first alternates too
            for n, e in order:
                ms[f"cond_{n}"].append(cond(e))
            for n, e in order:
                t, ta, images[n] = unet(e)
                ms[f"unet_{n}"].append(t)
                ms[f"xattn_{n}"].append(ta)
    med = {k: statistics.median(v) for k, v in ms.items()}
    low = {k: min(v) for k, v in ms.items()}  # least-disturbed call: robust to neighbours' load spikes
    diff = int(np.abs(images["native"].astype(np.int32) - images["sdpa"].astype(np.int32)).max())
    res = {
        "model": spec, "size": size, "steps": steps, "batch": batch, "unet_batch": 2 * batch, "concept": method,
        "pairs": pairs,
        "conditioning_ms_per_prompt": {"native": med["cond_native"], "sdpa": med["cond_sdpa"],
                                       "sdpa_over_native": med["cond_sdpa"] / med["cond_native"],
                                       "min_sdpa_over_min_native": low["cond_sdpa"] / low["cond_native"]},
        "unet_ms_per_step": {"native": med["unet_native"], "sdpa": med["unet_sdpa"],
                             "sdpa_over_native": med["unet_sdpa"] / med["unet_native"],
                             "min_native": low["unet_native"], "min_sdpa": low["unet_sdpa"],
                             "min_sdpa_over_min_native": low["unet_sdpa"] / low["unet_native"]},
        "cross_attention_ms_per_step": {"native": med["xattn_native"], "sdpa": med["xattn_sdpa"],
                                        "sdpa_over_native": med["xattn_sdpa"] / med["xattn_native"],
                                        "share_of_unet_sdpa": med["xattn_sdpa"] / med["unet_sdpa"]},
        "max_abs_diff_uint8": diff,
        "all_ms": ms,
    }
    log(f"{spec} {size}x{size}, {steps} steps, batch {batch}, {pairs} alternated pairs: "
        f"conditioning {med['cond_native']:.4g} ms (native) vs {med['cond_sdpa']:.4g} ms (sdpa), "
        f"U-Net {med['unet_native']:.4g} vs {med['unet_sdpa']:.4g} ms/step = "
        f"x{res['unet_ms_per_step']['sdpa_over_native']:.2f} faster with native (medians; fastest calls: "
        f"x{res['unet_ms_per_step']['min_sdpa_over_min_native']:.2f}); inside it the 16 cross-attention calls "
        f"{med['xattn_native']:.4g} vs {med['xattn_sdpa']:.4g} ms/step = x{med['xattn_sdpa'] / med['xattn_native']:.2f} "
        f"({100 * med['xattn_sdpa'] / med['unet_sdpa']:.1f}% of the SDPA step); images differ by <= {diff}/255")
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "sd15-shaped"])
    p.add_argument("--sd15-size", type=int, default=128, help="sd15-shaped image size (reduced for CPU)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=1, help="images per U-Net call (x2 for guidance)")
    p.add_argument("--pairs", type=int, default=9, help="tiny: alternated measurements per quantity")
    p.add_argument("--sd15-pairs", type=int, default=3, help="sd15-shaped: alternated measurements per quantity")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", default=str(DEFAULT_JSON))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from neti_fast.sd import native
    ok, why = native.native_available()
    if not ok:
        raise SystemExit(f"bench.native: {why}")
    load = os.getloadavg()[0]
    if torch.cuda.is_available():
        print("note: CUDA is present but this benchmark runs on CPU (the Triton kernel is the CUDA path)")
    results = [measure_model(m, args.sd15_size if m != "tiny" else None, args.steps, args.batch,
                             args.pairs if m == "tiny" else args.sd15_pairs) for m in args.models]
    meta = {"device": "cpu", "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__, "dtype": "float32", "when_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "loadavg_at_start": load, "timing": "medians; native and sdpa calls alternated"}
    out = {"meta": meta, "results": results}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(path)  # atomic: a run that fails never leaves half a file
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
