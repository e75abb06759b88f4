"""Compile every Triton kernel for real NVIDIA targets, without a GPU, and check its resources.

    python -m neti_fast.kernels.check [--archs 80 89 90 100] [--dtypes fp16 bf16] [--search [--write]]

The `TRITON_INTERPRET=1` tests check the kernel's math on CPU; they cannot see what a GPU would
refuse or run slowly.  This compiles the kernel the way a launch on that GPU would (Triton's own
pipeline down to SASS, with the ptxas bundled in its wheel: `triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`), at SD 1.5's real shapes (head dims 40 / 80 / 160 at
N = 4096 / 1024 / 256, L = 77) and the built-in tiny model's (head dims 4 / 8), in each dtype
the dispatcher sends to the kernel on CUDA (fp16, bf16: fp32 goes to SDPA, see --dtypes fp32).
One row per case: target, dtype, head dim, blocks, warps, registers, spills, shared memory and
the MMA instruction family found in the PTX (tcgen05 / wgmma / mma.sync / FMA).

Exit status 1 on a compile error, any spill, or shared memory over the target's per-block limit.

`--search` compiles every candidate (BLOCK_N, num_warps) per (family, head dim, dtype) and picks
one with `choose` (a resource model, not a timing); `--write` stores the picks in
`cross_attention_configs.py`, which the launcher reads.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from neti_fast.utils import first_line

# Per compute capability: (max shared memory per block with opt-in, shared memory per SM), bytes.
# From NVIDIA's CUDA C++ Programming Guide, "Technical Specifications per Compute Capability".
SMEM = {80: (166_912, 167_936), 86: (101_376, 102_400), 89: (101_376, 102_400),
        90: (232_448, 233_472), 100: (232_448, 233_472)}
REGS_PER_SM = 65_536
MAX_WARPS_PER_SM = {80: 64, 86: 48, 89: 48, 90: 64, 100: 64}
FAMILY_OF = {80: 80, 86: 80, 89: 80, 90: 90, 100: 100}
DEFAULT_ARCHS = (80, 89, 90, 100)
DISPATCHED_DTYPES = ("fp16", "bf16")

# (label, N, heads, head_dim): SD 1.5 at 512x512 (8 heads per level) and tiny at 64x64.
CASES = [("sd15-64x64", 4096, 8, 40), ("sd15-32x32", 1024, 8, 80), ("sd15-16x16", 256, 8, 160),
         ("tiny-8x8", 64, 8, 4), ("tiny-4x4", 16, 8, 8)]
L = 77
CANDIDATES = [(bn, nw) for bn in (32, 64, 128) for nw in (4, 8)]


@dataclass
class Result:
    arch: int
    dtype: str
    label: str
    head_dim: int
    block_n: int
    num_warps: int
    chunks: str = ""
    registers: int = -1
    spill_bytes: int = -1
    shared: int = -1
    mma: str = "?"
    seconds: float = 0.0
    error: str = ""

    def problems(self) -> list[str]:
        if self.error:
            return [self.error]
        out = []
        if self.spill_bytes:
            out.append(f"{self.spill_bytes} B of spills")
        if self.shared > SMEM[self.arch][0]:
            out.append(f"shared memory {self.shared} B > {SMEM[self.arch][0]} B limit")
        return out

    def resident_warps(self) -> int:
        """Warps per SM that registers and shared memory allow (register granule: 8 per thread)."""
        regs = -(-max(self.registers, 1) // 8) * 8
        by_regs = REGS_PER_SM // (regs * 32 * self.num_warps)
        by_smem = SMEM[self.arch][1] // max(self.shared, 1)
        ctas = min(by_regs, by_smem, MAX_WARPS_PER_SM[self.arch] // self.num_warps)
        return ctas * self.num_warps


def _signature(fn, dtype: str, n_divisible: bool) -> tuple[dict, dict]:
    """Argument types, and the divisibility-by-16 hints a launch with SD's tensors would get
    (torch allocations are 16-byte aligned; SD's strides and N are multiples of 16; L = 77 is not)."""
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in ("Q", "K", "V", "Out"):
            sig[a] = f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif a == "ROW":
            sig[a] = "*i64"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif a.startswith("stride"):
            sig[a] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif a == "N":
            sig[a] = "i32"
            if n_divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif a == "L":
            sig[a] = "i32"
        elif a == "qk_scale":
            sig[a] = "fp32"
        else:
            sig[a] = "constexpr"
    return sig, attrs


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_case(arch: int, dtype: str, label: str, N: int, heads: int, head_dim: int,
                 block_n: int | None = None, num_warps: int | None = None) -> Result:
    """Compile one variant for sm_{arch} and read its resources from ptxas's -v log."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    import torch
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import cross_attention as ca
    tdt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    cfg = ca.pick_config(head_dim, L, tdt, FAMILY_OF[arch], None if block_n else N, block_n, num_warps)
    res = Result(arch, dtype, label, head_dim, cfg.block_n, cfg.num_warps,
                 chunks=f"d {cfg.d0}+{cfg.d1} L {cfg.l0}+{cfg.l1}")
    fn = ca._cross_attn_fwd_kernel
    sig, attrs = _signature(fn, dtype, N % 16 == 0)
    const = ca.kernel_constexprs(heads, head_dim, cfg)
    knobs.nvidia.dump_ptxas_log = True       # ptxas -v output, printed by Triton
    knobs.compilation.always_compile = True  # never a cached binary: the log must come from ptxas
    buf = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(buf):
            k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": cfg.num_warps})
    except Exception as e:  # noqa: BLE001 - a compile failure is a result row, not a crash
        res.error = f"compile error: {type(e).__name__}: {first_line(e)}"
        return res
    res.seconds = time.perf_counter() - t0
    log = buf.getvalue()
    regs = _PTXAS_REGS.findall(log)
    spills = _PTXAS_SPILL.findall(log)
    if not regs:
        res.error = "no ptxas -v report in Triton's log"
        return res
    res.registers = max(int(r) for r in regs)
    res.spill_bytes = sum(int(a) + int(b) for a, b in spills)
    res.shared = int(k.metadata.shared)
    ptx = k.asm["ptx"]
    res.mma = ("tcgen05" if "tcgen05.mma" in ptx else "wgmma" if "wgmma.mma_async" in ptx
               else "mma.sync" if "mma.sync" in ptx else "FMA")
    return res


def choose(results: list[Result]) -> Result | None:
    """Among variants with no spill and shared memory in bounds: prefer >= 8 resident warps per
    SM (latency hiding), then the larger BLOCK_N (K/V read once per more queries, larger MMA
    tiles), then more resident warps, then fewer warps per CTA.  A resource model, not a timing."""
    ok = [r for r in results if not r.problems()]
    if not ok:
        return None
    return max(ok, key=lambda r: (min(r.resident_warps(), 8), r.block_n, r.resident_warps(), -r.num_warps))


def ptxas_archs() -> list[int]:
    """The archs of DEFAULT_ARCHS the bundled ptxas accepts."""
    from triton.backends.nvidia.compiler import get_ptxas
    ok = []
    for a in DEFAULT_ARCHS:
        try:
            get_ptxas(a)
            ok.append(a)
        except Exception:  # noqa: BLE001
            pass
    return ok


def _run(task):
    return compile_case(*task)


def _table(rows: list[Result]) -> str:
    head = ("target", "dtype", "case", "d", "chunks", "BLOCK_N", "warps", "regs", "spill B",
            "smem B", "limit B", "MMA", "res. warps", "s", "status")
    lines = [head]
    for r in rows:
        p = r.problems()
        lines.append((f"sm_{r.arch}", r.dtype, r.label, str(r.head_dim), r.chunks, str(r.block_n),
                      str(r.num_warps), str(r.registers), str(r.spill_bytes), str(r.shared),
                      str(SMEM[r.arch][0]), r.mma, str(r.resident_warps()) if not r.error else "-",
                      f"{r.seconds:.1f}", "ok" if not p else "FAIL: " + "; ".join(p)))
    w = [max(len(x[i]) for x in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(x)).rstrip() for x in lines)


def write_configs(picks: dict[tuple[int, int, str], tuple[int, int]]) -> Path:
    path = Path(__file__).with_name("cross_attention_configs.py")
    src = path.read_text()
    head = src[:src.index("CONFIGS:")]
    body = "CONFIGS: dict[tuple[int, int, str], tuple[int, int]] = {\n"
    for key in sorted(picks):
        body += f"    {key!r}: {picks[key]!r},\n"
    body += "}\n"
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(head + body)
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m neti_fast.kernels.check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", type=int, nargs="+", action="extend", default=None,
                    help=f"compute capabilities x10 (default: those of {DEFAULT_ARCHS} the bundled ptxas takes)")
    ap.add_argument("--dtypes", nargs="+", action="extend", default=None, choices=("fp16", "bf16", "fp32"),
                    help="default: fp16 bf16, what the dispatcher sends to the kernel on CUDA")
    ap.add_argument("--search", action="store_true", help="compile every candidate tile size and pick one per case")
    ap.add_argument("--write", action="store_true", help="with --search: store the picks in cross_attention_configs.py")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("kernels.check: triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    archs = args.archs or ptxas_archs()
    bad = [a for a in archs if a not in SMEM]
    if bad:
        print(f"--archs: {bad} unknown; known: {sorted(SMEM)}", file=sys.stderr)
        return 2
    dtypes = args.dtypes or list(DISPATCHED_DTYPES)
    tasks = []
    for a in archs:
        for dt in dtypes:
            for label, N, heads, d in CASES:
                cands = CANDIDATES if args.search else [(None, None)]
                tasks += [(a, dt, label, N, heads, d, bn, nw) for bn, nw in cands]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(_run, tasks))
    if args.search:
        picks, shown = {}, []
        for a in archs:
            for dt in dtypes:
                for label, _, _, d in CASES:
                    group = [r for r in results if (r.arch, r.dtype, r.label) == (a, dt, label)]
                    best = choose(group)
                    shown += group
                    if best is None:
                        print(f"sm_{a} {dt} {label}: no candidate compiles without spills within shared memory")
                        continue
                    fam = FAMILY_OF[a]
                    if fam == a:  # 86 / 89 share family 80's entry; they are checked, not searched for
                        picks[(fam, d, dt)] = (best.block_n, best.num_warps)
        print(_table(shown))
        print("picks:", picks)
        if args.write:
            print("wrote", write_configs(picks))
        return 0
    print(_table(results))
    failed = [r for r in results if r.problems()]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed "
          f"({len(results)} compiles in {time.perf_counter() - t0:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
