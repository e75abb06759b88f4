"""Row-gathered cross-attention for Stable Diffusion 1.x U-Net (Triton).

neti-fast precomputes, for every cross-attention layer, the projected text keys
and values of every conditioning row it will ever need:

    k_table, v_table : [R, L, C]   R rows, L = 77 text tokens, C = heads * head_dim
                                   (already multiplied by to_k / to_v)

Sample ``b`` of the batch reads one row ``r = row_idx[b]`` (e.g. the
unconditional row for the CFG-uncond half, a (concept, prompt, step) row for the
conditional half).  With ``q = to_q(x)`` of shape [B, N, C] and head ``h``
occupying channels ``h*d:(h+1)*d``:

    out[b, n, h*d:(h+1)*d] = softmax_l( q[b, n, h] . K_r[l, h] * scale ) @ V_r[:, h]
    r = row_idx[b],  scale = d ** -0.5 by default

The gather happens inside the kernel: each program loads ``row_idx[b]`` and
offsets its K/V pointers by ``r * stride_r``; no per-sample K/V copy is ever
materialized and nothing is index_select-ed before the launch.

Why no online softmax: the FlashAttention tutorial streams keys in blocks and
keeps a running max / running sum (online softmax) because the key axis is
long.  Here L = 77 fits in ONE padded block of BLOCK_L = 128 keys, so each
program does a plain, exact, single-pass softmax:

    s   = (q @ K^T) * scale * log2(e)      [BLOCK_N, BLOCK_L], fp32 accumulate
    s[:, l >= L] = -inf                    padding keys get zero weight
    p   = exp2(s - rowmax(s))              exp2 with log2(e) folded into scale
    out = (p @ V) / rowsum(p)              normalize once, after the PV matmul

Padding: head_dim (40/80/160 in SD 1.5, 4/8 in tiny test models) is not a
power of two; it is padded to BLOCK_D = next_pow2(max(head_dim, 16)) and
masked (16 is tl.dot's minimum K/N).  d = 160 pads to 256, wasting 37.5% of
the QK^T / PV work on that level; a 128 + 32 split would avoid it if it
matters after H100 tuning.

Precision: accumulation is always fp32.  For fp16/bf16 inputs, ``p`` is cast
back to the input dtype before ``p @ V`` (as FlashAttention does) so that the
second matmul runs on tensor cores.  For fp32 inputs tl.dot would default to
TF32 on GPU (10-bit mantissa, ~1e-3 relative error); we default to
``input_precision="ieee"`` so fp32 stays fp32-accurate, and the launcher's
``allow_tf32=True`` opts into TF32 for speed.

Grid: (cdiv(N, BLOCK_N), B * heads).  One program = one block of image
tokens of one (sample, head).  K/V for a (row, head) are re-read by every
N block but are tiny (77 x d) and stay in L2.
"""

from __future__ import annotations

import os

import torch

try:  # keep the module importable (reference, fake impl, guards) without triton
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on triton-less installs
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "cross_attention_ref",
    "cross_attention_triton",
    "cross_attention_op",
    "triton_supported",
]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_L = 128  # BLOCK_L: all keys live in one block
_MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634


def _interpret_mode() -> bool:
    """True if the kernel was built for triton's CPU interpreter.

    triton reads TRITON_INTERPRET when ``@triton.jit`` decorates the kernel,
    i.e. when this module is imported; setting it later has no effect.
    """
    return HAS_TRITON and type(_cross_attn_fwd_kernel).__name__ == "InterpretedFunction"


def _check_shapes(q, k_table, v_table, row_idx, heads):
    assert q.dim() == 3, f"q must be [B, N, C], got {tuple(q.shape)}"
    assert k_table.dim() == 3, f"k_table must be [R, L, C], got {tuple(k_table.shape)}"
    assert v_table.shape == k_table.shape, (
        f"v_table {tuple(v_table.shape)} != k_table {tuple(k_table.shape)}"
    )
    assert row_idx.dim() == 1 and row_idx.shape[0] == q.shape[0], (
        f"row_idx must be [B={q.shape[0]}], got {tuple(row_idx.shape)}"
    )
    assert k_table.shape[2] == q.shape[2], (
        f"channel mismatch: q C={q.shape[2]}, tables C={k_table.shape[2]}"
    )
    assert heads > 0 and q.shape[2] % heads == 0, f"C={q.shape[2]} not divisible by heads={heads}"


# --------------------------------------------------------------------------- #
# Reference
# --------------------------------------------------------------------------- #
def cross_attention_ref(q, k_table, v_table, row_idx, heads, scale=None):
    """Plain PyTorch reference: gather rows, then explicit softmax(QK^T)V.

    Runs entirely in q's dtype (no upcast), like flash-attention's
    ``attention_ref(upcast=False)``; upcast the inputs yourself for an fp32
    reference.  Returns [B, N, C] in q's dtype.
    """
    _check_shapes(q, k_table, v_table, row_idx, heads)
    B, N, C = q.shape
    L = k_table.shape[1]
    d = C // heads
    scale = d**-0.5 if scale is None else scale
    k = k_table.index_select(0, row_idx.long()).view(B, L, heads, d).transpose(1, 2)
    v = v_table.index_select(0, row_idx.long()).view(B, L, heads, d).transpose(1, 2)
    qh = q.view(B, N, heads, d).transpose(1, 2)  # [B, H, N, d]
    attn = torch.softmax((qh @ k.transpose(-1, -2)) * scale, dim=-1)
    out = attn @ v  # [B, H, N, d]
    return out.transpose(1, 2).reshape(B, N, C).to(q.dtype)


# --------------------------------------------------------------------------- #
# Triton kernel
# --------------------------------------------------------------------------- #
if HAS_TRITON:

    @triton.jit
    def _cross_attn_fwd_kernel(
        Q, K, V, ROW, Out,
        stride_qb, stride_qn,
        stride_kr, stride_kl,
        stride_vr, stride_vl,
        stride_ob, stride_on,
        N, L, qk_scale,  # qk_scale = scale * log2(e)
        H: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_D: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,  # interpreter + bf16 workaround, see launcher
    ):
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H

        # The gather: this sample's conditioning row, as an int64 offset.
        r = tl.load(ROW + b).to(tl.int64)

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_l = tl.arange(0, BLOCK_L)
        offs_d = tl.arange(0, BLOCK_D)
        mask_n = offs_n < N
        mask_l = offs_l < L
        mask_d = offs_d < HEAD_DIM
        col = h * HEAD_DIM + offs_d  # channel of (head h, dim d); last dim is contiguous

        q_ptrs = Q + b.to(tl.int64) * stride_qb + offs_n[:, None] * stride_qn + col[None, :]
        q = tl.load(q_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)

        kv_mask = mask_l[:, None] & mask_d[None, :]
        k = tl.load(K + r * stride_kr + offs_l[:, None] * stride_kl + col[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + r * stride_vr + offs_l[:, None] * stride_vl + col[None, :],
                    mask=kv_mask, other=0.0)

        in_dtype = v.dtype
        if DOT_IN_FP32:  # bf16 -> fp32 is exact, so the products are unchanged
            q = q.to(tl.float32)
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        # Scores in the log2 domain; padded keys -> -inf -> weight 0.
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        s = tl.where(mask_l[None, :], s, float("-inf"))
        m = tl.max(s, axis=1)
        p = tl.math.exp2(s - m[:, None])
        denom = tl.sum(p, axis=1)

        # p is rounded to the input dtype (tensor-core operand), as on GPU.
        acc = tl.dot(p.to(in_dtype).to(v.dtype), v, input_precision=INPUT_PRECISION)
        acc = acc / denom[:, None]

        o_ptrs = Out + b.to(tl.int64) * stride_ob + offs_n[:, None] * stride_on + col[None, :]
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])


def _pick_blocks(head_dim: int, block_n: int | None, num_warps: int | None):
    """Block-size heuristic (first guess; to be tuned on H100).

    BLOCK_D = next_pow2(max(head_dim, 16)).  Per program the live tiles are
    q/acc [BLOCK_N, BLOCK_D], K/V [128, BLOCK_D] and s/p [BLOCK_N, 128];
    with BLOCK_D = 256 (d = 160) a 64-row N block keeps the fp32 accumulator
    at 64 KB per program, spread over 8 warps.  Small heads use 128-row
    blocks with 4 warps.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if block_n is None:
        block_n = 128 if block_d <= 64 else 64
    if num_warps is None:
        num_warps = 4 if block_d <= 64 else 8
    return block_n, block_d, num_warps


def cross_attention_triton(q, k_table, v_table, row_idx, heads, scale=None,
                           block_n=None, num_warps=None, allow_tf32=False):
    """Row-gathered cross-attention with the Triton kernel.

    Shapes:
        q        [B, N, C]  image-token queries (output of to_q); last dim contiguous
        k_table  [R, L, C]  projected keys per conditioning row; L <= 128
        v_table  [R, L, C]  projected values, same shape/dtype as k_table
        row_idx  [B]        int32/int64, values in [0, R); row read by each sample
        heads    int        C % heads == 0, head_dim = C // heads <= 256
        scale    float      softmax scale, default head_dim ** -0.5
        allow_tf32          fp32 only: use TF32 tensor cores instead of exact fp32
    Returns out [B, N, C] in q's dtype (contiguous).

    Works on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 was set
    before triton was imported.  Row indices are not bounds-checked on device.
    """
    if not HAS_TRITON:
        raise RuntimeError("cross_attention_triton needs triton, which is not installed; "
                           "use cross_attention_ref or install triton")
    _check_shapes(q, k_table, v_table, row_idx, heads)
    assert q.dtype in _SUPPORTED_DTYPES, f"unsupported dtype {q.dtype}"
    assert k_table.dtype == q.dtype and v_table.dtype == q.dtype, (
        f"dtype mismatch: q {q.dtype}, k {k_table.dtype}, v {v_table.dtype}"
    )
    assert row_idx.dtype in (torch.int32, torch.int64), f"row_idx dtype {row_idx.dtype}"
    assert q.stride(-1) == 1 and k_table.stride(-1) == 1 and v_table.stride(-1) == 1, (
        "last dim of q, k_table, v_table must be contiguous"
    )
    devices = {q.device, k_table.device, v_table.device, row_idx.device}
    assert len(devices) == 1, f"all tensors must be on one device, got {devices}"
    assert q.is_cuda or _interpret_mode(), (
        "CPU tensors need TRITON_INTERPRET=1 set before neti_fast.kernels is imported"
    )

    B, N, C = q.shape
    L = k_table.shape[1]
    d = C // heads
    assert L <= _MAX_L, f"L={L} > {_MAX_L}: keys must fit one block"
    assert d <= _MAX_HEAD_DIM, f"head_dim={d} > {_MAX_HEAD_DIM}"
    scale = d**-0.5 if scale is None else float(scale)

    out = torch.empty((B, N, C), dtype=q.dtype, device=q.device)
    if B == 0 or N == 0:
        return out
    row_idx = row_idx.contiguous()
    block_n, block_d, num_warps = _pick_blocks(d, block_n, num_warps)
    precision = "tf32" if (allow_tf32 and q.dtype == torch.float32) else "ieee"
    # The CPU interpreter stores bf16 as raw uint16 and its tl.dot multiplies
    # the bit patterns (bf16 arithmetic is unsupported there; triton issue
    # #11584).  Under the interpreter, bf16 operands are upcast to fp32 inside
    # the kernel first -- exact, so the math matches the GPU path.
    dot_in_fp32 = _interpret_mode() and q.dtype == torch.bfloat16
    grid = (triton.cdiv(N, block_n), B * heads)
    _cross_attn_fwd_kernel[grid](
        q, k_table, v_table, row_idx, out,
        q.stride(0), q.stride(1),
        k_table.stride(0), k_table.stride(1),
        v_table.stride(0), v_table.stride(1),
        out.stride(0), out.stride(1),
        N, L, scale * _LOG2E,
        H=heads, HEAD_DIM=d,
        BLOCK_N=block_n, BLOCK_L=_MAX_L, BLOCK_D=block_d,
        INPUT_PRECISION=precision, DOT_IN_FP32=dot_in_fp32,
        num_warps=num_warps,
    )
    return out


# --------------------------------------------------------------------------- #
# Custom op: one opaque node for torch.compile / torch.export
# --------------------------------------------------------------------------- #
@torch.library.custom_op("neti_fast::cross_attention", mutates_args=())
def cross_attention_op(q: torch.Tensor, k_table: torch.Tensor, v_table: torch.Tensor,
                       row_idx: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """``torch.ops.neti_fast.cross_attention``: the Triton launcher as a custom op.

    `scale` is required here (a plain `float`, no optional default in the schema); callers pass
    `head_dim ** -0.5` for the standard scale.
    """
    return cross_attention_triton(q, k_table, v_table, row_idx, heads, scale)


@cross_attention_op.register_fake
def _(q, k_table, v_table, row_idx, heads, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------- #
# Dispatcher guard
# --------------------------------------------------------------------------- #
def _is_exporting() -> bool:
    try:
        if torch.compiler.is_exporting():
            return True
    except AttributeError:  # older torch
        pass
    try:
        return bool(torch.onnx.is_in_onnx_export())
    except AttributeError:
        return False


def triton_supported(q, k_table, heads) -> tuple[bool, str]:
    """Can the Triton kernel run for these inputs?  Returns (ok, reason)."""
    if os.environ.get("NETI_FAST_DISABLE_TRITON", "").strip().lower() in ("1", "true", "yes", "on"):
        return False, "disabled by NETI_FAST_DISABLE_TRITON"
    if not HAS_TRITON:
        return False, "triton is not installed"
    if _is_exporting():
        return False, "exporting (torch.export / ONNX): use the PyTorch path"
    if not q.is_cuda and not _interpret_mode():
        return False, (f"q is on {q.device}; needs CUDA (or TRITON_INTERPRET=1 set before "
                       "neti_fast.kernels is imported, for CPU)")
    if k_table.device != q.device:
        return False, f"k_table on {k_table.device}, q on {q.device}"
    if q.dtype not in _SUPPORTED_DTYPES:
        return False, f"unsupported dtype {q.dtype}"
    if k_table.dtype != q.dtype:
        return False, f"dtype mismatch: q {q.dtype}, k_table {k_table.dtype}"
    if q.dim() != 3 or k_table.dim() != 3 or q.shape[-1] != k_table.shape[-1]:
        return False, f"bad shapes q {tuple(q.shape)}, k_table {tuple(k_table.shape)}"
    if heads <= 0 or q.shape[-1] % heads:
        return False, f"C={q.shape[-1]} not divisible by heads={heads}"
    if q.shape[-1] // heads > _MAX_HEAD_DIM:
        return False, f"head_dim={q.shape[-1] // heads} > {_MAX_HEAD_DIM}"
    if k_table.shape[1] > _MAX_L:
        return False, f"L={k_table.shape[1]} > {_MAX_L}"
    return True, "ok"
