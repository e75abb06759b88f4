"""Mixing concepts over U-Net layers (XTI / P+ style mixing) and over denoising time.

A `MixedTable` is a concept made of others: at each (t, l) exactly one part serves the token and
bypass rows. XTI's style mixing sends one concept to the coarse layers and another to the rest:

    --layer-mix "IN01-IN08:cat,MID-OUT11:painting"      (layer names: the family's, sd.families.Family.layers)
    --time-mix  "t>=600:cat,t<600:painting"              (t: the scheduler's timestep, 999 = pure noise)

Every layer (every t in 0..999) must be covered exactly once. The mix is named `mix` (or
`NAME=...` before the spec) and a prompt refers to it as `{mix}`, or as bare `{}` when it is the
only mix. Parts without a bypass (TI / XTI) contribute a zero bypass, which leaves CLIP's output
unchanged at their positions, exactly as if they were used alone.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..errors import NetiError
from .table import NUM_TIMESTEPS, new_uid, stack_rows


@dataclass
class MixedTable:
    parts: list                                   # Tables
    layer_part: list | None = None                # layer mix: part index for each of the family's layers
    time_rules: list | None = None                # time mix: [(lo, hi, part index)], lo <= t < hi
    name: str = "mix"
    spec: str = ""
    uid: int = field(default_factory=new_uid, compare=False, repr=False)

    @property
    def placeholder(self) -> str:
        return f"<{self.name}>"

    @property
    def family(self):
        return self.parts[0].family

    @property
    def time_varying(self) -> bool:
        return self.time_rules is not None or any(p.time_varying for p in self.parts)

    @property
    def has_bypass(self) -> bool:
        return any(p.has_bypass for p in self.parts)

    @property
    def truncatable(self) -> bool:
        return any(p.truncatable for p in self.parts)

    @property
    def vectors(self) -> int:
        return 1  # parts are single-vector (__post_init__): a mix picks one row per (t, l)

    def __post_init__(self):
        multi = [p.name for p in self.parts if p.vectors != 1]
        if multi:
            what = "is a multi-vector embedding" if len(multi) == 1 else "are multi-vector embeddings"
            raise NetiError(f"mix {self.name!r}: {', '.join(repr(n) for n in multi)} {what}; "
                            "only single-vector concepts can be mixed")

    def check(self, model, truncation, where: str) -> None:
        for p in self.parts:
            p.check(model, truncation, where)

    def which(self, t: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        """Part index for each (t[i], l[i])."""
        if self.layer_part is not None:
            return torch.tensor(self.layer_part)[l.long().cpu()]
        out = torch.full(t.shape, -1, dtype=torch.long)
        for lo, hi, k in self.time_rules:
            out[(t.cpu() >= lo) & (t.cpu() < hi)] = k
        return out

    def _select(self, results, idx: torch.Tensor):
        """Per-part (token, bypass) results of the same shape -> the chosen part's rows."""
        token, bypass = stack_rows([(t.cpu(), None if b is None else b.cpu()) for t, b in results], dim=0)  # [P, ..., D]
        pick = idx.view(1, *idx.shape, 1).expand(1, *token.shape[1:])
        return token.gather(0, pick)[0], None if bypass is None else bypass.gather(0, pick)[0]

    def schedule_rows(self, timesteps: torch.Tensor, truncation: int | None = None):
        """As `Table.schedule_rows`: ([S, L, D], [S, L, D] or None)."""
        ts = timesteps.detach().float().cpu()
        L = self.family.num_layers
        t = ts[:, None].expand(-1, L)
        l = torch.arange(L)[None].expand(len(ts), -1)
        return self._select([p.schedule_rows(ts, truncation) for p in self.parts], self.which(t, l))

    def embeddings_at(self, t: torch.Tensor, l: torch.Tensor, truncation: int | None = None):
        """As `Table.embeddings_at`: each (t[i], l[i]) evaluated by the part that serves it."""
        return self._select([p.embeddings_at(t, l, truncation) for p in self.parts], self.which(t, l))



def _split_name(spec: str, flag: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.+-]+)\s*=(.*)$", spec)
    name, body = (m.group(1), m.group(2)) if m else ("mix", spec)
    if not body.strip():
        raise NetiError(f"{flag} {spec!r}: empty")
    return name, body


def _entries(spec: str, body: str, flag: str, tables: dict) -> list[tuple[str, object]]:
    """`A:name, B:name` -> [(A, table)], names checked against `tables`."""
    out = []
    for part in body.split(","):
        where, sep, name = part.rpartition(":")
        name = name.strip().strip("{}").strip()
        if not sep or not where.strip():
            raise NetiError(f"{flag} {spec!r}: entry {part.strip()!r} should look like RANGE:NAME")
        if name not in tables:
            raise NetiError(f"{flag} {spec!r}: {name!r} is not a concept given here (have: {', '.join(tables) or 'none'})")
        out.append((where.strip(), tables[name]))
    return out


def _parts(entries, spec: str, flag: str) -> tuple[list, list[int]]:
    parts, index = [], []
    for _, table in entries:
        if all(p is not table for p in parts):
            parts.append(table)
        index.append(next(i for i, p in enumerate(parts) if p is table))
    if len({p.family for p in parts}) > 1:
        raise NetiError(f"{flag} {spec!r}: mixes concepts of different model families "
                        f"({', '.join(dict.fromkeys(p.family.title for p in parts))})")
    return parts, index


def _layer(name: str, spec: str, layers: tuple) -> int:
    upper = name.strip().upper()
    if upper not in layers:
        raise NetiError(f"--layer-mix {spec!r}: unknown layer {name.strip()!r}; layers are {', '.join(layers)}")
    return layers.index(upper)


def parse_layer_mix(spec: str, tables: dict) -> MixedTable:
    """`[NAME=]IN01-IN08:cat,MID-OUT11:painting` -> a MixedTable; every layer covered exactly once."""
    name, body = _split_name(spec, "--layer-mix")
    entries = _entries(spec, body, "--layer-mix", tables)
    parts, index = _parts(entries, spec, "--layer-mix")
    layers = parts[0].family.layers
    owner = [None] * len(layers)
    for (rng, _), k in zip(entries, index):
        if rng.lower() == "all":
            lo, hi = 0, len(layers) - 1
        else:
            a, _, b = rng.partition("-")
            lo, hi = _layer(a, spec, layers), _layer(b or a, spec, layers)
        if hi < lo:
            raise NetiError(f"--layer-mix {spec!r}: range {rng!r} runs backwards (order: {', '.join(layers)})")
        for l in range(lo, hi + 1):
            if owner[l] is not None:
                raise NetiError(f"--layer-mix {spec!r}: layer {layers[l]} is given twice")
            owner[l] = k
    missing = [layers[l] for l in range(len(layers)) if owner[l] is None]
    if missing:
        raise NetiError(f"--layer-mix {spec!r}: no concept for layer(s) {', '.join(missing)}")
    return MixedTable(parts, layer_part=owner, name=name, spec=spec)


_TIME = [(re.compile(r"^t\s*>=\s*(\d+)$"), lambda m: (int(m[1]), NUM_TIMESTEPS)),
         (re.compile(r"^t\s*<\s*(\d+)$"), lambda m: (0, int(m[1]))),
         (re.compile(r"^(\d+)\s*<=\s*t\s*<\s*(\d+)$"), lambda m: (int(m[1]), int(m[2])))]


def parse_time_mix(spec: str, tables: dict) -> MixedTable:
    """`[NAME=]t>=600:cat,t<600:painting` (also `200<=t<600:x`) -> a MixedTable; t in 0..999 covered once.

    Bounds are integers, so covering the integers covers the fractional timesteps of Euler too.
    """
    name, body = _split_name(spec, "--time-mix")
    entries = _entries(spec, body, "--time-mix", tables)
    parts, index = _parts(entries, spec, "--time-mix")
    rules, owner = [], [None] * NUM_TIMESTEPS
    for (cond, _), k in zip(entries, index):
        for rx, bounds in _TIME:
            m = rx.match(cond.replace(" ", ""))
            if m:
                lo, hi = bounds(m)
                break
        else:
            raise NetiError(f"--time-mix {spec!r}: condition {cond!r} should be t>=N, t<N or N<=t<M")
        for t in range(lo, min(hi, NUM_TIMESTEPS)):
            if owner[t] is not None:
                raise NetiError(f"--time-mix {spec!r}: t={t} is covered twice")
            owner[t] = k
        rules.append((float(lo), float("inf") if hi >= NUM_TIMESTEPS else float(hi), k))
    missing = [t for t in range(NUM_TIMESTEPS) if owner[t] is None]
    if missing:
        raise NetiError(f"--time-mix {spec!r}: no concept for t in {missing[0]}..{missing[-1]}"
                        + ("" if len(missing) == missing[-1] - missing[0] + 1 else " (in part)"))
    return MixedTable(parts, time_rules=rules, name=name, spec=spec)


def add_mixes(tables: dict, layer_mix: str | None = None, time_mix: str | None = None) -> dict:
    """`tables` plus the mix that `--layer-mix` or `--time-mix` describes (one at a time)."""
    if layer_mix and time_mix:
        raise NetiError("--layer-mix and --time-mix: give one of them (a mix of mixes is not supported)")
    spec = layer_mix or time_mix
    if not spec:
        return tables
    mix = parse_layer_mix(spec, tables) if layer_mix else parse_time_mix(spec, tables)
    if mix.name in tables:
        raise NetiError(f"{'--layer-mix' if layer_mix else '--time-mix'} {spec!r}: the name {mix.name!r} is "
                        "already a concept; write NAME=... before the spec")
    return {**tables, mix.name: mix}
