"""Compile every Triton kernel for real NVIDIA targets, without a GPU, and check its resources.

    python -m neti_fast.kernels.check [--archs 80 89 90 100] [--dtypes fp16 bf16] [--families sd1 ...]
                                      [--search [--write]]

The `TRITON_INTERPRET=1` tests check the kernel's math on CPU; they cannot see what a GPU would
refuse or run slowly.  This compiles the kernel the way a launch on that GPU would (Triton's own
pipeline down to SASS, with the ptxas bundled in its wheel: `triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`), at every model family's real shapes (`shapes.SHAPES`:
SD 1.x's head dims 40 / 80 / 160, SD 2.x's and SDXL's 64, the built-in tiny model's 4 / 8) with
L = 77, and SD 1.x / 2.x / SDXL's at the long-prompt lengths `shapes.LONG_CONTEXTS` (154, 231:
the key-loop kernel), in each dtype the dispatcher sends to the kernel on CUDA (fp16, bf16: fp32
goes to SDPA, see --dtypes fp32).  One row per case: target, dtype, shape, L, kernel, chunks,
padding ratio (`work_ratio`: matmul work done over useful work), blocks, warps, registers, spills,
shared memory, the MMA instruction family found in the PTX (tcgen05 / wgmma / mma.sync / FMA) and
the tensor-core instructions ptxas emitted into the SASS (UTCHMMA / HGMMA / HMMA and their count,
read with the cuobjdump bundled in Triton's wheel).
Cases that select the same compiled variant (same constexprs, warps and N-divisibility hint; L is
a run-time argument of the key-loop kernel) share one compile.

Exit status 1 on a compile error, any spill, shared memory over the target's per-block limit, or
(fp16 / bf16) no tensor-core MMA in the PTX or the SASS.

`--search` compiles every candidate (BLOCK_N, num_warps) per (GPU family, head dim, dtype, kernel)
of the selected cases and picks one with `choose` (a resource model, not a timing); `--write`
merges the picks into `cross_attention_configs.py`, which the launcher reads.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from neti_fast.utils import first_line

from .shapes import LONG_CONTEXTS, LONG_PROMPT_FAMILIES, SHAPES, TOKENS, AttnShape

# Per compute capability: (max shared memory per block with opt-in, shared memory per SM), bytes.
# From NVIDIA's CUDA C++ Programming Guide, "Technical Specifications per Compute Capability".
SMEM = {80: (166_912, 167_936), 86: (101_376, 102_400), 89: (101_376, 102_400),
        90: (232_448, 233_472), 100: (232_448, 233_472)}
REGS_PER_SM = 65_536
MAX_WARPS_PER_SM = {80: 64, 86: 48, 89: 48, 90: 64, 100: 64}
FAMILY_OF = {80: 80, 86: 80, 89: 80, 90: 90, 100: 100}
DEFAULT_ARCHS = (80, 89, 90, 100)
DISPATCHED_DTYPES = ("fp16", "bf16")

CANDIDATES = [(bn, nw) for bn in (32, 64, 128) for nw in (4, 8)]


def cases(families=None) -> list[tuple[AttnShape, int]]:
    """(shape, L) pairs to compile: every level at L = 77, the long-prompt families' at LONG_CONTEXTS."""
    out = []
    for fam in families or SHAPES:
        for shape in SHAPES[fam]:
            out.append((shape, TOKENS))
            if fam in LONG_PROMPT_FAMILIES:
                out += [(shape, L) for L in LONG_CONTEXTS]
    return out


@dataclass
class Result:
    arch: int
    dtype: str
    label: str
    head_dim: int
    L: int
    block_n: int
    num_warps: int
    variant: str = ""
    chunks: str = ""
    padding: float = 0.0
    registers: int = -1
    spill_bytes: int = -1
    shared: int = -1
    mma: str = "?"
    sass: str = "?"   # tensor-core opcodes in the SASS, e.g. "HGMMA x13"; "?" if cuobjdump is missing
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
        if self.dtype != "fp32" and self.mma == "FMA":
            out.append("no tensor-core MMA in the PTX")
        if self.dtype != "fp32" and self.sass == "none":
            out.append("no tensor-core MMA in the SASS")
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
        if fn.params[i].is_constexpr:
            sig[a] = "constexpr"
        elif a in ("Q", "K", "V", "Out"):
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
        elif a in ("L", "H"):
            sig[a] = "i32"
        elif a == "qk_scale":
            sig[a] = "fp32"
        else:
            raise ValueError(f"kernels.check: no type for argument {a!r} of {fn.__name__}")
    return sig, attrs


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def resolve(arch: int, dtype: str, N: int, head_dim: int, L: int, block_n: int | None = None,
            num_warps: int | None = None):
    """The KernelConfig a launch at this shape would use on sm_{arch} (explicit tiles: as given)."""
    import torch

    from . import cross_attention as ca
    tdt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    return ca.pick_config(head_dim, L, tdt, FAMILY_OF[arch], None if block_n else N, block_n, num_warps)


def compile_key(arch: int, dtype: str, N: int, heads: int, head_dim: int, L: int,
                block_n: int | None = None, num_warps: int | None = None) -> tuple:
    """What determines the compiled binary: cases with equal keys share one compile (heads only for
    the one-pass kernel, where they are a constexpr)."""
    cfg = resolve(arch, dtype, N, head_dim, L, block_n, num_warps)
    return (arch, dtype, None if cfg.key_loop else heads, head_dim, N % 16 == 0, cfg)


def compile_case(arch: int, dtype: str, label: str, N: int, heads: int, head_dim: int, L: int = TOKENS,
                 block_n: int | None = None, num_warps: int | None = None) -> Result:
    """Compile one variant for sm_{arch} and read its resources from ptxas's -v log."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import cross_attention as ca
    cfg = resolve(arch, dtype, N, head_dim, L, block_n, num_warps)
    res = Result(arch, dtype, label, head_dim, L, cfg.block_n, cfg.num_warps, cfg.variant)
    _describe(res, cfg)
    fn = cfg.kernel
    sig, attrs = _signature(fn, dtype, N % 16 == 0)
    const = {k: v for k, v in ca.kernel_constexprs(heads, head_dim, cfg).items() if sig[k] == "constexpr"}
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
    res.sass = _sass_mma(k.asm["cubin"])
    return res


_SASS_MMA = re.compile(r"\b(UTC\w*MMA|HGMMA|HMMA)\b")


def _sass_mma(cubin: bytes) -> str:
    """The tensor-core opcodes in a cubin's SASS, most frequent first ("none" if there are none)."""
    import subprocess
    import tempfile
    from collections import Counter

    from triton import knobs
    tool = knobs.nvidia.cuobjdump.path
    if not tool or not os.path.exists(tool):
        return "?"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        r = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True)
    if r.returncode != 0:
        return "?"
    ops = Counter(_SASS_MMA.findall(r.stdout))
    return " ".join(f"{op} x{n}" for op, n in ops.most_common()) or "none"


def _describe(res: Result, cfg) -> None:
    """The row's chunking and padding ratio at its own L (cases sharing a compile differ in L)."""
    from . import cross_attention as ca
    keys = (f"L {ca.padded_keys(res.L, cfg) // cfg.l0}x{cfg.l0}" if cfg.key_loop
            else f"L {cfg.l0}+{cfg.l1}")
    res.chunks = f"d {cfg.d0}+{cfg.d1} {keys}"
    res.padding = ca.work_ratio(res.head_dim, res.L, cfg)


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
    head = ("target", "dtype", "case", "d", "L", "kernel", "chunks", "pad", "BLOCK_N", "warps", "regs",
            "spill B", "smem B", "limit B", "MMA", "SASS MMA", "res. warps", "s", "status")
    lines = [head]
    for r in rows:
        p = r.problems()
        lines.append((f"sm_{r.arch}", r.dtype, r.label, str(r.head_dim), str(r.L), r.variant, r.chunks,
                      f"{r.padding:.2f}", str(r.block_n), str(r.num_warps), str(r.registers),
                      str(r.spill_bytes), str(r.shared), str(SMEM[r.arch][0]), r.mma, r.sass,
                      str(r.resident_warps()) if not r.error else "-", f"{r.seconds:.1f}",
                      "ok" if not p else "FAIL: " + "; ".join(p)))
    w = [max(len(x[i]) for x in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(x)).rstrip() for x in lines)


def write_configs(picks: dict[tuple[int, int, str, str], tuple[int, int]]) -> Path:
    """Merge `picks` into cross_attention_configs.py (entries not searched for are kept)."""
    from .cross_attention_configs import CONFIGS
    path = Path(__file__).with_name("cross_attention_configs.py")
    src = path.read_text()
    head = src[:src.index("CONFIGS:")]
    merged = {**CONFIGS, **picks}
    body = "CONFIGS: dict[tuple[int, int, str, str], tuple[int, int]] = {\n"
    for key in sorted(merged):
        body += f"    {key!r}: {merged[key]!r},\n"
    body += "}\n"
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(head + body)
    os.replace(tmp, path)
    return path


def _compile_all(tasks: list[tuple], jobs: int) -> tuple[list[Result], int]:
    """One compile per distinct binary (`compile_key`), its result copied to every case sharing it;
    also returns the number of compiles."""
    first: dict[tuple, tuple] = {}
    for t in tasks:
        first.setdefault(compile_key(t[0], t[1], *t[3:]), t)
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        done = dict(zip(first, pool.map(_run, first.values())))
    out = []
    for t in tasks:
        r = copy.copy(done[compile_key(t[0], t[1], *t[3:])])
        r.label, r.L = t[2], t[6]
        _describe(r, resolve(t[0], t[1], t[3], t[5], t[6], t[7], t[8]))
        out.append(r)
    return out, len(first)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m neti_fast.kernels.check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", type=int, nargs="+", action="extend", default=None,
                    help=f"compute capabilities x10 (default: those of {DEFAULT_ARCHS} the bundled ptxas takes)")
    ap.add_argument("--dtypes", nargs="+", action="extend", default=None, choices=("fp16", "bf16", "fp32"),
                    help="default: fp16 bf16, what the dispatcher sends to the kernel on CUDA")
    ap.add_argument("--families", nargs="+", action="extend", default=None, choices=sorted(SHAPES),
                    help="model families whose shapes to compile (default: all)")
    ap.add_argument("--search", action="store_true", help="compile every candidate tile size and pick one per case")
    ap.add_argument("--missing", action="store_true", help="with --search: only the keys CONFIGS lacks")
    ap.add_argument("--write", action="store_true", help="with --search: merge the picks into cross_attention_configs.py")
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
    selected = cases(args.families)
    t0 = time.perf_counter()
    if args.search:
        return _search(archs, dtypes, selected, args.jobs, args.write, args.missing)
    tasks = [(a, dt, s.label, s.N, s.heads, s.head_dim, L, None, None)
             for a in archs for dt in dtypes for s, L in selected]
    results, compiles = _compile_all(tasks, args.jobs)
    print(_table(results))
    failed = [r for r in results if r.problems()]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed "
          f"({len(results)} cases, {compiles} compiles in {time.perf_counter() - t0:.0f} s)")
    return 1 if failed else 0


def _search(archs, dtypes, selected, jobs: int, write: bool, missing: bool) -> int:
    """Every candidate tile size per (GPU family, head dim, dtype, kernel); the first selected case
    of each such key stands for it (cases differ only in N and L, which do not change the binary
    beyond N's divisibility hint, the same for every shape in SHAPES)."""
    from . import cross_attention as ca
    from .cross_attention_configs import CONFIGS
    groups: dict[tuple, tuple] = {}
    for a in archs:
        if FAMILY_OF[a] != a:  # 86 / 89 share family 80's entry; they are checked, not searched for
            continue
        for dt in dtypes:
            for s, L in selected:
                key = (a, s.head_dim, dt, "keyloop" if L > ca._MAX_ONEPASS_L else "onepass")
                if not (missing and key in CONFIGS):
                    groups.setdefault(key, (s, L))
    tasks = [(a, dt, s.label, s.N, s.heads, s.head_dim, L, bn, nw)
             for (a, _, dt, _), (s, L) in groups.items() for bn, nw in CANDIDATES]
    results, _ = _compile_all(tasks, jobs)
    picks, shown = {}, []
    for (a, d, dt, variant), (s, L) in groups.items():
        group = [r for r in results if (r.arch, r.dtype, r.label, r.L) == (a, dt, s.label, L)]
        shown += group
        best = choose(group)
        if best is None:
            print(f"sm_{a} {dt} {s.label} L={L}: no candidate compiles without spills within shared memory")
            continue
        picks[(a, d, dt, variant)] = (best.block_n, best.num_warps)
    print(_table(shown))
    print("picks:", picks)
    if write:
        print("wrote", write_configs(picks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
