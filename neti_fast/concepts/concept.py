"""The Concept class: a NeTI mapper, per-layer XTI embeddings, or one TI embedding, plus metadata
(`neti_fast.concepts.importers` is the public face: Concept and load_concept for every file format).

Stored as safetensors (never pickle). Tensors:
    neti: `mapper.<state_dict key>` (including `mapper.encoder.w`), optional `placeholder_embed` [D]
    xti:  `embeds` [L, D] (L: the family's layers, 16 for SD 1.x)
    ti:   `embeds` [n, D] (n vectors: n token positions in a prompt)
Metadata (string -> string): neti_fast.format=concept, version, method, placeholder, init_word,
text_dim, vectors, mapper_config (JSON), base_model, source, and `family` (sd2, sdxl; not written for
SD 1.x, which is what every file without it was made for, so SD 1.x files stay as they were).
`vectors` came with multi-vector TI; a file without it is single-vector.

`Concept.embeddings_at(t, l, truncation)` is the one function that turns a concept into token / bypass rows;
precompute and the on-the-fly path both call it, so the table equals the mapper by construction.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import NetiError
from .mapper import MapperConfig, NeTIMapper
from ..sd import families
from ..sd.families import Family
from ..utils import METHODS, atomic_write, first_line
FORMAT_VERSION = "1"


@dataclass
class Concept:
    method: str                          # neti | xti | ti
    placeholder: str                     # token written into prompts in place of `{}`
    text_dim: int                        # D: 768 for SD 1.x
    mapper: NeTIMapper | None = None     # neti
    embeds: torch.Tensor | None = None   # xti [L, D] / ti [n, D]
    init_word: str | None = None
    base_model: str | None = None
    source: str = "neti-fast"
    placeholder_embed: torch.Tensor | None = None  # official NeTI's learned_embeds row (kept, unused at inference)
    family: Family = families.DEFAULT    # the model family it was made for
    # The file did not say its family (a raw TI vector): `family` is only the guess of its width
    # (importers._family_of), and a model of exactly its width decides instead (check_model).
    family_from_width: bool = field(default=False, compare=False)

    def __post_init__(self):
        if self.method not in METHODS:
            raise NetiError(f"concept method {self.method!r}: must be one of {', '.join(METHODS)}")

    @property
    def has_bypass(self) -> bool:
        return self.method == "neti" and self.mapper.cfg.output_bypass

    @property
    def time_varying(self) -> bool:
        """Whether rows change with t (only NeTI's do); TI / XTI rows are constant over time."""
        return self.method == "neti"

    @property
    def vectors(self) -> int:
        """Token positions the concept takes in a prompt: a TI embedding's n vectors, else 1."""
        return self.embeds.shape[0] if self.method == "ti" else 1

    def check_truncation(self, truncation: int | None) -> None:
        """Truncation is NeTI's nested-dropout index K in 1..128; other methods have none."""
        if truncation is None:
            return
        if self.method != "neti":
            raise NetiError(f"applies to NeTI concepts; {self.placeholder!r} is a {self.method.upper()} concept",
                            field="truncation", value=truncation)
        if not 1 <= truncation <= 128:
            raise NetiError("must be between 1 and 128", field="truncation", value=truncation)

    def embeddings_at(self, t: torch.Tensor, l: torch.Tensor, truncation: int | None = None):
        """Token and bypass rows for each (t[i], l[i]) (any t, even fractional): ([N, D], [N, D] or None),
        float32; a multi-vector TI concept's token rows are [N, n, D]."""
        self.check_truncation(truncation)
        if self.method == "neti":
            m = self.mapper
            was_training = m.training
            m.eval()
            dev = next(m.parameters()).device
            token, bypass = m(t.to(dev).float(), l.to(dev).float(), truncation)
            m.train(was_training)
            return token, bypass
        if self.vectors > 1:
            return self.embeds.float()[None].expand(len(l), -1, -1), None
        idx = l.long() if self.method == "xti" else torch.zeros_like(l, dtype=torch.long)
        return self.embeds[idx.to(self.embeds.device)].float(), None


    # ------------------------------------------------------------------ safetensors I/O
    def metadata(self) -> dict[str, str]:
        md = {"neti_fast.format": "concept", "version": FORMAT_VERSION, "method": self.method,
              "placeholder": self.placeholder, "text_dim": str(self.text_dim), "source": self.source,
              "init_word": self.init_word or "", "base_model": self.base_model or ""}
        if self.vectors > 1:  # written only where it says something: single-vector files stay as they were
            md["vectors"] = str(self.vectors)
        if self.family != families.DEFAULT:
            md["family"] = self.family.name
        if self.mapper is not None:
            md["mapper_config"] = self.mapper.cfg.to_json()
        return md

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        if self.mapper is not None:
            out.update({f"mapper.{k}": v.float().cpu() for k, v in self.mapper.tensors().items()})
        if self.embeds is not None:
            out["embeds"] = self.embeds.detach().float().cpu().contiguous()
        if self.placeholder_embed is not None:
            out["placeholder_embed"] = self.placeholder_embed.detach().float().cpu().contiguous()
        return out

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file
        return atomic_write(path, lambda tmp: save_file(self.tensors(), tmp, metadata=self.metadata()))

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], md: dict[str, str], where: str) -> "Concept":
        """Build from a safetensors dict + metadata (concept or table files); validates everything."""
        try:
            method, placeholder, text_dim = md["method"], md["placeholder"], int(md["text_dim"])
        except (KeyError, ValueError) as e:
            raise NetiError(f"{where}: concept metadata is missing or malformed ({e})") from None
        family = families.get(md.get("family", families.DEFAULT.name), where)
        mapper = embeds = None
        if method == "neti":
            try:
                cfg = MapperConfig.from_json(md["mapper_config"])
                mapper = NeTIMapper(cfg).eval()
                mapper.load_tensors({k[len("mapper."):]: v for k, v in tensors.items() if k.startswith("mapper.")})
            except (KeyError, ValueError, TypeError, RuntimeError) as e:
                raise NetiError(f"{where}: mapper weights do not match its config ({first_line(e)})") from None
            if cfg.num_layers != family.num_layers:
                raise NetiError(f"{where}: mapper covers {cfg.num_layers} layers; {family.title} has {family.num_layers}")
        elif method in ("xti", "ti"):
            embeds = tensors.get("embeds")
            try:
                want = family.num_layers if method == "xti" else int(md.get("vectors", "1"))  # older files: 1 vector
            except ValueError:
                raise NetiError(f"{where}: concept metadata `vectors` is malformed ({md['vectors']!r})") from None
            if embeds is None or embeds.ndim != 2 or embeds.shape != (want, text_dim):
                got = None if embeds is None else tuple(embeds.shape)
                raise NetiError(f"{where}: {method} concept needs `embeds` of shape [{want}, {text_dim}], got {got}")
        c = cls(method=method, placeholder=placeholder, text_dim=text_dim, mapper=mapper, embeds=embeds,
                init_word=md.get("init_word") or None, base_model=md.get("base_model") or None,
                source=md.get("source", "neti-fast"), placeholder_embed=tensors.get("placeholder_embed"),
                family=family)
        c.check_finite(where)
        return c

    def check_finite(self, where: str) -> None:
        for k, v in self.tensors().items():
            if not torch.isfinite(v).all():
                raise NetiError(f"{where}: tensor {k!r} contains NaN or Inf; the concept is corrupt (was training diverging?)")

    def check_model(self, model, where: str) -> None:
        """Refuse a concept made for another model family, or for another text width. A concept whose
        file does not record its family (`family_from_width`) and has the model's width is taken for
        the model's family: its width was the only clue, and a toy model's (tiny-sd2, tiny-xl) or the
        2048-d SDXL row matches no full-size single encoder's."""
        if self.family_from_width and self.family != model.family and self.text_dim == model.text_dim:
            self.family, self.family_from_width = model.family, False
        if self.family != model.family:
            raise NetiError(f"{where}: concept is for {self.family.title} ({self.family.name}), "
                            f"but the model is {model.family.title} ({model.family.name})")
        if self.text_dim != model.text_dim:
            raise NetiError(f"{where}: concept is for a text encoder of width {self.text_dim}, "
                            f"but the model's is {model.text_dim} (SD 1.x is 768, SD 2.x is 1024)")


def random_concept(method: str = "neti", dim: int = 768, seed: int = 0, placeholder: str = "<c>",
                   bypass: bool = True, family: Family = families.DEFAULT) -> Concept:
    """A concept with deterministic random weights (tests, benchmarks: nothing trained): a NeTI
    mapper, XTI [L, D] or TI [1, D] embeddings for `family`. The global RNG is left as it was."""
    g = torch.Generator().manual_seed(seed)
    if method == "neti":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # nn.Linear init draws from the default generator
            mapper = NeTIMapper(MapperConfig(output_dim=dim, num_layers=family.num_layers, target_norm=0.4,
                                             output_bypass=bypass), generator=g).eval()
        return Concept("neti", placeholder, dim, mapper=mapper, family=family)
    rows = family.num_layers if method == "xti" else 1
    return Concept(method, placeholder, dim, embeds=torch.randn(rows, dim, generator=g) * 0.1, family=family)
