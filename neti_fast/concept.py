"""`load_concept`, which reads every supported concept file format (importers.py) into a
`Concept` (concept_model.py)."""
from __future__ import annotations

from pathlib import Path

from .concept_model import Concept
from .importers import import_concept


def load_concept(path: str | Path, placeholder: str | None = None) -> Concept:
    """Load any supported concept file: neti-fast safetensors (concept or table) or an import format."""
    return import_concept(path, placeholder=placeholder)
