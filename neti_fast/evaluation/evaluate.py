"""`neti-fast eval`: CLIP image / text similarity and DINO similarity of generated images.

The protocol of Textual Inversion (Gal et al. 2022) and NeTI (Alaluf et al. 2023); XTI / P+ and
DreamBooth add DINO:

- **image similarity** (fidelity): mean cosine similarity between the CLIP image embeddings of the
  generated images and of the training images, over all (generated, training) pairs;
- **text similarity** (editability): mean cosine similarity between each generated image's CLIP image
  embedding and the CLIP text embedding of its prompt *without the concept* (`{}` / `{name}` removed,
  whitespace collapsed: "A photo of {} on a beach" -> "A photo of on a beach");
- **DINO similarity**: like image similarity, with DINO ViT-S/16 CLS embeddings.

Embeddings are the models' own: CLIP's projected image / text features (`get_image_features`,
`get_text_features`), DINO's final-layer-norm CLS token; all are L2-normalised before the dot product.
A group's value (all images, one truncation, one prompt) is the mean of its images' values, i.e. the
pairwise mean over (group x training images).

Default models: CLIP ViT-B/32 (`openai/clip-vit-base-patch32`), the model of the Textual Inversion
evaluation code (`LDMCLIPEvaluator(clip_model="ViT-B/32")`) whose protocol NeTI follows, and DINO
ViT-S/16 (`facebook/dino-vits16`), the DINO model of DreamBooth's and XTI's DINO metric.

Module-level imports stay light so that `neti-fast --help` starts fast; torch, transformers and
matplotlib are imported where they are used.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

from ..errors import NetiError
from ..utils import atomic_write, default_device, first_line as _first_line

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINO = "facebook/dino-vits16"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MANIFEST_JSON = "manifest.json"      # older `generate` folders
MANIFEST_JSONL = "manifest.jsonl"
METRICS = ("image_similarity", "text_similarity", "dino_similarity")

_PLACEHOLDER = re.compile(r"\{[^{}\s]*\}")


# ----------------------------------------------------------------------------- prompts

def strip_placeholder(prompt: str, placeholders=()) -> str:
    """The prompt without the concept: `{}` / `{name}` markers (and any literal `placeholders`)
    removed, whitespace collapsed, no space left before punctuation.

    "A photo of {} on a beach" -> "A photo of on a beach"; "An oil painting of {}." -> "An oil painting of."
    """
    text = _PLACEHOLDER.sub(" ", prompt)
    for p in placeholders:
        if p:
            text = text.replace(p, " ")
    text = " ".join(text.split())
    return re.sub(r"\s+([.,;:!?])", r"\1", text)


def truncation_key(truncation: int | None) -> str:
    return "full" if truncation is None else str(truncation)


def _sort_truncations(keys):
    """Truncation values in increasing order, full (None) last: most editable -> most faithful."""
    return sorted(keys, key=lambda t: (t is None, t if t is not None else 0))


# ----------------------------------------------------------------------------- inputs

def _parse_truncation(value, where: str) -> int | None:
    if value is None or value == "full":
        return None
    if isinstance(value, bool):
        raise NetiError(f"{where}: truncation {value!r} is not an integer or null")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise NetiError(f"{where}: truncation {value!r} is not an integer or null")


def _check_entry(entry, where: str) -> dict:
    if not isinstance(entry, dict):
        raise NetiError(f"{where}: expected a JSON object per image, got {type(entry).__name__}")
    file, prompt = entry.get("file"), entry.get("prompt")
    if not isinstance(file, str) or not file:
        raise NetiError(f"{where}: an image entry has no \"file\"")
    if not isinstance(prompt, str):
        raise NetiError(f"{where}: image {file}: no \"prompt\"")
    return {**entry, "truncation": _parse_truncation(entry.get("truncation"), f"{where}: image {file}")}


def read_manifest_entries(out_dir: str | Path) -> list[dict]:
    """Image entries of a generation folder: `manifest.json` (`neti-fast generate`) and / or
    `manifest.jsonl` plus any `manifest.rank*.jsonl` (the job runner; one object per line). Only
    entries whose `status` is absent or "done" count; all files together -> their union by file
    (a later finished entry for the same file replaces an earlier one). Every listed image must
    exist. Entries come back sorted by file name."""
    out = Path(out_dir)
    if not out.exists():
        raise NetiError(f"{out}: output folder does not exist")
    if not out.is_dir():
        raise NetiError(f"{out}: is not a folder (give the folder written by `neti-fast generate`)")
    from ..jobs import manifest
    pj = out / MANIFEST_JSON
    if not pj.is_file() and not manifest.manifest_files(out):
        raise NetiError(f"{out}: no {MANIFEST_JSON} or {MANIFEST_JSONL} (give a folder written by `neti-fast generate`)")
    entries: dict[str, dict] = {}
    for where, e in manifest.read_entries(out):  # a later finished entry for a file replaces an earlier one
        e = _check_entry(e, where)
        entries[e["file"]] = e
    if not entries:
        raise NetiError(f"{out}: the manifest lists no finished images")
    missing = [f for f in sorted(entries) if not (out / f).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise NetiError(f"{out}: {len(missing)} image(s) listed in the manifest are missing: "
                        f"{', '.join(missing[:3])}{more}")
    return [entries[f] for f in sorted(entries)]


def _open_rgb(path: Path):
    from PIL import Image, UnidentifiedImageError

    from ..training.data import to_rgb
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise NetiError(f"{path}: not a readable image ({_first_line(e)})") from None


def load_generated_images(out_dir: str | Path, entries: list[dict]) -> list:
    out = Path(out_dir)
    return [_open_rgb(out / e["file"]) for e in entries]


def load_train_images(train_dir: str | Path) -> tuple[list, list[str]]:
    """Every .png / .jpg / .jpeg / .webp in `train_dir` (not recursive, sorted) as RGB; unreadable
    files are skipped with a warning. Returns (images, file names)."""
    d = Path(train_dir)
    if not d.exists():
        raise NetiError(f"--train-images {d}: folder does not exist")
    if not d.is_dir():
        raise NetiError(f"--train-images {d}: is not a folder")
    files = sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_EXTENSIONS)
    images, names = [], []
    for p in files:
        try:
            images.append(_open_rgb(p))
            names.append(p.name)
        except NetiError as e:
            warnings.warn(f"{e}; skipped", stacklevel=2)
    if not images:
        what = f"none of its {len(files)} image files is readable" if files else \
            f"no {' / '.join(IMAGE_EXTENSIONS)} files in it"
        raise NetiError(f"--train-images {d}: no training images ({what})")
    return images, names


# ----------------------------------------------------------------------------- models

def _resolve(arg: str, spec: str) -> str:
    """A local folder (must exist and be a folder) or a hub id (owner/name)."""
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise NetiError(f"{arg} {spec}: is not a folder (give a model folder or a hub id)")
        return str(p)
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1 or "\\" in spec:
        raise NetiError(f"{arg} {spec}: no such folder, and not a hub id (owner/name)")
    return spec


def _load_error(arg: str, spec: str, e: BaseException, what: str = "it") -> NetiError:
    where = "" if Path(spec).expanduser().exists() else "no such local folder, and "
    return NetiError(f"{arg} {spec}: {where}could not load {what} ({_first_line(e)})")


_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError)


def _image_processor(arg: str, path: str):
    import importlib.util

    import transformers
    from transformers import AutoImageProcessor
    kwargs = {}
    if int(transformers.__version__.split(".")[0]) >= 5 and importlib.util.find_spec("torchvision") is None:
        kwargs["backend"] = "pil"  # same preprocessing; avoids the "requires torchvision" fallback warning
    try:
        return AutoImageProcessor.from_pretrained(path, **kwargs)
    except _LOAD_ERRORS as e:
        raise _load_error(arg, path, e, "its image processor") from None


def _model_type(arg: str, path: str) -> str:
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(path).model_type
    except _LOAD_ERRORS as e:
        raise _load_error(arg, path, e) from None


def _check_loaded(arg: str, path: str, info: dict) -> None:
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise NetiError(f"{arg} {path}: the checkpoint lacks {len(missing)} weight(s) of the model "
                        f"(e.g. {missing[0]}); is it the right kind of model?")


def load_clip(spec: str = DEFAULT_CLIP, device="cpu"):
    """(CLIPModel, CLIPTokenizer, image processor) from a local folder or hub id, eval mode, fp32."""
    from transformers import CLIPModel, CLIPTokenizer
    path = _resolve("--clip", spec)
    mtype = _model_type("--clip", path)
    if mtype != "clip":
        raise NetiError(f"--clip {spec}: not a CLIP model (its config says model_type {mtype!r})")
    try:
        model, info = CLIPModel.from_pretrained(path, output_loading_info=True)
        tokenizer = CLIPTokenizer.from_pretrained(path)
    except _LOAD_ERRORS as e:
        raise _load_error("--clip", spec, e) from None
    _check_loaded("--clip", spec, info)
    vocab = model.config.text_config.vocab_size
    if len(tokenizer) <= 2 or len(tokenizer) > vocab:
        raise NetiError(f"--clip {spec}: no usable CLIP tokenizer in it ({len(tokenizer)} tokens for a "
                        f"{vocab}-token text model)")
    processor = _image_processor("--clip", path)
    return model.to(device).eval().requires_grad_(False), tokenizer, processor


def load_dino(spec: str = DEFAULT_DINO, device="cpu"):
    """(ViT model, image processor) from a local folder or hub id (ViT, e.g. DINO; DINOv2 also works)."""
    from transformers import AutoModel, ViTModel
    path = _resolve("--dino", spec)
    mtype = _model_type("--dino", path)
    if mtype not in ("vit", "dinov2"):
        raise NetiError(f"--dino {spec}: not a ViT / DINO model (its config says model_type {mtype!r})")
    try:
        if mtype == "vit":
            model, info = ViTModel.from_pretrained(path, add_pooling_layer=False, output_loading_info=True)
        else:
            model, info = AutoModel.from_pretrained(path, output_loading_info=True)
    except _LOAD_ERRORS as e:
        raise _load_error("--dino", spec, e) from None
    _check_loaded("--dino", spec, info)
    processor = _image_processor("--dino", path)
    return model.to(device).eval().requires_grad_(False), processor


def _pooled(out):
    """get_*_features: a tensor in transformers 4.x; in 5.x an output whose pooler_output is projected."""
    import torch
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "pooler_output"):
        return out.pooler_output
    return out[1] if isinstance(out, tuple) else out


def _as_pil(images) -> list:
    import numpy as np
    from PIL import Image
    if isinstance(images, np.ndarray):
        images = [images] if images.ndim == 3 else list(images)
    out = []
    for im in images:
        if isinstance(im, Image.Image):
            out.append(im if im.mode == "RGB" else im.convert("RGB"))
        else:
            a = np.asarray(im)
            if a.dtype != np.uint8:
                raise NetiError(f"images must be PIL images or uint8 arrays [H, W, 3], got dtype {a.dtype}")
            out.append(Image.fromarray(a).convert("RGB"))
    return out


class Similarity:
    """Loaded CLIP (and optionally DINO) models; embeddings come back L2-normalised, float32, on CPU.

        sim = Similarity(clip="openai/clip-vit-base-patch32", dino="facebook/dino-vits16")
        g, r = sim.image_embeds(generated), sim.image_embeds(training)   # PIL images or uint8 arrays
        (g @ r.T).mean()                                                 # image similarity
    """

    def __init__(self, clip: str = DEFAULT_CLIP, dino: str | None = DEFAULT_DINO, device=None, batch_size: int = 32):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise NetiError(f"--batch-size {batch_size}: must be a positive integer")
        self.device = str(device or default_device())
        self.batch_size = batch_size
        self.clip_name, self.dino_name = clip, dino
        self.clip_model, self.tokenizer, self.clip_processor = load_clip(clip, self.device)
        self.dino_model, self.dino_processor = load_dino(dino, self.device) if dino else (None, None)

    def _batches(self, items):
        for i in range(0, len(items), self.batch_size):
            yield items[i:i + self.batch_size]

    @staticmethod
    def _normalize(x):
        import torch
        return torch.nn.functional.normalize(x.float(), dim=-1).cpu()

    def _embed_images(self, images, processor, model, forward, width: int):
        """Batched `forward(model, pixel_values)` over images, normalised: [N, width]."""
        import torch
        chunks = []
        with torch.inference_mode():
            for batch in self._batches(_as_pil(images)):
                px = processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device, model.dtype)
                chunks.append(self._normalize(forward(model, px)))
        return torch.cat(chunks) if chunks else torch.zeros(0, width)

    def image_embeds(self, images):
        """CLIP image embeddings [N, projection_dim] (the model's visual projection), normalised."""
        return self._embed_images(images, self.clip_processor, self.clip_model,
                                  lambda m, px: _pooled(m.get_image_features(pixel_values=px)),
                                  self.clip_model.config.projection_dim)

    def text_embeds(self, texts: list[str]):
        """CLIP text embeddings [N, projection_dim] (the model's text projection), normalised."""
        import torch
        texts = [texts] if isinstance(texts, str) else list(texts)
        max_len = min(self.clip_model.config.text_config.max_position_embeddings,
                      getattr(self.tokenizer, "model_max_length", 77) or 77)
        chunks = []
        with torch.inference_mode():
            for batch in self._batches(texts):
                enc = self.tokenizer(batch, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
                out = self.clip_model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                                        attention_mask=enc["attention_mask"].to(self.device))
                chunks.append(self._normalize(_pooled(out)))
        return torch.cat(chunks) if chunks else torch.zeros(0, self.clip_model.config.projection_dim)

    def dino_embeds(self, images):
        """DINO CLS embeddings [N, hidden] (last hidden state after the final layer norm), normalised."""
        if self.dino_model is None:
            raise NetiError("DINO was not loaded (--no-dino)")
        return self._embed_images(images, self.dino_processor, self.dino_model,
                                  lambda m, px: m(pixel_values=px).last_hidden_state[:, 0],
                                  self.dino_model.config.hidden_size)


# ----------------------------------------------------------------------------- metrics

def per_image_scores(gen_clip, train_clip, text_clip, gen_dino=None, train_dino=None) -> dict[str, list[float]]:
    """Per generated image i: image similarity mean_j cos(g_i, r_j), text similarity cos(g_i, t_i)
    (t_i: the embedding of image i's prompt without the concept), DINO similarity mean_j cos(d_i, dr_j).
    Inputs are normalised embeddings ([N, D] / [M, D]; text_clip is [N, D], row i for image i)."""
    scores = {"image_similarity": (gen_clip @ train_clip.T).mean(dim=1).tolist(),
              "text_similarity": (gen_clip * text_clip).sum(dim=1).tolist()}
    if gen_dino is not None:
        scores["dino_similarity"] = (gen_dino @ train_dino.T).mean(dim=1).tolist()
    return scores


def _group(rows: list[dict], metrics) -> dict:
    return {"n_images": len(rows), **{m: math.fsum(r[m] for r in rows) / len(rows) for m in metrics}}


def summarize(rows: list[dict], metrics=METRICS) -> dict:
    """rows: one dict per generated image (prompt, truncation, one value per metric) -> overall,
    per-truncation (keys "8", "16", ..., "full"; ascending, full last) and per-prompt groups."""
    metrics = [m for m in metrics if rows and m in rows[0]]
    by_trunc: dict = {}
    by_prompt: dict = {}
    for r in rows:
        by_trunc.setdefault(r["truncation"], []).append(r)
        by_prompt.setdefault(r["prompt"], []).append(r)
    per_prompt = {}
    for prompt, prs in by_prompt.items():
        sub: dict = {}
        for r in prs:
            sub.setdefault(r["truncation"], []).append(r)
        per_prompt[prompt] = {"text": prs[0]["text"], **_group(prs, metrics),
                              "per_truncation": {truncation_key(t): _group(sub[t], metrics)
                                                 for t in _sort_truncations(sub)}}
    return {"overall": _group(rows, metrics),
            "per_truncation": {truncation_key(t): _group(by_trunc[t], metrics) for t in _sort_truncations(by_trunc)},
            "per_prompt": per_prompt}


def evaluate_images(sim: Similarity, generated, prompts: list[str], truncations: list, train_images,
                    files: list[str] | None = None, placeholders=()) -> dict:
    """Metrics for in-memory images: `generated[i]` was made from `prompts[i]` at `truncations[i]`."""
    if not (len(generated) == len(prompts) == len(truncations)):
        raise NetiError("generated, prompts and truncations must have the same length")
    if len(generated) == 0:
        raise NetiError("no generated images to evaluate")
    if len(train_images) == 0:
        raise NetiError("no training images")
    texts = [strip_placeholder(p, placeholders) for p in prompts]
    unique = list(dict.fromkeys(texts))
    text_emb = sim.text_embeds(unique)
    row_of = {t: i for i, t in enumerate(unique)}
    gen_clip, train_clip = sim.image_embeds(generated), sim.image_embeds(train_images)
    gen_dino = train_dino = None
    if sim.dino_model is not None:
        gen_dino, train_dino = sim.dino_embeds(generated), sim.dino_embeds(train_images)
    scores = per_image_scores(gen_clip, train_clip, text_emb[[row_of[t] for t in texts]], gen_dino, train_dino)
    rows = []
    for i in range(len(generated)):
        row = {"file": files[i] if files else None, "prompt": prompts[i], "text": texts[i],
               "truncation": truncations[i]}
        row.update({m: v[i] for m, v in scores.items()})
        rows.append(row)
    summary = summarize(rows)
    return {"clip": sim.clip_name, "dino": sim.dino_name,
            "counts": {"generated": len(generated), "train": len(train_images), "prompts": len(set(prompts)),
                       "truncations": len(set(truncations))},
            **summary, "images": rows}


def evaluate_folder(out_dir: str | Path, train_dir: str | Path, clip: str = DEFAULT_CLIP,
                    dino: str | None = DEFAULT_DINO, device=None, batch_size: int = 32,
                    placeholders=(), similarity: Similarity | None = None) -> dict:
    """Evaluate a `neti-fast generate` (or job runner) folder against the training images.

    All inputs are checked before any model is loaded. `similarity` reuses loaded models (then
    `clip`, `dino`, `device` and `batch_size` are ignored). Returns the report (see `save_report`)."""
    entries = read_manifest_entries(out_dir)
    train_images, train_files = load_train_images(train_dir)
    generated = load_generated_images(out_dir, entries)
    sim = similarity or Similarity(clip=clip, dino=dino, device=device, batch_size=batch_size)
    report = evaluate_images(sim, generated, [e["prompt"] for e in entries], [e["truncation"] for e in entries],
                             train_images, files=[e["file"] for e in entries], placeholders=placeholders)
    return {"out_dir": str(out_dir), "train_dir": str(train_dir), "train_files": train_files, **report}


# ----------------------------------------------------------------------------- outputs

def write_json(report: dict, path: str | Path) -> Path:
    text = json.dumps(report, indent=1, allow_nan=False)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def plot_tradeoff(report: dict, path: str | Path) -> Path:
    """Text similarity (x, editability) vs image similarity (y, fidelity), one point per truncation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = report["per_truncation"]
    keys = list(groups)
    xs = [groups[k]["text_similarity"] for k in keys]
    ys = [groups[k]["image_similarity"] for k in keys]
    fig = Figure(figsize=(5, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if len(keys) > 1:
        ax.plot(xs, ys, color="0.7", linewidth=1, zorder=1)
    ax.scatter(xs, ys, s=40, zorder=2)
    for k, x, y in zip(keys, xs, ys):
        ax.annotate("full" if k == "full" else f"t={k}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
    ax.set_xlabel("text similarity (CLIP, editability)")
    ax.set_ylabel("image similarity (CLIP, fidelity)")
    ax.set_title(f"{report['counts']['generated']} images, {report['counts']['train']} training images", fontsize=10)
    ax.margins(0.2)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def save_report(report: dict, json_path: str | Path | None = None, plot_path: str | Path | None = None) -> None:
    if json_path:
        write_json(report, json_path)
    if plot_path:
        plot_tradeoff(report, plot_path)


def format_table(report: dict) -> str:
    metrics = [m for m in METRICS if m in report["overall"]]
    head = ["truncation", "images"] + [m.replace("_similarity", "-sim") for m in metrics]
    rows = [[k, str(g["n_images"])] + [f"{g[m]:.4f}" for m in metrics] for k, g in report["per_truncation"].items()]
    g = report["overall"]
    rows.append(["all", str(g["n_images"])] + [f"{g[m]:.4f}" for m in metrics])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*r) for r in [head] + rows)


# ----------------------------------------------------------------------------- CLI

def add_arguments(p) -> None:
    p.add_argument("out_dir", help="folder written by `neti-fast generate` (manifest.json) or the job runner (manifest.jsonl)")
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
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")


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
