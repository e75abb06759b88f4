"""Concepts: the `Concept` class (concept_model.py) and `load_concept`, which reads every supported
file format (importers.py). Import from here."""
from __future__ import annotations

from pathlib import Path

from .concept_model import FORMAT_VERSION, METHODS, Concept, random_concept  # noqa: F401  (re-exported)
from .importers import import_concept
from .utils import atomic_write  # noqa: F401  (re-exported: older code imports it from here)


def load_concept(path: str | Path, placeholder: str | None = None) -> Concept:
    """Load any supported concept file: neti-fast safetensors (concept or table) or an import format."""
    return import_concept(path, placeholder=placeholder)
