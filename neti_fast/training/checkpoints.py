"""Training checkpoints: `checkpoint-{step}.safetensors` with the concept tensors, the AdamW state
and every RNG state; the non-tensor state is JSON in the safetensors metadata (no pickle). See
trainer.py's docstring for what resuming guarantees."""
from __future__ import annotations

import json
import random
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..errors import NetiError
from .config import TrainConfig
from ..utils import atomic_write

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)\.safetensors$")


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


# Settings a plain re-run may change and still continue the same run: where and how long it goes.
# How it runs and what it shows change nothing it computes, beyond rounding.
RESUME_FREE = ("out", "steps", "save_every", "resume", "device", "gradient_checkpointing", "channels_last",
               "compile", "validate_every", "validation_prompts", "validation_seeds", "validation_steps",
               "tensorboard")


def settings_changed(path: Path, cfg: TrainConfig) -> list[str]:
    """The run settings (TrainConfig fields but RESUME_FREE) that differ between this run and the
    checkpoint at `path`, as "name recorded -> now"; unreadable records count as no difference
    (load_checkpoint then refuses what cannot be resumed)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            recorded = json.loads((f.metadata() or {})["neti_fast.train_state"])["config"]
    except Exception:  # noqa: BLE001 - load_checkpoint names the problem
        return []
    now = asdict(cfg)
    return [f"{k} {recorded[k]!r} -> {now[k]!r}" for k in now
            if k not in RESUME_FREE and k in recorded and recorded[k] != now[k]]


def _rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps the single-process seed, so one process and rank 0 draw the same stream."""
    return seed + 1_000_003 * rank


def _seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- checkpoints

def _rng_state(train_gen: torch.Generator, dataset, device: torch.device) -> tuple[dict, dict]:
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    pv, pinternal, pgauss = random.getstate()
    ds_js, ds_t = dataset.state_dict()
    js = {"numpy": {"name": np_name, "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
          "python": [pv, list(pinternal), pgauss], "data": ds_js}
    tensors = {"rng.torch": torch.get_rng_state(), "rng.train": train_gen.get_state(),
               "rng.numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
               "rng.data_order": ds_t["order_gen"]}
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    return js, tensors


def _set_rng_state(js: dict, tensors: dict, train_gen: torch.Generator, dataset, device: torch.device) -> None:
    n = js["numpy"]
    np.random.set_state((n["name"], tensors["rng.numpy_keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    pv, pinternal, pgauss = js["python"]
    random.setstate((pv, tuple(pinternal), pgauss))
    torch.set_rng_state(tensors["rng.torch"])
    train_gen.set_state(tensors["rng.train"])
    dataset.load_state_dict(js["data"], {"order_gen": tensors["rng.data_order"]})
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)


def unet_dtype_is_fp16(model) -> bool:
    """fp16 gradients flow back to the concept (through the U-Net, or a --text-dtype float16 text
    encoder): the run needs loss scaling."""
    if model.device.type != "cuda":
        return False
    return model.unet.dtype == torch.float16 or any(te.dtype == torch.float16 for te in model.text_encoders)


def save_checkpoint(path: Path, step: int, cfg: TrainConfig, trainable, optimizer, train_gen,
                    dataset, device, text_dim: int, scaler=None, ranks: list | None = None,
                    lr_position: int | None = None) -> Path:
    """`ranks`: under data parallelism, every rank's (_rng_state js, tensors), gathered by `_gather_rng`.
    `lr_position`: the official schedule's position (trainer.lr_schedule)."""
    from safetensors.torch import save_file
    concept = trainable.concept(text_dim)
    tensors = concept.tensors()  # a checkpoint is also a loadable concept file
    params = trainable.parameters()
    for i, p in enumerate(params):
        for k, v in optimizer.state.get(p, {}).items():
            tensors[f"optim.{i}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    rng_js, rng_t = _rng_state(train_gen, dataset, device)
    tensors.update({k: v.cpu().contiguous() for k, v in rng_t.items()})
    md = concept.metadata()
    scaler_state = scaler.state_dict() if scaler is not None and scaler.is_enabled() else None
    state = {"step": step, "num_params": len(params), "rng": rng_js, "scaler": scaler_state, "config": asdict(cfg),
             "lr_position": lr_position}
    if ranks:
        state["world_size"] = len(ranks)
        state["rank_rng"] = {str(r): js for r, (js, _) in enumerate(ranks) if r > 0}
        for r, (_, ts) in enumerate(ranks):
            if r > 0:
                tensors.update({f"rank{r}.{k}": v.cpu().contiguous() for k, v in ts.items()})
    md["neti_fast.train_state"] = json.dumps(state)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=md))


def load_checkpoint(path: Path, cfg: TrainConfig, trainable, optimizer, train_gen, dataset, device,
                    scaler=None, rank: int = 0) -> tuple[int, int | None]:
    """Restore a checkpoint into the run's objects; returns (step, the official schedule's position
    or None when the checkpoint has none)."""
    from safetensors import safe_open
    where = str(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        state = json.loads(md["neti_fast.train_state"])
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
        raise NetiError(f"{where}: not a neti-fast training checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    except Exception as e:  # safetensors raises its own error type for malformed headers
        raise NetiError(f"{where}: not a readable checkpoint ({str(e).splitlines()[0]})") from None
    for key, want in (("method", cfg.method), ("placeholder", cfg.placeholder)):
        if md.get(key) != want:
            raise NetiError(f"{where}: checkpoint was trained with {key} {md.get(key)!r}, this run uses {want!r}")
    trainable.load_tensors(tensors, where)
    params = trainable.parameters()
    if state.get("num_params") != len(params):
        raise NetiError(f"{where}: checkpoint does not match this run's concept settings (parameter count)")
    opt_state = {}
    for i in range(len(params)):
        st = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"optim.{i}.")}
        if st:
            opt_state[i] = st
    sd = optimizer.state_dict()
    sd["state"] = opt_state
    optimizer.load_state_dict(sd)
    rng_js, rng_t = state["rng"], tensors
    if rank > 0:
        rng_js = state.get("rank_rng", {}).get(str(rank))
        rng_t = {k[len(f"rank{rank}."):]: v for k, v in tensors.items() if k.startswith(f"rank{rank}.")}
    if rng_js is not None:
        _set_rng_state(rng_js, rng_t, train_gen, dataset, device)
    else:  # a checkpoint from fewer processes has no stream for this rank: a fresh one, seeded by the step
        _seed_globals(_rank_seed(cfg.seed, rank) + int(state["step"]))
    if scaler is not None and scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    pos = state.get("lr_position")
    return int(state["step"]), (None if pos is None else int(pos))
