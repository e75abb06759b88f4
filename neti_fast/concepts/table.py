"""The precomputed table: a concept evaluated on every (integer timestep, layer).

After `precompute`, TI, XTI and NeTI concepts look the same to the engine: rows of token and bypass
embeddings indexed by (t, l). File (safetensors):
    token                 [1000, L, D] float32      bypass            [1000, L, D] (NeTI with bypass)
    token.trunc{K}        same, with nested-dropout truncation K      bypass.trunc{K}
    a multi-vector TI concept's token rows are [1000, L, n, D] (metadata `vectors` = n)
    + the concept's own tensors and metadata (neti_fast.format=table), so a table is also a concept
      file and fractional timesteps (e.g. Euler's) are served exactly by evaluating the mapper.
L is the concept's family's cross-attention layer count (16 for SD 1.x and 2.x, 11 for SDXL).
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from tqdm.auto import tqdm

from .concept import Concept
from ..errors import NetiError
from ..utils import atomic_write, first_line

NUM_TIMESTEPS = 1000
_UIDS = itertools.count()


def new_uid() -> int:
    """A process-unique id for a table object: caches key on it (never on id(), which is reused)."""
    return next(_UIDS)


def stack_rows(rows: list, dim: int):
    """[(token, bypass or None)] of several concepts -> (tokens, bypasses or None) stacked on `dim`.

    A concept without a bypass (TI / XTI) beside one with it gets zero rows: a zero bypass changes
    nothing (conditioning.encode), so mixing methods needs no special case downstream.
    """
    token = torch.stack([r[0] for r in rows], dim=dim)
    if all(r[1] is None for r in rows):
        return token, None
    return token, torch.stack([r[1] if r[1] is not None else torch.zeros_like(r[0]) for r in rows], dim=dim)


def slot_rows(rows: list, vectors: list[int]):
    """[(token, bypass or None)] of a prompt's concepts ([..., D], or [..., n, D] for n vectors) ->
    (tokens, bypasses or None) [..., K, D]: one slot per vector, concepts in order (K = sum of n).
    Zero bypass rows beside a concept with a bypass, as `stack_rows`."""
    def split(t, n):
        return t.reshape(*t.shape[:t.ndim - (1 if n == 1 else 2)], n, t.shape[-1])
    token = torch.cat([split(r[0], n) for r, n in zip(rows, vectors)], dim=-2)
    if all(r[1] is None for r in rows):
        return token, None
    return token, torch.cat([split(r[1], n) if r[1] is not None else torch.zeros_like(split(r[0], n))
                             for r, n in zip(rows, vectors)], dim=-2)


@runtime_checkable
class TableLike(Protocol):
    """What the engine reads from a concept in a request: a `Table` (one concept, precomputed) or a
    `mixing.MixedTable` (several, chosen per layer or per timestep). Rows are float32 on the CPU."""
    name: str             # `{name}` in prompts
    uid: int              # process-unique: caches key on it

    @property
    def family(self):
        """The model family (sd.families.Family) its rows are for."""

    @property
    def placeholder(self) -> str: ...

    @property
    def time_varying(self) -> bool:
        """Whether rows depend on t (NeTI): one row per step, else one row serves every step."""

    @property
    def has_bypass(self) -> bool: ...

    @property
    def vectors(self) -> int:
        """Token positions it takes in a prompt (a multi-vector TI embedding's n, else 1)."""

    @property
    def truncatable(self) -> bool:
        """Whether nested-dropout truncation applies (a NeTI concept is among it)."""

    def check(self, model, truncation: int | None, where: str) -> None:
        """NetiError if it cannot serve `model` at `truncation`."""

    def schedule_rows(self, timesteps: torch.Tensor, truncation: int | None = None):
        """([S, L, D] token rows ([S, L, n, D] for n vectors), bypass rows or None) for a step schedule."""

    def embeddings_at(self, t: torch.Tensor, l: torch.Tensor, truncation: int | None = None):
        """([N, D], [N, D] or None) at each (t[i], l[i]), any t (fractional too)."""


def nbytes(obj) -> int:
    """Memory a loaded table (or a bundle {name: Table}) holds: its rows and its concept's weights."""
    if isinstance(obj, dict):
        return sum(nbytes(t) for t in obj.values())
    ts = list(obj.token.values()) + list(obj.bypass.values())
    c = obj.concept
    if getattr(c, "mapper", None) is not None:
        ts += list(c.mapper.parameters())
    if getattr(c, "embeds", None) is not None:
        ts.append(c.embeds)
    return sum(t.numel() * t.element_size() for t in ts)


def _key(name: str, truncation: int | None) -> str:
    return name if truncation is None else f"{name}.trunc{truncation}"


def default_name(placeholder: str) -> str:
    """The name a prompt uses for a concept, `{name}`: its placeholder without <>, e.g. <my-cat> -> my-cat."""
    return placeholder.strip().strip("<>").strip() or placeholder


@dataclass
class Table:
    concept: Concept
    token: dict = field(default_factory=dict)    # truncation (None = full) -> [1000, L, D]
    bypass: dict = field(default_factory=dict)
    name: str | None = None                      # `{name}` in prompts; default from the placeholder
    uid: int = field(default_factory=new_uid, compare=False, repr=False)

    def __post_init__(self):
        self.name = self.name or default_name(self.concept.placeholder)

    @property
    def placeholder(self) -> str:
        return self.concept.placeholder

    @property
    def time_varying(self) -> bool:
        return self.concept.time_varying

    @property
    def family(self):
        return self.concept.family

    @property
    def has_bypass(self) -> bool:
        return self.concept.has_bypass

    @property
    def vectors(self) -> int:
        return self.concept.vectors

    @property
    def truncatable(self) -> bool:
        """Whether nested-dropout truncation means anything here (NeTI only)."""
        return self.concept.method == "neti"

    def check(self, model, truncation: int | None, where: str) -> None:
        """Refuse a model of another family or text width, or an out-of-range truncation."""
        before = self.concept.family
        self.concept.check_model(model, where)
        if self.concept.family != before:  # a raw vector's guessed family, now the model's: its rows are
            self.token.clear()             # evaluated for that family's layers (precompute's values)
            self.bypass.clear()
        if self.truncatable:
            self.concept.check_truncation(truncation)

    def embeddings_at(self, t: torch.Tensor, l: torch.Tensor, truncation: int | None = None):
        """The concept evaluated at each (t[i], l[i]), as the official code does: ([N, D], [N, D] or None)."""
        return self.concept.embeddings_at(t, l, truncation if self.truncatable else None)

    @property
    def truncations(self) -> list:
        return [k for k in self.token if k is not None]

    def schedule_rows(self, timesteps: torch.Tensor, truncation: int | None = None):
        """Rows for a step schedule: ([S, L, D], [S, L, D] or None), float32 on CPU.

        Integer timesteps with a precomputed truncation are a lookup; anything else (fractional t,
        a truncation not in the file) evaluates the concept, which is what the table holds anyway.
        """
        truncation = truncation if self.truncatable else None
        ts = timesteps.detach().float().cpu()
        S = len(ts)
        integral = bool((ts == ts.round()).all()) and bool(((ts >= 0) & (ts < NUM_TIMESTEPS)).all())
        if integral and truncation in self.token:
            idx = ts.long()
            byp = self.bypass.get(truncation)
            return self.token[truncation][idx], None if byp is None else byp[idx]
        L = self.family.num_layers
        t = ts.repeat_interleave(L)
        l = torch.arange(L).repeat(S).float()
        with torch.no_grad():
            token, bypass = self.embeddings_at(t, l, truncation)
        D = token.shape[-1]
        return token.cpu().reshape(S, L, *token.shape[1:]), None if bypass is None else bypass.cpu().view(S, L, D)


    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file
        tensors, md = self.file_contents()
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=md))

    def file_contents(self) -> tuple[dict, dict]:
        """(tensors, metadata) of this table's file."""
        tensors = dict(self.concept.tensors())
        for trunc, tok in self.token.items():
            tensors[_key("token", trunc)] = tok.contiguous()
            if trunc in self.bypass:
                tensors[_key("bypass", trunc)] = self.bypass[trunc].contiguous()
        md = self.concept.metadata()
        md["neti_fast.format"] = "table"
        md["truncations"] = ",".join(str(k) for k in self.truncations)
        return tensors, md


def precompute(concept: Concept, truncations=(), progress: bool = True, chunk: int = 4000) -> Table:
    """Evaluate `concept` at all 1000 integer timesteps x its family's layers, for full and each truncation."""
    for k in truncations:
        concept.check_truncation(k)
    table = Table(concept)
    L = concept.family.num_layers
    t = torch.arange(NUM_TIMESTEPS).repeat_interleave(L).float()
    l = torch.arange(L).repeat(NUM_TIMESTEPS).float()
    todo = [None] + [k for k in dict.fromkeys(truncations)]
    bar = tqdm(total=len(todo) * len(t), desc="precompute", unit="row", disable=not progress)
    for trunc in todo:
        toks, byps = [], []
        with torch.no_grad():
            for i in range(0, len(t), chunk):
                tok, byp = concept.embeddings_at(t[i:i + chunk], l[i:i + chunk], trunc)
                toks.append(tok.float().cpu())
                if byp is not None:
                    byps.append(byp.float().cpu())
                bar.update(len(tok))
        table.token[trunc] = torch.cat(toks).view(NUM_TIMESTEPS, L, *toks[0].shape[1:])
        if byps:
            table.bypass[trunc] = torch.cat(byps).view(NUM_TIMESTEPS, L, -1)
    bar.close()
    return table


def _add_rows(table: Table, tensors: dict, where) -> Table:
    """Fill a table's token / bypass rows from a table file's tensors, validating their shapes."""
    dim, n, L = table.concept.text_dim, table.concept.vectors, table.family.num_layers
    for key, v in tensors.items():
        base, _, trunc = key.partition(".trunc")
        if base not in ("token", "bypass"):
            continue
        want = (NUM_TIMESTEPS, L) + ((n,) if n > 1 and base == "token" else ()) + (dim,)
        if tuple(v.shape) != want:
            raise NetiError(f"{where}: table tensor has shape {tuple(v.shape)}, expected {list(want)}")
        if not torch.isfinite(v).all():
            raise NetiError(f"{where}: table contains NaN or Inf")
        (table.token if base == "token" else table.bypass)[int(trunc) if trunc else None] = v
    return table


def _metadata(path: Path) -> dict:
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception as e:  # SafetensorError (corrupt header, random bytes), OSError...: never a traceback
        raise NetiError(f"{path}: not a readable safetensors file ({first_line(e)})") from None


def _neti_format(path: Path) -> str | None:
    """`neti_fast.format` of a neti-fast safetensors file (concept | table | bundle), else None."""
    return _metadata(path).get("neti_fast.format") if path.suffix == ".safetensors" and path.is_file() else None


def _bundle_names(path: Path) -> list[str]:
    try:
        return json.loads(_metadata(path)["names"])
    except (KeyError, ValueError):
        raise NetiError(f"{path}: malformed concept bundle (no list of names)") from None


def load_table(path: str | Path, placeholder: str | None = None, name: str | None = None) -> Table:
    """A table file, or any concept file (then rows are evaluated on demand, exactly as precompute would)."""
    from safetensors import safe_open

    from .importers import load_concept
    path = Path(path)
    fmt = _neti_format(path)
    if fmt == "bundle":
        raise NetiError(f"{path}: is a bundle of concepts ({', '.join(_bundle_names(path))}); "
                        "load it with --concept (neti_fast.load_tables)")
    table = Table(load_concept(path, placeholder=placeholder), name=name)
    if fmt == "table":
        with safe_open(str(path), "pt") as f:
            _add_rows(table, {k: f.get_tensor(k) for k in f.keys() if k.split(".")[0] in ("token", "bypass")}, path)
    return table


def load_any(path: str | Path, placeholder: str | None = None, name: str | None = None):
    """A bundle as {name: Table}; any other concept / table file as one Table."""
    path = Path(path)
    if _neti_format(path) != "bundle":
        return load_table(path, placeholder=placeholder, name=name)
    if name is not None or placeholder is not None:
        raise NetiError(f"{path}: a bundle keeps its own names and placeholders ({', '.join(_bundle_names(path))}); "
                        "give it without NAME=")
    return load_bundle(path)


def save_bundle(tables: dict, path: str | Path) -> Path:
    """Several concepts (with their precomputed rows) in one file: `neti-fast merge` (TI's "merge embeddings")."""
    from safetensors.torch import save_file
    tensors, md = {}, {"neti_fast.format": "bundle", "version": "1", "names": json.dumps(list(tables))}
    for name, t in tables.items():
        if not isinstance(t, Table) or "/" in name:  # a MixedTable is not a Table: it has no rows of its own
            raise NetiError(f"merge: {name!r} cannot go in a bundle (mixes are made at generation time; names have no '/')")
        tt, tm = t.file_contents()
        tensors.update({f"{name}/{k}": v for k, v in tt.items()})
        md[f"{name}/metadata"] = json.dumps(tm)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=md))


def load_bundle(path: str | Path) -> dict:
    """{name: Table} from a bundle written by `save_bundle`."""
    from safetensors.torch import load_file
    path = Path(path)
    md, names = _metadata(path), _bundle_names(path)
    try:
        tensors = load_file(str(path))
        out = {}
        for name in names:
            tm = json.loads(md[f"{name}/metadata"])
            mine = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}/")}
            table = Table(Concept.from_tensors(mine, tm, f"{path} [{name}]"), name=name)
            out[name] = _add_rows(table, mine, f"{path} [{name}]") if tm.get("neti_fast.format") == "table" else table
    except (KeyError, ValueError, TypeError) as e:
        raise NetiError(f"{path}: malformed concept bundle ({e})") from None
    return out


def load_tables(specs: list[str], placeholder: str | None = None) -> dict:
    """`--concept` values, each `PATH` or `NAME=PATH` -> {name: Table}, in order.

    The name is what prompts write as `{name}`; by default the concept's placeholder without <>.
    Two concepts with the same name are an error that says how to rename one.
    """
    import re
    if placeholder is not None and len(specs) > 1:
        raise NetiError("--placeholder: only with a single --concept (name several with --concept NAME=PATH)")
    tables, where = {}, {}
    for spec in specs:
        m = re.match(r"^([A-Za-z0-9_.+-]+)=(.+)$", spec)
        name, path = (m.group(1), m.group(2)) if m and not Path(spec).exists() else (None, spec)
        got = load_any(path, placeholder=placeholder, name=name)
        found = list(got.values()) if isinstance(got, dict) else [got]
        for table in found:
            if table.name in tables:
                raise NetiError(f"--concept {spec}: the name {table.name!r} is already used by {where[table.name]}; "
                                f"give it another with --concept NAME={path}")
            tables[table.name], where[table.name] = table, spec
    return tables
