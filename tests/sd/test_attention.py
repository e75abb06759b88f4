"""The attention dispatcher: Triton kernel when its guards pass, SDPA otherwise, same images."""
import numpy as np
import pytest
import torch

import logging

from neti_fast.sd.attention import DISPATCH, AttentionDispatcher, attend_rows
from neti_fast.kernels.cross_attention import cross_attention_ref, triton_supported
from neti_fast.engine.engine import Engine
from neti_fast.engine.request import GenerateConfig, Request
from neti_fast.concepts.table import precompute


@pytest.fixture(autouse=True)
def fresh_dispatcher():
    """Decisions are cached per process; each test starts from none (and leaves none behind)."""
    DISPATCH.reset()
    yield
    DISPATCH.reset()


def tables(B=3, R=4, N=16, C=32, heads=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, C, generator=g)
    k, v = torch.randn(R, 77, C, generator=g), torch.randn(R, 77, C, generator=g)
    return q, k, v, torch.tensor([3, 0, 3])


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_dispatch_backends_agree(backend):
    q, k, v, idx = tables()
    if backend == "triton" and not triton_supported(q, k, 4)[0]:
        pytest.skip(f"Triton kernel unavailable here: {triton_supported(q, k, 4)[1]}")
    ref = cross_attention_ref(q.double(), k.double(), v.double(), idx, 4).float()
    out = attend_rows(q, k, v, idx, 4, backend)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_auto_never_uses_the_cpu_interpreter(monkeypatch):
    """On CPU `auto` is SDPA even under TRITON_INTERPRET=1: a launcher that raises proves it is not called."""
    import neti_fast.kernels.cross_attention as ca
    monkeypatch.setattr(ca, "cross_attention_triton", lambda *a, **k: (_ for _ in ()).throw(AssertionError("called")))
    q, k, v, idx = tables()
    torch.testing.assert_close(attend_rows(q, k, v, idx, 4, "auto"), attend_rows(q, k, v, idx, 4, "sdpa"))
    if triton_supported(q, k, 4)[0]:  # and the patch is live: the forced path does hit it
        with pytest.raises(AssertionError, match="called"):
            attend_rows(q, k, v, idx, 4, "triton")


def test_kill_switch(monkeypatch):
    q, k, _, _ = tables()
    monkeypatch.setenv("NETI_FAST_DISABLE_TRITON", "1")
    ok, why = triton_supported(q, k, 4)
    assert not ok and "NETI_FAST_DISABLE_TRITON" in why
    with pytest.raises(RuntimeError, match="cannot run here"):
        attend_rows(*tables(), 4, backend="triton")


def test_engine_with_triton_kernel_equals_sdpa(tiny_model, make_concept):
    """The whole engine with the (interpreted, on CPU) Triton kernel in all 16 layers."""
    q, k, _, _ = tables()
    ok, why = triton_supported(q, k, 4)
    if not ok:
        pytest.skip(f"Triton kernel unavailable here: {why}")
    table = precompute(make_concept("neti", dim=tiny_model.text_dim, seed=2), progress=False)
    reqs = [Request("a photo of {}", 0, table), Request("a photo of {}", 1, table, None)]
    a = Engine(tiny_model, GenerateConfig(steps=2, attention="triton")).generate(reqs)
    b = Engine(tiny_model, GenerateConfig(steps=2, attention="sdpa")).generate(reqs)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_decided_once_and_logged_once(monkeypatch, caplog):
    """The guards run on the first call of a shape class only, and one INFO line says what runs."""
    import neti_fast.kernels.cross_attention as ca
    calls = []
    real = ca.triton_supported
    monkeypatch.setattr(ca, "triton_supported", lambda *a: calls.append(1) or real(*a))
    q, k, v, idx = tables()
    with caplog.at_level(logging.INFO, logger="neti_fast.sd.attention"):
        for _ in range(5):
            attend_rows(q, k, v, idx, 4, "sdpa")
            attend_rows(q, k, v, idx, 4, "auto")
        attend_rows(tables(N=8)[0], k, v, idx, 4, "auto")       # another N: a new shape class
    lines = [r.getMessage() for r in caplog.records if r.name == "neti_fast.sd.attention"]
    assert len(lines) == 3, lines
    assert "sdpa (requested)" in lines[0] and "N=16" in lines[0]
    from neti_fast.sd.native import native_preferred
    auto = "native (" if native_preferred(q, k, 4) else "sdpa (triton needs CUDA"
    assert auto in lines[1] and "N=8" in lines[2]
    assert calls == []  # `auto` on CPU never even asks the Triton kernel's guards


def _bad_kernel(q, k, v, ri, heads, scale):
    return cross_attention_ref(q, k, v, ri, heads, scale) + 0.05  # a plausible but wrong result


def test_first_use_check_disables_a_wrong_kernel(monkeypatch):
    """A kernel whose output is off by more than flash-attention's tolerance is turned off for the
    process with one warning, and the call returns SDPA's result (the check is what a CUDA run
    does on first use; here it is driven directly, on CPU)."""
    import neti_fast.kernels.cross_attention as ca
    monkeypatch.setattr(ca, "cross_attention_op", _bad_kernel)
    q, k, v, idx = tables()
    d = AttentionDispatcher()
    with pytest.warns(RuntimeWarning, match="failed its first-use check"):
        choice, out = d._first_use_check(q, k, v, idx, 4, "auto")
    assert choice.impl == "sdpa" and "max error" in choice.reason and d.triton_broken
    torch.testing.assert_close(out, attend_rows(q, k, v, idx, 4, "sdpa"))
    with pytest.raises(RuntimeError, match="failed its check"):   # forced: an error, not a fallback
        AttentionDispatcher()._first_use_check(q, k, v, idx, 4, "triton")


def test_first_use_check_catches_exceptions_and_passes_a_correct_kernel(monkeypatch):
    import neti_fast.kernels.cross_attention as ca
    q, k, v, idx = tables()
    monkeypatch.setattr(ca, "cross_attention_op", lambda *a: (_ for _ in ()).throw(RuntimeError("no kernel image")))
    d = AttentionDispatcher()
    with pytest.warns(RuntimeWarning, match="no kernel image"):
        assert d._first_use_check(q, k, v, idx, 4, "auto")[0].impl == "sdpa"
    monkeypatch.setattr(ca, "cross_attention_op", lambda *a: cross_attention_ref(*a))
    choice, out = AttentionDispatcher()._first_use_check(q, k, v, idx, 4, "auto")
    assert choice.impl == "triton" and choice.reason.startswith("checked against SDPA")
    torch.testing.assert_close(out, cross_attention_ref(q, k, v, idx, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the guard's CUDA branch")
def test_fp32_on_cuda_is_refused_by_the_guard():
    """fp32 goes to SDPA on CUDA (the kernel's fp32 path has no tensor cores)."""
    q, k, _, _ = (t.cuda() for t in tables())
    ok, why = triton_supported(q, k, 4)
    assert not ok and "fp32 on CUDA" in why
    assert triton_supported(q.half(), k.half(), 4)[0]
