"""One conformance suite for every cross-attention kernel: the Triton kernel (neti_fast.kernels;
under triton's CPU interpreter without a GPU) and the native C++ / CUDA op (neti_fast.sd.native).

    out[b] = softmax(q[b] K[row_idx[b]]^T * scale) V[row_idx[b]]      (per head)

Each kernel is held to flash-attention's rule against an fp64 reference (`kernels.cross_attention.
accuracy_ok`: at most 2x PyTorch's own error in the same dtype, plus one ulp / 1e-5 of atol), at SD
1.5's four cross-attention levels, the tiny models' shapes and odd ones, and must read only the rows
`row_idx` names. Kernel-specific behaviour (launcher guards, configs, ISA variants, op
registration) is in tests/kernels/test_triton.py and tests/sd/test_native.py.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before neti_fast.kernels defines its kernels

import pytest  # noqa: E402

from neti_fast.kernels import cross_attention as ca  # noqa: E402
from neti_fast.kernels.shapes import LONG_CONTEXTS  # noqa: E402
from neti_fast.kernels.shapes import SHAPES as FAMILY_SHAPES  # noqa: E402
from neti_fast.sd import native  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
L, R, B = 77, 5, 3
ROWS = [3, 0, 3]  # repeats and out of order; rows 1, 2, 4 are never read
NATIVE_OK, NATIVE_WHY = native.native_available()
TRITON_OK = ca.HAS_TRITON and (DEVICE == "cuda" or ca._interpret_mode())

# (name, N, C, heads, keys), from the model families' shapes (neti_fast.kernels.shapes). SD 1.5's
# levels at 512x512: N = 4096 / 1024 / 256 / 64, C = 320 / 640 / 1280 / 1280, 8 heads (head_dim 40
# / 80 / 160); SD 2.x's (768x768) and SDXL's (1024x1024) head dim 64 with 5 / 10 / 20 heads. The
# Triton interpreter costs ~12 s per dtype at N = 4096 or 1024, so off CUDA it runs levels above
# N = 256 at N = 128 (every query row is computed alike: N only changes how many programs run), and
# long prompts (L = 154, 231: the key-loop kernel) at one level per head dim; the native kernel runs
# SD 1.5 at full size and SD 2.x / SDXL at N <= 1024. "odd": N not a multiple of any block or
# group, head_dim not a multiple of any vector width; keys 1 and 128 are the one-pass kernel's
# extremes, 129 the key loop's smallest (one real key in its last block).
def family(name, keys=L, cap=lambda N: N):
    """A family's levels as cases, N reduced by `cap`."""
    return [(s.label + (f"-N{cap(s.N)}" if cap(s.N) != s.N else "") + (f"-L{keys}" if keys != L else ""),
             cap(s.N), s.C, s.heads, keys) for s in FAMILY_SHAPES[name]]


SD15 = family("sd1")
_cap = (lambda N: N) if DEVICE == "cuda" else (lambda N: N if N <= 256 else 128)  # interpreter
_L154, _L231 = LONG_CONTEXTS
SHAPES = {
    "triton": family("sd1", cap=_cap) + family("sd2", cap=_cap)[:1] + family("sdxl", cap=_cap)[1:]
              + [("tiny", 64, 32, 4, L), ("odd", 50, 64, 8, L)]
              + family("sd1", _L154, _cap)[:1] + family("sd1", _L231, _cap)[3:] + family("sd2", _L231, _cap)[:1]
              + [("odd-L129", 50, 64, 8, 129)],
    "native": SD15 + family("sd2", cap=lambda N: min(N, 1024)) + family("sdxl", cap=lambda N: min(N, 1024))
              + [c for k in LONG_CONTEXTS for c in family("sd1", k) + family("sdxl", k, lambda N: min(N, 1024))[1:]]
              + [("tiny8x8", 64, 32, 8, L), ("tiny2x2", 4, 64, 8, L), ("tiny1x1", 1, 64, 8, L),
                 ("odd", 50, 100, 5, L), ("L1", 37, 64, 4, 1), ("L128", 37, 64, 4, 128), ("L129", 37, 64, 4, 129)],
}
SHAPES["native-cuda"] = SHAPES["native"]
HALF = [torch.float32, torch.float16, torch.bfloat16]
DTYPES = {"triton": HALF, "native": [torch.float32, torch.bfloat16], "native-cuda": HALF}
SKIP = {"triton": None if TRITON_OK else "triton missing, or no CUDA and neti_fast.kernels was imported before "
                                         "TRITON_INTERPRET=1 was set (tests/conftest.py sets it)",
        "native": None if NATIVE_OK else f"neti_fast._C unavailable: {NATIVE_WHY}",
        "native-cuda": ("needs a CUDA GPU (none here, or a CPU-only torch)" if DEVICE != "cuda" else
                        None if NATIVE_OK else f"neti_fast._C unavailable: {NATIVE_WHY}")}
IMPLS = [pytest.param(name, marks=pytest.mark.skipif(SKIP[name] is not None, reason=str(SKIP[name])), id=name)
         for name in ("triton", "native", "native-cuda")]


def kernel(impl: str):
    return ca.cross_attention_triton if impl == "triton" else native.cross_attention_native


def device(impl: str) -> str:
    return {"triton": DEVICE, "native": "cpu", "native-cuda": "cuda"}[impl]


def make_inputs(impl, N, C, dtype, seed=0, keys=L, idx_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, C, generator=g)
    k = torch.randn(R, keys, C, generator=g)
    v = torch.randn(R, keys, C, generator=g)
    dev = device(impl)
    return [t.to(dev, dtype) for t in (q, k, v)] + [torch.tensor(ROWS, dtype=idx_dtype).to(dev)]


def check_against_reference(impl, q, k, v, ri, heads, scale=None):
    """flash-attention's rule vs an fp64 reference (fp32 inputs then have a nonzero PyTorch error too)."""
    out = kernel(impl)(q, k, v, ri, heads, scale)
    out_pt = ca.cross_attention_ref(q, k, v, ri, heads, scale)
    out_hi = ca.cross_attention_ref(q.double(), k.double(), v.double(), ri, heads, scale)
    assert out.dtype == q.dtype and out.shape == q.shape and out.isfinite().all()
    ok, detail = ca.accuracy_ok(out, out_pt, out_hi)
    assert ok, detail
    return out


CASES = [pytest.param(impl.values[0], *shape, dtype, marks=impl.marks,
                      id=f"{impl.values[0]}-{shape[0]}-{str(dtype).split('.')[-1]}")
         for impl in IMPLS for shape in SHAPES[impl.values[0]] for dtype in DTYPES[impl.values[0]]]


@pytest.mark.parametrize("impl,name,N,C,heads,keys,dtype", CASES)
def test_matches_reference(impl, name, N, C, heads, keys, dtype):
    q, k, v, ri = make_inputs(impl, N, C, dtype, keys=keys)
    check_against_reference(impl, q, k, v, ri, heads)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_row_idx_dtype_and_scale(impl, idx_dtype):
    q, k, v, ri = make_inputs(impl, 64, 32, torch.float32, idx_dtype=idx_dtype)
    check_against_reference(impl, q, k, v, ri, 4, scale=0.3)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_inputs(impl):
    """q / tables that are views with padded rows (only the last dim contiguous) give the same bits."""
    dt = torch.float32 if impl == "native" else torch.float16
    q, k, v, ri = make_inputs(impl, 40, 64, dt)
    q_wide = torch.zeros(B, 40, 96, dtype=dt, device=q.device)
    q_wide[..., :64] = q
    k_wide = torch.zeros(R, L + 3, 64, dtype=dt, device=q.device)  # stride_r = 80 * 64
    k_wide[:, :L] = k
    qs, ks = q_wide[..., :64], k_wide[:, :L]
    assert not qs.is_contiguous() and not ks.is_contiguous()
    out = check_against_reference(impl, qs, ks, v, ri, 8)
    torch.testing.assert_close(out, kernel(impl)(q, k, v, ri, 8), rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_gather_reads_only_selected_rows(impl):
    f = kernel(impl)
    q, k, v, ri = make_inputs(impl, 64, 32, torch.float32)
    base = f(q, k, v, ri, 4)
    torch.testing.assert_close(base, ca.cross_attention_ref(q, k, v, ri, 4), rtol=1e-5, atol=1e-5)
    k2, v2 = k.clone(), v.clone()
    for r in set(range(R)) - set(ROWS):  # unreferenced rows: no effect at all
        k2[r] = 1e4
        v2[r] = float("nan")
    torch.testing.assert_close(f(q, k2, v2, ri, 4), base, rtol=0, atol=0)
    v3 = v.clone()
    v3[0] += 1.0  # row 0 is read by sample 1 only; softmax weights sum to 1, so sample 1 moves by 1
    out3 = f(q, k, v3, ri, 4)
    torch.testing.assert_close(out3[1], base[1] + 1.0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out3[[0, 2]], base[[0, 2]], rtol=0, atol=0)
