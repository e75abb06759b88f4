"""The concepts a server offers: its --concepts folder, plus uploads and concepts trained on the page.

Files are read only with the project's restricted loaders (`table.load_any`: safetensors, or
torch.load(weights_only=True) for official / A1111 pickles), so nothing in a file can run code.
A concept is named as A1111 names embeddings: by its file name without the suffix (a bundle: by the
names inside). The listing is built at start (each file loaded once to check it fits the model);
loaded tables are then kept in an LRU under `budget_mb` and reloaded on demand.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

from ..concepts.table import nbytes
from ..errors import NetiError
from ..utils import ByteLRU
from .a1111 import FieldError

SUFFIXES = (".safetensors", ".pt", ".bin")
NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")


def clean_name(text: str) -> str:
    """A file stem / placeholder -> a concept name a prompt can write as {name} or as a word."""
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "-", text.strip().strip("<>")).strip("-.")[:64]
    return name or "concept"


def mark_words(text: str, names) -> str:
    """Each concept name written as a word -> `{name}` (existing markers left alone)."""
    names = sorted(names, key=len, reverse=True)  # longest first: "cat-2" before "cat"
    if not names:
        return text
    word = re.compile(r"(?<![\w{.+-])(" + "|".join(re.escape(n) for n in names) + r")(?![\w}.+-])")
    parts = re.split(r"(\{[^{}]*\})", text)
    return "".join(p if p.startswith("{") else word.sub(r"{\1}", p) for p in parts)


def concept_key(prompt: str, concept: str | None, names) -> str:
    """The concepts a txt2img request names, as one sorted, comma-joined id: what a router sends to the
    replica that already holds them (neti_fast.serve.ray_app). A hint only: unknown names stay out."""
    from ..sd.conditioning import markers
    known = set(names)
    used = {concept if m == "" else m for m in markers(mark_words(prompt, known))}
    used.add(concept)
    return ",".join(sorted(n for n in used if n in known))


def _load(path: Path):
    """`table.load_any`, with any reader's exception on a corrupt file (safetensors raises its own
    type) turned into the one-line NetiError a client / the listing gets."""
    from ..concepts.table import load_any
    try:
        return load_any(path)
    except NetiError:
        raise
    except Exception as e:
        raise NetiError(f"{path.name}: cannot read it as a concept ({type(e).__name__}: {e})") from None


@dataclass
class Entry:
    name: str
    path: Path
    origin: str          # concepts | upload | trained
    method: str
    dim: int
    truncations: list
    vectors: int = 1     # token positions in a prompt (a multi-vector TI embedding's n)

    def describe(self) -> dict:
        """A1111's EmbeddingItem, with neti-fast's fields beside it."""
        return {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": self.dim, "vectors": self.vectors,
                "method": self.method, "truncations": self.truncations, "origin": self.origin}


class ConceptStore:
    def __init__(self, model, folder: str | Path | None, budget_mb: int = 1024):
        self.model, self.folder = model, Path(folder) if folder else None
        self._lock = threading.RLock()
        self.entries: dict[str, Entry] = {}
        self.skipped: dict[str, str] = {}
        self._loaded = ByteLRU(budget_mb * 2**20, nbytes)   # name -> Table

    # ------------------------------------------------------------------ listing
    def scan(self) -> None:
        """(Re)read the --concepts folder; uploads and trained concepts stay listed."""
        with self._lock:
            for name in [n for n, e in self.entries.items() if e.origin == "concepts"]:
                del self.entries[name]
                self._loaded.pop(name, None)
            self.skipped = {}
            if self.folder is None:
                return
            if not self.folder.is_dir():
                raise NetiError(f"--concepts {self.folder}: not a folder")
            for path in sorted(self.folder.iterdir()):
                if path.name.startswith(".") or path.suffix not in SUFFIXES or not path.is_file():
                    continue
                try:
                    self.add_file(path, clean_name(path.stem), "concepts")
                except NetiError as e:
                    self.skipped[path.name] = str(e)

    def add_file(self, path: Path, name: str, origin: str) -> list[str]:
        """Load `path` (a concept, table or bundle), check it fits the model, list it. Returns the names.
        A file already listed is not read again (replicas sharing a state folder each pick up what
        another added, and its writer may list it too)."""
        with self._lock:
            same = [n for n, e in self.entries.items() if e.path == path]
        if same:
            return same
        got = _load(path)
        tables = got if isinstance(got, dict) else {name: got}
        with self._lock:
            for n, t in tables.items():
                if not NAME_RE.match(n):
                    raise NetiError(f"{path.name}: concept name {n!r} must be 1-64 of A-Z a-z 0-9 _ . + -")
                if n in self.entries:
                    raise NetiError(f"{path.name}: the name {n!r} is already taken by {self.entries[n].path.name}")
                t.check(self.model, None, f"{path.name}: concept {n!r}")
            for n, t in tables.items():
                t.name = n
                self.entries[n] = Entry(n, path, origin, t.concept.method, t.concept.text_dim, list(t.truncations),
                                        t.concept.vectors)
                self._loaded.put(n, t)
        return list(tables)

    def moved(self, old: Path, new: Path) -> None:
        """The file behind some entries was renamed / converted (uploads)."""
        with self._lock:
            for e in self.entries.values():
                if e.path == old:
                    e.path = new

    def names(self) -> list[str]:
        with self._lock:
            return list(self.entries)

    def embeddings(self) -> dict:
        with self._lock:
            return {"loaded": {n: e.describe() for n, e in self.entries.items()},
                    "skipped": {n: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 0,
                                    "vectors": 0, "error": why} for n, why in self.skipped.items()}}

    # ------------------------------------------------------------------ tables
    def get(self, name: str):
        """The Table named `name` (loaded again if the budget evicted it)."""
        with self._lock:
            if name in self._loaded:
                return self._loaded.get(name)
            entry = self.entries[name]
            got = _load(entry.path)
            table = got[name] if isinstance(got, dict) else got
            table.name = name
            return self._loaded.put(name, table)

    # ------------------------------------------------------------------ prompts
    def _mark_words(self, text: str) -> str:
        return mark_words(text, self.names())

    def check_negative(self, negative: str) -> None:
        """The engine encodes negative prompts as plain text: a concept named there (A1111's negative
        embeddings) would be silently ignored, so it is refused."""
        from ..sd.conditioning import markers
        found = [m for m in markers(self._mark_words(negative)) if m == "" or m in self.entries]
        if found:
            raise FieldError("negative_prompt", f"concepts in the negative prompt ({', '.join(repr(m) for m in found)}) "
                             "are not supported by neti-fast; use them in the prompt only")

    def resolve(self, prompt: str, concept: str | None) -> tuple[str, dict]:
        """A1111 / neti-fast prompt -> (engine prompt with {name} markers, {name: Table} it uses).

        `{name}` is the engine's marker; a concept's name written as a word (A1111's embeddings
        convention) becomes `{name}`; a bare `{}` means `concept`.
        """
        from ..sd.conditioning import markers
        prompt = self._mark_words(prompt)
        used = []
        for m in markers(prompt):
            if m == "":
                if concept is None:
                    raise FieldError("prompt", "a bare {} needs `concept` (or write {name})")
                m = concept
            if m not in self.entries:
                have = ", ".join(self.names()) or "none"
                field = "concept" if m == concept else "prompt"
                raise FieldError(field, f"{m!r} is not a concept this server has (have: {have})")
            if m not in used:
                used.append(m)
        if concept is not None and concept not in self.entries:
            raise FieldError("concept", f"{concept!r} is not a concept this server has (have: {', '.join(self.names()) or 'none'})")
        if concept is not None and concept not in used:  # a field that cannot apply is refused, not ignored
            raise FieldError("prompt", f"does not say where concept {concept!r} goes: add {{}} to the prompt "
                             f"(or write {{{concept}}})")
        if concept is not None:
            prompt = re.sub(r"\{\s*\}", "{" + concept + "}", prompt)
        return prompt, {n: self.get(n) for n in used}
