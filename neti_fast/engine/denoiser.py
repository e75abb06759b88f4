"""The denoiser interface: eps = U-Net(x, t) with every cross-attention reading per-layer K/V tables.

Every U-Net runtime implements this one call signature (tensors only: no dicts, no counters):
`TorchDenoiser` here (eager or torch.compile), `cudagraph.CudaGraphDenoiser` around it, and the
exported ONNX / TensorRT U-Nets (`neti_fast.export`); backends.py chooses among them.
"""
from __future__ import annotations

import torch

from ..sd.attention import canonical_attention, install_processors
from ..sd.models import Model


class TorchDenoiser:
    """eps = U-Net(x, t) with every cross-attention reading K/V rows `row_idx` of the per-layer tables.

    compile=True: `torch.compile` of the U-Net, specialized to every shape except the tables' row
    count (marked dynamic: a job whose batches need different numbers of rows never recompiles,
    where a recompile per row count would soon hit dynamo's limit and silently run eager). The first
    call per latent shape runs eagerly, so the attention dispatcher makes (and checks) its choices on
    real data before tracing bakes them in.
    """

    def __init__(self, model: Model, attention: str = "auto", compile: bool = False,
                 compile_backend: str = "inductor"):
        self.model, self.state, self.attention = model, install_processors(model), canonical_attention(attention)
        self.compiled = compile
        self.unet = torch.compile(model.unet, dynamic=False, backend=compile_backend) if compile else model.unet
        self._seen: set = set()

    def __call__(self, x, t, row_idx, k_tables, v_tables, added: dict | None = None):
        """`added`: the U-Net's added_cond_kwargs where the family has them (SDXL's text_embeds, time_ids)."""
        st = self.state
        st.mode, st.backend, st.row_idx, st.k_tables, st.v_tables = "tables", self.attention, row_idx, k_tables, v_tables
        unet = self.unet
        if self.compiled:
            for tab in k_tables + v_tables:
                torch._dynamo.maybe_mark_dynamic(tab, 0)
            key = (tuple(x.shape[1:]), x.dtype, x.device)
            if key not in self._seen:
                self._seen.add(key)
                unet = self.model.unet
        try:
            return unet(x, t, encoder_hidden_states=None, added_cond_kwargs=added).sample
        finally:
            st.mode, st.row_idx, st.k_tables, st.v_tables = "plain", None, [], []
