"""Choosing the U-Net runtime (the "denoiser") for an Engine: one library function, used by the
CLI (`--backend`), the job runner and the Python API (`generate(..., backend=...)`).

    backend    what runs
    eager      the PyTorch U-Net with per-layer K/V tables (the Engine's own TorchDenoiser)
    compile    torch.compile on the U-Net; on CUDA each call replayed as a CUDA graph
    onnx       the exported U-Net run by onnxruntime (exported once, cached)
    tensorrt   a TensorRT engine built from that ONNX file
    auto       eager today: it has no build step, and no GPU measurement yet shows the others pay
               back their minutes of compiling / exporting / building there

The attention kernel inside the U-Net is a separate setting (`--attention`, sd/attention.py); the
two vocabularies share no name (utils.BACKENDS, utils.ATTENTIONS). `--backend triton`, from when
this setting also forced the Triton kernel, still means `--backend eager --attention triton`, with
one notice. The choice and the reason for any fallback are logged once per (backend, reason).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import NetiError
from ..sd.attention import canonical_attention
from ..utils import BACKENDS, image_size

log = logging.getLogger("neti_fast")
_said: set = set()


def _say(msg: str) -> None:
    if msg not in _said:
        _said.add(msg)
        log.info(msg)


@dataclass
class Choice:
    backend: str          # what runs: eager | compile | onnx | tensorrt
    attention: str        # the attention setting the Engine's config should use
    reason: str           # why (for auto and fallbacks)


def resolve(backend: str = "auto", attention: str = "auto") -> Choice:
    """Which backend `backend` means here, and the attention setting that goes with it."""
    if backend == "triton":
        if "triton" not in _said:
            _said.add("triton")
            log.warning("neti-fast: --backend triton is now --backend eager --attention triton "
                        "(--attention chooses the kernel, --backend the U-Net runtime)")
        return Choice("eager", "triton", "triton: eager with the Triton attention kernel forced")
    if backend not in BACKENDS:
        raise NetiError(f"must be one of {', '.join(BACKENDS)}", field="backend", value=backend)
    attention = canonical_attention(attention)
    if backend == "auto":
        return Choice("eager", attention, "auto picks eager: no build step; compile / onnx / tensorrt have no "
                                          "GPU measurement yet that pays back their build time")
    return Choice(backend, attention, f"{backend}: asked for")


def make_denoiser(model, backend: str = "auto", attention: str = "auto", *, height: int | None = None,
                  width: int | None = None, batch_size: int = 8, export_dir: str | Path | None = None,
                  model_name: str | None = None, threads: int | None = None):
    """(denoiser, attention) for an Engine: denoiser None means the Engine's own TorchDenoiser with
    `attention`. onnx / tensorrt export for one (height, width) and cache the file in `export_dir`
    (default: under $NETI_FAST_CACHE, keyed by the model's weights); `threads`: onnxruntime's
    intra-op threads (default: its own choice)."""
    choice = resolve(backend, attention)
    _say(f"neti-fast backend: {choice.backend} ({choice.reason})")
    if choice.backend == "eager":
        return None, choice.attention
    if choice.backend == "compile":
        from .cudagraph import CudaGraphDenoiser
        from .denoiser import TorchDenoiser
        return CudaGraphDenoiser(TorchDenoiser(model, choice.attention, compile=True)), choice.attention
    from ..export import onnx as onnx_export
    h, w = image_size(model, height, width)
    cache = (Path(export_dir) if export_dir else
             onnx_export.default_export_dir(model_name or model.name, h, w, model.dtype))
    path = onnx_export.export_cached(model, cache, height=h, width=w)
    if choice.backend == "onnx":
        return onnx_export.OnnxDenoiser(path, threads=threads, device=model.device), choice.attention
    from ..export import tensorrt as trt_export
    import torch
    engine_path = trt_export.build_engine(path, Path(path).with_suffix(".plan"), fp16=model.dtype != torch.float32,
                                          max_batch=batch_size, opt_batches=[batch_size])
    return trt_export.TensorRTDenoiser(engine_path, device=model.device), choice.attention


def needs_size(backend: str) -> bool:
    """Whether the denoiser is built for one image size (exported backends), so a job with several
    sizes needs one per size."""
    return resolve(backend).backend != "eager"


def engine(model, cfg=None, backend: str = "auto", export_dir=None, model_name=None):
    """An Engine for `cfg` (GenerateConfig) running on `backend`."""
    import dataclasses

    from .engine import Engine
    from .request import GenerateConfig
    cfg = cfg or GenerateConfig()
    den, attention = make_denoiser(model, backend, cfg.attention, height=cfg.height, width=cfg.width,
                                   batch_size=cfg.batch_size, export_dir=export_dir, model_name=model_name)
    return Engine(model, dataclasses.replace(cfg, attention=attention), denoiser=den)
