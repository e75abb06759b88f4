"""What a training run writes beside its checkpoints, for people to look at:

- `settings.json`: the run's TrainConfig (every setting, defaults included), the number of processes
  and the library versions, rewritten (atomically) when a run starts or resumes;
- `loss.csv`: one row per optimizer step (step, loss, lr, seconds since the run started), kept across
  resumes (rows past the checkpoint a run resumes from are dropped: that run redoes them);
- `loss.png`: the loss (each step, and its running mean) and the learning rate, redrawn at every
  checkpoint and at the end;
- optionally TensorBoard event files in `tensorboard/` (loss, lr, validation grids).
Only rank 0 writes.
"""
from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import NetiError
from ..utils import atomic_write

CSV_FIELDS = ("step", "loss", "lr", "seconds")


def write_settings(out: Path, cfg, world: int) -> Path:
    import diffusers
    import torch
    import transformers

    from .. import __version__
    data = {"config": asdict(cfg), "world_size": world,
            "versions": {"neti_fast": __version__, "torch": torch.__version__,
                         "diffusers": diffusers.__version__, "transformers": transformers.__version__}}
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return atomic_write(out / "settings.json", lambda tmp: Path(tmp).write_text(text))


def read_loss_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{"step": int(r["step"]), "loss": float(r["loss"]), "lr": float(r["lr"]),
                 "seconds": float(r["seconds"])} for r in csv.DictReader(f)]


class TrainLog:
    """loss.csv / loss.png / TensorBoard for one run (rank 0); `start`: the step the run begins at."""

    def __init__(self, out: Path, start: int, tensorboard: bool = False):
        self.out, self.path = Path(out), Path(out) / "loss.csv"
        self.rows: list[dict] = []
        if self.path.is_file():
            try:
                self.rows = [r for r in read_loss_csv(self.path) if r["step"] <= start]
            except (OSError, KeyError, ValueError):
                self.rows = []  # an unreadable log is started afresh (the checkpoints hold the run)
        self._offset = self.rows[-1]["seconds"] if self.rows else 0.0
        self._t0 = time.perf_counter()
        self._rewrite()
        self._file = open(self.path, "a", newline="")
        self._csv = csv.DictWriter(self._file, CSV_FIELDS)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise NetiError("--tensorboard: the tensorboard package is not installed "
                                "(pip install tensorboard)") from None
            self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=start + 1)

    def _rewrite(self) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, CSV_FIELDS, lineterminator="\n")
        w.writeheader()
        w.writerows(self.rows)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(buf.getvalue()))

    def step(self, step: int, loss: float, lr: float) -> None:
        row = {"step": step, "loss": loss, "lr": lr, "seconds": round(self._offset + time.perf_counter() - self._t0, 3)}
        self.rows.append(row)
        self._csv.writerow(row)
        self._file.flush()
        if self.writer is not None:
            self.writer.add_scalar("loss", loss, step)
            self.writer.add_scalar("lr", lr, step)

    def image(self, tag: str, image, step: int) -> None:
        """uint8 [H, W, 3] to TensorBoard."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def plot(self) -> Path | None:
        """loss.png: the loss per step (faint), its running mean over 25 steps, the lr on a second axis."""
        if not self.rows:
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
        steps = np.array([r["step"] for r in self.rows])
        loss = np.array([r["loss"] for r in self.rows])
        k = min(25, len(loss))
        mean = np.convolve(loss, np.ones(k) / k, mode="valid")
        fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
        ax.plot(steps, loss, color="tab:blue", alpha=0.3, lw=0.8, label="loss")
        ax.plot(steps[k - 1:], mean, color="tab:blue", lw=1.8, label=f"mean of {k}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (MSE)")
        lr_ax = ax.twinx()
        lr_ax.plot(steps, [r["lr"] for r in self.rows], color="tab:orange", lw=1.0, label="lr")
        lr_ax.set_ylabel("learning rate", color="tab:orange")
        lr_ax.set_ylim(bottom=0)
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        return atomic_write(self.out / "loss.png", lambda tmp: Path(tmp).write_bytes(buf.getvalue()))

    def close(self) -> None:
        self._file.close()
        if self.writer is not None:
            self.writer.close()
