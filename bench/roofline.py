"""A roofline model of the ladder's rungs: FLOPs and bytes counted per operator, time predicted.

    python -m neti_fast.bench.roofline [--model sd15-shaped] [--height 512] [--steps 50]
        [--batch-sizes 1 4 16] [--measured bench/results/X.json] [--json out.json]
    python -m neti_fast.bench.roofline --model sdxl-shaped [--height 1024] [--steps 50]

THIS IS A MODEL, NOT A MEASUREMENT. For every aten operator of one U-Net call (at the U-Net batch
each rung uses), one CLIP text-encoder pass and one VAE decode, run on PyTorch's `meta` device (no
weights, no compute: shapes only), it counts
  - FLOPs, with torch.utils.flop_counter's formulas (matmul, conv, attention; 2 per multiply-add),
  - bytes, as every tensor an operator reads plus what it writes (views are free), i.e. no fusion
    and no cache reuse across operators: an upper bound of memory traffic for an unfused graph,
and predicts each operator's time as max(FLOPs / peak compute, bytes / peak bandwidth). A rung's
time per image is its counted work: U-Net calls x a call's time, text-encoder rows x a row's time,
one VAE decode. The call and row counts are the ladder's own (`unet_calls`, `text_encoder_rows` in
a ladder JSON given with --measured, whose measured images/s is printed beside the model for the
device it names, in the dtype it ran), or else the counts each rung's algorithm implies (see
`implied_counts`; fp16).

Peaks: dense bf16/fp16 tensor-core matmul as measured (H100 SXM about 794 TFLOP/s, the figure the
GPU targets use; H200 is the same GH100 compute at 4.8 TB/s instead of 3.35 TB/s HBM).
CLIP rows are counted as full 77-token passes: neti-fast's batched conditioning shares the prompt's
prefix and CLIP's first layer across rows, so for the NeTI rungs this overestimates its text work.

`--model sdxl-shaped` prints one line instead of the ladder (`sdxl_conditioning`): for one SDXL
image, the work of NeTI's conditioning (both text encoders, CLIP ViT-L at width 768 and OpenCLIP
bigG at 1280, run once per (step, cross-attention module): 11 modules x steps rows, plus the
negative prompt) beside the U-Net's (steps calls at batch 2 for guidance) and the VAE decode's, as
a share of the image's FLOPs and of its modeled time. The architecture is SDXL base 1.0's public
config on the meta device; again a model, not a measurement.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

DEVICES = {  # name: (dense fp16/bf16 matmul FLOP/s, HBM bytes/s)
    "H100-SXM": (794e12, 3.35e12),
    "H200": (794e12, 4.8e12),
}
_FREE = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "as_strided", "detach", "alias",
         "slice", "select", "unsqueeze", "squeeze", "reshape", "_reshape_alias", "split", "split_with_sizes",
         "chunk", "unbind", "lift_fresh", "empty", "empty_like", "zeros", "ones", "full", "arange",
         "scalar_tensor", "_to_copy", "contiguous", "clone", "lift_fresh_copy"}


@dataclass
class Work:
    flops: float = 0.0
    bytes: float = 0.0
    ops: list = None   # (flops, bytes) per operator

    def seconds(self, peak_flops: float, bandwidth: float) -> float:
        return sum(max(f / peak_flops, b / bandwidth) for f, b in self.ops)


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(y) for y in x)
    return 0


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _FREE:
            return out
        f = 0
        formula = flop_registry.get(func.overloadpacket)
        if formula is not None:
            f = formula(*args, **kwargs, out_val=out)  # the registry's wrapper reads the shapes
        b = _nbytes(list(args)) + _nbytes(list(kwargs.values())) + _nbytes(out)
        self.ops.append((float(f), float(b)))
        return out


def count(fn) -> Work:
    with torch.no_grad(), _Counter() as c:
        fn()
    return Work(sum(f for f, _ in c.ops), sum(b for _, b in c.ops), c.ops)


def meta_models(name: str, dtype: torch.dtype):
    """The built-in model's three networks on the meta device, in `dtype` (no memory, no init cost)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from neti_fast.sd.models import sd15_configs, tiny_configs
    cfg = sd15_configs() if name == "sd15-shaped" else tiny_configs(1000, 998, 999)
    with torch.device("meta"):
        text = CLIPTextModel(CLIPTextConfig(**cfg["text"])).to(dtype)
        unet = UNet2DConditionModel(**cfg["unet"]).to(dtype)
        vae = AutoencoderKL(**cfg["vae"]).to(dtype)
    return text, unet, vae, cfg


def network_work(name: str, height: int, width: int, unet_batches, dtype=torch.float16):
    """{('unet', b): Work, ('clip_row',): Work, ('vae',): Work} for the model at height x width."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    text, unet, vae, cfg = meta_models(name, dtype)
    h, w = height // 8, width // 8
    d = cfg["unet"]["cross_attention_dim"]
    out = {}
    with sdpa_kernel(SDPBackend.MATH):  # attention as explicit matmuls: counted by the formulas
        for b in sorted(set(unet_batches)):
            x = torch.empty(b, 4, h, w, device="meta", dtype=dtype)
            enc = torch.empty(b, 77, d, device="meta", dtype=dtype)
            t = torch.empty(b, device="meta", dtype=dtype)
            out[("unet", b)] = count(lambda: unet(x, t, encoder_hidden_states=enc))
        ids = torch.zeros(64, 77, dtype=torch.long, device="meta")
        clip = count(lambda: text(ids))
        out[("clip_row",)] = Work(clip.flops / 64, clip.bytes / 64, [(f / 64, b / 64) for f, b in clip.ops])
        z = torch.empty(1, 4, h, w, device="meta", dtype=dtype)
        out[("vae",)] = count(lambda: vae.decode(z))
    return out


# SDXL's two text encoders, named as the printed lines name them (their configs: sd.models.sdxl_configs).
SDXL_TEXT = {"clip-l": "text", "openclip-bigg": "text_2"}


def sdxl_conditioning(height: int = 1024, width: int | None = None, steps: int = 50,
                      dtype=torch.float16) -> dict:
    """FLOPs / modeled seconds of one SDXL image: U-Net (steps calls, batch 2), NeTI's conditioning
    (each text encoder x (steps x 11 modules + 1 negative) rows), VAE decode; and the conditioning's
    share. Plain SDXL's conditioning (2 rows per encoder: prompt and negative) is given beside it, and
    so is NeTI at per-transformer-block granularity (steps x 70 blocks + 1 rows: a mapper input per
    block instead of per module; not implemented, modeled to weigh it)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import CLIPTextConfig, CLIPTextModel

    from neti_fast.sd.families import SDXL
    from neti_fast.sd.models import sdxl_configs
    width = width or height
    cfg = sdxl_configs()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg["unet"]).to(dtype)
        texts = {k: CLIPTextModel(CLIPTextConfig(**cfg[c])).to(dtype) for k, c in SDXL_TEXT.items()}
        vae = AutoencoderKL(**cfg["vae"]).to(dtype)
    h, w = height // 8, width // 8
    with sdpa_kernel(SDPBackend.MATH):
        x = torch.empty(2, 4, h, w, device="meta", dtype=dtype)
        enc = torch.empty(2, 77, SDXL.context_width, device="meta", dtype=dtype)
        t = torch.empty(2, device="meta", dtype=dtype)
        cond = {"text_embeds": torch.empty(2, SDXL.widths[-1], device="meta", dtype=dtype),
                "time_ids": torch.empty(2, 6, device="meta", dtype=dtype)}
        u = count(lambda: unet(x, t, encoder_hidden_states=enc, added_cond_kwargs=cond))
        ids = torch.zeros(8, 77, dtype=torch.long, device="meta")
        rows = {k: count(lambda m=m: m(ids)) for k, m in texts.items()}
        v = count(lambda: vae.decode(torch.empty(1, 4, h, w, device="meta", dtype=dtype)))
    te_rows, block_rows = steps * SDXL.num_layers + 1, steps * SDXL.transformer_blocks + 1
    parts = {"unet": (steps, u), "vae": (1, v)}
    parts.update({f"text:{k}": (te_rows / 8, r) for k, r in rows.items()})  # counted over 8 rows
    flops = {k: n * wk.flops for k, (n, wk) in parts.items()}
    total = sum(flops.values())
    text = sum(f for k, f in flops.items() if k.startswith("text:"))
    share_at = lambda n: text * n / te_rows / (total - text + text * n / te_rows)  # noqa: E731  (n rows per encoder)
    out = {"height": height, "width": width, "steps": steps, "modules": SDXL.num_layers, "text_encoder_rows": te_rows,
           "tflop": {k: f / 1e12 for k, f in flops.items()}, "tflop_per_image": total / 1e12,
           "conditioning_flop_share": text / total, "plain_sdxl_conditioning_flop_share": share_at(2),
           "per_block": {"blocks": SDXL.transformer_blocks, "text_encoder_rows": block_rows,
                         "conditioning_flop_share": share_at(block_rows)}, "model": {}}
    for dev, (pf, bw) in DEVICES.items():
        secs = {k: n * wk.seconds(pf, bw) for k, (n, wk) in parts.items()}
        te = sum(s for k, s in secs.items() if k.startswith("text:"))
        rest = sum(secs.values()) - te
        out["model"][dev] = {"s_per_image": sum(secs.values()), "conditioning_s": te,
                             "conditioning_time_share": te / sum(secs.values()),
                             "per_block_s_per_image": rest + te * block_rows / te_rows,
                             "per_block_conditioning_time_share": te * block_rows / te_rows / (rest + te * block_rows / te_rows)}
    return out


def implied_counts(rung: str, B: int, steps: int, layers: int = 16) -> tuple[int, int, int]:
    """(U-Net calls, images per call x2 for guidance, text-encoder rows) for B images, one NeTI
    concept (16 different for `concepts`), as each rung's algorithm does them."""
    if rung == "reference":
        return 2 * steps * B, 1, B * (steps * layers + 1)        # batch-1 calls, 800 + 1 passes per image
    if rung == "diffusers":
        return steps, 2 * B, 2
    if rung == "eager":                                           # one seed at a time, both halves in one call
        return steps * B, 2, steps * layers + 1
    if rung == "concepts":
        return steps, 2 * B, B * steps * layers + 1
    return steps, 2 * B, steps * layers + 1                      # batched / triton / compile / onnx / tensorrt


def predict(work: dict, rung: str, B: int, calls: int, per_call: int, rows: int) -> dict:
    out = {}
    u = work[("unet", per_call)]
    for dev, (pf, bw) in DEVICES.items():
        s = calls * u.seconds(pf, bw) + rows * work[("clip_row",)].seconds(pf, bw) + B * work[("vae",)].seconds(pf, bw)
        out[dev] = {"s_per_batch": s, "images_per_s": B / s}
    flops = calls * u.flops + rows * work[("clip_row",)].flops + B * work[("vae",)].flops
    nbytes = calls * u.bytes + rows * work[("clip_row",)].bytes + B * work[("vae",)].bytes
    return {"rung": rung, "batch": B, "unet_calls": calls, "unet_batch": per_call, "text_encoder_rows": rows,
            "tflop_per_image": flops / B / 1e12, "gb_per_image": nbytes / B / 1e9, "model": out}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m neti_fast.bench.roofline", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd15-shaped", choices=("sd15-shaped", "tiny", "sdxl-shaped"))
    p.add_argument("--height", type=int, default=None, help="pixels (default 512; sdxl-shaped: 1024)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-sizes", type=int, nargs="+", action="extend", default=None)
    p.add_argument("--rungs", nargs="+", action="extend", default=None)
    p.add_argument("--measured", default=None, help="a ladder JSON: its counts, and its images/s beside the model")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.model == "sdxl-shaped":
        return _print_sdxl(sdxl_conditioning(a.height or 1024, a.width, a.steps), a.json)
    a.height = a.height or 512
    width = a.width or a.height
    measured = json.load(open(a.measured)) if a.measured else None
    if measured:
        rows_in = [r for r in measured["rows"] if r.get("status") == "ok"]
        a.height, width, a.steps = measured["height"], measured["width"], measured["steps"]
        a.model = measured["model"] if measured["model"] in ("tiny", "sd15-shaped") else a.model
        dtype = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16}.get(str(measured.get("dtype", "fp16")).replace("torch.", ""), torch.float16)
        dev = measured.get("device")
        device_name = dev.get("name", str(dev)) if isinstance(dev, dict) else str(dev)
        plan = []
        for r in rows_in:
            per_call = max(1, round(2 * r["batch"] * a.steps / max(r["unet_calls"], 1)))
            plan.append((r["rung"], r["batch"], r["unet_calls"], per_call, r["text_encoder_rows"], r))
    else:
        rungs = a.rungs or ["reference", "diffusers", "eager", "batched", "concepts"]
        plan = [(rung, B, *implied_counts(rung, B, a.steps), None) for rung in rungs for B in (a.batch_sizes or [1, 4, 16])]
        dtype, device_name = torch.float16, None
    work = network_work(a.model, a.height, width, [pc for _, _, _, pc, _, _ in plan], dtype)
    results = []
    print(f"roofline MODEL (not a measurement): {a.model} {a.height}x{width}, {a.steps} steps, "
          f"{str(dtype).replace('torch.', '')}; "
          "per-operator max(FLOPs / fp16-bf16 tensor-core peak, bytes / bandwidth), unfused bytes")
    head = f"{'rung':>10} {'B':>3} {'calls':>6} {'rows':>6} {'TFLOP/img':>10} {'GB/img':>8}" + "".join(
        f" {d + ' img/s':>15}" for d in DEVICES) + "   measured"
    print(head)
    for rung, B, calls, per_call, rows, m in plan:
        r = predict(work, rung, B, calls, per_call, rows)
        if m is not None:
            r["measured"] = {"device": device_name, "images_per_s": m.get("images_per_s")}
        results.append(r)
        meas = f"   {m['images_per_s']:.3g} img/s on {device_name}" if m is not None else ""
        print(f"{rung:>10} {B:>3} {calls:>6} {rows:>6} {r['tflop_per_image']:>10.2f} {r['gb_per_image']:>8.1f}" + "".join(
            f" {r['model'][d]['images_per_s']:>15.3g}" for d in DEVICES) + meas)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"kind": "roofline model, not a measurement", "model": a.model, "height": a.height,
                       "width": width, "steps": a.steps, "dtype": str(dtype), "devices": DEVICES,
                       "rows": results}, f, indent=1)
        print(f"wrote {a.json}")
    return results


def _print_sdxl(r: dict, path: str | None) -> dict:
    t = r["tflop"]
    print(f"roofline MODEL (not a measurement): SDXL-shaped {r['height']}x{r['width']}, {r['steps']} steps, fp16, "
          "one image, CFG batch 2")
    lines = [("U-Net", f"{r['steps']} calls", t["unet"])]
    lines += [(k, f"{r['text_encoder_rows']} rows ({r['steps']} steps x {r['modules']} modules + 1)", t["text:" + k])
              for k in SDXL_TEXT]
    lines.append(("VAE decode", "1", t["vae"]))
    for name, n, tf in lines:
        print(f"  {name:<14} {n:<36} {tf:8.2f} TFLOP")
    print(f"  NeTI conditioning: {100 * r['conditioning_flop_share']:.1f}% of the image's "
          f"{r['tflop_per_image']:.1f} TFLOP (plain SDXL, 2 rows per encoder: "
          f"{100 * r['plain_sdxl_conditioning_flop_share']:.2f}%)")
    for dev, m in r["model"].items():
        print(f"  {dev}: {m['s_per_image']:.2f} s per image modeled, conditioning {m['conditioning_s']:.2f} s "
              f"({100 * m['conditioning_time_share']:.1f}%)")
    b = r["per_block"]
    print(f"  per-transformer-block NeTI (not implemented; {b['text_encoder_rows']} rows per encoder, "
          f"{r['steps']} steps x {b['blocks']} blocks + 1): conditioning {100 * b['conditioning_flop_share']:.1f}% "
          "of the FLOPs; " + ", ".join(f"{dev} {m['per_block_s_per_image']:.2f} s per image "
                                      f"({100 * m['per_block_conditioning_time_share']:.1f}%)"
                                      for dev, m in r["model"].items()))
    if path:
        with open(path, "w") as f:
            json.dump({"kind": "roofline model, not a measurement", "model": "sdxl-shaped", "devices": DEVICES, **r},
                      f, indent=1)
        print(f"wrote {path}")
    return r


if __name__ == "__main__":
    main()
