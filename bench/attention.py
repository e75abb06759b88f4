"""Micro-benchmark: row-gathered cross-attention, Triton vs SDPA vs xformers vs eager.

    python -m neti_fast.bench.attention [--quick] [--dtype fp16] [--json out.json]

Shapes are SD 1.5's four cross-attention levels at 512x512 (N image tokens,
C channels, 8 heads, L = 77 text tokens) at batch sizes 2 / 8 / 32, i.e. 1 / 4 /
16 images doubled for classifier-free guidance.  The first half of the batch
reads the unconditional row 0, the second half one distinct conditional row
each, so the K/V tables have R = B/2 + 1 rows.

The non-Triton baselines must gather K/V rows themselves (``table[row_idx]``),
and that gather is inside their timed region: it is the work the Triton kernel
avoids.  On CUDA every implementation is timed with triton.testing.do_bench
(median ms).  Without CUDA a small fp32 run times SDPA / eager with
time.perf_counter only: the Triton interpreter is far too slow to be worth timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from neti_fast.kernels.cross_attention import (
    HAS_TRITON,
    cross_attention_ref,
    cross_attention_triton,
)

HEADS, L = 8, 77
SD15_LEVELS = [(4096, 320), (1024, 640), (256, 1280), (64, 1280)]  # (N, C) at 512x512
BATCHES = (2, 8, 32)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def attention_flops(B: int, N: int, L: int, C: int) -> int:
    # QK^T: per head N*L dot products of length d -> 2*N*L*d FLOPs; summed over
    # heads 2*N*L*C.  P@V costs the same.  Softmax (O(N*L*heads)) is ignored.
    return 4 * B * N * L * C


def attention_bytes(B: int, N: int, L: int, C: int, elt: int) -> int:
    # Minimum traffic: read q, write out, read each sample's K and V row once.
    return elt * (2 * B * N * C + 2 * B * L * C)


def _gather_heads(t, ri, B, n, d):  # table[ri] -> [B, H, n, d]
    return t[ri].view(B, n, HEADS, d).transpose(1, 2)


def make_impls(q, k_table, v_table, ri):
    B, N, C = q.shape
    d = C // HEADS

    def sdpa():
        qh = q.view(B, N, HEADS, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(qh, _gather_heads(k_table, ri, B, L, d),
                                           _gather_heads(v_table, ri, B, L, d))
        return o.transpose(1, 2).reshape(B, N, C)

    def eager():
        return cross_attention_ref(q, k_table, v_table, ri, HEADS)

    impls = {"sdpa": sdpa, "eager": eager}
    if q.is_cuda and HAS_TRITON:
        impls = {"triton": lambda: cross_attention_triton(q, k_table, v_table, ri, HEADS), **impls}
    if q.is_cuda:
        try:
            import xformers.ops as xops
        except ImportError:
            xops = None
        if xops is not None:
            def xformers():  # BMHK layout
                o = xops.memory_efficient_attention(
                    q.view(B, N, HEADS, d),
                    k_table[ri].view(B, L, HEADS, d),
                    v_table[ri].view(B, L, HEADS, d))
                return o.reshape(B, N, C)
            impls["xformers"] = xformers
    return impls


def _time_cpu(fn, warmup=2, reps=5):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def run(dtype, batches, levels, device):
    if device == "cuda":
        from triton.testing import do_bench
        timer = lambda fn: do_bench(fn, return_mode="median")  # noqa: E731
    else:
        timer = _time_cpu
    elt = torch.finfo(dtype).bits // 8
    rows = []
    for B in batches:
        for N, C in levels:
            R = B // 2 + 1
            q = torch.randn(B, N, C, device=device, dtype=dtype)
            k_table = torch.randn(R, L, C, device=device, dtype=dtype)
            v_table = torch.randn(R, L, C, device=device, dtype=dtype)
            ri = torch.cat([torch.zeros(B // 2), torch.arange(1, B - B // 2 + 1)]).to(device, torch.int32)
            impls = make_impls(q, k_table, v_table, ri)
            base = impls["sdpa"]()
            for name, fn in impls.items():
                ms = timer(fn)
                err = (fn().float() - base.float()).abs().max().item()
                rows.append(dict(impl=name, B=B, N=N, C=C, L=L, heads=HEADS, ms=ms,
                                 tflops=attention_flops(B, N, L, C) / ms * 1e-9,
                                 gbps=attention_bytes(B, N, L, C, elt) / ms * 1e-6,
                                 max_abs_diff_vs_sdpa=err))
    return rows


def print_table(rows):
    hdr = f"{'impl':>9} {'B':>3} {'N':>5} {'C':>5} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} {'|d| sdpa':>9}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['impl']:>9} {r['B']:>3} {r['N']:>5} {r['C']:>5} {r['ms']:>9.4f} "
              f"{r['tflops']:>8.2f} {r['gbps']:>8.1f} {r['max_abs_diff_vs_sdpa']:>9.2e}")


def sweep_configs(dtype, batch: int = 32) -> list[dict]:
    """CUDA: every candidate tile size of `kernels.check` at SD 1.5's levels, timed with do_bench,
    next to the shipped choice (`cross_attention_configs`): the numbers to re-pick the table from."""
    from triton.testing import do_bench

    from neti_fast.kernels.check import CANDIDATES
    from neti_fast.kernels.cross_attention import gpu_family, pick_config
    fam = gpu_family(torch.cuda.get_device_capability())
    out = []
    for N, C in SD15_LEVELS:
        g = torch.Generator().manual_seed(N)
        q = torch.randn(batch, N, C, generator=g).to("cuda", dtype)
        k = torch.randn(batch // 2 + 1, L, C, generator=g).to("cuda", dtype)
        v = torch.randn(batch // 2 + 1, L, C, generator=g).to("cuda", dtype)
        ri = torch.cat([torch.zeros(batch // 2), torch.arange(1, batch // 2 + 1)]).long().cuda()
        shipped = pick_config(C // HEADS, L, dtype, fam, N)
        for bn, nw in CANDIDATES:
            try:
                ms = do_bench(lambda: cross_attention_triton(q, k, v, ri, HEADS, block_n=bn, num_warps=nw))
            except Exception as e:  # noqa: BLE001 - e.g. out of resources: a row, not a crash
                ms = float("nan")
                print(f"N={N} C={C} BLOCK_N={bn} warps={nw}: {type(e).__name__}: {e}")
            out.append(dict(N=N, C=C, B=batch, block_n=bn, num_warps=nw, ms=ms,
                            shipped=(bn, nw) == (shipped.block_n, shipped.num_warps)))
            print(f"N={N:>5} C={C:>5} BLOCK_N={bn:>3} warps={nw}  {ms:8.4f} ms{'  <- shipped' if out[-1]['shipped'] else ''}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 2 only (CPU: two small levels)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--json", metavar="PATH", help="also write results as JSON")
    p.add_argument("--sweep-configs", action="store_true",
                   help="CUDA: also time every candidate tile size of the Triton kernel (kernels.check)")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype or ("fp16" if device == "cuda" else "fp32")]
    batches, levels = BATCHES, SD15_LEVELS
    if device == "cpu":
        print("no CUDA: timing SDPA / eager on CPU only; Triton timings need a GPU "
              "(the TRITON_INTERPRET=1 interpreter is for correctness, not speed)")
        batches = (2,)
        levels = SD15_LEVELS[2:] if args.quick else SD15_LEVELS
    elif args.quick:
        batches = (2,)

    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {device_name}  dtype: {dtype}  heads={HEADS} L={L}")
    rows = run(dtype, batches, levels, device)
    print_table(rows)
    sweep = sweep_configs(dtype) if args.sweep_configs and device == "cuda" and HAS_TRITON else None
    if args.json:
        meta = dict(device=device_name, dtype=str(dtype), torch=torch.__version__,
                    triton=__import__("triton").__version__ if HAS_TRITON else None)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=rows, config_sweep=sweep), f, indent=2)
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
