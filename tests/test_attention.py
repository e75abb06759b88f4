"""The attention dispatcher: Triton kernel when its guards pass, SDPA otherwise, same images."""
import numpy as np
import pytest
import torch

from neti_fast.attention import attend_rows
from neti_fast.kernels.cross_attention import cross_attention_ref, triton_supported
from neti_fast.pipeline import Engine, GenerateConfig, Request
from neti_fast.table import precompute


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
