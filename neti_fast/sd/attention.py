"""Cross-attention processors bound to their layer, and the attention dispatcher.

Each of the U-Net's cross-attention modules gets a `NetiCrossAttnProcessor` that knows its index
and its layer from the start (no counter mutating during the forward pass, so tracing, compile and
export see a static graph). A layer is the family's NeTI layer l (16 in SD 1.x / 2.x, each one
module; 11 in SDXL, holding 70 modules); a module has its own K / V projection, so the K / V
tables are per module and the text encodings per layer. All read one shared `CrossAttnState`,
which the caller fills before a U-Net call, in one of three modes:

- `plain`:  K = V-source = the `encoder_hidden_states` passed to the U-Net (plain SD; the
            reference path's unconditional call; training with no concept).
- `layers`: per-layer text encodings: K = to_k(enc[l]), V = to_v(enc_bypass[l]) (NeTI's bypass
            feeds the values only). Used by training and by the reference path.
- `tables`: precomputed per-layer K / V tables [R, 77, C]; sample b reads row `row_idx[b]`. Used
            by the fast engine: no projection of text in the denoising loop, and the unconditional
            rows are shared by every sample instead of copied.

The dispatcher (`AttentionDispatcher`, used by `attend_rows`) decides once per shape class and
logs it: the fused Triton kernel on CUDA when its guards pass (supported dtype / head dim / GPU,
not exporting, `NETI_FAST_DISABLE_TRITON` unset) and its first-use check against SDPA passes; on
CPU the native C++ kernel (`neti_fast.sd.native`, where `_C` is built, `NETI_FAST_DISABLE_NATIVE`
unset, and measured faster for the shape class); else SDPA on gathered rows; `native`, `xformers`
and `math` (the official bmm + softmax) can be forced. `canonical_attention` checks the name
(`eager`, the older spelling of `math`, still works, with one notice: it also names a --backend).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import NetiError
from ..utils import ATTENTIONS, ATTENTIONS_RENAMED, first_line


@dataclass
class CrossAttnState:
    mode: str = "plain"                                  # plain | layers | tables
    enc: list | None = None                              # layers: per layer [B, 77, D] (keys' source)
    enc_bypass: list | None = None                       # layers: per layer [B, 77, D] (values' source)
    k_tables: list = field(default_factory=list)         # tables: per module [R, 77, C_m]
    v_tables: list = field(default_factory=list)
    row_idx: torch.Tensor | None = None                  # tables: [B] rows, one per sample
    backend: str = "auto"                                # one of utils.ATTENTIONS


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, backend: str = "sdpa", attn=None) -> torch.Tensor:
    """Multi-head attention on [B, N, C] / [B, L, C] tensors -> [B, N, C]."""
    if backend == "math" and attn is not None:
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


@dataclass(frozen=True)
class AttnChoice:
    impl: str          # triton | native | sdpa | xformers | math
    reason: str        # why (the fallback's cause, or how the kernel was validated)


class AttentionDispatcher:
    """Decides once per (device, dtype, N, C, heads, L, requested backend) which attention runs.

    The decision is cached (a dict lookup per layer per step after the first) and logged once at
    INFO on the `neti_fast.sd.attention` logger. `auto` picks the Triton kernel on CUDA when its
    guards pass; the kernel's first use at a shape is then checked against SDPA on the very same
    inputs (flash-attention's rule vs an fp32 reference, `kernels.cross_attention.accuracy_ok`):
    an exception or a mismatch turns the kernel off for the process with one warning, and SDPA
    runs from then on. A forced `triton` that fails the check raises instead. The check needs real
    data, so it is skipped (and the log says so) when the first use is inside torch.compile's
    tracing or a CUDA-graph capture; the engine's backends make one eager call first for that.
    Kill switch: NETI_FAST_DISABLE_TRITON=1.
    """

    def __init__(self):
        self.choices: dict = {}
        self.triton_broken: str | None = None   # set by a failed first-use check: process-wide

    def reset(self) -> None:
        self.choices.clear()
        self.triton_broken = None

    @staticmethod
    def key(q, k_table, heads, backend) -> tuple:
        return (str(q.device), q.dtype, q.shape[1], q.shape[2], heads, k_table.shape[1], k_table.dtype, backend)

    def decide(self, q, k_table, v_table, row_idx, heads, backend, attn=None):
        """-> (AttnChoice, output or None): the output when the first-use check already computed it."""
        key = self.key(q, k_table, heads, backend)
        choice = self.choices.get(key)
        if choice is not None:
            return choice, None
        out = None
        if backend in ("sdpa", "xformers", "math"):
            choice = AttnChoice(backend, "requested")
        elif backend == "native":
            from .native import native_supported
            ok, why = native_supported(q, k_table, heads)
            if not ok:
                raise RuntimeError(f"--attention native: cannot run here ({why})")
            choice = AttnChoice("native", "requested")
        elif backend == "auto" and not q.is_cuda:
            # `auto` never picks the CPU interpreter (TRITON_INTERPRET=1): a test device, not a fast path.
            # The native C++ kernel where it is built and measured faster here (neti_fast.sd.native).
            from .native import native_preferred
            if native_preferred(q, k_table, heads):
                choice = AttnChoice("native", "native C++ kernel, measured faster than SDPA for this shape class")
            else:
                choice = AttnChoice("sdpa", f"triton needs CUDA (q on {q.device}); native not preferred here")
        else:
            from ..kernels.cross_attention import triton_supported
            ok, why = triton_supported(q, k_table, heads)
            if ok and self.triton_broken:
                ok, why = False, f"disabled for this process after a failed check: {self.triton_broken}"
            if not ok:
                if backend == "triton":
                    raise RuntimeError(f"--attention triton: cannot run here ({why})")
                choice = AttnChoice("sdpa", f"triton: {why}")
            elif not q.is_cuda:
                choice = AttnChoice("triton", "forced; CPU interpreter")
            else:
                choice, out = self._first_use_check(q, k_table, v_table, row_idx, heads, backend)
        if _tracing():
            # Inside torch.compile's tracing (or a graph capture) nothing is cached or logged: the
            # first eager call at this shape makes, checks and logs the decision for good.
            return choice, out
        self.choices[key] = choice
        dev, dt, N, C, h, L = key[:6]
        log.info("attention %s %s [N=%d, C=%d, heads=%d, L=%d]: %s (%s)", dev, str(dt).replace("torch.", ""),
                 N, C, h, L, choice.impl, choice.reason)
        return choice, out

    def _first_use_check(self, q, k_table, v_table, row_idx, heads, backend):
        from ..kernels.cross_attention import accuracy_ok, cross_attention_op, cross_attention_ref
        if _tracing():
            return AttnChoice("triton", "not checked: first use inside torch.compile tracing / graph capture"), None
        scale = (q.shape[-1] // heads) ** -0.5
        try:
            out = cross_attention_op(q, k_table, v_table, row_idx, heads, scale)
            sdpa = _gathered(q, k_table, v_table, row_idx, heads, "sdpa", None)
            ref = cross_attention_ref(q.float(), k_table.float(), v_table.float(), row_idx, heads, scale)
            ok, detail = accuracy_ok(out, sdpa, ref)
        except Exception as e:  # noqa: BLE001 - any failure of a never-run kernel: fall back, say why
            ok, detail, sdpa = False, f"{type(e).__name__}: {first_line(e)}", None
        if ok:
            return AttnChoice("triton", f"checked against SDPA at this shape: {detail}"), out
        if backend == "triton":
            raise RuntimeError(f"--attention triton: the kernel failed its check against SDPA ({detail})")
        self.triton_broken = detail
        warnings.warn(f"neti-fast: the Triton attention kernel failed its first-use check on {q.device} "
                      f"({detail}); using SDPA for the rest of this process", RuntimeWarning, stacklevel=4)
        if sdpa is None:
            sdpa = _gathered(q, k_table, v_table, row_idx, heads, "sdpa", None)
        return AttnChoice("sdpa", f"triton failed its check: {detail}"), sdpa


def _tracing() -> bool:
    try:
        if torch.compiler.is_compiling():
            return True
    except AttributeError:
        pass
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _exporting() -> bool:
    from ..kernels.cross_attention import _is_exporting
    return _is_exporting()


DISPATCH = AttentionDispatcher()
log = logging.getLogger("neti_fast.sd.attention")
_renamed_said: set = set()


def canonical_attention(name: str) -> str:
    """An --attention name, checked; an older spelling is mapped to today's, with one notice."""
    if name in ATTENTIONS_RENAMED:
        if name not in _renamed_said:
            _renamed_said.add(name)
            logging.getLogger("neti_fast").warning(f"neti-fast: --attention {name} is now --attention {ATTENTIONS_RENAMED[name]}")
        return ATTENTIONS_RENAMED[name]
    if name not in ATTENTIONS:
        raise NetiError(f"must be one of {', '.join(ATTENTIONS)}", field="attention", value=name)
    return name


def _gathered(q, k_table, v_table, row_idx, heads, backend, attn):
    # Gather the rows (a per-sample copy the fused kernel avoids), then plain attention.
    return attend(q, k_table.index_select(0, row_idx), v_table.index_select(0, row_idx), heads, backend, attn)


def attend_rows(q: torch.Tensor, k_table: torch.Tensor, v_table: torch.Tensor, row_idx: torch.Tensor,
                heads: int, backend: str = "auto", attn=None) -> torch.Tensor:
    """Attention where sample b uses K / V rows `row_idx[b]` of the [R, L, C] tables."""
    if backend not in ("triton", "native") and _exporting():
        # torch.export / ONNX: `auto` keeps the portable graph (SDPA), and nothing is looked up by
        # shape: the dispatcher's dict keyed on L would specialise the exported graph's dynamic text
        # length (export/onnx.py's "tokens" axis) to the example's 77.
        return _gathered(q, k_table, v_table, row_idx, heads, "sdpa" if backend == "auto" else backend, attn)
    choice, out = DISPATCH.decide(q, k_table, v_table, row_idx, heads, backend, attn)
    if out is not None:
        return out
    impl = choice.impl
    if impl == "triton":
        from ..kernels.cross_attention import cross_attention_op, cross_attention_triton
        scale = (q.shape[-1] // heads) ** -0.5
        if not q.is_cuda:  # CPU interpreter (tests): no compile / export there, skip the op layer
            return cross_attention_triton(q, k_table, v_table, row_idx, heads, scale)
        return cross_attention_op(q, k_table, v_table, row_idx, heads, scale)
    if impl == "native":
        from .native import cross_attention_native
        return cross_attention_native(q, k_table, v_table, row_idx, heads)
    return _gathered(q, k_table, v_table, row_idx, heads, impl, attn)



class NetiCrossAttnProcessor:
    """diffusers attention processor for one cross-attention module (`attn2`): module `index` of
    the U-Net's, in its family's layer `layer`."""

    def __init__(self, index: int, layer: int, state: CrossAttnState):
        self.index = index
        self.layer = layer
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        st, l, i = self.state, self.layer, self.index
        q = attn.to_q(hidden_states)
        if st.mode == "tables":
            out = attend_rows(q, st.k_tables[i], st.v_tables[i], st.row_idx, attn.heads, st.backend, attn)
        else:
            if st.mode == "layers":
                ek, ev = st.enc[l], st.enc_bypass[l]
            else:
                ek = ev = encoder_hidden_states
            backend = "sdpa" if st.backend in ("auto", "triton", "native") else st.backend
            out = attend(q, attn.to_k(ek), attn.to_v(ev), attn.heads, backend, attn)
        return attn.to_out[1](attn.to_out[0](out))


def install_processors(model) -> CrossAttnState:
    """Bind a processor to each cross-attention module (once per model); returns their state."""
    state = getattr(model, "attn_state", None)
    if state is None:
        state = CrossAttnState()
        for i, (attn, l) in enumerate(zip(model.cross_attention, model.attn_layer)):
            attn.set_processor(NetiCrossAttnProcessor(i, l, state))
        model.attn_state = state
    return state
