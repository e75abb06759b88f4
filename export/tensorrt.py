"""TensorRT engine from the ONNX export, and a denoiser that runs it (TensorRT 10 Python API).

UNTESTED HERE: TensorRT cannot be installed in the environment this was written in (no NVIDIA GPU),
so this module has never been run; tests/test_export.py exercises it only where `tensorrt` and
CUDA are available. Written against the TensorRT 10 name-based API: `Builder.create_network(0)`
(explicit batch is the only mode), `OnnxParser.parse_from_file` (resolves `<name>.onnx.data`
external weights relative to the file), one optimization profile, `build_serialized_network`;
at run time `Runtime.deserialize_cuda_engine`, `set_input_shape`, `set_tensor_address`,
`execute_async_v3` on torch's current CUDA stream.

Profiles: one per batch bucket (`opt_batches`, default the batch sizes asked for, else powers of
two up to max_batch): bucket i covers U-Net batches (2 x previous bucket, 2 x bucket] and is tuned
for exactly 2 x bucket (classifier-free guidance doubles the batch), so batch-1 latency runs
kernels tuned for batch 1, not for the largest batch. Rows 1 .. max_rows, tuned for `opt_rows`
(the engine's K / V arena hands over power-of-two row counts). Spatial size is what the ONNX graph
fixed. The family's added conditioning inputs (SDXL: text_embeds [B, 1280], time_ids [B, 6]) take
the batch range of `sample` (`input_profile`); the inputs are the ONNX graph's (`onnx.input_names`). At run time the context of the bucket that holds the batch is used, on the denoiser's own
CUDA stream (TensorRT warns that the legacy default stream costs extra synchronization), ordered
after and before torch's current stream.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .onnx import OUTPUT_NAMES, input_names, is_table, ordered_inputs, parse_input_names

ENGINE_FORMAT = "1"


def _trt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise RuntimeError("TensorRT is not installed: pip install tensorrt on a machine with an NVIDIA GPU") from e
    return trt


def _onnx_digest(onnx_path: Path) -> str:
    """Cheap identity of the ONNX export: its cache sidecar's fingerprint if any, else size + mtime."""
    side = onnx_path.with_name(onnx_path.name + ".json")
    try:
        return json.loads(side.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        st = onnx_path.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"


def batch_buckets(max_batch: int, opt_batches=None) -> list[int]:
    """Images-per-batch buckets, one TensorRT profile each: sorted, ending at max_batch."""
    if opt_batches:
        b = sorted({int(x) for x in opt_batches if 1 <= int(x) <= max_batch} | {max_batch})
    else:
        b, n = [], 1
        while n < max_batch:
            b.append(n)
            n *= 2
        b.append(max_batch)
    return b


def profile_ranges(buckets: list[int]) -> list[tuple[int, int, int]]:
    """(min, opt, max) U-Net batch (2 rows per image) of each bucket's profile."""
    out, lo = [], 1
    for b in buckets:
        out.append((lo, 2 * b, 2 * b))
        lo = 2 * b + 1
    return out


def input_profile(name: str, shape, batch: tuple[int, int, int], opt_rows: int, max_rows: int,
                  max_tokens: int):
    """(min, opt, max) shapes of graph input `name` (its ONNX shape, -1 for dynamic axes) for a
    profile of U-Net batch range `batch` = (min, opt, max); None for the static timestep. Tables
    [R, L, C]: rows 1 .. max_rows (opt opt_rows), tokens 1 .. max_tokens (opt 77); every other input
    (sample, row_idx, the added conditioning) leads with the batch axis."""
    shape = list(shape)
    if name == "timestep":
        return None  # static [1]
    if is_table(name):
        return tuple([n, t, shape[2]] for n, t in ((1, 1), (opt_rows, 77), (max_rows, max_tokens)))
    return tuple([n, *shape[1:]] for n in batch)


def build_engine(onnx_path, engine_path, fp16: bool = True, max_batch: int = 16, max_rows: int = 4096,
                 opt_batch: int | None = None, opt_rows: int | None = None, workspace_gb: float | None = None,
                 force: bool = False, opt_batches=None, max_tokens: int = 231) -> Path:
    """Serialize a TensorRT engine for `onnx_path` to `engine_path` (cached).

    Skipped when the engine is newer than the ONNX file and its sidecar (`<engine>.json`) records the
    same ONNX fingerprint, TensorRT version, GPU and build options. max_rows bounds R of the K / V
    tables (an engine batch of n distinct NeTI prompts at 50 steps has up to ~(n + 1) * 50 rows);
    max_tokens bounds their text length L (tuned for 77; 231 = three 77-token chunks of a long prompt).
    """
    trt = _trt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.exists():
        raise FileNotFoundError(onnx_path)
    buckets = batch_buckets(max_batch, opt_batches or ([opt_batch] if opt_batch else None))
    opt_rows = min(opt_rows or 64, max_rows)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "?"
    key = {"format": ENGINE_FORMAT, "onnx": _onnx_digest(onnx_path), "trt": trt.__version__, "gpu": gpu,
           "fp16": fp16, "max_batch": max_batch, "max_rows": max_rows, "buckets": buckets, "opt_rows": opt_rows,
           "max_tokens": max_tokens}
    side = engine_path.with_name(engine_path.name + ".json")
    if (not force and engine_path.exists() and side.exists()
            and engine_path.stat().st_mtime_ns >= onnx_path.stat().st_mtime_ns):
        try:
            if json.loads(side.read_text()) == key:
                return engine_path
        except (OSError, ValueError):
            pass

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errs}")
    parse_input_names([network.get_input(i).name for i in range(network.num_inputs)], str(onnx_path), ordered=False)
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    for lo_b, opt_b, hi_b in profile_ranges(buckets):
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            inp = network.get_input(i)
            shapes = input_profile(inp.name, inp.shape, (lo_b, opt_b, hi_b), opt_rows, max_rows, max_tokens)
            if shapes is not None:
                profile.set_shape(inp.name, *shapes)
        config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_name(engine_path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(memoryview(blob))
    os.replace(tmp, engine_path)
    tmp = side.with_name(side.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(key, indent=1))
    os.replace(tmp, side)
    return engine_path


class TensorRTDenoiser:
    """A TensorRT engine with `TorchDenoiser`'s call signature; CUDA tensors in, CUDA tensor out.

    Inputs are cast to the engine's I/O dtypes (fp32 unless the ONNX graph was fp16 / bf16; the FP16
    build flag changes internal precision, not I/O) and bound by device pointer: no host copies.
    One execution context per optimization profile (batch bucket), made on first use.
    """

    def __init__(self, engine_path, device: str | torch.device = "cuda"):
        trt = _trt()
        self.trt, self.device = trt, torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(self.device):
            self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
            self.stream = torch.cuda.Stream(self.device)
        if self.engine is None:
            raise RuntimeError(f"{engine_path}: TensorRT could not load it (built by another TensorRT version or GPU?)")
        self.path = str(engine_path)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        if OUTPUT_NAMES[0] not in names:
            raise ValueError(f"{engine_path}: not a neti-fast tables U-Net engine (no output {OUTPUT_NAMES[0]})")
        self.added, self.tables = parse_input_names([n for n in names if n not in OUTPUT_NAMES], str(engine_path),
                                                     ordered=False)
        self.names = input_names(self.tables, self.added)
        dt = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64, trt.int32: torch.int32}
        if hasattr(trt, "bfloat16"):
            dt[trt.bfloat16] = torch.bfloat16
        self.dtypes = {n: dt[self.engine.get_tensor_dtype(n)] for n in names}
        # Each profile's batch range, from the engine itself (min, opt, max of "sample"'s dim 0).
        self.ranges = [tuple(s[0] for s in self.engine.get_tensor_profile_shape("sample", p))
                       for p in range(self.engine.num_optimization_profiles)]
        self._contexts: dict = {}

    def _context(self, batch: int):
        for p, (lo, _, hi) in enumerate(self.ranges):
            if lo <= batch <= hi:
                break
        else:
            raise ValueError(f"{self.path}: U-Net batch {batch} is outside every profile "
                             f"({', '.join(f'{lo}-{hi}' for lo, _, hi in self.ranges)}); rebuild with a larger max_batch")
        ctx = self._contexts.get(p)
        if ctx is None:
            ctx = self.engine.create_execution_context()
            if not ctx.set_optimization_profile_async(p, self.stream.cuda_stream):
                raise RuntimeError(f"{self.path}: TensorRT refused optimization profile {p}")
            self._contexts[p] = ctx
        return ctx

    def __call__(self, x, t, row_idx, k_tables, v_tables, added: dict | None = None):
        tensors = ordered_inputs(self.added, self.tables, x, t, row_idx, k_tables, v_tables, added, self.path)
        if x.device != self.device:
            raise ValueError(f"{self.path}: loaded on {self.device}, called with tensors on {x.device}")
        with torch.cuda.device(self.device):
            ctx, keep = self._context(x.shape[0]), []
            for name, v in zip(self.names, tensors):
                v = v.to(device=self.device, dtype=self.dtypes[name]).contiguous()
                keep.append(v)
                if not ctx.set_input_shape(name, tuple(v.shape)):
                    raise ValueError(f"{self.path}: input {name} of shape {tuple(v.shape)} is outside the "
                                     "engine's profile (rebuild with larger max_batch / max_rows)")
                ctx.set_tensor_address(name, v.data_ptr())
            out = torch.empty(tuple(ctx.get_tensor_shape(OUTPUT_NAMES[0])), device=self.device,
                              dtype=self.dtypes[OUTPUT_NAMES[0]])
            ctx.set_tensor_address(OUTPUT_NAMES[0], out.data_ptr())
            cur = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(cur)           # inputs written on torch's stream are ready
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            for v in keep + [out]:                 # the allocator must not reuse them before TRT is done
                v.record_stream(self.stream)
            cur.wait_stream(self.stream)           # torch's next kernels see eps
        return out.to(x.dtype)
