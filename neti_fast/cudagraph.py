"""CUDA-graph replay of the denoiser: the `compile` backend's last step.

One U-Net call launches several hundred kernels; at batch 1 on a fast GPU their launch cost is a
large share of the step. A CUDA graph records the call once and replays it with one launch. It needs
static shapes and addresses and no host sync inside the call, which the denoiser's signature
(tensors only, no dicts or counters) was made for. So `CudaGraphDenoiser` keeps static buffers per
(latent shape, dtype, table capacity):

- x, t and row_idx are copied in every step (a few KB);
- the K/V tables are copied in once per generation (when the engine hands over new ones) into
  buffers of `capacity` rows, R rounded up to a power of two, so batches whose conditionings add
  a few rows replay the same graph. Rows past R are never read: row_idx < R.

Memory: each captured shape holds its own table buffers (at most 2x the tables) and its graph's
activations. The scheduler step stays outside the graph (diffusers schedulers keep Python state).

GPU-only; on CPU, when capture fails (reported once), or with NETI_FAST_DISABLE_CUDA_GRAPHS=1,
calls go to the wrapped denoiser. Not yet run on a GPU: see the README's backend table.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch


@dataclass
class _Graph:
    graph: object                     # torch.cuda.CUDAGraph, or None: capture failed, run eagerly
    x: torch.Tensor
    t: torch.Tensor
    row_idx: torch.Tensor
    k_tables: list
    v_tables: list
    out: torch.Tensor | None = None
    source: tuple | None = None       # the (k_tables, v_tables) lists last copied in (held: ids stay unique)


def graphs_enabled() -> bool:
    """False when NETI_FAST_DISABLE_CUDA_GRAPHS is set (1 / true / yes / on): the kill switch."""
    return os.environ.get("NETI_FAST_DISABLE_CUDA_GRAPHS", "").strip().lower() not in ("1", "true", "yes", "on")


def capacity(rows: int) -> int:
    """Table rows a graph is captured for: the next power of two (at least 8)."""
    return max(8, 1 << (rows - 1).bit_length())


class CudaGraphDenoiser:
    """Wraps a denoiser `inner(x, t, row_idx, k_tables, v_tables) -> eps` with CUDA-graph replay."""

    def __init__(self, inner, warmup: int = 2):
        self.inner, self.warmup = inner, warmup
        self._graphs: dict = {}

    def __getattr__(self, name):  # model / state / attention of the wrapped denoiser
        return getattr(self.inner, name)

    def __call__(self, x, t, row_idx, k_tables, v_tables):
        if not x.is_cuda or not graphs_enabled():
            return self.inner(x, t, row_idx, k_tables, v_tables)
        cap = capacity(k_tables[0].shape[0])
        key = (tuple(x.shape), x.dtype, cap, tuple(tuple(k.shape[1:]) for k in k_tables),
               tuple(tuple(v.shape[1:]) for v in v_tables), k_tables[0].dtype)
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = self._capture(x, t, row_idx, k_tables, v_tables, cap)
        if g.graph is None:
            return self.inner(x, t, row_idx, k_tables, v_tables)
        self._load(g, x, t, row_idx, k_tables, v_tables)
        g.graph.replay()
        return g.out.clone()  # the static output is overwritten by the next replay

    @staticmethod
    def _load(g: _Graph, x, t, row_idx, k_tables, v_tables) -> None:
        g.x.copy_(x)
        g.t.copy_(t)
        g.row_idx.copy_(row_idx)
        if g.source is None or g.source[0] is not k_tables or g.source[1] is not v_tables:
            for dst, src in zip(g.k_tables + g.v_tables, k_tables + v_tables):
                dst[:src.shape[0]].copy_(src)
            g.source = (k_tables, v_tables)

    def _capture(self, x, t, row_idx, k_tables, v_tables, cap: int) -> _Graph:
        dev = x.device
        static = _Graph(
            graph=None, x=torch.empty_like(x), t=torch.as_tensor(t).to(dev).clone(), row_idx=torch.empty_like(row_idx),
            k_tables=[torch.zeros((cap, *k.shape[1:]), dtype=k.dtype, device=dev) for k in k_tables],
            v_tables=[torch.zeros((cap, *v.shape[1:]), dtype=v.dtype, device=dev) for v in v_tables])
        self._load(static, x, t, row_idx, k_tables, v_tables)
        args = (static.x, static.t, static.row_idx, static.k_tables, static.v_tables)
        try:
            # Warm-up on a side stream (torch.compile's compilation and autotuning, cuBLAS / Triton
            # set-up) so that none of it happens during capture.
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.inner(*args)
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static.out = self.inner(*args)
            static.graph = graph
        except Exception as e:  # noqa: BLE001 - any capture failure: fall back, say so once
            warnings.warn(f"CUDA graph capture failed for batch shape {tuple(x.shape)}; running without it "
                          f"({type(e).__name__}: {e})", RuntimeWarning, stacklevel=3)
            static.k_tables = static.v_tables = []  # free the buffers
        return static
