"""Micro-benchmark: row-gathered cross-attention, Triton vs native vs SDPA vs xformers vs eager.

    python -m neti_fast.bench.attention [--quick] [--dtype fp16] [--families sd1 sdxl] [--tokens 154]
                                        [--json out.json]

Shapes are the model families' cross-attention levels (`neti_fast.kernels.shapes`, the list
`kernels.check` compiles; default SD 1.5's four levels at 512x512: N image tokens, C channels,
8 heads) with L = 77 text tokens (`--tokens`: 154 / 231 for long prompts) at batch sizes 2 / 8 /
32, i.e. 1 / 4 / 16 images doubled for classifier-free guidance.  The first half of the batch
reads the unconditional row 0, the second half one distinct conditional row
each, so the K/V tables have R = B/2 + 1 rows.

The non-Triton baselines must gather K/V rows themselves (``table[row_idx]``),
and that gather is inside their timed region: it is the work the Triton kernel
avoids.  On CUDA every implementation is timed with triton.testing.do_bench
(median ms).  Without CUDA a small fp32 run times SDPA / eager / the native C++ kernel (where
neti_fast._C is built) with time.perf_counter, the implementations' calls alternated one by one
(this VM's speed drifts over minutes), at the chosen families' levels and at the `tiny` model's
(8 heads, head dim 4 / 8): the Triton interpreter is far too slow to be worth timing.  These CPU figures
decide `neti_fast.sd.native.native_preferred`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from neti_fast.kernels.cross_attention import (
    HAS_TRITON,
    cross_attention_ref,
    cross_attention_triton,
)
from neti_fast.kernels.shapes import SHAPES, TOKENS, AttnShape

BATCHES = (2, 8, 32)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def attention_flops(B: int, N: int, L: int, C: int) -> int:
    # QK^T: per head N*L dot products of length d -> 2*N*L*d FLOPs; summed over
    # heads 2*N*L*C.  P@V costs the same.  Softmax (O(N*L*heads)) is ignored.
    return 4 * B * N * L * C


def attention_bytes(B: int, N: int, L: int, C: int, elt: int) -> int:
    # Minimum traffic: read q, write out, read each sample's K and V row once.
    return elt * (2 * B * N * C + 2 * B * L * C)


def _gather_heads(t, ri, B, n, heads, d):  # table[ri] -> [B, H, n, d]
    return t[ri].view(B, n, heads, d).transpose(1, 2)


def make_impls(q, k_table, v_table, ri, heads):
    B, N, C = q.shape
    L = k_table.shape[1]
    d = C // heads

    def sdpa():
        qh = q.view(B, N, heads, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(qh, _gather_heads(k_table, ri, B, L, heads, d),
                                           _gather_heads(v_table, ri, B, L, heads, d))
        return o.transpose(1, 2).reshape(B, N, C)

    def eager():
        return cross_attention_ref(q, k_table, v_table, ri, heads)

    impls = {"sdpa": sdpa, "eager": eager}
    if not q.is_cuda:
        from neti_fast.sd import native
        if native.native_supported(q, k_table, heads)[0]:
            impls["native"] = lambda: native.cross_attention_native(q, k_table, v_table, ri, heads)
    if q.is_cuda and HAS_TRITON:
        impls = {"triton": lambda: cross_attention_triton(q, k_table, v_table, ri, heads), **impls}
    if q.is_cuda:
        try:
            import xformers.ops as xops
        except ImportError:
            xops = None
        if xops is not None:
            def xformers():  # BMHK layout
                o = xops.memory_efficient_attention(
                    q.view(B, N, heads, d),
                    k_table[ri].view(B, L, heads, d),
                    v_table[ri].view(B, L, heads, d))
                return o.reshape(B, N, C)
            impls["xformers"] = xformers
    return impls


def _time_cpu_alternating(impls, warmup=2, reps=7):
    """Median ms of each implementation, their calls alternated one by one."""
    for _ in range(warmup):
        for fn in impls.values():
            fn()
    ts = {name: [] for name in impls}
    for _ in range(reps):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fn()
            ts[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in ts.items()}


def run(dtype, batches, shapes: list[AttnShape], device, L: int = TOKENS):
    if device == "cuda":
        from triton.testing import do_bench
        timer = lambda fn: do_bench(fn, return_mode="median")  # noqa: E731
    else:
        timer = None
    elt = torch.finfo(dtype).bits // 8
    rows = []
    for B in batches:
        for s in shapes:
            N, C = s.N, s.C
            R = B // 2 + 1
            q = torch.randn(B, N, C, device=device, dtype=dtype)
            k_table = torch.randn(R, L, C, device=device, dtype=dtype)
            v_table = torch.randn(R, L, C, device=device, dtype=dtype)
            ri = torch.cat([torch.zeros(B // 2), torch.arange(1, B - B // 2 + 1)]).to(device, torch.int32)
            impls = make_impls(q, k_table, v_table, ri, s.heads)
            base = impls["sdpa"]()
            times = _time_cpu_alternating(impls) if timer is None else {n: timer(f) for n, f in impls.items()}
            for name, fn in impls.items():
                ms = times[name]
                err = (fn().float() - base.float()).abs().max().item()
                rows.append(dict(impl=name, shape=s.label, B=B, N=N, C=C, L=L, heads=s.heads, ms=ms,
                                 tflops=attention_flops(B, N, L, C) / ms * 1e-9,
                                 gbps=attention_bytes(B, N, L, C, elt) / ms * 1e-6,
                                 max_abs_diff_vs_sdpa=err, sdpa_ms_over_ms=times["sdpa"] / ms))
    return rows


def print_table(rows):
    hdr = (f"{'impl':>9} {'shape':>11} {'B':>3} {'N':>5} {'C':>5} {'L':>4} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8}"
           f" {'|d| sdpa':>9} {'sdpa/x':>7}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['impl']:>9} {r['shape']:>11} {r['B']:>3} {r['N']:>5} {r['C']:>5} {r['L']:>4} {r['ms']:>9.4f} "
              f"{r['tflops']:>8.2f} {r['gbps']:>8.1f} {r['max_abs_diff_vs_sdpa']:>9.2e} {r['sdpa_ms_over_ms']:>7.2f}")


def sweep_configs(dtype, shapes: list[AttnShape], batch: int = 32, L: int = TOKENS) -> list[dict]:
    """CUDA: every candidate tile size of `kernels.check` at `shapes`, timed with do_bench, next to
    the shipped choice (`cross_attention_configs`): the numbers to re-pick the table from."""
    from triton.testing import do_bench

    from neti_fast.kernels.check import CANDIDATES
    from neti_fast.kernels.cross_attention import gpu_family, pick_config
    fam = gpu_family(torch.cuda.get_device_capability())
    out = []
    for s in shapes:
        N, C, heads = s.N, s.C, s.heads
        g = torch.Generator().manual_seed(N)
        q = torch.randn(batch, N, C, generator=g).to("cuda", dtype)
        k = torch.randn(batch // 2 + 1, L, C, generator=g).to("cuda", dtype)
        v = torch.randn(batch // 2 + 1, L, C, generator=g).to("cuda", dtype)
        ri = torch.cat([torch.zeros(batch // 2), torch.arange(1, batch // 2 + 1)]).long().cuda()
        shipped = pick_config(s.head_dim, L, dtype, fam, N)
        for bn, nw in CANDIDATES:
            try:
                ms = do_bench(lambda: cross_attention_triton(q, k, v, ri, heads, block_n=bn, num_warps=nw))
            except Exception as e:  # noqa: BLE001 - e.g. out of resources: a row, not a crash
                ms = float("nan")
                print(f"N={N} C={C} BLOCK_N={bn} warps={nw}: {type(e).__name__}: {e}")
            out.append(dict(shape=s.label, N=N, C=C, L=L, B=batch, block_n=bn, num_warps=nw, ms=ms,
                            shipped=(bn, nw) == (shipped.block_n, shipped.num_warps)))
            print(f"{s.label:>11} N={N:>5} C={C:>5} L={L} BLOCK_N={bn:>3} warps={nw}  {ms:8.4f} ms{'  <- shipped' if out[-1]['shipped'] else ''}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 2 only (CPU: two small levels)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--json", metavar="PATH", help="also write results as JSON")
    p.add_argument("--sweep-configs", action="store_true",
                   help="CUDA: also time every candidate tile size of the Triton kernel (kernels.check)")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch intra-op threads (default: torch's)")
    p.add_argument("--families", nargs="+", choices=sorted(set(SHAPES) - {"tiny"}), default=["sd1"],
                   help="model families whose cross-attention levels to time (kernels/shapes.py)")
    p.add_argument("--tokens", type=int, default=TOKENS, help="text length L (77; 154 / 231: long prompts)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype or ("fp16" if device == "cuda" else "fp32")]
    batches, shapes = BATCHES, [s for f in args.families for s in SHAPES[f]]
    if device == "cpu":
        print("no CUDA: timing SDPA / eager / native on CPU only; Triton timings need a GPU "
              "(the TRITON_INTERPRET=1 interpreter is for correctness, not speed)")
        batches = (2,)
        shapes = [s for s in shapes if not args.quick or s.N <= 256] + SHAPES["tiny"]
    elif args.quick:
        batches = (2,)

    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {device_name}  dtype: {dtype}  families: {' '.join(args.families)}  L={args.tokens}")
    rows = run(dtype, batches, shapes, device, args.tokens)
    print_table(rows)
    sweep = (sweep_configs(dtype, shapes, L=args.tokens) if args.sweep_configs and device == "cuda" and HAS_TRITON
             else None)
    if args.json:
        meta = dict(device=device_name, dtype=str(dtype), torch=torch.__version__,
                    triton=__import__("triton").__version__ if HAS_TRITON else None,
                    threads=torch.get_num_threads(), loadavg_1min=os.getloadavg()[0],
                    timing="median, calls alternated" if device == "cpu" else "triton.testing.do_bench median")
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=rows, config_sweep=sweep), f, indent=2)
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
