"""The native extension neti_fast._C (csrc/): its CPU kernel against the reference, its dispatch,
its one-node view in torch.compile / torch.export, and the CUDA artifact.

Tests that need `_C` skip with the reason it is unavailable, except under
NETI_FAST_REQUIRE_NATIVE=1 (CI, where cmake and a compiler exist), where a missing `_C` fails.
"""
import logging
import os
import shutil
import sys
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from neti_fast.sd import native
from neti_fast.sd.attention import attend_rows
from neti_fast.kernels.cross_attention import cross_attention_ref
from neti_fast.engine.engine import Engine
from neti_fast.engine.request import GenerateConfig, Request
from neti_fast.engine.reference import generate_reference
from neti_fast.concepts.table import precompute

OK, WHY = native.native_available()
REQUIRE = os.environ.get("NETI_FAST_REQUIRE_NATIVE", "").strip().lower() in ("1", "true", "yes", "on")
needs_native = pytest.mark.skipif(not OK, reason=f"neti_fast._C unavailable: {WHY}")

L, R, B = 77, 5, 3
ROWS = [3, 0, 3]  # repeats and out of order; rows 1, 2, 4 are never read

def make_inputs(N, C, dtype, seed=0, keys=L, idx_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, C, generator=g)
    k = torch.randn(R, keys, C, generator=g)
    v = torch.randn(R, keys, C, generator=g)
    return [t.to(dtype) for t in (q, k, v)] + [torch.tensor(ROWS, dtype=idx_dtype)]


def test_required_build():
    """CI sets NETI_FAST_REQUIRE_NATIVE=1: a broken build cannot hide behind the fallback."""
    if not REQUIRE:
        pytest.skip("NETI_FAST_REQUIRE_NATIVE is not set")
    assert OK, WHY
    assert (native.library_path().parent / "_native_build.txt").read_text().strip() == "built"


@needs_native
def test_every_isa_variant_agrees():
    """The kernel is compiled per ISA (DEFAULT / AVX2 / AVX512); ATEN_CPU_CAPABILITY caps it, read
    once per process, so each variant runs in its own interpreter."""
    script = ("import torch, sys; from neti_fast.sd import native; native.native_available();"
              "g = torch.Generator().manual_seed(0); q = torch.randn(2, 45, 100, generator=g);"
              "k = torch.randn(3, 77, 100, generator=g); v = torch.randn(3, 77, 100, generator=g);"
              "o = native.cross_attention_native(q, k, v, torch.tensor([2, 0]), 5);"
              "torch.save(o, sys.argv[1])")
    ref = None
    for cap in ("default", "avx2", "avx512"):
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"neti-native-{os.getpid()}-{cap}.pt"
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap, OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, "-c", script, str(path)], env=env, check=True, timeout=120)
        out = torch.load(path, weights_only=True)
        path.unlink()
        if ref is None:
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(*s, generator=g) for s in ((2, 45, 100), (3, 77, 100), (3, 77, 100)))
            ref = cross_attention_ref(q, k, v, torch.tensor([2, 0]), 5)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=f"ATEN_CPU_CAPABILITY={cap}")


@needs_native
def test_last_dim_strided_inputs_are_copied():
    """Views with padded rows are read in place (the conformance suite); a q whose last dim is not
    contiguous is copied first, so it gives the same bits."""
    q, k, v, ri = make_inputs(40, 64, torch.float32)
    out = native.cross_attention_native(q, k, v, ri, 8)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # stride(-1) != 1
    torch.testing.assert_close(native.cross_attention_native(qt, k, v, ri, 8), out, rtol=0, atol=0)


@needs_native
def test_bad_inputs_raise_clear_errors():
    q, k, v, ri = make_inputs(16, 32, torch.float32)
    op = torch.ops.neti_fast.cross_attention_native
    cases = [
        ((q, k, v, torch.tensor([0, 5, 1]), 4, 0.5), "out of range"),
        ((q, k, v, ri, 5, 0.5), "divisible"),
        ((q, k, v, ri[:2], 4, 0.5), "row_idx"),
        ((q.half(), k.half(), v.half(), ri, 4, 0.5), "unsupported"),
        ((q, k.bfloat16(), v, ri, 4, 0.5), "dtype mismatch"),
        ((q, torch.randn(R, 0, 32), torch.randn(R, 0, 32), ri, 4, 0.5), "L=0"),
        ((q[0], k, v, ri, 4, 0.5), "q must be"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            op(*args)


def test_supported_and_kill_switch(monkeypatch):
    q, k, v, ri = make_inputs(16, 32, torch.float32)
    ok, why = native.native_supported(q, k, 4)
    assert ok == OK, why
    if OK:
        assert not native.native_supported(q.half(), k.half(), 4)[0]
        assert "L=0" in native.native_supported(q, torch.randn(1, 0, 32), 4)[1]
        assert native.native_supported(q, torch.randn(1, 231, 32), 4)[0]  # long prompts: any L
        assert "divisible" in native.native_supported(q, k, 5)[1]
    monkeypatch.setenv("NETI_FAST_DISABLE_NATIVE", "1")
    ok, why = native.native_supported(q, k, 4)
    assert not ok and "NETI_FAST_DISABLE_NATIVE" in why
    assert not native.native_preferred(q, k, 4)
    with pytest.raises(RuntimeError, match="cannot run here"):
        attend_rows(q, k, v, ri, 4, backend="native")
    torch.testing.assert_close(attend_rows(q, k, v, ri, 4, "auto"), attend_rows(q, k, v, ri, 4, "sdpa"))


def test_missing_library_reason_logged_once(monkeypatch, tmp_path, caplog):
    """The fallback: no _C.so -> (False, reason with the build's own verdict), one warning line."""
    (tmp_path / "_native_build.txt").write_text("not built: cmake not found on PATH\n")
    monkeypatch.setattr(native, "_HERE", tmp_path)
    monkeypatch.setattr(native, "_state", None)
    monkeypatch.setattr(native, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="neti_fast.sd.native"):
        for _ in range(3):
            ok, why = native.native_available()
            assert not ok and "cmake not found" in why
        q, k, v, ri = make_inputs(8, 32, torch.float32)
        torch.testing.assert_close(attend_rows(q, k, v, ri, 4, "auto"), attend_rows(q, k, v, ri, 4, "sdpa"))
    lines = [r for r in caplog.records if r.name == "neti_fast.sd.native"]
    assert len(lines) == 1 and "not built" in lines[0].getMessage()


@needs_native
def test_dispatch(monkeypatch):
    q, k, v, ri = make_inputs(64, 32, torch.float32)
    sdpa = attend_rows(q, k, v, ri, 4, "sdpa")
    torch.testing.assert_close(attend_rows(q, k, v, ri, 4, "native"), sdpa, rtol=1e-5, atol=1e-5)
    calls = []
    real = native.cross_attention_native
    monkeypatch.setattr(native, "cross_attention_native", lambda *a, **kw: calls.append(a[0].dtype) or real(*a, **kw))
    attend_rows(q, k, v, ri, 4, "auto")                                   # fp32: measured faster
    attend_rows(q.bfloat16(), k.bfloat16(), v.bfloat16(), ri, 4, "auto")  # bf16, head_dim 8: faster
    qb, kb = torch.randn(2, 64, 320), torch.randn(2, L, 320)
    attend_rows(qb, kb, kb, torch.tensor([0, 1]), 8, "auto")              # fp32, head_dim 40: faster
    attend_rows(qb.bfloat16(), kb.bfloat16(), kb.bfloat16(), torch.tensor([0, 1]), 8, "auto")  # SDPA
    assert calls == [torch.float32, torch.bfloat16, torch.float32]


@needs_native
def test_engine_with_native_equals_reference(tiny_model, make_concept):
    """The whole engine with the native kernel in all 16 layers, held to the reference path."""
    table = precompute(make_concept("neti", dim=tiny_model.text_dim, seed=2), truncations=[16], progress=False)
    cfg = GenerateConfig(steps=3, batch_size=8, attention="native")
    reqs = [Request("a photo of {} on a beach", s, table, t) for t in (None, 16) for s in (0, 1)]
    fast = Engine(tiny_model, cfg).generate(reqs)
    for r, img in zip(reqs, fast):
        ref = generate_reference(tiny_model, r, cfg)[0]
        assert int(np.abs(img.astype(np.int32) - ref.astype(np.int32)).max()) <= 1
    assert int(np.abs(fast[0].astype(np.int32) - fast[1].astype(np.int32)).max()) > 10


class _Attn(torch.nn.Module):
    def forward(self, q, k, v, ri):
        return attend_rows(q, k, v, ri, 4, backend="native") * 2.0


def _op_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and "cross_attention_native" in str(n.target)]


@needs_native
def test_torch_compile_sees_one_node():
    q, k, v, ri = make_inputs(16, 32, torch.float32)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(_Attn(), backend=capture, fullgraph=True)(q, k, v, ri)
    assert len(graphs) == 1 and len(_op_nodes(graphs[0])) == 1
    torch.testing.assert_close(out, 2 * cross_attention_ref(q, k, v, ri, 4), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()  # and through inductor on CPU: the op stays an extern call
    out = torch.compile(_Attn(), fullgraph=True)(q, k, v, ri)
    torch.testing.assert_close(out, 2 * cross_attention_ref(q, k, v, ri, 4), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@needs_native
def test_torch_export_sees_one_node():
    q, k, v, ri = make_inputs(16, 32, torch.float32)
    ep = torch.export.export(_Attn(), (q, k, v, ri))
    assert len(_op_nodes(ep.graph_module)) == 1
    torch.testing.assert_close(ep.module()(q, k, v, ri), _Attn()(q, k, v, ri), rtol=0, atol=0)


def _cuobjdump():
    exe = shutil.which("cuobjdump")
    if exe is None:
        try:  # triton's wheel bundles one
            import triton
            cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
            exe = str(cand) if cand.exists() else None
        except ImportError:
            pass
    return exe


def test_cuda_artifact_has_sm80_and_sm90():
    """Where nvcc was found at build time, libneti_fast_cuda.so carries sm_80 and sm_90 SASS and
    compute_90 PTX.  It is built without torch, so this holds on a CPU-only torch too."""
    lib = native.cuda_library_path()
    if not lib.exists():
        if REQUIRE and shutil.which("nvcc"):
            pytest.fail(f"nvcc is installed but {lib} was not built")
        pytest.skip(f"{lib.name} not built (no nvcc at install time)")
    exe = _cuobjdump()
    if exe is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or triton)")
    listing = subprocess.run([exe, "--list-elf", "--list-ptx", str(lib)], capture_output=True, text=True,
                             check=True).stdout
    assert "sm_80.cubin" in listing and "sm_90.cubin" in listing and "sm_90.ptx" in listing, listing
    if shutil.which("nm"):  # the launcher _C dlopen()s is exported
        syms = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
        assert "neti_fast_cross_attention_cuda" in syms
