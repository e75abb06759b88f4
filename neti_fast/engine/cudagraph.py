"""CUDA-graph replay of the denoiser: the `compile` backend's last step.

One U-Net call launches several hundred kernels; at batch 1 on a fast GPU their launch cost is a
large share of the step. A CUDA graph records the call once and replays it with one launch. It needs
static shapes and addresses and no host sync inside the call, which the denoiser's signature
(tensors only, no dicts or counters) was made for.

- Per latent shape (batch size, size, dtype) one graph, with static x, t and row_idx buffers that
  are copied into every step (a few KB); where the family has added U-Net conditioning (SDXL's
  text_embeds, time_ids: one row per sample) static buffers for those too, copied the same way.
- The K / V tables are *not* copied: the engine hands every call the same buffers (its
  `kv_arena.KVArena`), so a graph reads them in place. If the tables handed over are other tensors
  (the arena grew, or a caller without an arena), every graph captured against the old ones is
  dropped and the shape is captured again.
- All graphs allocate from one memory pool (`torch.cuda.graph_pool_handle()`). That is safe here:
  replays run one at a time on one stream, and each replay's output is cloned before the next one,
  so no graph needs another's intermediates to survive. At most `max_graphs` are kept, least
  recently used evicted first (a long job with many batch shapes cannot grow without bound).
- Capture and replay run on x's device (`--device cuda:1` in a process whose current device is 0).

The scheduler step stays outside the graph (diffusers schedulers keep Python state). GPU-only; on
CPU, when capture fails (reported once), or with NETI_FAST_DISABLE_CUDA_GRAPHS=1, calls go to the
wrapped denoiser. Not yet run on a GPU: see the README's backend table.
"""
from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..utils import env_flag

log = logging.getLogger("neti_fast.engine.cudagraph")


@dataclass
class _Graph:
    graph: object                     # torch.cuda.CUDAGraph, or None: capture failed, run eagerly
    x: torch.Tensor
    t: torch.Tensor
    row_idx: torch.Tensor
    added: dict | None = None         # static copies of the added conditioning (None: the family has none)
    out: torch.Tensor | None = None


def graphs_enabled() -> bool:
    """False when NETI_FAST_DISABLE_CUDA_GRAPHS is on (`utils.env_flag`): the kill switch."""
    return not env_flag("NETI_FAST_DISABLE_CUDA_GRAPHS")


def tables_key(k_tables, v_tables) -> tuple:
    """Identity of the tables a graph reads: their addresses and shapes."""
    return tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in list(k_tables) + list(v_tables))


class CudaGraphDenoiser:
    """Wraps a denoiser `inner(x, t, row_idx, k_tables, v_tables, added=None) -> eps` with CUDA-graph replay."""

    def __init__(self, inner, warmup: int = 2, max_graphs: int = 8):
        self.inner, self.warmup, self.max_graphs = inner, warmup, max_graphs
        self._graphs: OrderedDict = OrderedDict()   # (shape, dtype, device) -> _Graph, LRU order
        self._tables: tuple | None = None            # tables_key of what the graphs read
        self._held: tuple = ()                       # those tables, kept alive while graphs read them
        self._pool = None
        self.captures = 0

    def __getattr__(self, name):  # model / state / attention of the wrapped denoiser
        return getattr(self.inner, name)

    def __call__(self, x, t, row_idx, k_tables, v_tables, added: dict | None = None):
        extra = {} if added is None else {"added": added}
        if not x.is_cuda or not graphs_enabled():
            return self.inner(x, t, row_idx, k_tables, v_tables, **extra)
        with torch.cuda.device(x.device):
            tkey = tables_key(k_tables, v_tables)
            if tkey != self._tables:
                if self._graphs:
                    log.info("K/V tables changed (new arena buffers): dropping %d CUDA graph(s)", len(self._graphs))
                self._graphs.clear()
                self._tables, self._held = tkey, (list(k_tables), list(v_tables))
            key = (tuple(x.shape), x.dtype, x.device,
                   None if added is None else tuple((n, tuple(v.shape), v.dtype) for n, v in sorted(added.items())))
            g = self._graphs.get(key)
            if g is None:
                g = self._capture(x, t, row_idx, k_tables, v_tables, added)
                self._graphs[key] = g
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
            self._graphs.move_to_end(key)
            if g.graph is None:
                return self.inner(x, t, row_idx, k_tables, v_tables, **extra)
            g.x.copy_(x)
            g.t.copy_(t)
            g.row_idx.copy_(row_idx)
            for n, v in (added or {}).items():
                g.added[n].copy_(v)
            g.graph.replay()
            return g.out.clone()  # the static output is overwritten by the next replay

    def _capture(self, x, t, row_idx, k_tables, v_tables, added: dict | None = None) -> _Graph:
        dev = x.device
        static = _Graph(graph=None, x=x.clone(), t=torch.as_tensor(t).to(dev).clone(), row_idx=row_idx.clone(),
                        added=None if added is None else {n: v.to(dev).clone() for n, v in added.items()})
        args = (static.x, static.t, static.row_idx, k_tables, v_tables)
        kw = {} if static.added is None else {"added": static.added}
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            # Warm-up on a side stream (torch.compile's compilation and autotuning, cuBLAS / Triton
            # set-up, the attention dispatcher's first-use checks) so none of it happens in capture.
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.inner(*args, **kw)
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                static.out = self.inner(*args, **kw)
            static.graph = graph
            self.captures += 1
            log.info("captured a CUDA graph for batch shape %s on %s (%d kept)", tuple(x.shape), dev,
                     len(self._graphs) + 1)
        except Exception as e:  # noqa: BLE001 - any capture failure: fall back, say so once
            warnings.warn(f"CUDA graph capture failed for batch shape {tuple(x.shape)}; running without it "
                          f"({type(e).__name__}: {e})", RuntimeWarning, stacklevel=3)
        return static
