"""Training speed and memory: neti-fast's trainer against the official NeTI algorithm, side by side.

    python -m neti_fast.bench.training [--models tiny sd15-shaped] [--resolution 64] [--batch-size 2]
                                       [--repeats 3] [--compile] [--json out.json]
    python -m neti_fast.bench.training --memory-model [--resolution 512]   (item 4: counted, no compute)

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
`--memory-model` counts the same for one micro-batch of sd15-shaped on the meta device (no
memory, no arithmetic) at --resolution, with and without gradient checkpointing, and adds the
parameters (frozen models, mapper, its gradients and AdamW state): a model, labelled so, not a
measurement.
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
    return [p for mod in (m.unet, m.vae, m.text_encoder) for p in mod.parameters()] + run.trainable.parameters()


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


def memory_model(resolution: int = 512, batch: int = 2, dtype_name: str = "float32") -> dict:
    """Counted bytes of one training micro-batch of sd15-shaped on the meta device."""
    import torch

    from .roofline import meta_models
    from neti_fast.concepts.mapper import MapperConfig, NeTIMapper
    from neti_fast.sd.attention import install_processors
    from neti_fast.sd.conditioning import encode
    from neti_fast.sd.families import SD1
    from neti_fast.sd.models import Model
    from neti_fast.training.trainer import checkpointing
    dtype = getattr(torch, dtype_name)
    text, unet, vae, cfg = meta_models("sd15-shaped", dtype)
    NUM_LAYERS = SD1.num_layers
    text = text.float()  # the text encoder stays fp32 (as official); autocast on CUDA
    D = cfg["unet"]["cross_attention_dim"]
    with torch.device("meta"):
        mapper = NeTIMapper(MapperConfig(output_dim=D, num_layers=NUM_LAYERS, target_norm=0.4)).float()
    model = Model(None, text, unet, vae, {}, name="sd15-shaped (meta)")
    state = install_processors(model)

    def nbytes(mods):
        return sum(p.numel() * p.element_size() for m in mods for p in m.parameters())
    frozen = nbytes([text, unet, vae])
    mapper_b = nbytes([mapper])
    out = {"model": "sd15-shaped", "resolution": resolution, "batch_size": batch, "dtype": dtype_name,
           "kind": "model: bytes counted on the meta device, not measured",
           "frozen_param_bytes": frozen, "mapper_param_bytes": mapper_b,
           "mapper_grad_and_adamw_bytes": 3 * mapper_b, "rows": []}
    h = resolution // 8
    for ckpt in (False, True):
        if ckpt:  # as the trainer's _prepare_model
            unet.enable_gradient_checkpointing()
            checkpointing(text, True)
            unet.train()
            text.train()
        x = torch.empty(batch, 4, h, h, device="meta", dtype=dtype)
        t = torch.zeros(batch, device="meta")
        ids = torch.zeros(batch * NUM_LAYERS, 77, dtype=torch.long, device="meta")
        slot = torch.zeros(batch * NUM_LAYERS, 77, dtype=torch.bool, device="meta")
        params = [p for m in (text, unet, vae) for p in m.parameters()] + list(mapper.parameters())
        with saved_bytes(params) as c, _memory_efficient_sdpa():
            tl = torch.arange(NUM_LAYERS, device="meta").repeat_interleave(batch).float()
            token, bypass = mapper(t.repeat(NUM_LAYERS), tl)
            e, eb = encode(text, ids, slot, token, bypass)
            state.mode = "layers"
            state.enc = [z.to(dtype) for z in e.split(batch)]
            state.enc_bypass = [z.to(dtype) for z in eb.split(batch)]
            pred = unet(x, t, encoder_hidden_states=state.enc[0]).sample
            pred.float().square().mean()
        state.mode, state.enc, state.enc_bypass = "plain", None, None
        total = frozen + 4 * mapper_b + c.bytes
        out["rows"].append({"gradient_checkpointing": ckpt, "activation_bytes": c.bytes, "total_bytes": total})
        if ckpt:
            unet.disable_gradient_checkpointing()
            checkpointing(text, False)
            unet.eval()
            text.eval()
    return out


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
    p.add_argument("--memory-model", action="store_true", help="only the counted memory of sd15-shaped (item 4)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.resolution is None:
        args.resolution = 512 if args.memory_model else 64
    if args.memory_model:
        res = {"memory_model": [memory_model(args.resolution, args.batch_size, d) for d in ("float32", "float16")]}
        for m in res["memory_model"]:
            print(f"sd15-shaped {m['resolution']}x{m['resolution']} batch {m['batch_size']} {m['dtype']} ({m['kind']}): "
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
