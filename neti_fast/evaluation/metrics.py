"""The metrics of `neti-fast eval`: CLIP image / text similarity and DINO similarity of generated images.

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

import math
from pathlib import Path

from ..errors import NetiError
from .inputs import load_generated_images, load_train_images, read_manifest_entries, strip_placeholder, truncation_key, _sort_truncations
from .models import DEFAULT_CLIP, DEFAULT_DINO, Similarity

METRICS = ("image_similarity", "text_similarity", "dino_similarity")


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
