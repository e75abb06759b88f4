"""`neti-fast` command line. Every subcommand is a thin layer over the Python API.

User mistakes raise NetiError and are printed as one line (exit status 2); anything else is a bug
and keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import NetiError

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


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


def _torch_setup(args):
    import torch
    from .api import default_device
    device = args.device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NetiError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    return device, getattr(torch, DTYPES[dtype])


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
    from .models import build_tiny
    print(f"wrote {build_tiny(args.dir)}")


def cmd_import(args):
    from .importers import import_concept
    concept = import_concept(args.src, placeholder=args.placeholder, embeds_path=args.embeds)
    out = concept.save(args.out)
    print(f"imported {concept.method.upper()} concept {concept.placeholder!r} ({concept.source}) -> {out}")


def cmd_precompute(args):
    from .concept import load_concept
    from .table import precompute
    concept = load_concept(args.concept, placeholder=args.placeholder)
    if Path(args.out).exists() and not args.overwrite:
        raise NetiError(f"--out {args.out}: exists; use --overwrite to replace it")
    table = precompute(concept, args.truncation or ())
    out = table.save(args.out)
    print(f"table for {concept.placeholder!r}: 1000 timesteps x 16 layers, truncations {table.truncations or 'none'} -> {out}")


def cmd_merge(args):
    from .table import load_tables, save_bundle
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
    from .api import generate_to_folder
    from .mixing import add_mixes
    from .models import load_model
    from .pipeline import Engine, GenerateConfig, Request, check_request
    from .table import load_tables
    prompts = _read_prompts(args)
    seeds = parse_seeds(args.seeds)
    tables = add_mixes(load_tables(args.concept or [], args.placeholder), args.layer_mix, args.time_mix)
    truncs = args.truncation or [None]
    device, dtype = _torch_setup(args)
    model = load_model(args.model, device=device, dtype=dtype)
    for p in prompts:  # validate everything before any work
        for t in truncs:
            check_request(model, Request(p, 0, tables or None, t))
    cfg = GenerateConfig(steps=args.steps, guidance=args.guidance, scheduler=args.scheduler, height=args.height,
                         width=args.width, negative_prompt=args.negative_prompt, batch_size=args.batch_size,
                         attention=attention_choice(args))
    engine = Engine(model, cfg, denoiser=_denoiser(args, model, cfg))
    described = ",".join(args.concept or []) + "".join(f" {f}={v}" for f, v in (("layer-mix", args.layer_mix), ("time-mix", args.time_mix)) if v)
    entries = generate_to_folder(model, tables or None, prompts, seeds, args.out, truncs, cfg, overwrite=args.overwrite,
                                 model_name=args.model, concept_name=described or None, engine=engine)
    sweep = " and truncation sweep grid(s)" if len(truncs) > 1 else ""
    print(f"{len(entries)} images, {len(prompts)} grid(s){sweep} and manifest.json in {args.out}")


BACKENDS = ("auto", "eager", "triton", "compile", "onnx", "tensorrt")


def add_runtime_args(p) -> None:
    """--attention / --backend / --export-dir, shared by `generate` and `run`."""
    p.add_argument("--attention", choices=["auto", "triton", "native", "sdpa", "xformers", "eager"], default="auto",
                   help="cross-attention kernel (auto: the Triton kernel on CUDA when its guards pass, else SDPA)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="U-Net runtime. auto = eager today: it has no build step, and the others (compile, "
                        "onnx, tensorrt) have no GPU measurement yet to justify their minutes of export / build")
    p.add_argument("--export-dir", default=None, help="cache for onnx / tensorrt exports")


def resolve_backend(args) -> str:
    backend = getattr(args, "backend", "auto")
    return "eager" if backend == "auto" else backend


def attention_choice(args) -> str:
    return "triton" if resolve_backend(args) == "triton" else args.attention


def _denoiser(args, model, cfg):
    backend = resolve_backend(args)
    if backend in ("eager", "triton"):
        return None  # Engine's default TorchDenoiser; `triton` has set cfg.attention = "triton"
    if backend == "compile":
        from .cudagraph import CudaGraphDenoiser
        from .pipeline import TorchDenoiser
        return CudaGraphDenoiser(TorchDenoiser(model, cfg.attention, compile=True))  # graphs on CUDA only
    from .export import onnx as onnx_export
    h, w = cfg.height or model.default_size, cfg.width or model.default_size
    cache = Path(args.export_dir) if args.export_dir else onnx_export.default_export_dir(args.model, h, w, model.dtype)
    path = onnx_export.export_cached(model, cache, height=h, width=w)
    if backend == "onnx":
        return onnx_export.OnnxDenoiser(path, device=model.device)
    from .export import tensorrt as trt_export
    engine_path = trt_export.build_engine(path, Path(path).with_suffix(".plan"), fp16=str(model.dtype) != "torch.float32",
                                          max_batch=cfg.batch_size, opt_batches=[cfg.batch_size])
    return trt_export.TensorRTDenoiser(engine_path, device=model.device)


def cmd_export(args):
    from .export import onnx as onnx_export
    from .models import load_model
    device, dtype = _torch_setup(args)
    model = load_model(args.model, device=device, dtype=dtype)
    out = Path(args.out)
    path = onnx_export.export_cached(model, out, height=args.height, width=args.width)
    if args.format == "tensorrt":
        from .export import tensorrt as trt_export
        path = trt_export.build_engine(path, Path(path).with_suffix(".plan"))
    print(f"exported {args.format} -> {path}")


def cmd_train(args):
    from . import train
    train.main(args)


def cmd_demo(args):
    from .demo import run_demo
    run_demo(args.out)


def cmd_bench(args):
    from .bench import ladder
    ladder.main(args)


# ----------------------------------------------------------------------------- parser

def _add_model_args(p, model_default=None):
    p.add_argument("--model", default=model_default, required=model_default is None,
                   help="diffusers folder, hub id, or built-in: tiny, sd15-shaped")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on cuda, fp32 on cpu")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="neti-fast", description=(
        "Fast NeTI / XTI / Textual Inversion for Stable Diffusion 1.x: train a concept, precompute its "
        "table, generate in batches. Start with `neti-fast demo`."))
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train, precompute and generate on the built-in tiny model (about a minute on CPU)")
    p.add_argument("--out", default="neti-fast-demo", help="output folder (default: ./neti-fast-demo)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a NeTI (default), XTI or TI concept from 3-5 images")
    from . import train
    train.add_arguments(p)
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
    p.add_argument("--truncation", type=int, nargs="*", default=None, metavar="K",
                   help="also store rows with nested-dropout truncation K (NeTI only; e.g. 8 16 32)")
    p.add_argument("--placeholder", default=None, help="override the placeholder token")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_precompute)

    p = sub.add_parser("merge", help="bundle several concepts in one file (prompts use {NAME} for each)")
    p.add_argument("concepts", nargs="+", metavar="[NAME=]PATH", help="concept / table files (any supported format, or bundles)")
    p.add_argument("--out", required=True, help="bundle .safetensors to write")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("generate", help="batched generation with a concept (or plain SD without one)")
    _add_model_args(p)
    p.add_argument("--concept", action="append", metavar="[NAME=]PATH",
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
    p.add_argument("--seeds", nargs="+", default=["0"], help="e.g. 0-15 or 0 3 7 (default 0)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--scheduler", choices=["dpm++", "ddim", "euler", "euler-a", "dpm++-karras"], default="dpm++")
    p.add_argument("--truncation", type=int, nargs="+", default=None, metavar="K",
                   help="nested-dropout truncation(s): smaller K = more editable, less faithful; several "
                        "also write a sweep grid per seed (rows prompts, columns truncations)")
    p.add_argument("--batch-size", type=int, default=8, help="images per U-Net batch")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    add_runtime_args(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="regenerate images that already exist")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("run", help="run a JSONL job of many requests: packed batches, resumable, torchrun-aware")
    from . import jobs
    jobs.add_arguments(p)
    p.set_defaults(func=jobs.main)

    p = sub.add_parser("tiny-model", help="write the built-in tiny model as a diffusers folder")
    p.add_argument("dir")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("export", help="export the U-Net (with per-layer K/V table inputs) to ONNX or TensorRT")
    _add_model_args(p)
    p.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--out", required=True, help="output folder (reused when the model is unchanged)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="latency / throughput ladder: reference -> diffusers -> neti-fast backends")
    from .bench import ladder
    ladder.add_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="CLIP image / text and DINO similarity of generated images (per truncation)")
    from . import evaluate
    evaluate.add_arguments(p)
    p.set_defaults(func=evaluate.main)

    from .serve.cli import add_parser as add_serve_parser
    add_serve_parser(sub)
    return ap


def main(argv=None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except NetiError as e:
        print(f"neti-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"neti-fast {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
