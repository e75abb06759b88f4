"""The `compile` backend: torch.compile of the U-Net, replayed as a CUDA graph on CUDA."""
import pytest
import torch

from neti_fast.engine.cudagraph import CudaGraphDenoiser, graphs_enabled, tables_key
from neti_fast.engine.denoiser import TorchDenoiser
from neti_fast.engine.engine import Engine
from neti_fast.engine.request import GenerateConfig, Request
from neti_fast.concepts.table import precompute

CFG = GenerateConfig(steps=4, batch_size=4)


def test_kill_switch(monkeypatch):
    monkeypatch.delenv("NETI_FAST_DISABLE_CUDA_GRAPHS", raising=False)
    assert graphs_enabled()
    for value, enabled in (("1", False), ("true", False), ("ON", False), ("0", True), ("", True)):
        monkeypatch.setenv("NETI_FAST_DISABLE_CUDA_GRAPHS", value)
        assert graphs_enabled() is enabled


def test_tables_key_tracks_addresses_not_values():
    k = [torch.zeros(4, 3)]
    v = [torch.zeros(4, 3)]
    key = tables_key(k, v)
    k[0].fill_(1.0)                              # new contents, same buffer: graphs stay valid
    assert tables_key(k, v) == key
    assert tables_key([torch.zeros(4, 3)], v) != key  # another buffer: graphs must be dropped


def test_compile_does_not_recompile_when_table_rows_change(tiny_model):
    """Row counts differ from batch to batch in a job; with the rows marked dynamic, dynamo compiles
    the U-Net once (backend "eager" keeps this test fast: the guards are dynamo's, not inductor's)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from neti_fast.export.onnx import example_inputs
    torch._dynamo.reset()
    counters.clear()
    den = TorchDenoiser(tiny_model, "sdpa", compile=True, compile_backend="eager")
    outs = []
    for i, rows in enumerate((3, 5, 9, 17, 3)):
        x, t, idx, *kv = example_inputs(tiny_model, batch=2, rows=rows, seed=i % 4)
        idx = idx.clamp(max=2)
        outs.append((den(x, t, idx, kv[:16], kv[16:]), TorchDenoiser(tiny_model, "sdpa")(x, t, idx, kv[:16], kv[16:])))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    for compiled, eager in outs:
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_compile_backend_equals_eager_on_cpu(max_diff, tiny_model, make_concept):
    """Inductor-compiled U-Net (no graphs on CPU): same images as eager. Compiling takes ~2.5 min here."""
    table = precompute(make_concept("neti", dim=tiny_model.text_dim, seed=3), progress=False)
    reqs = [Request("a photo of {}", s, table) for s in (0, 1)]
    eager = Engine(tiny_model, CFG).generate(reqs)
    compiled = Engine(tiny_model, CFG, denoiser=CudaGraphDenoiser(TorchDenoiser(tiny_model, CFG.attention, compile=True)))
    assert max_diff(compiled.generate(reqs), eager) <= 1


def test_compile_backend_passes_added_conditioning(max_diff, make_concept, tiny_xl_model):
    """The compile backend's denoiser chain (CudaGraphDenoiser around a compiled TorchDenoiser) on
    SDXL (whose U-Net also takes text_embeds / time_ids through `added`): the same images as eager.
    dynamo with backend "eager" keeps it fast (the pass-through is dynamo's and ours, not inductor's);
    no graphs on CPU. (SD 2.x's chain is SD 1.x's: no added inputs; test above.)"""
    import torch._dynamo
    m = tiny_xl_model
    fam = m.family
    torch._dynamo.reset()
    cfg = GenerateConfig(steps=2, batch_size=2, scheduler=fam.default_scheduler, guidance=fam.default_guidance)
    table = precompute(make_concept("neti", dim=m.text_dim, seed=5, family=fam), progress=False)
    reqs = [Request("a photo of {}", s, table) for s in (0, 1)]
    eager = Engine(m, cfg).generate(reqs)
    den = CudaGraphDenoiser(TorchDenoiser(m, cfg.attention, compile=True, compile_backend="eager"))
    assert max_diff(Engine(m, cfg, denoiser=den).generate(reqs), eager) <= 1
    assert max_diff(eager[0], eager[1]) > 10


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: CUDA graphs exist only there (SDXL's added-conditioning buffers too)")
def test_cuda_graph_replay_equals_eager_sdxl(max_diff, tiny_xl_model, make_concept):
    """SDXL: text_embeds change per step (NeTI's pooled rows follow t), so the static buffer must be
    refreshed every replay; time ids are copied the same way."""
    from neti_fast.sd.families import SDXL
    m = tiny_xl_model.to("cuda")
    try:
        cfg = GenerateConfig(steps=4, batch_size=2, scheduler="euler", guidance=5.0)
        t = precompute(make_concept("neti", dim=m.text_dim, seed=1, family=SDXL), progress=False)
        graphed = CudaGraphDenoiser(TorchDenoiser(m, cfg.attention))
        reqs = [Request("a photo of {}", s, t) for s in (0, 1)]
        assert max_diff(Engine(m, cfg, denoiser=graphed).generate(reqs), Engine(m, cfg).generate(reqs)) <= 1
        assert graphed.captures == 1 and all(g.added is not None for g in graphed._graphs.values())
    finally:
        tiny_xl_model.to("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: CUDA graphs exist only there (this path has not been run yet)")
def test_cuda_graph_replay_equals_eager(max_diff, tiny_model, make_concept):
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
        assert graphed.captures == 2   # the arena's buffers were read in place: no recapture per batch
    finally:
        tiny_model.to("cpu")
