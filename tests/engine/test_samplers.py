"""The engine's schedulers: the new names, and ancestral noise drawn per image from its own seed."""
from __future__ import annotations

import pytest

from neti_fast.engine.engine import Engine
from neti_fast.engine.request import GenerateConfig, Request
from neti_fast.engine.sampling import make_scheduler
from neti_fast.utils import SCHEDULERS

# Batched and alone differ only in float summation order: at most one uint8 level (tests/engine/test_engine.py's TOL).
TOL = 1


def test_scheduler_names(tiny_model):
    from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler
    assert {"dpm++", "ddim", "euler", "euler-a", "dpm++-karras"} <= set(SCHEDULERS)
    assert isinstance(make_scheduler("euler-a", tiny_model.scheduler_config), EulerAncestralDiscreteScheduler)
    k = make_scheduler("dpm++-karras", tiny_model.scheduler_config)
    assert isinstance(k, DPMSolverMultistepScheduler) and k.config.use_karras_sigmas
    assert not make_scheduler("dpm++", tiny_model.scheduler_config).config.use_karras_sigmas


@pytest.mark.parametrize("scheduler", ["euler-a", "dpm++-karras"])
def test_image_independent_of_batch_mates(max_diff, tiny_model, make_concept, one_thread, scheduler):
    """An image is the same alone and beside other seeds / concepts (the ancestral step's noise comes
    from the image's own generator), and matches the reference path."""
    from neti_fast.engine.reference import generate_reference
    from neti_fast.concepts.table import Table
    a, b = Table(make_concept(seed=1), name="a"), Table(make_concept(seed=2), name="b")
    cfg = GenerateConfig(steps=4, scheduler=scheduler, batch_size=8)
    eng = Engine(tiny_model, cfg)
    reqs = [Request("a photo of {}", 3, a), Request("a photo of {}", 4, b), Request("a photo of {}", 5, a, truncation=8)]
    batch = eng.generate_batch(reqs)
    for r, img in zip(reqs, batch):
        assert max_diff(eng.generate_batch([r])[0], img) <= TOL
    assert max_diff(batch[0], batch[1]) > 10  # seeds really differ: noise drawn from a shared or global
    # generator would move an image by as much when its batch-mates change
    assert max_diff(generate_reference(tiny_model, reqs[0], cfg)[0], batch[0]) <= TOL

