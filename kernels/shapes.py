"""The cross-attention shapes each model family launches, as data: `kernels.check` compiles them,
`bench.attention` times them, the tests take them from here.

One `AttnShape` per distinct cross-attention level (query positions N, heads, head dim) at the
family's default resolution; C = heads * head_dim.  Keyed by the family's name in
`neti_fast.sd.families` ("tiny": the built-in toy model). kernels/ sits below sd/ and cannot read
the descriptions, so tests/sd/test_families.py runs each family's published U-Net config on the meta
device and asserts that these are exactly the shapes it launches, in order.

    sd1   SD 1.x at 512x512 (latent 64x64): 8 heads, C = 320 / 640 / 1280 / 1280 (d 40 / 80 / 160)
    sd2   SD 2.x at 768x768 (latent 96x96): head dim 64, 5 / 10 / 20 / 20 heads (C = 320 / 640 /
          1280 / 1280); the mid block at 12x12
    sdxl  SDXL at 1024x1024 (latent 128x128): head dim 64; cross-attention only at the 64x64 level
          (10 heads, C = 640) and the 32x32 level and mid block (20 heads, C = 1280)
    tiny  the built-in tiny model at 64x64 (latent 8x8): 8 heads, C = 32 / 32 / 64 / 64 (d 4 / 4 / 8 / 8)

L is the text length: 77 tokens for one CLIP chunk; long prompts (A1111-style, 77-token chunks
concatenated) give L = 77 * k, of which `LONG_CONTEXTS` are checked and tested.
"""
from __future__ import annotations

from dataclasses import dataclass

TOKENS = 77                   # one CLIP context
LONG_CONTEXTS = (154, 231)    # two and three chunks: the key-loop kernel (L > 128)


@dataclass(frozen=True)
class AttnShape:
    family: str
    level: str    # latent resolution of the level, e.g. "64x64"
    N: int        # query positions (image tokens)
    heads: int
    head_dim: int

    @property
    def C(self) -> int:
        return self.heads * self.head_dim

    @property
    def label(self) -> str:
        return f"{self.family}-{self.level}"


def _levels(family: str, rows: list[tuple[int, int, int]]) -> list[AttnShape]:
    """(side, heads, head_dim) per level -> shapes with N = side * side."""
    return [AttnShape(family, f"{s}x{s}", s * s, h, d) for s, h, d in rows]


SHAPES: dict[str, list[AttnShape]] = {
    "sd1": _levels("sd1", [(64, 8, 40), (32, 8, 80), (16, 8, 160), (8, 8, 160)]),
    "sd2": _levels("sd2", [(96, 5, 64), (48, 10, 64), (24, 20, 64), (12, 20, 64)]),
    "sdxl": _levels("sdxl", [(64, 10, 64), (32, 20, 64)]),
    "tiny": _levels("tiny", [(8, 8, 4), (4, 8, 4), (2, 8, 8), (1, 8, 8)]),
}
LONG_PROMPT_FAMILIES = ("sd1", "sd2", "sdxl")  # families whose long-prompt contexts are checked
