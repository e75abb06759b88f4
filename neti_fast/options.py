"""Command-line options shared by several subcommands (`generate`, `run`, `export`, `bench`...).

Every flag that takes several values accumulates when repeated (`action="extend"`):
`--truncation 8 --truncation 64` is `--truncation 8 64`.
"""
from __future__ import annotations

import argparse

from .errors import NetiError
from .utils import ATTENTIONS, ATTENTIONS_RENAMED, BACKENDS, CLI_DTYPES, SCHEDULERS, default_device, default_dtype_name, torch_dtype

NO_TRUNCATION = ("none", "full")  # how the command line writes "no truncation" beside truncations


def parse_seeds(tokens: list[str]) -> list[int]:
    """`0-15`, `0 3 7`, `0,3,7` or a mix -> list of ints, in order, without repeats."""
    seeds = []
    for tok in tokens:
        for part in str(tok).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if "-" in part:
                    a, b = (int(x) for x in part.split("-", 1))
                    if b < a:
                        raise ValueError
                    seeds.extend(range(a, b + 1))
                else:
                    seeds.append(int(part))
            except ValueError:
                raise NetiError(f"--seeds {tok}: expected integers or ranges like 0-15") from None
    if any(s < 0 or s >= 2**63 for s in seeds):
        raise NetiError("--seeds: seeds must be between 0 and 2^63-1")
    return list(dict.fromkeys(seeds))


def truncation_value(text: str) -> int | None:
    """argparse type of --truncation: K (an integer), or none / full for no truncation."""
    if text.strip().lower() in NO_TRUNCATION:
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer K, or none / full for no truncation") from None


def dedup(values) -> list:
    return list(dict.fromkeys(values))


def add_model_args(p, model_default=None) -> None:
    p.add_argument("--model", default=model_default, required=model_default is None,
                   help="diffusers folder, hub id, or built-in: tiny, sd15-shaped")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(CLI_DTYPES), default=None, help="default: fp16 on cuda, fp32 on cpu")


def add_seeds_arg(p, help_text="e.g. 0-15 or 0 3 7 (default 0)") -> None:
    p.add_argument("--seeds", nargs="+", action="extend", default=None, help=help_text)


def seeds_of(args) -> list[int]:
    return parse_seeds(args.seeds or ["0"])


def add_sampling_args(p) -> None:
    """--steps / --guidance / --negative-prompt / --scheduler / --batch-size / --height / --width."""
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="dpm++")
    p.add_argument("--batch-size", type=int, default=8, help="images per U-Net batch")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)


def add_runtime_args(p) -> None:
    """--attention / --backend / --export-dir, shared by `generate` and `run`."""
    # older spellings (--attention eager, --backend triton) are still taken, not shown; a notice names today's
    p.add_argument("--attention", choices=ATTENTIONS + tuple(ATTENTIONS_RENAMED), default="auto",
                   metavar="{" + ",".join(ATTENTIONS) + "}",
                   help="cross-attention kernel (auto: the Triton kernel on CUDA when its guards pass, else "
                        "the native CPU kernel where built and faster, else SDPA; math: the official bmm + softmax)")
    p.add_argument("--backend", choices=BACKENDS + ("triton",), default="auto", metavar="{" + ",".join(BACKENDS) + "}",
                   help="U-Net runtime. auto = eager today: it has no build step, and the others (compile, "
                        "onnx, tensorrt) have no GPU measurement yet to justify their minutes of export / build")
    p.add_argument("--export-dir", default=None, help="cache for onnx / tensorrt exports")


def torch_setup(args):
    """(device, torch dtype) from --device / --dtype, checked."""
    import torch
    device = args.device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NetiError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
    return device, torch_dtype(args.dtype or default_dtype_name(device))
