"""Training speed and memory: neti-fast's trainer against the official NeTI algorithm, side by side.

    python -m neti_fast.bench.training [--models tiny sd15-shaped] [--resolution 64] [--batch-size 2]
                                       [--repeats 3] [--compile] [--json out.json]
    python -m neti_fast.bench.training --memory-model [--model sd15-shaped] [--resolution 512]   (counted, no compute)
    python -m neti_fast.bench.training --peak-memory --model sdxl-shaped [--resolution 128]
        [--dtypes bfloat16 float32] [--text-dtypes float32 same] [--checkpointing off on] [--max-gib 12]
        [--gpu-resolution 1024]      (issue 21 item 8: measured on CPU + the counted GPU estimate)

One process, one model, one NeTI concept and one training run's data per model; the variants'
optimizer steps alternate round by round (so drift of the machine does not enter the ratios):

  official        the official coach's algorithm, transcribed in `official_micro_step`: every
                  micro-batch the VAE encodes the batch's pixels, and the text encoder runs once per
                  U-Net cross-attention layer (16 sequential passes of B captions, each with the
                  mapper's (t, l) token and bypass), then the U-Net with layer l's keys from pass l.
  batched         the 16 passes as one CLIP batch of 16 B (neti-fast's trainer before issue 20: the
                  VAE still encodes every micro-batch).
  neti-fast       the trainer as it is (`trainer._optimizer_step`): batched, and the VAE latent
                  distributions of every image and its mirror image computed once (cached).
  channels-last   neti-fast + U-Net and VAE in channels-last memory format.
  checkpointing   neti-fast + gradient checkpointing of the U-Net.
  compile         neti-fast + torch.compile of the U-Net (only with --compile: slow to compile).

All variants compute the same loss and gradients (up to rounding; tests/bench/test_training.py
checks `official` against the trainer). Per variant: seconds per optimizer step (median over
--repeats rounds, after a warm-up round, and the fastest round; --grad-accum micro-batches of
--batch-size each, default 1 x 2), steps/s, the ratio to `official` (of the medians, and of the
fastest rounds: the better estimate on a busy machine), and memory:
  counted activations  bytes of the tensors saved for backward during one micro-batch (autograd's
                       saved-tensor hooks; storages counted once; parameters excluded): what the
                       backward pass keeps alive at its start. With checkpointing the backward
                       pass recomputes one block at a time on top of that (not in the count).
  cuda peak            (CUDA only) torch.cuda.max_memory_allocated during the step over the
                       allocation before it.
`--memory-model` counts the same for one micro-batch of --model on the meta device (no
memory, no arithmetic) at --resolution, with and without gradient checkpointing, and adds the
parameters (frozen models, mapper, its gradients and AdamW state): a model, labelled so, not a
measurement. With checkpointing it adds the largest checkpointed unit's own saved bytes (a
ResNet block, transformer block or CLIP layer: what the backward pass recomputes at once).
`--peak-memory` measures: one fresh process per setting builds the model (a *-shaped one with
its random weights drawn in the setting's dtype), sets up a NeTI run (batch 1, 3 images) and runs
ONE optimizer step on CPU; it reports the resident memory after loading (the baseline), the peak
(getrusage ru_maxrss, the process's high-water mark) after the step, and their difference, beside
the counted estimate at the same size; then the GPU estimate (counted, not measured) at
--gpu-resolution with the U-Net / VAE in fp16 and the text encoders fp32 (the default: autocast
computes them in fp16) or fp16 (--text-dtype float16). Not in the estimate: the CUDA context and
kernels' workspace, allocator fragmentation, and the gradient buffers of the backward pass beyond
the saved activations (the CPU runs show how much the measured step exceeds the count).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import time
from pathlib import Path

VARIANTS = ("official", "batched", "neti-fast", "channels-last", "checkpointing", "compile")


# ----------------------------------------------------------------------------- the official algorithm

def official_micro_step(run, state, batched_text: bool = False) -> float:
    """One micro-batch as the official coach computes it (training/coach.py, Coach.train and
    get_text_conditioning), with neti-fast's objects: VAE-encode the batch and sample its latents,
    noise and timesteps; one text-encoder pass per U-Net layer (or one batch of all 16 with
    `batched_text`); the U-Net; MSE to the noise (or v); backward of loss / grad_accum.
    Random draws in the trainer's order and from its generators, so it matches the trainer."""
    import torch

    from neti_fast.sd.conditioning import encode, tokenize
    from neti_fast.training.trainer import _text_rows
    cfg, m, gen, sched = run.cfg, run.model, run.train_gen, run.noise_sched
    device, dtype = m.device, m.unet.dtype
    pixels, captions = run.dataset.next_batch(cfg.batch_size)
    B = len(captions)
    with torch.no_grad():
        latents = m.vae.encode(pixels.to(device, m.vae.dtype)).latent_dist.sample(generator=gen)
        latents = latents * m.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
    t = torch.randint(0, sched.config.num_train_timesteps, (B,), generator=gen).to(device)
    noisy = sched.add_noise(latents, noise, t)
    toks = [tokenize(run.tokenizers[0], c, [cfg.placeholder]) for c in captions]   # SD 1.x: one text encoder
    ids, mask = torch.stack([x.input_ids for x in toks]), torch.stack([x.mask for x in toks])
    if batched_text:
        enc, enc_b, _ = _text_rows(run, [ids], mask, t, B)
    else:
        enc, enc_b = [], []
        for layer in range(m.family.num_layers):  # the coach's loop over UNET_LAYERS: one CLIP pass each
            token, bypass = run.trainable.layer_rows(t, layer)
            e, eb = encode(m.text_encoder, ids, mask, token, bypass)
            enc.append(e)
            enc_b.append(eb)
    state.mode, state.enc, state.enc_bypass = "layers", [x.to(dtype) for x in enc], [x.to(dtype) for x in enc_b]
    pred = run.unet(noisy.to(dtype), t, encoder_hidden_states=state.enc[0]).sample
    target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")
    (loss / cfg.grad_accum).backward()
    return float(loss.detach()) / cfg.grad_accum


def official_optimizer_step(run, state, batched_text: bool = False) -> float:
    total = sum(official_micro_step(run, state, batched_text) for _ in range(run.cfg.grad_accum))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return total


# ----------------------------------------------------------------------------- counting memory

@contextlib.contextmanager
def saved_bytes(params):
    """Bytes of the distinct storages autograd saves for backward inside the block (parameters
    excluded); read `.bytes` of the yielded object after the block."""
    import torch
    skip = {p.untyped_storage()._cdata for p in params}
    seen: dict[int, int] = {}

    class Count:
        bytes = 0

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in skip and s._cdata not in seen:
            seen[s._cdata] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield Count
    Count.bytes = sum(seen.values())


def _all_params(run):
    m = run.model
    return [p for mod in (m.unet, m.vae, *m.text_encoders) for p in mod.parameters()] + run.trainable.parameters()


# ----------------------------------------------------------------------------- the side-by-side run

def setup_run(model, resolution: int, batch: int, accum: int, images_dir: Path, seed: int = 0):
    """A training run's state (trainer._setup) on `model`, as `neti-fast train` would start it."""
    import torch

    from neti_fast.engine.distributed import setup_distributed
    from neti_fast.sd.attention import install_processors
    from neti_fast.training.config import TrainConfig
    from neti_fast.training.data import load_images
    from neti_fast.training.trainer import _setup
    cfg = TrainConfig(images=str(images_dir), placeholder="<bench>", init_word="cat", model=model.name,
                      batch_size=batch, grad_accum=accum, resolution=resolution, steps=1000, device="cpu",
                      seed=seed)
    dd = setup_distributed("cpu")
    run = _setup(cfg, model, dd, load_images(images_dir), None)
    state = install_processors(model)
    torch.manual_seed(seed)
    return run, state, dd


def write_images(d: Path, n: int = 4) -> Path:
    import numpy as np
    from PIL import Image
    d.mkdir(parents=True, exist_ok=True)
    rs = np.random.RandomState(0)
    for i in range(n):
        Image.fromarray((rs.rand(96, 96, 3) * 255).astype(np.uint8)).save(d / f"{i}.png")
    return d


@contextlib.contextmanager
def _variant(run, name: str, compiled=None):
    """The model settings of one variant for the duration of its step."""
    from neti_fast.training.trainer import _prepare_model
    cfg = dataclasses.replace(run.cfg, channels_last=name == "channels-last",
                              gradient_checkpointing=name == "checkpointing")
    undo = _prepare_model(cfg, run.model)
    unet = run.unet
    if name == "compile":
        run.unet = compiled
    try:
        yield
    finally:
        run.unet = unet
        undo()


def _step(run, state, dd, name: str) -> float:
    from neti_fast.training.trainer import _optimizer_step
    if name == "official":
        return official_optimizer_step(run, state)
    if name == "batched":
        return official_optimizer_step(run, state, batched_text=True)
    return _optimizer_step(run, state, 0, dd)[0]


def measure_model(model_name: str, resolution: int, batch: int, accum: int, repeats: int, variants, work: Path,
                  log=print) -> dict:
    import torch

    from neti_fast.sd.models import load_model
    run, state, dd = setup_run(load_model(model_name), resolution, batch, accum, write_images(work / "images"))
    compiled = torch.compile(run.model.unet) if "compile" in variants else None
    cuda = run.model.device.type == "cuda"
    times = {v: [] for v in variants}
    mem: dict[str, dict] = {}
    for rnd in range(repeats + 1):  # round 0 warms up (and compiles)
        for v in variants:
            with _variant(run, v, compiled):
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                _step(run, state, dd, v)
                if cuda:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                if rnd:
                    times[v].append(dt)
                if cuda and rnd == 1:
                    mem.setdefault(v, {})["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - base
        log(f"  {model_name} round {rnd}: " + ", ".join(f"{v} {times[v][-1]:.2f}s" for v in variants if rnd))
    for v in variants:  # counted activations of one micro-batch per variant (not timed)
        from neti_fast.training.trainer import _micro_step
        run.cfg = dataclasses.replace(run.cfg, grad_accum=1)
        with _variant(run, v, compiled), saved_bytes(_all_params(run)) as c:
            if v in ("official", "batched"):
                official_micro_step(run, state, batched_text=v == "batched")
            else:
                _micro_step(run, state)
        run.cfg = dataclasses.replace(run.cfg, grad_accum=accum)
        run.optimizer.zero_grad(set_to_none=True)
        mem.setdefault(v, {})["counted_activation_bytes"] = c.bytes
    state.mode, state.enc, state.enc_bypass = "plain", None, None
    rows = []
    ref = statistics.median(times["official"]) if "official" in times else None
    for v in variants:
        s = statistics.median(times[v])
        rows.append({"variant": v, "s_per_step": s, "s_per_step_min": min(times[v]), "steps_per_s": 1 / s,
                     "times": times[v], "vs_official": (ref / s) if ref else None,
                     "vs_official_min": (min(times["official"]) / min(times[v])) if ref else None, **mem.get(v, {})})
    return {"model": model_name, "resolution": resolution, "batch_size": batch, "grad_accum": accum,
            "rows": rows}


# ----------------------------------------------------------------------------- memory model (item 4)

@contextlib.contextmanager
def _memory_efficient_sdpa():
    """On the meta device SDPA falls back to the math kernel, which keeps the [N, N] attention
    probabilities for backward; on a GPU the flash / memory-efficient kernels keep only the output
    and the log-sum-exp. Route unmasked SDPA to the memory-efficient op so the count is the GPU's."""
    import torch
    import torch.nn.functional as F
    plain = F.scaled_dot_product_attention

    def efficient(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if attn_mask is not None or is_causal or dropout_p or kw:
            return plain(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=scale)[0]
    F.scaled_dot_product_attention = efficient
    try:
        yield
    finally:
        F.scaled_dot_product_attention = plain


def meta_model(name: str, dtype, text_dtype=None):
    """The built-in `name` (tiny*, *-shaped) on the meta device (no memory, no init cost) as a
    `Model`: frozen networks in `dtype`, text encoders in `text_dtype` (default `dtype`)."""
    import tempfile

    import torch

    from neti_fast.sd.models import SHAPED, TINY, Model, _build_components, _builtin_configs, _tokenizers
    b = {**TINY, **SHAPED}[name]
    toks = _tokenizers(Path(tempfile.mkdtemp(prefix="neti-bpe-")), b)
    if name in SHAPED:  # the published configs (CLIP's 49408-token vocabulary), as build_shaped
        pad = toks[-1].pad_token_id
        cfg = b.configs() if pad == toks[0].eos_token_id else b.configs(pad=pad)
    else:
        cfg = _builtin_configs(b, toks)
    with torch.device("meta"):
        texts, unet, vae = _build_components(cfg)
    for m in (unet, vae):
        m.to(dtype).eval().requires_grad_(False)
    for te in texts:
        te.to(text_dtype or dtype).eval().requires_grad_(False)
    return Model(toks[0], texts[0], unet, vae, dict(b.scheduler), name=f"{name} (meta)", family=b.family,
                 more_tokenizers=toks[1:], more_text_encoders=texts[1:])


# the modules diffusers / transformers checkpoint one by one (enable_gradient_checkpointing)
_CHECKPOINT_UNITS = ("ResnetBlock2D", "BasicTransformerBlock", "CLIPEncoderLayer")


def memory_model(resolution: int = 512, batch: int = 2, dtype_name: str = "float32", name: str = "sd15-shaped",
                 text_dtype_name: str | None = "float32", text_compute_dtype_name: str | None = None) -> dict:
    """Counted bytes of one NeTI training micro-batch of the built-in `name` on the meta device: the
    family's forward as the trainer runs it (the mapper's rows of every layer through every text
    encoder in one batch, the pooled embedding and time ids where the family has them, the U-Net),
    with and without gradient checkpointing. Parameters: frozen networks in `dtype_name`, text
    encoders in `text_dtype_name` (None: `dtype_name`); activations of the text encoders in
    `text_compute_dtype_name` (default: their weights' dtype; on CUDA the trainer runs them under
    autocast in the U-Net's dtype, so a GPU estimate passes `dtype_name`)."""
    import torch

    from neti_fast.concepts.mapper import MapperConfig, NeTIMapper
    from neti_fast.sd.attention import install_processors
    from neti_fast.sd.encoders import encode_all, pooled_rows
    from neti_fast.training.trainer import checkpointing
    dtype = getattr(torch, dtype_name)
    text_dtype = getattr(torch, text_dtype_name or dtype_name)
    compute = getattr(torch, text_compute_dtype_name) if text_compute_dtype_name else text_dtype
    model = meta_model(name, dtype, compute)  # activations counted in `compute`; weights' bytes below
    fam, D, L = model.family, model.text_dim, model.family.num_layers
    with torch.device("meta"):
        mapper = NeTIMapper(MapperConfig(output_dim=D, num_layers=L, target_norm=0.4)).float()
    state = install_processors(model)
    text, unet, vae = model.text_encoders, model.unet, model.vae

    def numel(mods):
        return sum(p.numel() for m in mods for p in m.parameters())
    tsize = torch.empty((), dtype=text_dtype).element_size()
    dsize = torch.empty((), dtype=dtype).element_size()
    frozen = {"unet": numel([unet]) * dsize, "vae": numel([vae]) * dsize, "text_encoders": numel(text) * tsize}
    mapper_b = numel([mapper]) * 4
    out = {"model": name, "resolution": resolution, "batch_size": batch, "dtype": dtype_name,
           "text_dtype": text_dtype_name or dtype_name, "text_compute_dtype": str(compute).replace("torch.", ""),
           "kind": "estimate, not measured: bytes counted on the meta device",
           "frozen_param_bytes": sum(frozen.values()), "frozen_param_bytes_by_network": frozen,
           "mapper_param_bytes": mapper_b, "mapper_grad_bytes": mapper_b, "adamw_state_bytes": 2 * mapper_b,
           "rows": []}
    h = resolution // model.vae_scale_factor
    params = [p for m in (*text, unet, vae) for p in m.parameters()] + list(mapper.parameters())
    for ckpt in (False, True):
        if ckpt:  # as the trainer's _prepare_model
            unet.enable_gradient_checkpointing()
            unet.train()
            for te in text:
                checkpointing(te, True)
                te.train()
        units, running, seen = [], [0], set()
        skip = {p.untyped_storage()._cdata for p in params}

        def pack(t):
            st = t.untyped_storage()
            if st._cdata not in skip and st._cdata not in seen:
                seen.add(st._cdata)
                running[0] += st.nbytes()
            return t
        hooks = []
        if not ckpt:  # each checkpointed unit's own saved bytes: what the backward pass recomputes at once
            for mod in [m for net in (*text, unet) for m in net.modules() if type(m).__name__ in _CHECKPOINT_UNITS]:
                hooks.append(mod.register_forward_pre_hook(lambda m, a: units.append([running[0], None])))
                hooks.append(mod.register_forward_hook(lambda m, a, o: units[-1].__setitem__(1, running[0])))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _memory_efficient_sdpa():
            x = torch.empty(batch, unet.config.in_channels, h, h, device="meta", dtype=dtype)
            t = torch.zeros(batch, device="meta")
            tl = torch.arange(L, device="meta").repeat_interleave(batch).float()
            token, bypass = mapper(t.repeat(L), tl)
            ids = [torch.zeros(batch * L, 77, dtype=torch.long, device="meta") for _ in text]
            slot = torch.zeros(batch * L, 77, dtype=torch.bool, device="meta")
            e, eb = encode_all(model, ids, slot, token, bypass)
            added = None
            if fam.pooled_layer is not None:
                pooled = pooled_rows(model, [i[:batch] for i in ids], torch.zeros(batch, 77, dtype=torch.long,
                                     device="meta"), token[fam.pooled_layer * batch:(fam.pooled_layer + 1) * batch])
                added = {"text_embeds": pooled.to(dtype), "time_ids": torch.zeros(batch, 6, device="meta", dtype=dtype)}
            state.mode = "layers"
            state.enc = [z.to(dtype) for z in e.split(batch)]
            state.enc_bypass = [z.to(dtype) for z in eb.split(batch)]
            pred = unet(x, t, encoder_hidden_states=state.enc[0], added_cond_kwargs=added).sample
            pred.float().square().mean()
        for hk in hooks:
            hk.remove()
        state.mode, state.enc, state.enc_bypass = "plain", None, None
        row = {"gradient_checkpointing": ckpt, "activation_bytes": running[0]}
        if not ckpt:
            out["largest_unit_bytes"] = max((b - a for a, b in units if b is not None), default=0)
        else:  # the backward pass recomputes one unit at a time on top of the saved boundaries
            row["recompute_bytes"] = out["largest_unit_bytes"]
        row["total_bytes"] = (out["frozen_param_bytes"] + 4 * mapper_b + row["activation_bytes"]
                              + row.get("recompute_bytes", 0))
        out["rows"].append(row)
        if ckpt:
            unet.disable_gradient_checkpointing()
            unet.eval()
            for te in text:
                checkpointing(te, False)
                te.eval()
    return out


# ----------------------------------------------------------------------------- measured peak memory (item 8)

def _rss_bytes() -> int:
    """This process's resident memory now (Linux /proc/self/statm)."""
    import os
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    """This process's peak resident memory so far (getrusage: KiB on Linux)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _frozen_model(name: str, dtype_name: str, text_dtype_name: str):
    """The frozen networks as the trainer holds them: U-Net / VAE in `dtype_name`, text encoders in
    `text_dtype_name`. A *-shaped model's random weights are drawn straight in `dtype_name` (a
    float32 build first would set this process's peak memory above the training step's)."""
    import torch

    from neti_fast.sd.models import SHAPED, build_shaped, load_model
    dtype = getattr(torch, dtype_name)
    if name in SHAPED:
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = build_shaped(name)
        finally:
            torch.set_default_dtype(prev)
        model.to(dtype=dtype)
        for m in (*model.text_encoders, model.unet, model.vae):
            m.eval().requires_grad_(False)
    else:
        model = load_model(name, "cpu", dtype)
    for te in model.text_encoders:
        te.to(getattr(torch, text_dtype_name))
    return model


def peak_memory_step(name: str, resolution: int, dtype_name: str, text_dtype_name: str, ckpt: bool,
                     work: Path) -> dict:
    """Build `name`, set up a NeTI run (batch 1, no accumulation, 3 images), run ONE optimizer step
    on CPU and report this process's memory: resident after loading and setup (the baseline) and
    the peak (ru_maxrss) after the step, with and minus the baseline. Meant for a fresh process
    (`--peak-memory` starts one per setting): ru_maxrss is the process's high-water mark."""
    import gc

    import torch

    from neti_fast.training.trainer import _optimizer_step, _prepare_model
    rss_start = _rss_bytes()
    t0 = time.perf_counter()
    model = _frozen_model(name, dtype_name, text_dtype_name)
    run, state, dd = setup_run(model, resolution, 1, 1, write_images(work / "images", 3))
    run.cfg = dataclasses.replace(run.cfg, gradient_checkpointing=ckpt, dtype=dtype_name, text_dtype=text_dtype_name)
    undo = _prepare_model(run.cfg, model)
    gc.collect()
    load_s = time.perf_counter() - t0
    rss_loaded, max_loaded = _rss_bytes(), _maxrss_bytes()
    t0 = time.perf_counter()
    with saved_bytes(_all_params(run)) as c:
        loss, _ = _optimizer_step(run, state, 0, dd)
    step_s = time.perf_counter() - t0
    max_after, rss_after = _maxrss_bytes(), _rss_bytes()
    undo()
    state.mode, state.enc, state.enc_bypass = "plain", None, None

    def nbytes(mods):
        return sum(p.numel() * p.element_size() for m in mods for p in m.parameters())
    params = run.trainable.parameters()
    adam = sum(v.numel() * v.element_size() for p in params for v in run.optimizer.state[p].values()
               if torch.is_tensor(v) and v.ndim)
    return {"model": name, "resolution": resolution, "batch_size": 1, "grad_accum": 1, "method": "neti",
            "dtype": dtype_name, "text_dtype": text_dtype_name, "gradient_checkpointing": ckpt,
            "kind": "measured on CPU (resident memory of a fresh process)",
            "loss": loss, "load_s": load_s, "step_s": step_s, "threads": torch.get_num_threads(),
            "rss_at_start_bytes": rss_start, "rss_after_load_bytes": rss_loaded,
            "maxrss_after_load_bytes": max_loaded, "maxrss_after_step_bytes": max_after,
            "rss_after_step_bytes": rss_after,
            "step_peak_above_loaded_bytes": max_after - rss_loaded,
            "step_peak_hidden_by_load": max_after <= max_loaded,
            "counted": {"unet_param_bytes": nbytes([model.unet]), "vae_param_bytes": nbytes([model.vae]),
                        "text_encoder_param_bytes": nbytes(model.text_encoders),
                        "mapper_param_bytes": sum(p.numel() * p.element_size() for p in params),
                        "mapper_param_dtype": str(params[0].dtype).replace("torch.", ""),
                        "adamw_state_bytes": adam, "saved_activation_bytes": c.bytes}}


def peak_memory(name: str, resolution: int, settings, gpu_resolution: int = 1024, log=print, max_bytes: int | None = None) -> dict:
    """One fresh subprocess per (dtype, text dtype, checkpointing) setting measuring ONE training
    step (peak_memory_step), skipped with the reason when the counted need (meta-device estimate at
    the same size, + 50% of its activations + 1.5 GiB for the runtime) is above `max_bytes` or the machine's available memory; then the
    GPU estimate (counted, not measured) at `gpu_resolution`, fp16, with and without checkpointing."""
    import platform
    import subprocess
    import sys
    import tempfile

    import torch
    rows = []
    for dtype_name, text_dtype_name, ckpt in settings:
        est = memory_model(resolution, 1, dtype_name, name, text_dtype_name)
        e = est["rows"][int(ckpt)]  # + the Python / torch runtime (~0.6 GiB) and a margin on the activations
        need = int(e["total_bytes"] + 0.5 * (e["activation_bytes"] + e.get("recompute_bytes", 0)) + 1.5 * 2**30)
        avail = _available_bytes()
        tag = f"{name} {resolution}x{resolution} dtype {dtype_name}, text {text_dtype_name}, " \
              f"checkpointing {'on' if ckpt else 'off'}"
        if max_bytes is not None and need > max_bytes:
            log(f"  {tag}: skipped (needs ~{_gib(need)}, over --max-gib {_gib(max_bytes)})")
            rows.append({"dtype": dtype_name, "text_dtype": text_dtype_name, "gradient_checkpointing": ckpt,
                         "skipped": f"needs ~{_gib(need)} (counted estimate + 50% of its activations + 1.5 GiB), over the "
                                    f"--max-gib cap of {_gib(max_bytes)} (a machine shared with other jobs)"})
            continue
        if avail is not None and avail < need:
            log(f"  {tag}: skipped (needs ~{_gib(need)}, {_gib(avail)} available)")
            rows.append({"dtype": dtype_name, "text_dtype": text_dtype_name, "gradient_checkpointing": ckpt,
                         "skipped": f"needs ~{_gib(need)} (counted estimate + 50% of its activations + 1.5 GiB), {_gib(avail)} available"})
            continue
        with tempfile.TemporaryDirectory() as work:
            spec = json.dumps([name, resolution, dtype_name, text_dtype_name, ckpt, work])
            proc = subprocess.run([sys.executable, "-m", "neti_fast.bench.training", "--peak-memory-child", spec],
                                  capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{tag}: the measuring process failed:\n{proc.stderr[-2000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        e = est["rows"][int(ckpt)]
        row["estimate_same_size"] = {"frozen_param_bytes": est["frozen_param_bytes"],
                                     "mapper_param_bytes": est["mapper_param_bytes"], **e,
                                     # what the step adds to the loaded run: activations (+ one unit
                                     # recomputed), the mapper's gradients and AdamW's two moments
                                     "step_bytes": e["activation_bytes"] + e.get("recompute_bytes", 0)
                                     + 3 * est["mapper_param_bytes"]}
        rows.append(row)
        log(f"  {tag}: peak {_gib(row['maxrss_after_step_bytes'])} (after load {_gib(row['rss_after_load_bytes'])}, "
            f"step +{_gib(row['step_peak_above_loaded_bytes'])}), step {row['step_s']:.1f}s")
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else None
    import diffusers
    gpu = [memory_model(gpu_resolution, 1, "float16", name, "float32", "float16"),
           memory_model(gpu_resolution, 1, "float16", name, "float16")]
    return {"model": name, "resolution": resolution, "device": "cpu", "cpu": cpu, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "measured": rows,
            "gpu_estimate": {"kind": "estimate, not measured: counted sizes (meta device), no GPU was used",
                             "resolution": gpu_resolution, "models": gpu}}


def format_peak(res: dict) -> str:
    lines = [f"{res['model']}: ONE NeTI training step (batch 1) at {res['resolution']}x{res['resolution']}, "
             f"measured on CPU ({res['cpu']}, torch {res['torch']}, {res['date']})",
             f"  {'dtype':<10}{'text':<10}{'ckpt':<6}{'after load':>12}{'peak':>12}{'step adds':>12}"
             f"{'(counted)':>12}{'step s':>8}"]
    for r in res["measured"]:
        if "skipped" in r:
            lines.append(f"  {r['dtype']:<10}{r['text_dtype']:<10}{'on' if r['gradient_checkpointing'] else 'off':<6}"
                         f"  skipped: {r['skipped']}")
            continue
        lines.append(f"  {r['dtype']:<10}{r['text_dtype']:<10}{'on' if r['gradient_checkpointing'] else 'off':<6}"
                     f"{_gib(r['rss_after_load_bytes']):>12}{_gib(r['maxrss_after_step_bytes']):>12}"
                     f"{_gib(r['step_peak_above_loaded_bytes']):>12}{_gib(r['estimate_same_size']['step_bytes']):>12}"
                     f"{r['step_s']:>8.1f}")
    g = res["gpu_estimate"]
    lines.append(f"GPU {g['kind']}; {g['resolution']}x{g['resolution']}, batch 1, U-Net / VAE fp16:")
    for m in g["models"]:
        lines.append(f"  text encoders {m['text_dtype']} (activations {m['text_compute_dtype']}): frozen params "
                     f"{_gib(m['frozen_param_bytes'])}, mapper + grads + AdamW {_gib(4 * m['mapper_param_bytes'])}")
        for r in m["rows"]:
            extra = f" + recompute {_gib(r['recompute_bytes'])}" if "recompute_bytes" in r else ""
            lines.append(f"    checkpointing {'on ' if r['gradient_checkpointing'] else 'off'}: activations "
                         f"{_gib(r['activation_bytes'])}{extra}, total {_gib(r['total_bytes'])} (estimate)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

def _gib(b):
    if b is None:
        return "-"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def format_table(res: dict) -> str:
    lines = []
    for r in res["models"]:
        lines.append(f"{r['model']} at {r['resolution']}x{r['resolution']}, batch {r['batch_size']} x "
                     f"accumulation {r['grad_accum']} (CPU: {res['threads']} threads)")
        lines.append(f"  {'variant':<15}{'s/step':>9}{'(min)':>9}{'steps/s':>9}{'vs official':>13}{'(of mins)':>11}"
                     f"{'activations':>14}")
        for row in r["rows"]:
            lines.append(f"  {row['variant']:<15}{row['s_per_step']:>9.3f}{row['s_per_step_min']:>9.3f}"
                         f"{row['steps_per_s']:>9.3f}{row['vs_official']:>12.2f}x{row['vs_official_min']:>10.2f}x"
                         f"{_gib(row['counted_activation_bytes']):>14}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    import tempfile

    import torch
    p = argparse.ArgumentParser(prog="python -m neti_fast.bench.training", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "sd15-shaped"])
    p.add_argument("--resolution", type=int, default=None, help="default 64 (speed), 512 (--memory-model)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "compile"], choices=VARIANTS)
    p.add_argument("--compile", action="store_true", help="add the compile variant")
    p.add_argument("--memory-model", action="store_true", help="only the counted memory of --model (item 4)")
    p.add_argument("--model", default="sd15-shaped",
                   help="--memory-model / --peak-memory: a built-in model (default sd15-shaped)")
    p.add_argument("--peak-memory", action="store_true",
                   help="measure the peak memory of ONE training step on CPU, a fresh process per setting "
                        "(--dtypes x --text-dtypes x --checkpointing), and print the counted GPU estimate")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--text-dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "same"],
                   help="text encoders' dtype per setting (same: the --dtypes one)")
    p.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--max-gib", type=float, default=None,
                   help="--peak-memory: skip a setting whose counted need is above this (a shared machine)")
    p.add_argument("--gpu-resolution", type=int, default=1024, help="--peak-memory: size of the GPU estimate")
    p.add_argument("--peak-memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.peak_memory_child:  # one measurement in this fresh process: its JSON on the last line
        name, res_, d, td, ck, work = json.loads(args.peak_memory_child)
        print(json.dumps(peak_memory_step(name, res_, d, td, ck, Path(work))))
        return {}
    if args.resolution is None:
        args.resolution = 512 if args.memory_model else 128 if args.peak_memory else 64
    if args.peak_memory:
        settings = [(d, d if td == "same" else td, c == "on") for d in args.dtypes for td in args.text_dtypes
                    for c in args.checkpointing]
        res = peak_memory(args.model, args.resolution, list(dict.fromkeys(settings)), args.gpu_resolution,
                          max_bytes=None if args.max_gib is None else int(args.max_gib * 2**30))
        print(format_peak(res))
    elif args.memory_model:
        res = {"memory_model": [memory_model(args.resolution, args.batch_size, d, args.model)
                                for d in ("float32", "float16")]}
        for m in res["memory_model"]:
            print(f"{m['model']} {m['resolution']}x{m['resolution']} batch {m['batch_size']} {m['dtype']} ({m['kind']}): "
                  f"frozen params {_gib(m['frozen_param_bytes'])}, mapper + grads + AdamW "
                  f"{_gib(4 * m['mapper_param_bytes'])}")
            for r in m["rows"]:
                print(f"  gradient checkpointing {'on ' if r['gradient_checkpointing'] else 'off'}: activations "
                      f"{_gib(r['activation_bytes'])}, total {_gib(r['total_bytes'])}")
    else:
        variants = list(dict.fromkeys(args.variants + (["compile"] if args.compile else [])))
        if "official" not in variants:
            variants.insert(0, "official")
        with tempfile.TemporaryDirectory() as work:
            res = {"threads": torch.get_num_threads(), "device": "cpu", "torch": torch.__version__,
                   "models": [measure_model(m, args.resolution, args.batch_size, args.grad_accum, args.repeats,
                                            variants, Path(work) / m) for m in args.models]}
        print(format_table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
