"""The evaluation's outputs: eval.json, the reconstruction-vs-editability plot, a text table."""
from __future__ import annotations

import json
from pathlib import Path

from ..utils import atomic_write
from .metrics import METRICS


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
