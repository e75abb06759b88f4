"""The precomputed table: a concept evaluated on every (integer timestep, layer).

After `precompute`, TI, XTI and NeTI concepts look the same to the engine: rows of token and bypass
embeddings indexed by (t, l). File (safetensors):
    token                 [1000, 16, D] float32      bypass            [1000, 16, D] (NeTI with bypass)
    token.trunc{K}        same, with nested-dropout truncation K      bypass.trunc{K}
    + the concept's own tensors and metadata (neti_fast.format=table), so a table is also a concept
      file and fractional timesteps (e.g. Euler's) are served exactly by evaluating the mapper.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .concept import Concept, atomic_write
from .errors import NetiError
from .models import NUM_LAYERS

NUM_TIMESTEPS = 1000


def _key(name: str, truncation: int | None) -> str:
    return name if truncation is None else f"{name}.trunc{truncation}"


@dataclass
class Table:
    concept: Concept
    token: dict = field(default_factory=dict)    # truncation (None = full) -> [1000, 16, D]
    bypass: dict = field(default_factory=dict)

    @property
    def placeholder(self) -> str:
        return self.concept.placeholder

    @property
    def time_varying(self) -> bool:
        return self.concept.time_varying

    @property
    def truncations(self) -> list:
        return [k for k in self.token if k is not None]

    def rows(self, timesteps: torch.Tensor, truncation: int | None = None):
        """Rows for a step schedule: ([S, 16, D], [S, 16, D] or None), float32 on CPU.

        Integer timesteps with a precomputed truncation are a lookup; anything else (fractional t,
        a truncation not in the file) evaluates the concept, which is what the table holds anyway.
        """
        ts = timesteps.detach().float().cpu()
        S = len(ts)
        integral = bool((ts == ts.round()).all()) and bool(((ts >= 0) & (ts < NUM_TIMESTEPS)).all())
        if integral and truncation in self.token:
            idx = ts.long()
            byp = self.bypass.get(truncation)
            return self.token[truncation][idx], None if byp is None else byp[idx]
        t = ts.repeat_interleave(NUM_LAYERS)
        l = torch.arange(NUM_LAYERS).repeat(S).float()
        with torch.no_grad():
            token, bypass = self.concept.rows(t, l, truncation)
        D = token.shape[-1]
        return token.cpu().view(S, NUM_LAYERS, D), None if bypass is None else bypass.cpu().view(S, NUM_LAYERS, D)

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file
        tensors = dict(self.concept.tensors())
        for trunc, tok in self.token.items():
            tensors[_key("token", trunc)] = tok.contiguous()
            if trunc in self.bypass:
                tensors[_key("bypass", trunc)] = self.bypass[trunc].contiguous()
        md = self.concept.metadata()
        md["neti_fast.format"] = "table"
        md["truncations"] = ",".join(str(k) for k in self.truncations)
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=md))


def precompute(concept: Concept, truncations=(), progress: bool = True, chunk: int = 4000) -> Table:
    """Evaluate `concept` at all 1000 integer timesteps x 16 layers, for full and each truncation."""
    for k in truncations:
        concept.check_truncation(k)
    table = Table(concept)
    t = torch.arange(NUM_TIMESTEPS).repeat_interleave(NUM_LAYERS).float()
    l = torch.arange(NUM_LAYERS).repeat(NUM_TIMESTEPS).float()
    todo = [None] + [k for k in dict.fromkeys(truncations)]
    bar = tqdm(total=len(todo) * len(t), desc="precompute", unit="row", disable=not progress)
    for trunc in todo:
        toks, byps = [], []
        with torch.no_grad():
            for i in range(0, len(t), chunk):
                tok, byp = concept.rows(t[i:i + chunk], l[i:i + chunk], trunc)
                toks.append(tok.float().cpu())
                if byp is not None:
                    byps.append(byp.float().cpu())
                bar.update(len(tok))
        table.token[trunc] = torch.cat(toks).view(NUM_TIMESTEPS, NUM_LAYERS, -1)
        if byps:
            table.bypass[trunc] = torch.cat(byps).view(NUM_TIMESTEPS, NUM_LAYERS, -1)
    bar.close()
    return table


def load_table(path: str | Path, placeholder: str | None = None) -> Table:
    """A table file, or any concept file (then rows are evaluated on demand, exactly as precompute would)."""
    from safetensors import safe_open

    from .concept import load_concept
    concept = load_concept(path, placeholder=placeholder)
    table = Table(concept)
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as f:
                md = f.metadata() or {}
                if md.get("neti_fast.format") == "table":
                    for name in f.keys():
                        base, _, trunc = name.partition(".trunc")
                        if base in ("token", "bypass"):
                            k = int(trunc) if trunc else None
                            (table.token if base == "token" else table.bypass)[k] = f.get_tensor(name)
        except (OSError, ValueError) as e:
            raise NetiError(f"{path}: cannot read the table ({e})") from None
        for k, v in list(table.token.items()) + list(table.bypass.items()):
            if v.ndim != 3 or v.shape[:2] != (NUM_TIMESTEPS, NUM_LAYERS) or v.shape[2] != concept.text_dim:
                raise NetiError(f"{path}: table tensor has shape {tuple(v.shape)}, expected [1000, 16, {concept.text_dim}]")
            if not torch.isfinite(v).all():
                raise NetiError(f"{path}: table contains NaN or Inf")
    return table
