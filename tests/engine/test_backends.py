"""neti_fast.engine.backends: the one place that chooses the U-Net runtime, for the CLI and the Python API."""
import logging

import numpy as np
import pytest

import neti_fast as nf
from neti_fast import utils
from neti_fast.engine import backends
from neti_fast.sd import attention
from neti_fast.errors import NetiError


def test_resolve():
    assert backends.resolve("auto").backend == "eager" and "auto picks eager" in backends.resolve("auto").reason
    assert backends.resolve("auto", "sdpa").attention == "sdpa"
    assert backends.resolve("onnx").backend == "onnx"
    with pytest.raises(NetiError, match="backend 'fast': must be one of auto, eager") as e:
        backends.resolve("fast")
    assert e.value.field == "backend" and e.value.render("--backend").startswith("--backend 'fast': ")
    with pytest.raises(NetiError, match="attention 'fused': must be one of") as e:
        backends.resolve("eager", "fused")
    assert not backends.needs_size("auto") and not backends.needs_size("triton") and backends.needs_size("onnx")


def test_backend_and_attention_vocabularies_do_not_overlap(caplog):
    """--backend names the U-Net runtime, --attention the kernel: no name means both. The older
    spellings (--backend triton, --attention eager) still work, each with one notice."""
    assert set(utils.BACKENDS) & set(utils.ATTENTIONS) == {"auto"}   # "decide for me", in each setting
    backends._said.clear()
    attention._renamed_said.clear()
    with caplog.at_level(logging.WARNING, logger="neti_fast"):
        for _ in range(2):
            c = backends.resolve("triton", "sdpa")
            assert (c.backend, c.attention) == ("eager", "triton")
            assert backends.resolve("eager", "eager").attention == "math"
    notices = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert notices == ["neti-fast: --backend triton is now --backend eager --attention triton "
                       "(--attention chooses the kernel, --backend the U-Net runtime)",
                       "neti-fast: --attention eager is now --attention math"]


def test_make_denoiser_eager_logs_its_choice_once(tiny_model, caplog):
    backends._said.clear()
    with caplog.at_level(logging.INFO, logger="neti_fast"):
        assert backends.make_denoiser(tiny_model, "auto") == (None, "auto")
        assert backends.make_denoiser(tiny_model, "auto") == (None, "auto")
        assert backends.make_denoiser(tiny_model, "eager", "sdpa") == (None, "sdpa")
    said = [r.getMessage() for r in caplog.records if r.name == "neti_fast"]
    assert len([m for m in said if "eager" in m and "auto" in m]) == 1  # once, with the reason
    assert said[-1] == "neti-fast backend: eager (eager: asked for)" and len(said) == 2


def test_python_api_takes_backend(tiny_model, make_concept):
    table = nf.precompute(make_concept("ti", dim=32, seed=3), progress=False)
    cfg = nf.GenerateConfig(steps=2, batch_size=2)
    a = nf.generate(tiny_model, table, ["a photo of {}"], seeds=[0, 1], cfg=cfg)
    b = nf.generate(tiny_model, table, ["a photo of {}"], seeds=[0, 1], cfg=cfg, backend="eager")
    assert a.shape == (2, 64, 64, 3) and np.array_equal(a, b)
    with pytest.raises(NetiError, match="backend 'nope'"):
        nf.generate(tiny_model, table, ["a photo of {}"], cfg=cfg, backend="nope")
