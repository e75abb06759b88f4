"""The `compile` backend: torch.compile of the U-Net, replayed as a CUDA graph on CUDA."""
import numpy as np
import pytest
import torch

from neti_fast.cudagraph import CudaGraphDenoiser, _Graph, capacity, graphs_enabled
from neti_fast.pipeline import Engine, GenerateConfig, Request, TorchDenoiser
from neti_fast.table import precompute

CFG = GenerateConfig(steps=4, batch_size=4)


def max_diff(a, b):
    return int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())


def test_capacity():
    assert [capacity(r) for r in (1, 8, 9, 51, 801, 1024)] == [8, 8, 16, 64, 1024, 1024]


def test_kill_switch(monkeypatch):
    monkeypatch.delenv("NETI_FAST_DISABLE_CUDA_GRAPHS", raising=False)
    assert graphs_enabled()
    for value, enabled in (("1", False), ("true", False), ("ON", False), ("0", True), ("", True)):
        monkeypatch.setenv("NETI_FAST_DISABLE_CUDA_GRAPHS", value)
        assert graphs_enabled() is enabled


def test_tables_copied_once_per_generation():
    """Tables are copied into the static buffers when the engine hands over new ones, not every step."""
    g = _Graph(None, torch.zeros(2), torch.zeros(()), torch.zeros(2, dtype=torch.long),
               [torch.zeros(8, 3)], [torch.zeros(8, 3)])
    k, v = [torch.ones(5, 3)], [torch.full((5, 3), 2.0)]
    CudaGraphDenoiser._load(g, torch.ones(2), torch.tensor(7), torch.tensor([0, 4]), k, v)
    assert g.k_tables[0][:5].eq(1).all() and g.v_tables[0][:5].eq(2).all() and g.k_tables[0][5:].eq(0).all()
    assert g.t.item() == 7 and g.row_idx.tolist() == [0, 4]
    g.k_tables[0].zero_()
    CudaGraphDenoiser._load(g, torch.ones(2), torch.tensor(6), torch.tensor([1, 3]), k, v)  # same lists: next step
    assert g.k_tables[0].eq(0).all() and g.t.item() == 6 and g.row_idx.tolist() == [1, 3]
    k2 = [torch.full((3, 3), 5.0)]
    CudaGraphDenoiser._load(g, torch.ones(2), torch.tensor(6), torch.tensor([1, 2]), k2, v)  # a new generation
    assert g.k_tables[0][:3].eq(5).all()


def test_compile_backend_equals_eager_on_cpu(tiny_model, make_concept):
    """Inductor-compiled U-Net (no graphs on CPU): same images as eager. Compiling takes ~2.5 min here."""
    table = precompute(make_concept("neti", dim=tiny_model.text_dim, seed=3), progress=False)
    reqs = [Request("a photo of {}", s, table) for s in (0, 1)]
    eager = Engine(tiny_model, CFG).generate(reqs)
    compiled = Engine(tiny_model, CFG, denoiser=CudaGraphDenoiser(TorchDenoiser(tiny_model, CFG.attention, compile=True)))
    assert max_diff(compiled.generate(reqs), eager) <= 1


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: CUDA graphs exist only there (this path has not been run yet)")
def test_cuda_graph_replay_equals_eager(tiny_model, make_concept):
    """Graph replay equals the eager denoiser, across generations with different tables (reloaded) and
    a second batch shape (a second graph)."""
    m = tiny_model.to("cuda")
    try:
        ta = precompute(make_concept("neti", dim=m.text_dim, seed=1), progress=False)
        tb = precompute(make_concept("xti", dim=m.text_dim, seed=2), progress=False)
        graphed = CudaGraphDenoiser(TorchDenoiser(m, CFG.attention))
        fast, plain = Engine(m, CFG, denoiser=graphed), Engine(m, CFG)
        for reqs in ([Request("a photo of {}", s, ta) for s in (0, 1)],
                     [Request("a photo of {}", 0, ta), Request("a painting of {}", 1, tb)],
                     [Request("a photo of {}", 5, tb)]):
            assert max_diff(fast.generate(reqs), plain.generate(reqs)) <= 1
        assert len(graphed._graphs) == 2 and all(g.graph is not None for g in graphed._graphs.values())
    finally:
        tiny_model.to("cpu")
