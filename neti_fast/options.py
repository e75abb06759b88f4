"""Command-line options shared by several subcommands (`generate`, `run`, `export`, `bench`...).

Every flag that takes several values accumulates when repeated (`action="extend"`):
`--truncation 8 --truncation 64` is `--truncation 8 64`.
"""
from __future__ import annotations

import argparse

from .errors import NetiError
from .sd.prompt_syntax import SYNTAXES
from .utils import (ATTENTIONS, ATTENTIONS_RENAMED, BACKENDS, CLI_DTYPES, DEFAULT_STRENGTH, RESIZE_MODE_RANGE, SAMPLERS,
                    SAMPLING_RANGES, scheduler_problem, SCHEDULES, SEED_RANGE, STRENGTH_RANGE, Range, default_device,
                    default_dtype_name, torch_dtype)

NO_TRUNCATION = ("none", "full")  # how the command line writes "no truncation" beside truncations


class HelpFormatter(argparse.HelpFormatter):
    """--help shows every flag's default (unless its help already says it, or there is none to show)."""

    def _get_help_string(self, action):
        text, d = action.help or "", action.default
        if d is None or d is False or d is argparse.SUPPRESS or d == "" or "default" in text:
            return text
        return f"{text} (default: %(default)s)".lstrip()


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `neti-fast generate: error: argument --steps: 0: must be ...`,
    exit status 2, as every other mistake the CLI reports (no usage block in front), and defaults in
    --help. Subcommands' parsers are made of the same class."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number(rng: Range, none: tuple = ()):
    """argparse type for a numeric flag: the value if `rng` allows it, else an error naming the flag
    and the allowed values. `none`: spellings that mean None (e.g. "none" for no truncation)."""
    def parse(text: str):
        if none and text.strip().lower() in none:
            return None
        try:
            return rng.parse(text)
        except NetiError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.range = rng          # what tests walk to hold every numeric flag to its range
    return parse


def count(lo: int = 1):
    """argparse type: an integer >= lo (batch sizes, repeats, threads...)."""
    return number(Range(int, lo))


def megabytes():
    """argparse type of the --*-mb memory bounds: an integer >= 0."""
    return number(Range(int, 0))


# --truncation K (K >= 1; the concept's own width is checked once it is loaded), or none / full
truncation_value = number(Range(int, 1), none=NO_TRUNCATION)


def parse_seeds(tokens: list[str]) -> list[int]:
    """`0-15`, `0 3 7`, `0,3,7` or a mix -> list of ints, in order, without repeats."""
    seeds = []
    for tok in tokens:
        for part in str(tok).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if "-" in part[1:]:
                    a, b = (int(x) for x in part.split("-", 1))
                else:
                    a = b = int(part)
            except ValueError:
                raise NetiError(f"--seeds {tok}: expected integers or ranges like 0-15") from None
            if b < a:
                raise NetiError(f"--seeds {part}: the range is backwards (write {b}-{a})")
            seeds.extend(range(a, b + 1))
    if any(not SEED_RANGE.ok(s) for s in seeds):
        raise NetiError("--seeds: seeds must be between 0 and 2^63-1")
    return list(dict.fromkeys(seeds))


def dedup(values) -> list:
    return list(dict.fromkeys(values))


def add_model_args(p, model_default=None) -> None:
    p.add_argument("--model", default=model_default, required=model_default is None,
                   help="diffusers folder, hub id, or built-in: tiny, tiny-sd2, tiny-xl, sd15-shaped, sd2-shaped, sdxl-shaped")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(CLI_DTYPES), default=None, help="default: fp16 on cuda, fp32 on cpu")


def add_seeds_arg(p, help_text="e.g. 0-15 or 0 3 7 (default 0)") -> None:
    p.add_argument("--seeds", nargs="+", action="extend", default=None, help=help_text)


def seeds_of(args) -> list[int]:
    return parse_seeds(args.seeds or ["0"])


def _scheduler(text: str) -> str:
    problem = scheduler_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


def add_sampling_args(p) -> None:
    """--steps / --guidance / --negative-prompt / --scheduler / --batch-size / --height / --width."""
    R = SAMPLING_RANGES
    p.add_argument("--steps", type=number(R["steps"]), default=50, help="denoising steps")
    p.add_argument("--guidance", type=number(R["guidance"]), default=None,
                   help="classifier-free guidance scale (default: the model family's: 7.5 SD 1.x / 2.x, 5.0 SDXL)")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (plain text, no {})")
    p.add_argument("--scheduler", type=_scheduler, default=None, metavar="SAMPLER[-SCHEDULE]",
                   help=f"sampler: {', '.join(SAMPLERS)} (default: the model family's: dpm++, DPM++ 2M, the official "
                        "NeTI one, for SD 1.x / 2.x; euler for SDXL, as diffusers' pipeline); optionally on a "
                        f"schedule: -{', -'.join(k.replace('_', '-') for k in SCHEDULES if k != 'uniform')} "
                        "(e.g. dpm++-karras; the table: docs/samplers.md)")
    p.add_argument("--prompt-syntax", choices=SYNTAXES, default="plain",
                   help="plain: the prompt as written, at most 77 tokens; a1111: A1111's (emphasis:1.2), [less], "
                        "\\( escapes, BREAK and prompts longer than 75 tokens (README: Prompt syntax)")
    p.add_argument("--batch-size", type=number(R["batch_size"]), default=8, help="images per U-Net batch")
    p.add_argument("--height", type=number(R["height"]), default=None, help="default: the model's native size")
    p.add_argument("--width", type=number(R["width"]), default=None, help="default: the model's native size")


def sampling_defaults(args, family) -> tuple[float, str]:
    """(--guidance, --scheduler), each the model family's default where not given."""
    return (family.default_guidance if args.guidance is None else args.guidance,
            family.default_scheduler if args.scheduler is None else args.scheduler)


def add_img2img_args(p) -> None:
    """--init-image / --strength / --resize-mode / --mask (None when not given: each needs --init-image)."""
    p.add_argument("--init-image", default=None, metavar="PATH",
                   help="img2img: start every image from this one (resized to --width x --height)")
    p.add_argument("--strength", type=number(STRENGTH_RANGE), default=None, metavar="S",
                   help=f"img2img: A1111's denoising strength, the last int(steps x S) steps are run (default "
                        f"{DEFAULT_STRENGTH}; 1: all of them, from the image's latent with the seed's noise)")
    p.add_argument("--resize-mode", type=number(RESIZE_MODE_RANGE), default=None, metavar="{0,1,2}",
                   help="img2img: A1111's resize mode, 0 just resize (default), 1 crop and resize, 2 resize and fill")
    p.add_argument("--mask", default=None, metavar="PATH",
                   help="inpainting: a mask of the init image's size, white = repaint (blurred 4 px, the masked "
                        "area filled from around it: the server's defaults); the rest is kept")


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
