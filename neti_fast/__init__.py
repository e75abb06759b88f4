"""neti-fast: fast NeTI / XTI / Textual Inversion for Stable Diffusion 1.x.

The Python API (see neti_fast/api.py):
    load_model, load_concept, precompute, load_table, generate, generate_to_folder,
    Engine, GenerateConfig, Request, NetiError,
    load_tables, parse_layer_mix, parse_time_mix (several concepts, style mixing),
    attach (NeTI inside a diffusers StableDiffusionPipeline)

The names are imported on first use (PEP 562), so `import neti_fast` and the CLI's `--help` do not
load torch, diffusers and transformers.
"""
__version__ = "0.1.0"

import importlib
import importlib.machinery
import os
import sys
from pathlib import Path

from .errors import NetiError

# The repository's top-level folders kernels/, export/ and bench/ install as neti_fast.kernels etc.,
# but in a source checkout whose root is on sys.path (python -m pytest / python -m neti_fast run
# from it) they would also be importable as top-level `kernels`, `export`, `bench`, shadowing
# installed packages of those names: transformers >= 5.25 requires Hugging Face's `kernels` and
# imports it when diffusers loads a pipeline. This finder, first on sys.meta_path, resolves those
# three top-level names past the checkout's root; the checkout's own folders are only ever
# imported as neti_fast.kernels / .export / .bench.
_CHECKOUT = Path(__file__).resolve().parent.parent
_SHADOWED = ("kernels", "export", "bench")


class _PastTheCheckout:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if path is not None or name not in _SHADOWED:
            return None
        elsewhere = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _CHECKOUT]
        return importlib.machinery.PathFinder.find_spec(name, elsewhere)


if (_CHECKOUT / "setup.py").is_file() and not any(isinstance(f, _PastTheCheckout) for f in sys.meta_path):
    sys.meta_path.insert(0, _PastTheCheckout())

_HOMES = {name: ".api" for name in ("Engine", "GenerateConfig", "Request", "generate", "generate_to_folder",
                                     "load_concept", "load_model", "load_table", "load_tables",
                                     "parse_layer_mix", "parse_time_mix", "precompute")}
_HOMES["attach"] = ".engine.adapter"
__all__ = sorted([*_HOMES, "NetiError"])


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module 'neti_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    globals()[name] = value          # later lookups skip __getattr__
    return value


def __dir__():
    return sorted([*globals(), *_HOMES])
