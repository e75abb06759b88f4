"""The native extension `neti_fast._C`: loading it, its guards, and its op's Python face.

`_C.so` (built from csrc/ by CMakeLists.txt through setup.py) registers one op,

    torch.ops.neti_fast.cross_attention_native(q, k_table, v_table, row_idx, heads, scale)

with the math of `kernels.cross_attention.cross_attention_ref` (row-gathered cross-attention:
sample b reads K / V row `row_idx[b]` of the [R, L, C] tables), a C++ CPU kernel (fp32 / bf16,
any L, any head dim) and a CUDA kernel (libneti_fast_cuda.so, sm_80 / sm_90, fp32 / bf16 / fp16).
It is a separate op from the Triton custom op `neti_fast::cross_attention` (see csrc/ops.cpp for
why); its fake implementation is registered here, so torch.compile and torch.export see one node.

The extension is optional: if it was not built (no cmake / compiler at install time, or
NETI_FAST_NATIVE=0) or fails to load, `native_available()` says why, one warning line is logged
once, and callers use PyTorch.  NETI_FAST_DISABLE_NATIVE=1 turns it off at run time.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from ..utils import env_flag

__all__ = ["native_available", "native_supported", "native_preferred", "cross_attention_native",
           "library_path", "cuda_library_path"]

_log = logging.getLogger("neti_fast.sd.native")
_HERE = Path(__file__).resolve().parent.parent  # neti_fast/: setup.py builds the extension as neti_fast._C
_CPU_DTYPES = (torch.float32, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CUDA_MAX_HEAD_DIM = 256

_lock = threading.Lock()
_state: tuple[bool, str] | None = None  # (loaded, reason), decided once
_warned = False


def library_path() -> Path:
    return _HERE / "_C.so"


def cuda_library_path() -> Path:
    return _HERE / "libneti_fast_cuda.so"


def _build_status() -> str:
    """The build's own one-line verdict (written by setup.py), if any."""
    try:
        return (_HERE / "_native_build.txt").read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def _load() -> tuple[bool, str]:
    global _state
    if _state is not None:  # decided: no lock (also keeps torch.compile tracing through this)
        return _state
    with _lock:
        if _state is None:
            path = library_path()
            if not path.exists():
                status = _build_status()
                why = status if status.startswith("not built") else "not built (no neti_fast/_C.so)"
                _state = (False, f"native extension {why}; reinstall with cmake and a C++ compiler present "
                                 "(and NETI_FAST_NATIVE unset) to build it")
            else:
                try:
                    torch.ops.load_library(str(path))
                    _register_fake()
                    _state = (True, f"loaded {path}")
                except (OSError, RuntimeError) as e:  # e.g. built against another torch
                    _state = (False, f"native extension {path} failed to load: {str(e).splitlines()[0]}")
    return _state


def _warn_once(why: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        _log.warning("neti-fast: %s; using PyTorch attention instead", why)


def native_available() -> tuple[bool, str]:
    """Is the native op usable in this process?  (ok, reason).  Loads `_C` on first call."""
    if env_flag("NETI_FAST_DISABLE_NATIVE"):
        return False, "disabled by NETI_FAST_DISABLE_NATIVE"
    ok, why = _load()
    if not ok:
        _warn_once(why)
    return ok, why


def _in_onnx_export() -> bool:
    try:
        return bool(torch.onnx.is_in_onnx_export())
    except AttributeError:
        return False


def native_supported(q: torch.Tensor, k_table: torch.Tensor, heads: int) -> tuple[bool, str]:
    """Can the native kernel run for these inputs?  (ok, reason)."""
    ok, why = native_available()
    if not ok:
        return False, why
    if _in_onnx_export():  # torch.export keeps the op as one node (fake impl); ONNX has no such op
        return False, "ONNX export: use the PyTorch path"
    if q.dim() != 3 or k_table.dim() != 3 or q.shape[-1] != k_table.shape[-1]:
        return False, f"bad shapes q {tuple(q.shape)}, k_table {tuple(k_table.shape)}"
    if heads <= 0 or q.shape[-1] % heads:
        return False, f"C={q.shape[-1]} not divisible by heads={heads}"
    if k_table.device != q.device:
        return False, f"k_table on {k_table.device}, q on {q.device}"
    if k_table.dtype != q.dtype:
        return False, f"dtype mismatch: q {q.dtype}, k_table {k_table.dtype}"
    if k_table.shape[1] < 1:
        return False, "L=0: no keys"
    if q.device.type == "cpu":
        if q.dtype not in _CPU_DTYPES:
            return False, f"dtype {q.dtype} unsupported on CPU (float32 / bfloat16)"
        return True, "ok"
    if q.device.type == "cuda":
        if not cuda_library_path().exists():
            return False, "CUDA kernels not built (nvcc was not found at install time)"
        if q.dtype not in _CUDA_DTYPES:
            return False, f"dtype {q.dtype} unsupported on CUDA"
        if q.shape[-1] // heads > _CUDA_MAX_HEAD_DIM:
            return False, f"head_dim={q.shape[-1] // heads} > {_CUDA_MAX_HEAD_DIM}"
        return True, "ok"
    return False, f"no native kernel for device {q.device}"


# `auto` on CPU, from `python -m neti_fast.bench.attention --threads 1` (native vs SDPA, calls
# alternated; bench/results/cpu-attention-native-{fp32,bf16}.json, docs/native-extension.md).
# Set from a run under load (2026-12-01): fp32 native faster at every level (1.22-1.45x at SD 1.5's
# head dims 40 / 80 / 160, 1.39-2.07x at tiny's); bf16 faster at tiny's only, so SDPA keeps bf16
# above head dim 16. Two quiet runs (2026-12-03) agree at tiny's (~2x) but give 0.82-1.05x at SD
# 1.5's fp32 levels; the rule is kept until repeated runs settle it: there cross-attention is under
# 1% of a CPU U-Net step (x0.96 engine-level, within noise), so either choice costs the same.
_BF16_MAX_HEAD_DIM = 16


def native_preferred(q: torch.Tensor, k_table: torch.Tensor, heads: int) -> bool:
    """Should `auto` pick the native kernel over SDPA for this CPU shape class?"""
    if q.device.type != "cpu":
        return False  # on CUDA the Triton kernel is the tuned path; native is opt-in there
    if not native_supported(q, k_table, heads)[0]:
        return False
    return q.dtype == torch.float32 or q.shape[-1] // heads <= _BF16_MAX_HEAD_DIM


def cross_attention_native(q: torch.Tensor, k_table: torch.Tensor, v_table: torch.Tensor,
                           row_idx: torch.Tensor, heads: int, scale: float | None = None) -> torch.Tensor:
    """Row-gathered cross-attention with the native kernel; [B, N, C] in q's dtype.

    Same contract as `kernels.cross_attention.cross_attention_ref`; raises RuntimeError naming the
    reason if the extension is not available.
    """
    ok, why = native_available()
    if not ok:
        raise RuntimeError(f"cross_attention_native: {why}")
    scale = (q.shape[-1] // heads) ** -0.5 if scale is None else float(scale)
    return torch.ops.neti_fast.cross_attention_native(q, k_table, v_table, row_idx, heads, scale)


def _register_fake() -> None:
    # The op's schema lives in _C, so its fake implementation is registered right after loading
    # _C (which names this module with set_python_module, as torch asks of C++ ops with Python fakes).
    @torch.library.register_fake("neti_fast::cross_attention_native")
    def _(q, k_table, v_table, row_idx, heads, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)
