"""`neti-fast eval`: its flags and the command."""
from __future__ import annotations

from pathlib import Path

from ..errors import NetiError
from ..options import count
from ..utils import default_device
from .metrics import evaluate_folder
from .models import DEFAULT_CLIP, DEFAULT_DINO
from .report import format_table, save_report


def add_arguments(p) -> None:
    p.add_argument("out_dir", help="folder written by `neti-fast generate` or `neti-fast run` (its manifest.jsonl lists the images)")
    p.add_argument("--train-images", required=True, metavar="DIR",
                   help="the concept's training images (.png / .jpg / .jpeg / .webp)")
    p.add_argument("--clip", default=DEFAULT_CLIP,
                   help=f"CLIP model folder or hub id (default {DEFAULT_CLIP}: ViT-B/32, as Textual Inversion / NeTI)")
    p.add_argument("--dino", default=DEFAULT_DINO, help=f"DINO ViT folder or hub id (default {DEFAULT_DINO})")
    p.add_argument("--no-dino", action="store_true", help="skip the DINO similarity")
    p.add_argument("--placeholder", action="append", default=[], metavar="TOKEN",
                   help="also remove this literal token from prompts (besides {} / {name}); repeatable")
    p.add_argument("--json", default=None, metavar="PATH", help="report to write (default OUT_DIR/eval.json)")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="text vs image similarity per truncation, PNG (default OUT_DIR/eval.png)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--batch-size", type=count(), default=32, help="images per forward pass (default 32)")


def main(args) -> dict:
    if args.batch_size < 1:
        raise NetiError(f"--batch-size {args.batch_size}: must be a positive integer")
    device = args.device or default_device()
    if str(device).startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise NetiError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
    out = Path(args.out_dir)
    report = evaluate_folder(out, args.train_images, clip=args.clip, dino=None if args.no_dino else args.dino,
                             device=device, batch_size=args.batch_size, placeholders=tuple(args.placeholder))
    json_path = Path(args.json) if args.json else out / "eval.json"
    plot_path = Path(args.plot) if args.plot else out / "eval.png"
    save_report(report, json_path, plot_path)
    c = report["counts"]
    print(f"{c['generated']} generated images ({c['prompts']} prompt(s)) vs {c['train']} training images; "
          f"CLIP {report['clip']}, DINO {report['dino'] or 'skipped'}")
    print(format_table(report))
    print(f"wrote {json_path} and {plot_path}")
    return report
