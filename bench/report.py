"""The bench ladder's report: environment (device, versions), the summary ratios, the text table
and the PNG chart."""
from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only; imported where used, so `--help` does not load it
    import torch

from .rungs import RUNGS


def _device_info(dev: torch.device) -> dict:
    import torch
    info = {"type": dev.type, "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    if dev.type == "cuda":
        info["name"] = torch.cuda.get_device_name(dev)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(dev)))
    else:
        info["name"] = f"CPU {info['cpu']} ({info['cpu_count']} cores), no GPU used"
    return info


def _versions() -> dict:
    import torch
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "transformers", "triton", "onnxruntime", "tensorrt", "neti-fast"):
        try:
            from importlib.metadata import version
            out[name] = version(name)
        except Exception:  # noqa: BLE001 - not installed
            out[name] = None
    return out


def summary(rows: list[dict], side: dict | None = None) -> dict:
    """Headline ratios. `side`: `side_by_side`'s result; its alternated measurements, where
    present, give the conditioning speedup and the concepts-vs-one U-Net ratio, otherwise the
    rungs' own columns do."""
    side = side or {}
    ok = {(r["rung"], r["batch"]): r for r in rows if r["status"] == "ok"}
    out = {}
    ref = [r for (n, _), r in ok.items() if n == "reference"]
    bat = [r for (n, _), r in ok.items() if n == "batched"]
    if ref and bat:
        out["conditioning_speedup"] = (side["conditioning"]["speedup"] if "conditioning" in side else
                                       ref[0]["cond_ms_per_prompt"] / bat[0]["cond_ms_per_prompt"])
        common = sorted({r["batch"] for r in ref} & {r["batch"] for r in bat})
        if common:
            B = common[-1]
            out["largest_common_batch"] = B
            out["images_per_s_speedup_largest_batch"] = ok[("batched", B)]["images_per_s"] / ok[("reference", B)]["images_per_s"]
        # the best neti-fast rung at its largest batch vs the reference at its largest batch
    fast = [r for r in ok.values() if r["rung"] not in ("reference", "diffusers")]
    if ref and fast:
        best = max(fast, key=lambda r: r["images_per_s"])
        refB = ok.get(("reference", best["batch"])) or max(ref, key=lambda r: r["batch"])
        out["best"] = {"rung": best["rung"], "batch": best["batch"], "images_per_s": best["images_per_s"],
                       "speedup_vs_reference": best["images_per_s"] / refB["images_per_s"]}
    many = [r for (n, _), r in ok.items() if n == "concepts"]
    if many and bat:
        common = sorted({r["batch"] for r in many} & {r["batch"] for r in bat} - {1})  # at batch 1 they are the same
        if common:
            B = common[-1]
            # denoising cost of B different concepts vs one (target: within 5%); img/s also pays B conditionings
            out["concepts_vs_one_concept"] = {
                "batch": B,
                "unet_ms_per_step_ratio": (side["concepts"]["ratio"] if side.get("concepts", {}).get("batch") == B else
                                           ok[("concepts", B)]["unet_ms_per_step"] / ok[("batched", B)]["unet_ms_per_step"]),
                "images_per_s_ratio": ok[("concepts", B)]["images_per_s"] / ok[("batched", B)]["images_per_s"]}
    dif = [r for (n, _), r in ok.items() if n == "diffusers"]
    if dif and bat:
        common = sorted({r["batch"] for r in dif} & {r["batch"] for r in bat})
        if common:
            B = common[-1]
            out["batched_vs_diffusers_largest_batch"] = ok[("batched", B)]["images_per_s"] / ok[("diffusers", B)]["images_per_s"]
    return out


def _fmt(x, spec):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _mem(b):
    if b is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024


def format_table(result: dict) -> str:
    rows = result["rows"]
    ref = {r["batch"]: r for r in rows if r["rung"] == "reference" and r["status"] == "ok"}
    head = ["rung", "batch", "cond ms/prompt", "unet ms/step", "img/s", "latency-1 s", "peak mem", "TFLOP/s", "util",
            "speedup"]
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append([r["rung"], "-", f"{r['status']}: {r['reason']}"])
            continue
        sp = r["images_per_s"] / ref[r["batch"]]["images_per_s"] if r["batch"] in ref else None
        lines.append([r["rung"], str(r["batch"]), _fmt(r["cond_ms_per_prompt"], ".4g"), _fmt(r["unet_ms_per_step"], ".4g"),
                      _fmt(r["images_per_s"], ".4g"), _fmt(r["latency1_s"], ".3g"), _mem(r["peak_mem_bytes"]),
                      _fmt(r["unet_tflops"], ".3g"), _fmt(None if r["utilization"] is None else 100 * r["utilization"], ".1f")
                      + ("%" if r["utilization"] is not None else ""), _fmt(sp, ".2f") + ("x" if sp else "")])
    widths = [max(len(head[i]), *(len(l[i]) for l in lines if len(l) == len(head))) for i in range(len(head))]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out.append("  ".join("-" * w for w in widths))
    for l in lines:
        if len(l) == len(head):
            out.append("  ".join(c.ljust(w) for c, w in zip(l, widths)))
        else:
            out.append(f"{l[0].ljust(widths[0])}  {l[2]}")
    s = result["summary"]
    out.append("")
    if "concepts_vs_one_concept" in s:
        c = s["concepts_vs_one_concept"]
        alt = (result.get("side_by_side") or {}).get("concepts")
        how = f"median of {alt['pairs']} alternated pairs" if alt and alt["batch"] == c["batch"] else "the rungs' columns"
        out.append(f"{c['batch']} different concepts vs one, batch {c['batch']}: U-Net ms/step x{c['unet_ms_per_step_ratio']:.3f} "
                   f"({how}), img/s x{c['images_per_s_ratio']:.3f} (rung columns; includes {c['batch']} cold conditionings)")
    unet = (result.get("side_by_side") or {}).get("unet")
    if unet:
        out.append(f"U-Net ms/step at batch {unet['batch']}, {unet['rounds']} alternated rounds, median (min-max): " +
                   ", ".join(f"{n} {v['median']:.4g} ({v['min']:.4g}-{v['max']:.4g})" for n, v in unet["ms_per_step"].items()))
    if "conditioning_speedup" in s:
        side = (result.get("side_by_side") or {}).get("conditioning")
        how = (f"median of {side['pairs']} alternated pairs, {side['reference_ms']:.4g} / {side['batched_ms']:.4g} ms"
               if side else "the two rungs' cond columns")
        out.append(f"conditioning speedup (reference / batched, {how}): {s['conditioning_speedup']:.1f}x")
    if "images_per_s_speedup_largest_batch" in s:
        out.append(f"end-to-end images/s, batched vs reference at batch {s['largest_common_batch']}: "
                   f"{s['images_per_s_speedup_largest_batch']:.1f}x")
    if "batched_vs_diffusers_largest_batch" in s:
        out.append(f"batched (with NeTI concept) vs plain diffusers (no concept), images/s at the largest batch: "
                   f"{s['batched_vs_diffusers_largest_batch']:.2f}x")
    if "best" in s:
        b = s["best"]
        out.append(f"fastest rung: {b['rung']} at batch {b['batch']}: {b['images_per_s']:.3g} img/s, "
                   f"{b['speedup_vs_reference']:.1f}x the reference")
    out.append(f"memory: {result['memory_kind']}; TFLOP/s = counted U-Net FLOPs / U-Net time")
    return "\n".join(out)


def write_chart(result: dict, path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    rungs = [r for r in RUNGS if any(x["rung"] == r for x in rows)]
    batches = sorted({r["batch"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(batches) * max(1, len(rungs)) / 3), 4.5))
    width = 0.8 / max(1, len(rungs))
    for i, rung in enumerate(rungs):
        xs, ys = [], []
        for j, B in enumerate(batches):
            r = next((x for x in rows if x["rung"] == rung and x["batch"] == B), None)
            if r is not None:
                xs.append(j + (i - (len(rungs) - 1) / 2) * width)
                ys.append(r["images_per_s"])
        ax.bar(xs, ys, width=width, label=rung)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_yscale("log")
    ax.set_ylabel("images / s (log)")
    a = result["args"]
    ax.set_title(f"neti-fast bench: {a['model']} {result['height']}x{result['width']}, {a['steps']} steps, "
                 f"{a['dtype']}\n{result['device']['name']}", fontsize=9)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
