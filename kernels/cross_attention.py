"""Row-gathered cross-attention for Stable Diffusion U-Nets (Triton).

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

Two kernels, chosen by L.  Up to L = 128 (`_MAX_ONEPASS_L`; SD's 77 tokens) all
keys fit in registers at once, so `_cross_attn_fwd_kernel` does a plain, exact,
single-pass softmax, with no running max / sum to rescale:

    s   = (q @ K^T) * scale * log2(e)      [BLOCK_N, L], fp32 accumulate
    p   = exp2(s - rowmax(s))              exp2 with log2(e) folded into scale
    out = (p @ V) / rowsum(p)              normalize once, after the PV matmul

Longer contexts (A1111-style long prompts: 77-token chunks concatenated, L = 77k)
go to `_cross_attn_fwd_keyloop_kernel`, which streams the keys in blocks of
BLOCK_L = 32 (`_KEY_BLOCK`) with the online softmax of the FlashAttention
tutorial.  After key blocks 1..j, with s_j the block's scores as above:

    m_j   = max(m_{j-1}, rowmax(s_j))                 running max (m_0 = -inf)
    a_j   = exp2(m_{j-1} - m_j)                       rescales what was summed under m_{j-1}
    p_j   = exp2(s_j - m_j)
    l_j   = a_j * l_{j-1} + rowsum(p_j)               running denominator (l_0 = 0)
    acc_j = a_j * acc_{j-1} + p_j @ V_j               running numerator
    out   = acc_last / l_last

which equals the exact softmax: every term ends up scaled by exp2(-m_last).  Each
block holds at least one real key (blocks start below L), so m_j is finite from
the first block on and a_1 = exp2(-inf) = 0.  32 keys per block bound the
padding of L = 77k at 31 keys (154 -> 160, 231 -> 256); the rescale costs
BLOCK_N * d multiplies per block against the block's 4 * BLOCK_N * 32 * d matmul
FLOPs (under 1%).

Less padding: tl.dot needs power-of-two tiles of at least 16.  Padding d to
next_pow2(d) and L to 128 would waste 37.5% of both matmuls at SD 1.5's head dims
(40 / 80 / 160 -> 64 / 128 / 256) and 40% of the keys (77 -> 128).  Instead both
axes are split into at most two power-of-two chunks, each a separate tl.dot:

    d   = D0 + D1:   40 -> 32 + 16 (48),  80 -> 64 + 16,  160 -> 128 + 32   (D1 = 0 if d = D0)
    L   = L0 + L1:   77 -> 64 + 16 (80)
    s_j = sum_i q[:, Di] @ K[Lj, Di]^T      (chunks of d are a split reduction: accumulate)
    out[:, Di] = sum_j p_j @ V[Lj, Di]      (chunks of L are a split reduction: accumulate)

so QK^T and PV do 48/40 (d = 40) or exactly d (64, 80, 160) of the head dim's
work and 80/77 of the keys' (the padding lanes are masked loads of zeros; padded
keys get -inf scores).  The key-loop kernel splits d the same way.

Precision: accumulation is always fp32.  For fp16/bf16 inputs, ``p`` is cast
back to the input dtype before ``p @ V`` (as FlashAttention does) so that the
second matmul runs on tensor cores.  fp32 inputs are computed in IEEE fp32 on
FMA units (``input_precision="ieee"``; ``allow_tf32=True`` opts into TF32):
that path exists for the CPU interpreter and explicit calls.  On CUDA the
dispatcher sends fp32 to SDPA instead: `python -m neti_fast.kernels.check
--dtypes fp32` shows why (no tensor cores, register spills).

Block sizes and warps per (GPU family, head dim, dtype, kernel) come from
`cross_attention_configs.CONFIGS`, chosen by `kernels.check --search` from
ptxas's register / spill / shared-memory report (no GPU timing yet); unknown
cases use `_default_blocks`.

Grid: (cdiv(N, BLOCK_N), B * heads).  One program = one block of image
tokens of one (sample, head).  K/V for a (row, head) are re-read by every
N block but are small (L x d) and stay in L2.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

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
_MAX_ONEPASS_L = 128  # up to here all keys are in registers at once (at most two chunks)
_KEY_BLOCK = 32  # keys per block of the key-loop kernel (L > _MAX_ONEPASS_L)
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
def split_pow2(n: int, minimum: int = 16) -> tuple[int, int]:
    """`n` as at most two power-of-two chunks (each >= `minimum`, tl.dot's smallest tile) that
    cover it: (c0, c1), c1 = 0 when one chunk suffices.  40 -> (32, 16), 80 -> (64, 16),
    160 -> (128, 32), 77 -> (64, 16), 8 -> (16, 0), 100 -> (64, 64)."""
    assert n >= 1
    c0 = max(minimum, 1 << (n.bit_length() - 1))  # largest power of two <= n (at least `minimum`)
    rest = n - c0
    if rest <= 0:
        return c0, 0
    c1 = max(minimum, 1 << (rest - 1).bit_length())  # next power of two >= rest
    if c1 >= c0:  # two equal chunks are one chunk of twice the size: fewer, larger dots
        return 2 * c0, 0
    return c0, c1


if HAS_TRITON:

    @triton.jit
    def _load_tile(base, offs_r, stride_r, offs_c, mask_r, col_limit):
        """[len(offs_r), len(offs_c)] tile base[r * stride_r + c], zeros outside (r, c < col_limit)."""
        return tl.load(base + offs_r[:, None] * stride_r + offs_c[None, :],
                       mask=mask_r[:, None] & (offs_c < col_limit)[None, :], other=0.0)

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
        L0: tl.constexpr, L1: tl.constexpr,   # key chunks (L1 = 0: one chunk)
        D0: tl.constexpr, D1: tl.constexpr,   # head-dim chunks (D1 = 0: one chunk)
        INPUT_PRECISION: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,  # interpreter + bf16 workaround, see launcher
    ):
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H

        # The gather: this sample's conditioning row, as an int64 offset.
        r = tl.load(ROW + b).to(tl.int64)
        head = h * HEAD_DIM  # first channel of head h; the last dim is contiguous
        q_base = Q + b.to(tl.int64) * stride_qb + head
        k_base = K + r * stride_kr + head
        v_base = V + r * stride_vr + head
        o_base = Out + b.to(tl.int64) * stride_ob + head

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_l0 = tl.arange(0, L0)
        offs_d0 = tl.arange(0, D0)

        # ---- scores s_j = sum_i q[:, Di] @ K[Lj, Di]^T (fp32), j over key chunks
        q0 = _load_tile(q_base, offs_n, stride_qn, offs_d0, mask_n, HEAD_DIM)
        k00 = _load_tile(k_base, offs_l0, stride_kl, offs_d0, offs_l0 < L, HEAD_DIM)
        if DOT_IN_FP32:  # bf16 -> fp32 is exact, so the products are unchanged
            q0 = q0.to(tl.float32)
            k00 = k00.to(tl.float32)
        s0 = tl.dot(q0, tl.trans(k00), input_precision=INPUT_PRECISION)
        if D1 > 0:
            offs_d1 = D0 + tl.arange(0, D1)
            q1 = _load_tile(q_base, offs_n, stride_qn, offs_d1, mask_n, HEAD_DIM)
            k01 = _load_tile(k_base, offs_l0, stride_kl, offs_d1, offs_l0 < L, HEAD_DIM)
            if DOT_IN_FP32:
                q1 = q1.to(tl.float32)
                k01 = k01.to(tl.float32)
            s0 = tl.dot(q1, tl.trans(k01), s0, input_precision=INPUT_PRECISION)
        s0 = tl.where((offs_l0 < L)[None, :], s0 * qk_scale, float("-inf"))
        m = tl.max(s0, axis=1)
        if L1 > 0:
            offs_l1 = L0 + tl.arange(0, L1)
            k10 = _load_tile(k_base, offs_l1, stride_kl, offs_d0, offs_l1 < L, HEAD_DIM)
            if DOT_IN_FP32:
                k10 = k10.to(tl.float32)
            s1 = tl.dot(q0, tl.trans(k10), input_precision=INPUT_PRECISION)
            if D1 > 0:
                k11 = _load_tile(k_base, offs_l1, stride_kl, offs_d1, offs_l1 < L, HEAD_DIM)
                if DOT_IN_FP32:
                    k11 = k11.to(tl.float32)
                s1 = tl.dot(q1, tl.trans(k11), s1, input_precision=INPUT_PRECISION)
            s1 = tl.where((offs_l1 < L)[None, :], s1 * qk_scale, float("-inf"))
            m = tl.maximum(m, tl.max(s1, axis=1))

        # ---- exact softmax over all keys (padded keys: exp2(-inf) = 0)
        p0 = tl.math.exp2(s0 - m[:, None])
        denom = tl.sum(p0, axis=1)
        in_dtype = Q.dtype.element_ty
        op_dtype = tl.float32 if DOT_IN_FP32 else in_dtype
        # p is rounded to the input dtype (the tensor-core operand), as on GPU.
        p0 = p0.to(in_dtype).to(op_dtype)
        if L1 > 0:
            p1 = tl.math.exp2(s1 - m[:, None])
            denom += tl.sum(p1, axis=1)
            p1 = p1.to(in_dtype).to(op_dtype)
        inv = 1.0 / denom

        # ---- out[:, Di] = (sum_j p_j @ V[Lj, Di]) / denom, one head-dim chunk at a time
        v00 = _load_tile(v_base, offs_l0, stride_vl, offs_d0, offs_l0 < L, HEAD_DIM).to(op_dtype)
        acc0 = tl.dot(p0, v00, input_precision=INPUT_PRECISION)
        if L1 > 0:
            v10 = _load_tile(v_base, offs_l1, stride_vl, offs_d0, offs_l1 < L, HEAD_DIM).to(op_dtype)
            acc0 = tl.dot(p1, v10, acc0, input_precision=INPUT_PRECISION)
        tl.store(o_base + offs_n[:, None] * stride_on + offs_d0[None, :],
                 (acc0 * inv[:, None]).to(Out.dtype.element_ty),
                 mask=mask_n[:, None] & (offs_d0 < HEAD_DIM)[None, :])
        if D1 > 0:
            v01 = _load_tile(v_base, offs_l0, stride_vl, offs_d1, offs_l0 < L, HEAD_DIM).to(op_dtype)
            acc1 = tl.dot(p0, v01, input_precision=INPUT_PRECISION)
            if L1 > 0:
                v11 = _load_tile(v_base, offs_l1, stride_vl, offs_d1, offs_l1 < L, HEAD_DIM).to(op_dtype)
                acc1 = tl.dot(p1, v11, acc1, input_precision=INPUT_PRECISION)
            tl.store(o_base + offs_n[:, None] * stride_on + offs_d1[None, :],
                     (acc1 * inv[:, None]).to(Out.dtype.element_ty),
                     mask=mask_n[:, None] & (offs_d1 < HEAD_DIM)[None, :])

    @triton.jit
    def _cross_attn_fwd_keyloop_kernel(
        Q, K, V, ROW, Out,
        stride_qb, stride_qn,
        stride_kr, stride_kl,
        stride_vr, stride_vl,
        stride_ob, stride_on,
        N, L, qk_scale,  # qk_scale = scale * log2(e)
        H,  # heads: a run-time value here (one binary for 5 / 10 / 20 heads), a constexpr in the one-pass kernel
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_L: tl.constexpr,                # keys per block of the loop
        D0: tl.constexpr, D1: tl.constexpr,   # head-dim chunks (D1 = 0: one chunk)
        INPUT_PRECISION: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,
    ):
        """L > 128: the keys streamed in blocks with an online softmax (module docstring)."""
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        r = tl.load(ROW + b).to(tl.int64)
        head = h * HEAD_DIM
        q_base = Q + b.to(tl.int64) * stride_qb + head
        k_base = K + r * stride_kr + head
        v_base = V + r * stride_vr + head
        o_base = Out + b.to(tl.int64) * stride_ob + head

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_d0 = tl.arange(0, D0)
        in_dtype = Q.dtype.element_ty
        op_dtype = tl.float32 if DOT_IN_FP32 else in_dtype

        q0 = _load_tile(q_base, offs_n, stride_qn, offs_d0, mask_n, HEAD_DIM).to(op_dtype)
        acc0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
        if D1 > 0:
            offs_d1 = D0 + tl.arange(0, D1)
            q1 = _load_tile(q_base, offs_n, stride_qn, offs_d1, mask_n, HEAD_DIM).to(op_dtype)
            acc1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
        m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        denom = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, L, BLOCK_L):
            offs_l = start + tl.arange(0, BLOCK_L)
            mask_l = offs_l < L
            k0 = _load_tile(k_base, offs_l, stride_kl, offs_d0, mask_l, HEAD_DIM).to(op_dtype)
            s = tl.dot(q0, tl.trans(k0), input_precision=INPUT_PRECISION)
            if D1 > 0:
                k1 = _load_tile(k_base, offs_l, stride_kl, offs_d1, mask_l, HEAD_DIM).to(op_dtype)
                s = tl.dot(q1, tl.trans(k1), s, input_precision=INPUT_PRECISION)
            s = tl.where(mask_l[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.math.exp2(m - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            denom = denom * alpha + tl.sum(p, axis=1)
            p = p.to(in_dtype).to(op_dtype)  # the tensor-core operand, as in the one-pass kernel
            v0 = _load_tile(v_base, offs_l, stride_vl, offs_d0, mask_l, HEAD_DIM).to(op_dtype)
            acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=INPUT_PRECISION)
            if D1 > 0:
                v1 = _load_tile(v_base, offs_l, stride_vl, offs_d1, mask_l, HEAD_DIM).to(op_dtype)
                acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=INPUT_PRECISION)
            m = m_new
        inv = 1.0 / denom
        tl.store(o_base + offs_n[:, None] * stride_on + offs_d0[None, :],
                 (acc0 * inv[:, None]).to(Out.dtype.element_ty),
                 mask=mask_n[:, None] & (offs_d0 < HEAD_DIM)[None, :])
        if D1 > 0:
            tl.store(o_base + offs_n[:, None] * stride_on + offs_d1[None, :],
                     (acc1 * inv[:, None]).to(Out.dtype.element_ty),
                     mask=mask_n[:, None] & (offs_d1 < HEAD_DIM)[None, :])


@dataclass(frozen=True)
class KernelConfig:
    """Everything that selects one compiled variant of the kernels (besides dtype and target).

    key_loop: the key-loop kernel (L > 128), l0 = BLOCK_L and l1 = 0; else the one-pass kernel with
    key chunks l0 + l1."""
    block_n: int
    num_warps: int
    l0: int
    l1: int
    d0: int
    d1: int
    key_loop: bool = False

    @property
    def variant(self) -> str:
        """The kernel's name in CONFIGS' keys."""
        return "keyloop" if self.key_loop else "onepass"

    @property
    def kernel(self):
        return _cross_attn_fwd_keyloop_kernel if self.key_loop else _cross_attn_fwd_kernel


def padded_keys(L: int, cfg: "KernelConfig") -> int:
    """Keys the matmuls compute for L real ones (padding lanes included)."""
    return -(-L // cfg.l0) * cfg.l0 if cfg.key_loop else cfg.l0 + cfg.l1


def work_ratio(head_dim: int, L: int, cfg: "KernelConfig") -> float:
    """(d0 + d1) * padded keys / (head_dim * L): padded over useful matmul work, both matmuls."""
    return (cfg.d0 + cfg.d1) * padded_keys(L, cfg) / (head_dim * L)


def gpu_family(capability: tuple[int, int]) -> int | None:
    """The row of CONFIGS a compute capability uses: 80 (Ampere / Ada, mma.sync), 90 (Hopper,
    wgmma), 100 (datacenter Blackwell); None for GPUs the compile check does not cover."""
    major, _ = capability
    return {8: 80, 9: 90, 10: 100}.get(major)


@functools.lru_cache(maxsize=None)
def _device_family(index: int) -> int | None:
    return gpu_family(torch.cuda.get_device_capability(index))


def _default_blocks(head_dim: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) where CONFIGS has no entry: moderate tiles that fit every target."""
    return (64, 4) if head_dim <= 128 else (32, 4)


@functools.lru_cache(maxsize=None)  # called per layer per step by the launcher: decide once per shape
def pick_config(head_dim: int, L: int, dtype: torch.dtype, family: int | None, N: int | None = None,
                block_n: int | None = None, num_warps: int | None = None) -> KernelConfig:
    """The variant to launch: the kernel and key chunking from L, head-dim chunking from head_dim;
    tiles from CONFIGS[(family, d, dtype, kernel)], BLOCK_N capped at N's power of two (at least
    32) so that small levels do not run mostly-masked programs (4 warps then)."""
    from .cross_attention_configs import CONFIGS
    d0, d1 = split_pow2(head_dim)
    key_loop = L > _MAX_ONEPASS_L
    l0, l1 = (_KEY_BLOCK, 0) if key_loop else split_pow2(L)
    variant = "keyloop" if key_loop else "onepass"
    bn, nw = CONFIGS.get((family, head_dim, DTYPE_NAMES.get(dtype), variant), _default_blocks(head_dim))
    if N is not None and bn > max(32, 1 << (max(N, 1) - 1).bit_length()):
        bn, nw = max(32, 1 << (max(N, 1) - 1).bit_length()), 4
    return KernelConfig(block_n or bn, num_warps or nw, l0, l1, d0, d1, key_loop)


DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def kernel_constexprs(heads: int, head_dim: int, cfg: KernelConfig, precision: str = "ieee",
                      dot_in_fp32: bool = False) -> dict:
    """`cfg.kernel`'s keyword arguments (shared by the launcher and `kernels.check`): its constexprs,
    and H, which the key-loop kernel takes at run time."""
    keys = dict(BLOCK_L=cfg.l0) if cfg.key_loop else dict(L0=cfg.l0, L1=cfg.l1)
    return dict(H=heads, HEAD_DIM=head_dim, BLOCK_N=cfg.block_n, **keys, D0=cfg.d0,
                D1=cfg.d1, INPUT_PRECISION=precision, DOT_IN_FP32=dot_in_fp32)


def cross_attention_triton(q, k_table, v_table, row_idx, heads, scale=None,
                           block_n=None, num_warps=None, allow_tf32=False):
    """Row-gathered cross-attention with the Triton kernel.

    Shapes:
        q        [B, N, C]  image-token queries (output of to_q); last dim contiguous
        k_table  [R, L, C]  projected keys per conditioning row; L >= 1 (one pass up to 128,
                            a key loop beyond)
        v_table  [R, L, C]  projected values, same shape/dtype as k_table
        row_idx  [B]        int32/int64, values in [0, R); row read by each sample
        heads    int        C % heads == 0, head_dim = C // heads <= 256
        scale    float      softmax scale, default head_dim ** -0.5
        allow_tf32          fp32 only: use TF32 tensor cores instead of exact fp32
    Returns out [B, N, C] in q's dtype (contiguous).

    Works on CUDA tensors (launched on q's device, whatever the current device is), and on
    CPU tensors when TRITON_INTERPRET=1 was set before triton was imported.  Row indices are
    not bounds-checked on device.
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
    assert L >= 1, "L=0: no keys to attend to"
    assert d <= _MAX_HEAD_DIM, f"head_dim={d} > {_MAX_HEAD_DIM}"
    scale = d**-0.5 if scale is None else float(scale)

    out = torch.empty((B, N, C), dtype=q.dtype, device=q.device)
    if B == 0 or N == 0:
        return out
    row_idx = row_idx.contiguous()
    family = _device_family(q.device.index if q.device.index is not None else torch.cuda.current_device()) \
        if q.is_cuda else 90
    cfg = pick_config(d, L, q.dtype, family, N, block_n, num_warps)
    precision = "tf32" if (allow_tf32 and q.dtype == torch.float32) else "ieee"
    # The CPU interpreter stores bf16 as raw uint16 and its tl.dot multiplies
    # the bit patterns (bf16 arithmetic is unsupported there; triton issue
    # #11584).  Under the interpreter, bf16 operands are upcast to fp32 inside
    # the kernel first -- exact, so the math matches the GPU path.
    dot_in_fp32 = _interpret_mode() and q.dtype == torch.bfloat16
    grid = (triton.cdiv(N, cfg.block_n), B * heads)
    # Triton launches on the *current* CUDA device: make it q's (`--device cuda:1`).
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        cfg.kernel[grid](
            q, k_table, v_table, row_idx, out,
            q.stride(0), q.stride(1),
            k_table.stride(0), k_table.stride(1),
            v_table.stride(0), v_table.stride(1),
            out.stride(0), out.stride(1),
            N, L, scale * _LOG2E,
            **kernel_constexprs(heads, d, cfg, precision, dot_in_fp32),
            num_warps=cfg.num_warps,
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
    from neti_fast.utils import env_flag
    if env_flag("NETI_FAST_DISABLE_TRITON"):
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
    if k_table.shape[1] < 1:
        return False, "L=0: no keys"
    if q.is_cuda:
        if q.dtype == torch.float32:
            # Compiled for sm_80 / sm_90, fp32 runs on FMA units with register spills (and at
            # head dim 160 once needed more shared memory than any GPU has): SDPA is faster.
            # `python -m neti_fast.kernels.check --dtypes fp32` shows the numbers.
            return False, "fp32 on CUDA: the kernel is built for fp16 / bf16 tensor cores (kernels.check --dtypes fp32)"
        cap = torch.cuda.get_device_capability(q.device)
        if gpu_family(cap) is None:
            return False, f"compute capability {cap[0]}.{cap[1]} is not among the targets kernels.check compiles for"
    return True, "ok"


def accuracy_ok(out: torch.Tensor, out_same_dtype: torch.Tensor, out_fp32: torch.Tensor) -> tuple[bool, str]:
    """flash-attention's rule: `out` may be at most twice as far from a higher-precision reference
    as PyTorch computing in the same dtype, plus a small atol (fp32: 1e-5; fp16 / bf16: one ulp
    at the output's magnitude, the final rounding both sides pay independently); no NaN / Inf.
    Shared by the tests and the dispatcher's first-use check. Returns (ok, "err a vs b + atol")."""
    if not torch.isfinite(out).all():
        return False, "non-finite output"
    hi = out_fp32.double()
    err = (out.double() - hi).abs().max().item()
    err_pt = (out_same_dtype.double() - hi).abs().max().item()
    if out.dtype in (torch.float32, torch.float64):
        atol = 1e-5
    else:
        atol = torch.finfo(out.dtype).eps * hi.abs().max().item()
    detail = f"max error {err:.2e} vs PyTorch's {err_pt:.2e} (+ atol {atol:.1e})"
    return err <= 2 * err_pt + atol, detail
