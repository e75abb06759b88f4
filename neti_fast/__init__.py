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

from .errors import NetiError

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
