"""The engine's schedulers: the one sampler table (utils.SAMPLERS x SCHEDULES) builds what it says,
every sampler draws its noise per image from that image's seed, and multi-evaluation samplers
(Heun, DPM2, DPM++ SDE: the U-Net twice per step) still read each step's own NeTI rows."""
from __future__ import annotations

import inspect
import os

import pytest

from neti_fast.engine.engine import Engine
from neti_fast.engine.request import GenerateConfig, Request
from neti_fast.engine.sampling import make_scheduler, missing_packages
from neti_fast.errors import NetiError
from neti_fast.utils import SAMPLERS, SCHEDULER_PARTS, SCHEDULERS, SCHEDULES, scheduler_name

# Batched and alone differ only in float summation order: at most one uint8 level (tests/engine/test_engine.py's TOL).
TOL = 1
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(name: str) -> None:
    """Skip a scheduler whose optional package (scipy, torchsde) is missing; in CI it is a failure
    (the `test` extra installs them)."""
    missing = missing_packages(name)
    if missing and IN_CI:
        pytest.fail(f"CI: scheduler {name} needs {', '.join(missing)} (the `test` extra installs it)")
    if missing:
        pytest.skip(f"scheduler {name} needs {', '.join(missing)}")


def test_table_options_are_the_classes_own(tiny_model):
    """Every option of the table is a config parameter of its diffusers class (from_config would
    drop an unknown one with only a warning), and the built scheduler carries it."""
    import diffusers
    assert len(SCHEDULERS) == len(set(SCHEDULERS)) == len(SCHEDULER_PARTS)
    assert {"dpm++", "ddim", "euler", "euler-a", "dpm++-karras"} <= set(SCHEDULERS)  # the names before the table
    for sampler, spec in SAMPLERS.items():
        if missing_packages(sampler):
            continue  # without scipy / torchsde diffusers has a placeholder class, with no signature to read
        params = inspect.signature(getattr(diffusers, spec.cls).__init__).parameters
        for schedule in spec.schedules:
            for key, _ in spec.options + SCHEDULES[schedule]:
                assert key in params, (sampler, schedule, key)
        if spec.noise == "generator":  # its step() draws from the generators the engine passes
            assert "generator" in inspect.signature(getattr(diffusers, spec.cls).step).parameters, sampler
    for name, (sampler, schedule) in SCHEDULER_PARTS.items():
        if missing_packages(name):
            continue
        cfg = make_scheduler(name, tiny_model.scheduler_config).config
        for key, value in SAMPLERS[sampler].options + SCHEDULES[schedule]:
            assert cfg[key] == value, (name, key)
    k = make_scheduler("dpm++-karras", tiny_model.scheduler_config)
    assert type(k).__name__ == "DPMSolverMultistepScheduler" and k.config.use_karras_sigmas
    assert not make_scheduler("dpm++", tiny_model.scheduler_config).config.use_karras_sigmas


def test_unknown_scheduler_names_the_field(tiny_model):
    with pytest.raises(NetiError) as e:
        make_scheduler("euler-a-karras", tiny_model.scheduler_config)  # diffusers' Euler a has no Karras sigmas
    assert e.value.field == "scheduler" and "euler-a" in str(e.value)
    with pytest.raises(NetiError) as e:
        Engine(tiny_model, GenerateConfig(steps=2, scheduler="euler", eta=0.5)).generate_batch([Request("a", 0)])
    assert e.value.field == "eta"


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_image_independent_of_batch_mates(max_diff, tiny_model, make_concept, one_thread, sampler):
    """An image in a batch equals the same seed generated alone: each sampler's noise (ancestral,
    SDE, Brownian, DDIM with eta, LCM) comes from the image's own seed, never a shared generator."""
    from neti_fast.concepts.table import Table
    need(sampler)
    a = Table(make_concept(seed=1), name="a")
    eta = 1.0 if SAMPLERS[sampler].eta else None  # DDIM: its stochastic form
    eng = Engine(tiny_model, GenerateConfig(steps=3, scheduler=sampler, batch_size=8, eta=eta))
    reqs = [Request("a photo of {}", 3, a), Request("a photo of {}", 4, a), Request("a dog", 5)]
    batch = eng.generate_batch(reqs)
    # DDIM at eta 1 scales the U-Net's float-order differences by its larger noise coefficient, and
    # DPM2's second evaluation per step compounds them (measured: 2 levels each, with the native CPU
    # attention kernel); noise drawn for another image moves an image by more than 10
    tol = 2 if eta or sampler == "dpm2" else TOL
    for r, img in zip(reqs, batch):
        assert max_diff(eng.generate_batch([r])[0], img) <= tol
    assert max_diff(batch[0], batch[1]) > 10  # the seeds really differ


def test_samplers_are_distinct(max_diff, tiny_model, one_thread):
    """Each sampler name reaches its own scheduler: one seed, pairwise different images."""
    imgs = {}
    for sampler in SAMPLERS:
        if missing_packages(sampler):
            continue
        imgs[sampler] = Engine(tiny_model, GenerateConfig(steps=3, scheduler=sampler)).generate_batch([Request("a cat", 7)])[0]
    names = list(imgs)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            if {x, y} == {"euler", "ddim"}:
                continue  # deterministic DDIM is Euler's step in other variables: the same image up to its last sigma
            assert max_diff(imgs[x], imgs[y]) > TOL, (x, y)


def test_schedules_change_the_timesteps(tiny_model):
    """Each schedule type gives its sampler other sigmas / timesteps than the model's own spacing
    (Simple and SGM Uniform are both diffusers' trailing spacing)."""
    import torch
    base = make_scheduler("euler", tiny_model.scheduler_config)
    base.set_timesteps(6)
    for schedule in SCHEDULES:
        if schedule == "uniform" or missing_packages(scheduler_name("euler", schedule)):
            continue
        s = make_scheduler(scheduler_name("euler", schedule), tiny_model.scheduler_config)
        s.set_timesteps(6)
        assert not torch.allclose(s.sigmas, base.sigmas), schedule


@pytest.mark.parametrize("scheduler", ["euler-a", "dpm++-karras", "heun", "dpm2-a-karras", "dpm++-sde", "ddim"])
def test_matches_reference_path(max_diff, tiny_model, make_concept, one_thread, scheduler):
    """The engine equals the official algorithm re-implemented (reference.py), including samplers
    that call the U-Net twice per step (Heun, DPM2: 2n - 1 timesteps, the odd ones between steps):
    the engine's per-timestep NeTI rows are read at the timestep the U-Net is called with."""
    from neti_fast.concepts.table import Table
    from neti_fast.engine.reference import generate_reference
    need(scheduler)
    a = Table(make_concept(seed=1), name="a")
    cfg = GenerateConfig(steps=4, scheduler=scheduler, batch_size=8, eta=0.7 if scheduler == "ddim" else None)
    eng = Engine(tiny_model, cfg)
    req = Request("a photo of {}", 3, a, truncation=8)
    sched = eng.make_scheduler()
    if scheduler in ("heun", "dpm2-a-karras", "dpm++-sde"):
        assert len(sched.timesteps) == 2 * cfg.steps - 1  # the case the per-step rows must survive
    got = eng.generate_batch([req, Request("a photo of {}", 4, a)])[0]
    assert max_diff(generate_reference(tiny_model, req, cfg)[0], got) <= TOL


def test_ddim_eta_changes_the_image(max_diff, tiny_model, one_thread):
    """eta 0 (the default) is deterministic DDIM; eta > 0 adds noise from the image's seed."""
    imgs = [Engine(tiny_model, GenerateConfig(steps=3, scheduler="ddim", eta=eta)).generate_batch([Request("a cat", 2)])[0]
            for eta in (None, 0.0, 1.0)]
    assert max_diff(imgs[0], imgs[1]) == 0 and max_diff(imgs[0], imgs[2]) > 10
