"""`neti-fast` command line. Every subcommand is a thin layer over the Python API.

User mistakes raise NetiError and are printed as one line (exit status 2); anything else is a bug
and keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import options
from .errors import NetiError
from .utils import SAMPLING_RANGES


def _quiet_libraries():
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import warnings
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    try:
        import diffusers
        import transformers
        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # logging niceties only
        pass


# ----------------------------------------------------------------------------- subcommands

def cmd_tiny_model(args):
    from .sd.models import build_tiny
    print(f"wrote {build_tiny(args.dir, args.model)}")


def cmd_import(args):
    from .concepts.importers import load_concept
    concept = load_concept(args.src, placeholder=args.placeholder, embeds_path=args.embeds)
    out = concept.save(args.out)
    print(f"imported {concept.method.upper()} concept {concept.placeholder!r} ({concept.source}) -> {out}")


def cmd_precompute(args):
    from .concepts.importers import load_concept
    from .concepts.table import precompute
    concept = load_concept(args.concept, placeholder=args.placeholder)
    if Path(args.out).exists() and not args.overwrite:
        raise NetiError(f"--out {args.out}: exists; use --overwrite to replace it")
    table = precompute(concept, [t for t in options.dedup(args.truncation or ()) if t is not None])
    out = table.save(args.out)
    print(f"table for {concept.placeholder!r}: 1000 timesteps x 16 layers, truncations {table.truncations or 'none'} -> {out}")


def cmd_merge(args):
    from .concepts.table import load_tables, save_bundle
    if Path(args.out).exists() and not args.overwrite:
        raise NetiError(f"--out {args.out}: exists; use --overwrite to replace it")
    tables = load_tables(args.concepts)
    out = save_bundle(tables, args.out)
    print(f"bundle of {len(tables)} concepts ({', '.join('{' + n + '}' for n in tables)}) -> {out}")


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            text = Path(args.prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise NetiError(f"--prompts-file {args.prompts_file}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise NetiError("give at least one --prompt or a --prompts-file")
    return prompts


def cmd_generate(args):
    from .api import generate_to_folder, load_concepts, load_model
    from .engine.request import GenerateConfig
    from .jobs.jobfile import init_source
    prompts = _read_prompts(args)
    seeds = options.seeds_of(args)
    init = init_source(args.init_image, args.strength, args.resize_mode, args.mask)
    if init is not None:
        init.check()   # before the model loads (checked again, with the steps, with every request)
    tables = load_concepts(args.concept or [], args.placeholder, args.layer_mix, args.time_mix)
    truncs = options.dedup(args.truncation) if args.truncation else [None]
    device, dtype = options.torch_setup(args)
    model = load_model(args.model, device=device, dtype=dtype)
    guidance, scheduler = options.sampling_defaults(args, model.family)
    cfg = GenerateConfig(steps=args.steps, guidance=guidance, scheduler=scheduler, height=args.height,
                         width=args.width, negative_prompt=args.negative_prompt, batch_size=args.batch_size,
                         attention=args.attention, prompt_syntax=args.prompt_syntax)
    described = ",".join(args.concept or []) + "".join(f" {f}={v}" for f, v in (("layer-mix", args.layer_mix), ("time-mix", args.time_mix)) if v)
    summary = {}
    generate_to_folder(model, tables or None, prompts, seeds, args.out, truncs, cfg,
                       overwrite=args.overwrite, model_name=args.model, concept_name=described or None,
                       backend=args.backend, export_dir=args.export_dir, on_summary=summary.update, init=init)
    sweeps = (f", {len(seeds)} sweep-s*.png (rows prompts, columns truncations)" if len(truncs) > 1 else "")
    print(f"{args.out}: {summary['done']} images made, {summary['skipped']} already there; "
          f"{len(prompts)} grid-*.png (rows truncations, columns seeds){sweeps}; manifest.jsonl")


def cmd_export(args):
    from .export import onnx as onnx_export
    from .sd.models import load_model
    device, dtype = options.torch_setup(args)
    model = load_model(args.model, device=device, dtype=dtype)
    out = Path(args.out)
    path = onnx_export.export_cached(model, out, height=args.height, width=args.width)
    if args.format == "tensorrt":
        from .export import tensorrt as trt_export
        path = trt_export.build_engine(path, Path(path).with_suffix(".plan"))
    print(f"exported {args.format} -> {path}")


def cmd_train(args):
    from .training import trainer as train
    train.main(args)


def cmd_demo(args):
    from .demo import run_demo
    run_demo(args.out, model=args.model)


def cmd_bench(args):
    from .bench import ladder
    ladder.main(args)


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    ap = options.Parser(prog="neti-fast", description=(
        "Fast NeTI / XTI / Textual Inversion for Stable Diffusion 1.x: train a concept, precompute its "
        "table, generate in batches. Start with `neti-fast demo`."))
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train, precompute and generate on the built-in tiny model (about 25 s on 2 CPU cores; "
                                    "its weights are random, so the images are noise)")
    p.add_argument("--out", default="neti-fast-demo", help="output folder (default: ./neti-fast-demo)")
    p.add_argument("--model", default="tiny", choices=["tiny", "tiny-sd2", "tiny-xl"],
                   help="built-in model: tiny (SD 1.x, the default), tiny-sd2 (SD 2.x) or tiny-xl (SDXL)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a NeTI (default), XTI or TI concept from 3-5 images")
    from .training.config import add_arguments as add_train_arguments
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("import", help="convert official NeTI / Textual Inversion / Automatic1111 files to a concept")
    p.add_argument("src", help="mapper-steps-N.pt, learned_embeds.bin, A1111 .pt / .safetensors, or a neti-fast file")
    p.add_argument("--out", required=True, help="concept .safetensors to write")
    p.add_argument("--embeds", default=None, help="official NeTI learned_embeds-steps-N.bin (found automatically beside the mapper)")
    p.add_argument("--placeholder", default=None, help="override the placeholder token")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("precompute", help="evaluate a concept on all 1000 timesteps x 16 layers into a table")
    p.add_argument("concept", help="concept file (any supported format)")
    p.add_argument("--out", required=True, help="table .safetensors to write")
    p.add_argument("--truncation", type=options.truncation_value, nargs="*", action="extend", default=None,
                   metavar="K", help="also store rows with nested-dropout truncation K (NeTI only; e.g. 8 16 32; "
                                     "the untruncated rows are always stored)")
    p.add_argument("--placeholder", default=None, help="override the placeholder token")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_precompute)

    p = sub.add_parser("merge", help="bundle several concepts in one file (prompts use {NAME} for each)")
    p.add_argument("concepts", nargs="+", metavar="[NAME=]PATH", help="concept / table files (any supported format, or bundles)")
    p.add_argument("--out", required=True, help="bundle .safetensors to write")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("generate", help="batched generation with a concept (or plain SD without one)")
    options.add_model_args(p)
    p.add_argument("--concept", action="extend", nargs="+", metavar="[NAME=]PATH",
                   help="table or concept file (any supported format); repeat for several concepts, written "
                        "{NAME} in prompts (default NAME: the placeholder without <>)")
    p.add_argument("--placeholder", default=None, help="override the concept's placeholder token (one concept)")
    p.add_argument("--layer-mix", default=None, metavar="SPEC",
                   help='XTI style mixing, e.g. "IN01-IN08:cat,MID-OUT11:painting"; the prompt\'s {} (or {mix}) '
                        "takes each layer's token from the concept named for it")
    p.add_argument("--time-mix", default=None, metavar="SPEC",
                   help='mixing over time, e.g. "t>=600:cat,t<600:painting" (t = scheduler timestep, 999 = noise)')
    p.add_argument("--prompt", action="append", help='prompt with {} (or {NAME}) where the concept goes; repeatable')
    p.add_argument("--prompts-file", default=None, help="one prompt per line")
    options.add_seeds_arg(p)
    p.add_argument("--truncation", type=options.truncation_value, nargs="+", action="extend", default=None,
                   metavar="K", help="nested-dropout truncation(s): smaller K = more editable, less faithful; "
                                     "none (or full) = no truncation, e.g. --truncation none 8 16; several also "
                                     "write a sweep grid per seed (rows prompts, columns truncations)")
    options.add_sampling_args(p)
    options.add_img2img_args(p)
    options.add_runtime_args(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="regenerate images that already exist")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("run", help="run a JSONL job of many requests: packed batches, resumable, torchrun-aware")
    from .jobs import runner as jobs
    jobs.add_arguments(p)
    p.set_defaults(func=jobs.main)

    p = sub.add_parser("tiny-model", help="write a built-in tiny model as a diffusers folder")
    p.add_argument("dir")
    p.add_argument("--model", default="tiny", choices=["tiny", "tiny-sd2", "tiny-xl"],
                   help="which: tiny (SD 1.x, the default), tiny-sd2 (SD 2.x) or tiny-xl (SDXL)")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("export", help="export the U-Net (with per-layer K/V table inputs) to ONNX or TensorRT")
    options.add_model_args(p)
    p.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx")
    p.add_argument("--height", type=options.number(SAMPLING_RANGES["height"]), default=None,
                   help="default: the model's native size")
    p.add_argument("--width", type=options.number(SAMPLING_RANGES["width"]), default=None,
                   help="default: the model's native size")
    p.add_argument("--out", required=True, help="output folder (reused when the model is unchanged)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="latency / throughput ladder: reference -> diffusers -> neti-fast backends")
    from .bench import ladder
    ladder.add_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="CLIP image / text and DINO similarity of generated images (per truncation)")
    from .evaluation import cli as evaluation_cli
    evaluation_cli.add_arguments(p)
    p.set_defaults(func=evaluation_cli.main)

    from .serve.cli import add_parser as add_serve_parser
    add_serve_parser(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)   # --help and usage errors exit here, before any heavy import
    _quiet_libraries()
    try:
        args.func(args)
    except NetiError as e:  # a request setting at fault is named as its flag
        msg = e.render("--" + e.field.replace("_", "-")) if e.field else str(e)
        print(f"neti-fast {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = "; re-run the same command to resume" if args.command in RESUMABLE else ""
        print(f"neti-fast {args.command}: interrupted{again}", file=sys.stderr)
        raise   # to the caller: `entry` below for the console script; a test run stops, as Ctrl-C asks
    return 0


RESUMABLE = ("generate", "run", "train", "demo")   # a plain re-run continues where these stopped


def entry() -> int:
    """The `neti-fast` console script: main(), with Ctrl-C as exit status 130 (no traceback)."""
    try:
        return main()
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(entry())
