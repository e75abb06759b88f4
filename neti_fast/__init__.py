"""neti-fast: fast NeTI / XTI / Textual Inversion for Stable Diffusion 1.x.

The Python API (see neti_fast/api.py):
    load_model, load_concept, precompute, load_table, generate, generate_to_folder,
    Engine, GenerateConfig, Request, NetiError,
    load_tables, parse_layer_mix, parse_time_mix (several concepts, style mixing),
    attach (NeTI inside a diffusers StableDiffusionPipeline)
"""
__version__ = "0.1.0"

from .api import (Engine, GenerateConfig, Request, generate, generate_to_folder, load_concept,  # noqa: F401
                  load_model, load_table, load_tables, parse_layer_mix, parse_time_mix, precompute)
from .engine.adapter import attach  # noqa: F401
from .errors import NetiError  # noqa: F401
