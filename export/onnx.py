"""The denoiser `eps = U-Net(x, t, row_idx, K/V tables)` as an ONNX graph, and an onnxruntime backend.

Graph inputs (names are the contract with `OnnxDenoiser` and `tensorrt.build_engine`; `input_names`):
    sample    float [B, 4, h, w]      B dynamic ("batch"); h, w fixed at export time
    timestep  float32 [1]             broadcast over the batch inside the U-Net (diffusers'
                                      `timesteps.expand(B)`); see `_timestep` for why float [1]
    row_idx   int64 [B]               the table row each sample's cross-attention reads
    <added>   float [B, W]            only where the family has added U-Net conditioning, one input
                                      per name of `Family.added_conditioning` (SDXL: text_embeds
                                      [B, 1280], time_ids [B, 6]); same dynamic batch axis
    k0..k{n-1} float [R, L, C_m]      one K table per cross-attention module of the model (SD 1.x /
                                      2.x: 16; SDXL: 70 blocks), R dynamic ("rows"), L dynamic
                                      ("tokens": 77 per CLIP chunk, 77k for A1111-style long prompts)
    v0..v{n-1} float [R, L, C_m]      the V tables (same R and L)
Output:
    eps       float [B, 4, h, w]
SD 1.x's graph is what it was before families existed (no added inputs, k0..k15, v0..v15).

Cross-attention in the graph is the "sdpa" backend of `neti_fast.sd.attention`: Gather (index_select)
of the rows, then scaled-dot-product attention. The Triton custom op is never exported. Nothing in
the U-Net depends on L but those matmuls' inner sizes, so one graph serves every prompt length.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from neti_fast.sd.attention import install_processors
from neti_fast.utils import image_size

BASE_INPUTS = ["sample", "timestep", "row_idx"]
OUTPUT_NAMES = ["eps"]
# Bump when the graph's inputs / semantics change: invalidates cached exports. SD 1.x's graph is
# unchanged by the added-conditioning inputs (it has none), so "2" still names its layout.
FORMAT_VERSION = "2"
_TABLE = re.compile(r"[kv]\d+")


def input_names(tables: int, added=()) -> list[str]:
    """The graph's input names for `tables` K/V tables (one per cross-attention module) and the
    family's added conditioning names, in graph order."""
    return BASE_INPUTS + list(added) + [f"k{i}" for i in range(tables)] + [f"v{i}" for i in range(tables)]


def model_input_names(model) -> list[str]:
    return input_names(len(model.cross_attention), model.family.added_conditioning)


def parse_input_names(names, where: str, ordered: bool = True) -> tuple[list[str], int]:
    """(added names, table count) of a graph / engine with these input names; ValueError if they are
    not `input_names`' layout (in its order, unless `ordered` is False: inputs bound by name)."""
    names = list(names)
    tables = [n for n in names if _TABLE.fullmatch(n)]
    added = [n for n in names if n not in BASE_INPUTS and not _TABLE.fullmatch(n)]
    n = len(tables) // 2
    want = input_names(n, added)
    if (names != want if ordered else sorted(names) != sorted(want)) or n == 0:
        raise ValueError(f"{where}: not a neti-fast tables U-Net export (inputs {', '.join(names[:6])}"
                         f"{', ...' if len(names) > 6 else ''})")
    return added, n


def is_table(name: str) -> bool:
    """Whether graph input `name` is a K / V table ([R, L, C]; the others lead with the batch axis
    or are the timestep)."""
    return bool(_TABLE.fullmatch(name))


def ordered_inputs(added_names, tables: int, x, t, row_idx, k_tables, v_tables, added: dict | None, where: str) -> list:
    """The denoiser call's tensors in graph order (`input_names(tables, added_names)`)."""
    if len(k_tables) != tables or len(v_tables) != tables:
        raise ValueError(f"{where}: expected {tables} K and V tables, got {len(k_tables)} and {len(v_tables)}")
    added = added or {}
    if set(added) != set(added_names):
        raise ValueError(f"{where}: the graph takes added conditioning {list(added_names) or 'none'}, "
                         f"given {list(added) or 'none'}")
    return [x, _timestep(t), row_idx.reshape(-1), *(added[n] for n in added_names), *k_tables, *v_tables]


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("neti-fast")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "0"


class TablesUNet(torch.nn.Module):
    """`model.unet` with every cross-attention reading K / V rows `row_idx[b]` of the given tables.

    forward(sample, timestep, row_idx, *added, k0..k{n-1}, v0..v{n-1}) -> eps, `added` the family's
    added conditioning in `Family.added_conditioning` order (none for SD 1.x / 2.x). All inputs
    explicit tensors, so the graph is a pure function of its inputs (the shared state is filled and
    cleared around the call).
    """

    def __init__(self, model):
        super().__init__()
        self.unet = model.unet
        self.state = install_processors(model)
        self.added = tuple(model.family.added_conditioning)
        self.tables = len(model.cross_attention)

    def forward(self, sample, timestep, row_idx, *kv):
        # `kv`: the added inputs, then the tables. The parameter keeps its SD 1.x-era name: torch.export
        # names the inputs' symbolic sizes after it, and a different name gives SD 1.x's graph another
        # (equivalent) choice of which table's Shape it reads.
        n, a = self.tables, len(self.added)
        if len(kv) != a + 2 * n:
            raise ValueError(f"TablesUNet: expected {a} added inputs and {2 * n} K/V tables, got {len(kv)} tensors")
        added = dict(zip(self.added, kv[:a])) if a else None
        kv = kv[a:]
        st = self.state
        prev = (st.mode, st.backend, st.row_idx, st.k_tables, st.v_tables)
        st.mode, st.backend, st.row_idx = "tables", "sdpa", row_idx
        st.k_tables, st.v_tables = list(kv[:n]), list(kv[n:])
        try:
            return self.unet(sample, timestep, encoder_hidden_states=None, added_cond_kwargs=added,
                             return_dict=False)[0]
        finally:
            st.mode, st.backend, st.row_idx, st.k_tables, st.v_tables = prev


def _timestep(t) -> torch.Tensor:
    """Any scheduler timestep (python number, 0-d or [1] int / float tensor) -> float32 [1].

    float32 [1] rather than int64 0-d: the U-Net's sinusoidal embedding works in float anyway
    (exact for integer t < 2**24), Euler / Karras schedules give fractional timesteps, and a rank-1
    input keeps TensorRT profiles and ORT bindings free of 0-d corner cases.
    """
    t = torch.as_tensor(t)
    return t.reshape(1).to(torch.float32)


def example_inputs(model, batch: int = 2, rows: int = 3, height: int | None = None, width: int | None = None,
                   seed: int = 0, tokens: int = 77) -> tuple:
    """Random inputs in the graph's layout (sample, timestep, row_idx, the added conditioning, the K
    and V tables of L = tokens). Added inputs: random pooled embeddings; time ids as the engine makes
    them (h, w, 0, 0, h, w), offset per sample so the batch rows differ."""
    g = torch.Generator().manual_seed(seed)
    f = model.vae_scale_factor
    h, w = (n // f for n in image_size(model, height, width))
    dt, dev = model.dtype, model.device
    sample = torch.randn(batch, model.unet.config.in_channels, h, w, generator=g).to(dev, dt)
    t = _timestep(torch.randint(0, 1000, (), generator=g)).to(dev)
    row_idx = torch.randint(0, rows, (batch,), generator=g).to(dev)
    added, (ph, pw) = [], (h * f, w * f)
    for i, n in enumerate(model.added_widths.values()):
        if i == 0:   # the pooled text embedding (Model.added_widths' order)
            added.append(torch.randn(batch, n, generator=g).to(dev, dt))
        else:        # time ids: sizes and crop offsets in pixels, a different original size per sample
            base = torch.tensor(([ph, pw, 0, 0, ph, pw] + [0] * n)[:n], dtype=torch.float32)
            added.append((base + 8 * torch.arange(batch)[:, None] * (base != 0)).to(dev, dt))
    ks, vs = [], []
    for attn in model.cross_attention:
        ks.append(torch.randn(rows, tokens, attn.to_k.out_features, generator=g).to(dev, dt))
        vs.append(torch.randn(rows, tokens, attn.to_v.out_features, generator=g).to(dev, dt))
    return (sample, t, row_idx, *added, *ks, *vs)


# Exports larger than this are written as `<name>.onnx` + `<name>.onnx.data` (external data): one
# protobuf cannot exceed 2 GB, and SD 1.5's fp32 U-Net alone is ~3.4 GB.
EXTERNAL_DATA_BYTES = 1 << 30


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _export_dynamo(mod, args, dest: Path, opset, external: bool, optimize: bool = True) -> None:
    """torch.export-based exporter (torch >= 2.9's default): symbolic dims from `dynamic_shapes`."""
    from torch.export import Dim
    # max=63: diffusers' Upsample2D does `if x.shape[0] >= 64: x = x.contiguous()` (a layout-only
    # workaround); torch.export turns that branch into a guard and rejects a wider range (and the
    # ONNX exporter then retries with slower strategies, minutes even for the tiny model). The bound
    # exists only for torch.export: `.contiguous()` is no op in ONNX, the graph has no batch bound
    # and is correct for any batch (`dim_param` "batch"); TensorRT profiles set their own range.
    batch, rows = Dim("batch", min=1, max=63), Dim("rows", min=1, max=1 << 20)
    tokens = Dim("tokens", min=1, max=1 << 16)  # one L shared by all tables
    # `*kv` is one var-positional parameter: torch.export wants its spec as one nested tuple.
    dyn = ({0: batch}, None, {0: batch}, tuple({0: batch} for _ in mod.added)
           + tuple({0: rows, 1: tokens} for _ in range(2 * mod.tables)))
    prog = torch.onnx.export(mod, args, dynamo=True, dynamic_shapes=dyn, input_names=_names(mod),
                             output_names=OUTPUT_NAMES, opset_version=opset, optimize=optimize,
                             verbose=False, report=False)
    prog.save(str(dest), external_data=external)  # external: weights in `<dest>.data`


def _names(mod: TablesUNet) -> list[str]:
    return input_names(mod.tables, mod.added)


def _export_torchscript(mod, args, dest: Path, opset, external: bool) -> None:
    """Legacy TorchScript exporter (tracing); fallback only."""
    names = _names(mod)
    axes = {"sample": {0: "batch"}, "row_idx": {0: "batch"}, "eps": {0: "batch"}}
    axes.update({n: {0: "batch"} for n in mod.added})
    axes.update({n: {0: "rows", 1: "tokens"} for n in names if is_table(n)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings from diffusers' shape checks, deprecation notice
        torch.onnx.export(mod, args, str(dest), dynamo=False, input_names=names, output_names=OUTPUT_NAMES,
                          dynamic_axes=axes, opset_version=opset or 18, do_constant_folding=True)
    if external:  # the legacy exporter writes one file per large tensor: gather them into one
        import onnx
        proto = onnx.load(str(dest))
        for f in dest.parent.iterdir():
            if f != dest:
                f.unlink()
        onnx.save_model(proto, str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=dest.name + ".data", size_threshold=1024)


def check_exportable(model) -> None:
    """bf16 graphs are refused up front: onnxruntime has no bf16 kernels for the U-Net's Conv
    (seen: "Type 'tensor(bfloat16)' of input parameter (sample) of operator (Conv) ... is invalid"),
    and TensorRT builds its own reduced precision from an fp16 / fp32 graph anyway."""
    if str(model.dtype) == "torch.bfloat16":
        from neti_fast.errors import NetiError
        raise NetiError("--backend onnx / tensorrt: a bf16 model cannot be exported (onnxruntime has no bf16 "
                        "convolution); use --dtype fp16, or --backend eager / compile for bf16")


def export_onnx(model, path, batch: int = 2, rows: int = 3, height: int | None = None, width: int | None = None,
                opset: int | None = None, optimize: bool = True) -> Path:
    """Write `TablesUNet(model)` to `path` (ONNX; dynamic batch, table rows and text length L; fixed
    spatial size).

    `batch` / `rows` only size the example inputs (both axes are dynamic; they must be >= 2 so the
    tracer does not specialise them to 1). height / width are pixels (default: the model's native
    size); the graph's latent size is height / 8 x width / 8 and is fixed. optimize: run the
    onnxscript graph optimizer (constant folding, cast / reshape cleanup; worth it for TensorRT,
    about half the export time; dynamo exporter only).

    Exporter: `torch.onnx.export(dynamo=True)` (torch.export + onnxscript; the default since torch
    2.9, and the only exporter still developed) is tried first. If it raises, the legacy TorchScript
    exporter (`dynamo=False`, `dynamic_axes`) is used instead, with a warning that says why; the
    exporter used is recorded in the cache sidecar by `export_cached`. On torch 2.13 + diffusers 0.42
    the dynamo path succeeds for the U-Net (tested), so the fallback is for other torch versions.

    The file appears atomically: everything is written into a temporary folder beside `path` and
    moved into place, external data (`<name>.onnx.data`, used above ~1 GB of weights) first and the
    `.onnx` last, so a reader never sees a `.onnx` whose weights are missing.
    Returns the path; `export_onnx.last_exporter` says which exporter ran ("dynamo" / "torchscript").
    bf16 models are refused (`check_exportable`).
    """
    check_exportable(model)
    path = Path(path)
    if batch < 2 or rows < 2:
        raise ValueError("export_onnx: batch and rows must be >= 2 (a size-1 example would be specialised)")
    path.parent.mkdir(parents=True, exist_ok=True)
    mod = TablesUNet(model).eval()
    args = example_inputs(model, batch, rows, height, width)
    external = _param_bytes(model.unet) > EXTERNAL_DATA_BYTES
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        dest = tmpdir / path.name
        try:
            with torch.no_grad():
                _export_dynamo(mod, args, dest, opset, external, optimize)
            export_onnx.last_exporter = "dynamo"
        except Exception as e:  # noqa: BLE001 - any exporter failure: try the other exporter
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            warnings.warn(f"export_onnx: the dynamo exporter failed ({type(e).__name__}: {first}); "
                          "falling back to the TorchScript exporter", RuntimeWarning, stacklevel=2)
            for f in tmpdir.iterdir():
                f.unlink()
            with torch.no_grad():
                _export_torchscript(mod, args, dest, opset, external)
            export_onnx.last_exporter = "torchscript"
        files = sorted(tmpdir.iterdir(), key=lambda f: f == dest)  # the .onnx last: the commit point
        for f in files:
            os.replace(f, path.parent / f.name)
        stale = path.parent / (path.name + ".data")
        if stale.exists() and not any(f.name == stale.name for f in files):
            stale.unlink()  # a previous external-data export's weights; the new model has them inline
    finally:
        for f in tmpdir.iterdir() if tmpdir.exists() else ():
            f.unlink()
        if tmpdir.exists():
            tmpdir.rmdir()
    return path


export_onnx.last_exporter = None


# ----------------------------------------------------------------------------- caching

FULL_HASH_BYTES = 512 << 20   # hash every byte of state_dicts up to this size (tiny: ~10 MB)
def sample_indices(n: int, k: int) -> torch.Tensor:
    """k evenly spaced indices 0 .. n-1, in integer arithmetic: a float32 linspace rounds indices
    past 2**24 (SD 1.5's larger weights) and can step past the end of the tensor."""
    return torch.arange(k, dtype=torch.int64) * (n - 1) // (k - 1)


SAMPLE_ELEMS = 4096           # above it: per tensor, this many evenly strided elements


def fingerprint(model, height: int | None = None, width: int | None = None, opset: int | None = None,
                optimize: bool = True) -> str:
    """Identity of an export: the U-Net's weights, its config, dtype, spatial size, versions.

    Up to FULL_HASH_BYTES of weights every byte is hashed. Larger models (SD 1.5: 3.4 GB) hash, per
    tensor, its name, dtype, shape and SAMPLE_ELEMS evenly strided elements, plus the config: a
    fine-tune changes essentially every element, so a sample catches it at ~1 % of the cost; an edit
    of a handful of weights in a big model is not detected (re-export with `force=True`).
    """
    h = hashlib.sha256()
    unet = model.unet
    meta = {"format": FORMAT_VERSION, "neti_fast": _version(), "torch": torch.__version__,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(unet.config).items()},
            "dtype": str(model.dtype), "height": image_size(model, height, width)[0], "width": image_size(model, height, width)[1],
            "opset": opset, "optimize": optimize}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    sd = unet.state_dict()
    full = _param_bytes(unet) <= FULL_HASH_BYTES
    for name in sorted(sd):
        t = sd[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        flat = t.reshape(-1)
        if not full and flat.numel() > SAMPLE_ELEMS:
            flat = flat[sample_indices(flat.numel(), SAMPLE_ELEMS).to(flat.device)]
        h.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def default_export_dir(model_name: str, height: int, width: int, dtype) -> Path:
    """`$NETI_FAST_CACHE/exports/<model>-<h>x<w>-<dtype>`: one folder per (model, size, dtype); the
    fingerprint in it decides whether an export is reused."""
    import hashlib

    from neti_fast.sd.models import _cache_root
    tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(model_name))[-40:]
    tag += "-" + hashlib.sha1(str(model_name).encode()).hexdigest()[:8]
    return _cache_root() / "exports" / f"{tag}-{height}x{width}-{str(dtype).replace('torch.', '')}"


def export_cached(model, out_dir, name: str = "unet_tables.onnx", height: int | None = None, width: int | None = None,
                  opset: int | None = None, optimize: bool = True, force: bool = False) -> Path:
    """`out_dir/name`, exported only when missing or when its sidecar's fingerprint differs.

    Sidecar: `out_dir/name.json` = {"fingerprint", "exporter", "onnx_bytes"}; written after the
    model, so a crash mid-export leaves no sidecar and the next call exports again.
    """
    check_exportable(model)
    out_dir = Path(out_dir)
    path, side = out_dir / name, out_dir / (name + ".json")
    fp = fingerprint(model, height, width, opset, optimize)
    if not force and path.exists() and side.exists():
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError):
            meta = {}
        if meta.get("fingerprint") == fp and meta.get("onnx_bytes") == path.stat().st_size:
            return path
    if side.exists():
        side.unlink()  # the export below replaces the model: never leave a sidecar vouching for it early
    export_onnx(model, path, height=height, width=width, opset=opset, optimize=optimize)
    meta = {"fingerprint": fp, "exporter": export_onnx.last_exporter, "onnx_bytes": path.stat().st_size}
    tmp = side.with_name(side.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, side)
    return path


# ----------------------------------------------------------------------------- onnxruntime backend

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
       "tensor(double)": np.float64}


class OnnxDenoiser:
    """An exported graph run by onnxruntime, with `TorchDenoiser`'s call signature.

    Providers: CUDAExecutionProvider when onnxruntime-gpu offers it, else CPUExecutionProvider.
    CPU: torch -> numpy views (no copy for contiguous tensors; the tables are shared across steps)
    and the output wrapped back with torch.from_numpy. CUDA: IO binding on the torch tensors' device
    pointers (no host round trip); this path is untested here (no GPU, onnxruntime-gpu not installed).
    Inputs are cast to the graph's dtypes (e.g. an fp32 graph driven by an fp16 engine) and the
    output is returned in the sample's dtype, on the sample's device.
    """

    def __init__(self, path, providers: list | None = None, threads: int | None = None,
                 device: str | torch.device | None = None):
        import onnxruntime as ort
        self.path = str(path)
        dev = torch.device(device) if device is not None else None
        # The CUDA provider runs on its `device_id` (default 0), not on torch's current device:
        # name the device the engine's tensors live on (`--device cuda:1`).
        self.device_id = (dev.index if dev.index is not None else torch.cuda.current_device()) \
            if dev is not None and dev.type == "cuda" else 0
        if providers is None:
            avail = ort.get_available_providers()
            cuda = dev is None or dev.type == "cuda"
            providers = ([("CUDAExecutionProvider", {"device_id": self.device_id})]
                         if cuda and "CUDAExecutionProvider" in avail else []) + ["CPUExecutionProvider"]
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(self.path, so, providers=providers)
        self.cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        ins = {i.name: i for i in self.session.get_inputs()}
        self.added, self.tables = parse_input_names([i.name for i in self.session.get_inputs()], str(path))
        self.names = input_names(self.tables, self.added)
        self.types = {n: _NP[ins[n].type] for n in self.names}
        self.spatial = tuple(ins["sample"].shape[2:])  # fixed at export, e.g. (64, 64) for SD 1.5 at 512

    def _check(self, x):
        if tuple(x.shape[2:]) != self.spatial:
            raise ValueError(f"{self.path}: exported for latents {self.spatial[0]}x{self.spatial[1]}, got "
                             f"{x.shape[2]}x{x.shape[3]} (re-export with that --height/--width)")

    def inputs(self, x, t, row_idx, k_tables, v_tables, added: dict | None = None) -> list:
        return ordered_inputs(self.added, self.tables, x, t, row_idx, k_tables, v_tables, added, self.path)

    def __call__(self, x, t, row_idx, k_tables, v_tables, added: dict | None = None):
        """`added`: the family's added conditioning by name (SDXL: text_embeds, time_ids), as the
        Engine passes it to every denoiser; None where the graph has none."""
        self._check(x)
        tensors = self.inputs(x, t, row_idx, k_tables, v_tables, added)
        if self.cuda and x.is_cuda:
            return self._run_cuda(x, tensors)
        feed = {}
        for n, v in zip(self.names, tensors):
            a = v.detach().cpu().numpy()  # a view for CPU tensors
            feed[n] = np.ascontiguousarray(a, dtype=self.types[n])
        eps = self.session.run(OUTPUT_NAMES, feed)[0]
        return torch.from_numpy(eps).to(device=x.device, dtype=x.dtype)

    def _run_cuda(self, x, tensors):  # untested here: needs onnxruntime-gpu and a GPU
        dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
        if dev != self.device_id:
            raise ValueError(f"{self.path}: onnxruntime session on cuda:{self.device_id}, tensors on cuda:{dev} "
                             "(pass device= to OnnxDenoiser)")
        to_torch = {np.float32: torch.float32, np.float16: torch.float16, np.int64: torch.int64, np.float64: torch.float64}
        binding = self.session.io_binding()
        keep = []
        for n, v in zip(self.names, tensors):
            v = v.to(device=x.device, dtype=to_torch[self.types[n]]).contiguous()
            keep.append(v)
            binding.bind_input(n, "cuda", dev, self.types[n], tuple(v.shape), v.data_ptr())
        out_t = self.session.get_outputs()[0].type
        out = torch.empty(x.shape, device=x.device, dtype=to_torch[_NP[out_t]])
        binding.bind_output(OUTPUT_NAMES[0], "cuda", dev, _NP[out_t], tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(x.device).synchronize()  # inputs written by torch's stream are ready
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return out.to(x.dtype)
