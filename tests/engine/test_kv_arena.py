"""The engine's K / V arena: conditionings placed once, indices only per batch, stable buffers."""
from dataclasses import dataclass

import numpy as np
import torch

from neti_fast.engine.kv_arena import KVArena
from neti_fast.engine.engine import Engine
from neti_fast.engine.request import GenerateConfig, Request
from neti_fast.concepts.table import precompute


@dataclass(eq=False)
class C:  # the arena needs only per-layer .k / .v lists of [S, L, C_l]
    k: list
    v: list


def cond(rows: int, value: float, widths=(4, 8)) -> C:
    return C([torch.full((rows, 3, w), value) for w in widths], [torch.full((rows, 3, w), -value) for w in widths])


def arena() -> KVArena:
    return KVArena([4, 8], [4, 8], 3, torch.float32, "cpu")


def rows_of(a: KVArena, start: int, n: int):
    return a.k[0][start:start + n], a.v[1][start:start + n]


def test_placed_once_then_indices_only():
    a, x, y = arena(), cond(5, 1.0), cond(2, 2.0)
    s = a.place([x, y])
    assert a.capacity == 16 and a.copies == 2
    k, v = rows_of(a, s[id(x)], 5)
    assert k.eq(1).all() and v.eq(-1).all()
    k_before = a.k[0]
    s2 = a.place([y, x])                       # the next batch: same conditionings, no copy
    assert s2 == s and a.copies == 2 and a.k[0] is k_before


def test_lru_ranges_are_reused_and_live_ones_kept():
    a = arena()
    x, y, z = cond(8, 1.0), cond(6, 2.0), cond(8, 3.0)
    sx = a.place([x])[id(x)]
    buf = a.k[0]
    a.place([y])                               # 8 + 6 of 16 rows used
    s = a.place([z, y])                        # z needs 8: x (least recently used) is evicted
    assert a.capacity == 16 and a.k[0] is buf  # evicted, not regrown
    assert s[id(z)] == sx and rows_of(a, s[id(z)], 8)[0].eq(3).all()
    assert rows_of(a, s[id(y)], 6)[0].eq(2).all()   # y, in this batch, untouched
    assert a.place([x, z])[id(x)] != s[id(z)]  # x comes back: copied again, y gives way


def test_growth_replaces_buffers():
    a = arena()
    x = cond(10, 1.0)
    a.place([x])
    old = a.k[0]
    big = cond(30, 5.0)
    s = a.place([x, big])
    assert a.capacity == 64 and a.k[0] is not old
    assert rows_of(a, s[id(x)], 10)[0].eq(1).all() and rows_of(a, s[id(big)], 30)[0].eq(5).all()


def test_freed_conditioning_releases_its_rows():
    a = arena()
    x = cond(16, 1.0)
    a.place([x])
    del x                                      # dropped by the engine's cache: its range is free
    y = cond(16, 2.0)
    assert a.place([y])[id(y)] == 0 and a.capacity == 16


def test_engine_batches_share_the_arena(tiny_model, make_concept):
    """Across batches with different concepts the U-Net reads the same buffers; images equal a fresh engine's."""
    tables = [precompute(make_concept("neti", dim=tiny_model.text_dim, seed=s), progress=False) for s in (1, 2, 3)]
    cfg = GenerateConfig(steps=3, batch_size=2, height=64, width=64)
    eng = Engine(tiny_model, cfg)
    seen = []
    real = eng.denoiser

    def spy(x, t, row_idx, k, v):
        seen.append((k[0].data_ptr(), k[0].shape[0]))
        return real(x, t, row_idx, k, v)
    eng.denoiser = spy
    batches = [[Request("a photo of {}", 0, tables[0]), Request("a photo of {}", 1, tables[1])],
               [Request("a photo of {}", 2, tables[1]), Request("a photo of {}", 3, tables[2])],
               [Request("a photo of {}", 4, tables[0])]]
    images = [eng.generate_batch(b) for b in batches]
    assert len(set(seen)) == 1                 # one buffer, one row count for every call
    (arena_,) = eng._arenas.values()
    assert arena_.copies == 4                  # neg + t0 + t1, then t2; t0 and t1 again were resident
    for b, img in zip(batches, images):
        np.testing.assert_array_equal(img, Engine(tiny_model, cfg).generate_batch(b))


def test_long_prompt_rows_and_one_length_per_arena():
    """Long prompts give L = 77k keys per row: any L is held, but one arena holds one L."""
    import pytest
    long = KVArena([4, 8], [4, 8], 154, torch.float32, "cpu")
    x = C([torch.full((2, 154, w), 1.0) for w in (4, 8)], [torch.full((2, 154, w), -1.0) for w in (4, 8)])
    s = long.place([x])
    assert long.k[1].shape == (16, 154, 8) and long.k[0][s[id(x)]:s[id(x)] + 2].eq(1).all()
    with pytest.raises(ValueError, match="L=154"):
        long.place([cond(1, 2.0)])  # L = 3 rows in an L = 154 arena
