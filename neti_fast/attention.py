"""Cross-attention processors bound to their layer, and the attention dispatcher.

Each of the U-Net's 16 cross-attention modules gets a `NetiCrossAttnProcessor` that knows its
layer index from the start (no counter mutating during the forward pass, so tracing, compile and
export see a static graph). All 16 read one shared `CrossAttnState`, which the caller fills before
a U-Net call, in one of three modes:

- `plain`:  K = V-source = the `encoder_hidden_states` passed to the U-Net (plain SD; the
            reference path's unconditional call; training with no concept).
- `layers`: per-layer text encodings: K = to_k(enc[l]), V = to_v(enc_bypass[l]) (NeTI's bypass
            feeds the values only). Used by training and by the reference path.
- `tables`: precomputed per-layer K / V tables [R, 77, C]; sample b reads row `row_idx[b]`. Used
            by the fast engine: no projection of text in the denoising loop, and the unconditional
            rows are shared by every sample instead of copied.

The dispatcher `attend_rows` picks the fused Triton kernel when its guards pass (CUDA tensors,
supported dtype / head dim, not exporting, `NETI_FAST_DISABLE_TRITON` unset); on CPU the native
C++ kernel (`neti_fast.native`, where `_C` is built, `NETI_FAST_DISABLE_NATIVE` unset, and measured
faster for the shape class); else SDPA on gathered rows; `native`, `xformers` and `eager` (the
official bmm + softmax) can be forced.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "triton", "native", "sdpa", "xformers", "eager")


@dataclass
class CrossAttnState:
    mode: str = "plain"                                  # plain | layers | tables
    enc: list | None = None                              # layers: 16 x [B, 77, D] (keys' source)
    enc_bypass: list | None = None                       # layers: 16 x [B, 77, D] (values' source)
    k_tables: list = field(default_factory=list)         # tables: 16 x [R, 77, C_l]
    v_tables: list = field(default_factory=list)
    row_idx: torch.Tensor | None = None                  # tables: [B] rows, one per sample
    backend: str = "auto"                                # see BACKENDS


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, backend: str = "sdpa", attn=None) -> torch.Tensor:
    """Multi-head attention on [B, N, C] / [B, L, C] tensors -> [B, N, C]."""
    if backend == "eager" and attn is not None:
        # The official NeTI processor: diffusers' get_attention_scores (baddbmm + softmax) then bmm.
        qh, kh, vh = attn.head_to_batch_dim(q), attn.head_to_batch_dim(k), attn.head_to_batch_dim(v)
        return attn.batch_to_head_dim(torch.bmm(attn.get_attention_scores(qh, kh, None), vh))
    if backend == "xformers":
        import xformers.ops as xops
        b, n, c = q.shape
        d = c // heads
        out = xops.memory_efficient_attention(q.view(b, n, heads, d), k.view(b, -1, heads, d), v.view(b, -1, heads, d))
        return out.reshape(b, n, c)
    out = F.scaled_dot_product_attention(_split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads))
    return _merge_heads(out)


def attend_rows(q: torch.Tensor, k_table: torch.Tensor, v_table: torch.Tensor, row_idx: torch.Tensor,
                heads: int, backend: str = "auto", attn=None) -> torch.Tensor:
    """Attention where sample b uses K / V rows `row_idx[b]` of the [R, L, C] tables."""
    # --- native backend (issue 13): the C++ kernel of neti_fast._C; `auto` on CPU takes it where
    # neti_fast.native.native_preferred says the micro-benchmark measured it faster than SDPA.
    if backend == "native" or (backend == "auto" and not q.is_cuda and not _is_exporting()):
        from . import native
        if backend == "native":
            ok, why = native.native_supported(q, k_table, heads)
            if not ok:
                raise RuntimeError(f"--attention native: cannot run here ({why})")
            return native.cross_attention_native(q, k_table, v_table, row_idx, heads)
        if native.native_preferred(q, k_table, heads):
            return native.cross_attention_native(q, k_table, v_table, row_idx, heads)
    # --- end native backend
    if backend == "triton" or (backend == "auto" and q.is_cuda):
        # `auto` never picks the CPU interpreter (TRITON_INTERPRET=1): that is a test device, not a fast path.
        from .kernels.cross_attention import cross_attention_op, cross_attention_triton, triton_supported
        ok, why = triton_supported(q, k_table, heads)
        if ok:
            scale = (q.shape[-1] // heads) ** -0.5
            if not q.is_cuda:  # CPU interpreter (tests): no compile / export there, skip the op layer
                return cross_attention_triton(q, k_table, v_table, row_idx, heads, scale)
            return cross_attention_op(q, k_table, v_table, row_idx, heads, scale)
        if backend == "triton":
            raise RuntimeError(f"--attention triton: cannot run here ({why})")
        backend = "sdpa"
    # Fallback: gather the rows (a per-sample copy the fused kernel avoids), then plain attention.
    return attend(q, k_table.index_select(0, row_idx), v_table.index_select(0, row_idx), heads, backend, attn)


def _is_exporting() -> bool:
    """torch.export / ONNX export: `auto` keeps the portable SDPA graph (`native` can be forced)."""
    try:
        if torch.compiler.is_exporting():
            return True
    except AttributeError:
        pass
    try:
        return bool(torch.onnx.is_in_onnx_export())
    except AttributeError:
        return False


class NetiCrossAttnProcessor:
    """diffusers attention processor for one cross-attention layer of SD 1.x (`attn2`)."""

    def __init__(self, layer: int, state: CrossAttnState):
        self.layer = layer
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        st, l = self.state, self.layer
        q = attn.to_q(hidden_states)
        if st.mode == "tables":
            out = attend_rows(q, st.k_tables[l], st.v_tables[l], st.row_idx, attn.heads, st.backend, attn)
        else:
            if st.mode == "layers":
                ek, ev = st.enc[l], st.enc_bypass[l]
            else:
                ek = ev = encoder_hidden_states
            backend = "sdpa" if st.backend in ("auto", "triton", "native") else st.backend
            out = attend(q, attn.to_k(ek), attn.to_v(ev), attn.heads, backend, attn)
        return attn.to_out[1](attn.to_out[0](out))


def install_processors(model) -> CrossAttnState:
    """Bind a processor to each of the 16 cross-attention layers (once per model); returns their state."""
    state = getattr(model, "attn_state", None)
    if state is None:
        state = CrossAttnState()
        for i, attn in enumerate(model.cross_attention):
            attn.set_processor(NetiCrossAttnProcessor(i, state))
        model.attn_state = state
    return state
