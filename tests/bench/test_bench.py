"""`neti-fast bench`: FLOP counting and the ladder end to end on the tiny model (CPU, --quick)."""
from __future__ import annotations

import importlib.util
import json
import math
import statistics

import pytest
import torch

from neti_fast.bench import flops, ladder, report, rungs


def _onnx_importable() -> bool:
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    try:
        from neti_fast.export.onnx import OnnxDenoiser, export_cached  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def tiny():
    from neti_fast.sd.models import load_model
    return load_model("tiny", "cpu", torch.float32)


def test_flops_positive_and_linear_in_batch(tiny):
    c = flops.count(tiny)
    assert c["height"] == c["width"] == tiny.default_size
    for k in ("unet_per_sample", "text_encoder_pass", "vae_decode"):
        assert isinstance(c[k], int) and c[k] > 0, k
    one, four = flops.unet_flops(tiny, batch=1), flops.unet_flops(tiny, batch=4)
    assert one == c["unet_per_sample"]
    assert 3.9 < four / one < 4.1
    assert 1.9 < flops.text_encoder_flops(tiny, batch=2) / c["text_encoder_pass"] < 2.1
    assert flops.image_flops(c, steps=10) == 20 * c["unet_per_sample"]
    # resolution: 4x the pixels, about 4x the U-Net work (attention grows a bit faster)
    big = flops.unet_flops(tiny, 2 * tiny.default_size, 2 * tiny.default_size)
    assert 3.5 < big / one < 6


RUNGS = ["reference", "diffusers", "batched", "concepts", "triton", "compile", "tensorrt"] + (["onnx"] if _onnx_importable() else [])


_THREADS = torch.get_num_threads()


@pytest.fixture(scope="module")
def ladder_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    js, png = out / "bench.json", out / "bench.png"
    result = ladder.cli(["--model", "tiny", "--device", "cpu", "--quick", "--steps", "2", "--batch-sizes", "1", "2",
                         "--threads", "1", "--rungs", *RUNGS,
                         "--json", str(js), "--chart", str(png)])
    return result, js, png


def test_ladder_json_rows_and_chart(ladder_run):
    result, js, png = ladder_run
    assert torch.get_num_threads() == _THREADS  # --threads is undone after the run
    data = json.loads(js.read_text())
    for key in ("schema", "date", "device", "versions", "args", "flops", "rows", "summary", "memory_kind",
                "model", "height", "width", "steps"):
        assert key in data, key
    assert data["device"]["type"] == "cpu" and data["device"]["name"]
    for v in ("torch", "diffusers", "transformers", "onnxruntime", "triton"):
        assert v in data["versions"]
    assert data["args"]["steps"] == 2 and data["args"]["batch_sizes"] == [1, 2] and data["args"]["repeats"] == 1
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    by = {}
    for r in data["rows"]:
        by.setdefault(r["rung"], []).append(r)
    assert set(by) == set(RUNGS)
    for name in ("reference", "diffusers", "batched", "concepts"):
        rows = by[name]
        assert [r["status"] for r in rows] == ["ok", "ok"], rows
        assert [r["batch"] for r in rows] == [1, 2]
        for r in rows:
            for k in ("cond_ms_per_prompt", "unet_ms_per_step", "images_per_s", "batch_latency_s", "latency1_s",
                      "unet_tflops", "e2e_tflops"):
                assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] > 0, (name, k, r[k])
            assert r["peak_mem_bytes"] >= 0 and r["utilization"] is None  # no peak on CPU
            assert r["latency1_s"] == rows[0]["batch_latency_s"]
    # the reference encodes every (step, layer) once, plus the negative prompt, per image
    ref2 = by["reference"][1]
    assert ref2["text_encoder_rows"] == 2 * (2 * 16 + 1)
    assert ref2["unet_calls"] == 2 * 2 * 2
    assert by["batched"][1]["unet_calls"] == 2  # one call per step for the whole batch, both CFG halves
    for name in ("triton", "compile", "tensorrt"):
        (r,) = by[name]
        assert r["status"] == "skipped" and isinstance(r["reason"], str) and r["reason"]
    assert by["compile"][0]["reason"] == rungs.COMPILE_CPU_REASON
    if "onnx" in by:
        for r in by["onnx"]:
            assert r["status"] in ("ok", "skipped"), r
            if r["status"] == "ok":
                assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0
            else:
                assert r["reason"]
    s = data["summary"]
    # the headline ratios are the rows' own numbers (timings themselves are not asserted: no timed unit tests)
    assert s["largest_common_batch"] == 2
    assert s["images_per_s_speedup_largest_batch"] == by["batched"][1]["images_per_s"] / by["reference"][1]["images_per_s"]
    assert s["batched_vs_diffusers_largest_batch"] == by["batched"][1]["images_per_s"] / by["diffusers"][1]["images_per_s"]
    # what the conditioning speedup measures: the reference calls CLIP once per (step, layer) row
    # (2 x 16 + 1 per image); the batched path never calls CLIP's forward per row: it runs CLIP's
    # layers itself over all rows at once (conditioning.PromptState), so the counter sees no call
    assert by["reference"][0]["text_encoder_rows"] == 2 * 16 + 1
    assert by["batched"][0]["text_encoder_rows"] == 0
    side = data["side_by_side"]["conditioning"]  # alternated pairs: the summary's conditioning ratio
    assert side["pairs"] >= 1 and len(side["all_reference_ms"]) == len(side["all_batched_ms"]) == side["pairs"]
    assert s["conditioning_speedup"] == side["speedup"] == side["reference_ms"] / side["batched_ms"]
    assert side["reference_ms"] == pytest.approx(statistics.median(side["all_reference_ms"]))
    alt = data["side_by_side"]["concepts"]  # and the concepts-vs-one U-Net ratio, at the largest batch
    assert alt["batch"] == 2 and len(alt["all_concepts_ms"]) == len(alt["all_batched_ms"]) == alt["pairs"] >= 1
    assert s["concepts_vs_one_concept"]["unet_ms_per_step_ratio"] == alt["ratio"] > 0
    assert alt["concepts_unet_ms_per_step"] == pytest.approx(statistics.median(alt["all_concepts_ms"]))
    assert s["largest_common_batch"] == 2
    unet = data["side_by_side"]["unet"]  # one U-Net, three rungs, alternated round by round at batch 1
    assert unet["batch"] == 1 and set(unet["ms_per_step"]) == {"reference", "diffusers", "batched"}
    for v in unet["ms_per_step"].values():
        assert len(v["all"]) == unet["rounds"] >= 1
        assert v["min"] == min(v["all"]) <= v["median"] <= v["max"] == max(v["all"])
        assert v["median"] == pytest.approx(statistics.median(v["all"]))
    many = s["concepts_vs_one_concept"]
    assert many["batch"] == 2 and many["unet_ms_per_step_ratio"] > 0 and many["images_per_s_ratio"] > 0
    assert by["concepts"][1]["unet_calls"] == 2  # two concepts, still one U-Net call per step
    assert len(result["rows"]) == len(data["rows"])


def test_table_text(ladder_run):
    result, _, _ = ladder_run
    text = report.format_table(result)
    assert "reference" in text and "conditioning speedup" in text and "skipped:" in text
    assert "U-Net ms/step at batch 1, " in text and "alternated rounds, median (min-max): reference " in text


def test_diffusers_rung_restores_neti_processors(tiny):
    from neti_fast.sd.attention import NetiCrossAttnProcessor, install_processors
    install_processors(tiny)
    before = dict(tiny.unet.attn_processors)
    ctx = ladder.Context(ladder._resolve(ladder.add_arguments(__import__("argparse").ArgumentParser()).parse_args(
        ["--quick", "--device", "cpu"])), tiny, None, tiny.default_size, tiny.default_size, {}, None)
    rung = rungs.DiffusersRung(ctx)
    rung.setup()
    assert not any(isinstance(p, NetiCrossAttnProcessor) for p in tiny.unet.attn_processors.values())
    rung.teardown()
    after = tiny.unet.attn_processors
    assert all(after[k] is v for k, v in before.items())
    assert sum(isinstance(p, NetiCrossAttnProcessor) for p in after.values()) == 16


def test_summary_without_side_by_side_uses_rung_columns():
    # side_by_side failed (or a rung was missing): the ratios come from the rungs' own columns
    def row(rung, batch, cond, unet, ips):
        return {"rung": rung, "batch": batch, "status": "ok", "cond_ms_per_prompt": cond,
                "unet_ms_per_step": unet, "images_per_s": ips}
    rows = [row("reference", 2, 100.0, 50.0, 1.0), row("batched", 2, 10.0, 20.0, 4.0), row("concepts", 2, 12.0, 22.0, 3.0)]
    for side in (None, {"failed": "RuntimeError: x"}, {"concepts": {"batch": 4, "ratio": 9.0}}):
        s = report.summary(rows, side)
        assert s["conditioning_speedup"] == 10.0
        assert s["concepts_vs_one_concept"]["unet_ms_per_step_ratio"] == 22.0 / 20.0  # batch 4 != 2: not used
    s = report.summary(rows, {"conditioning": {"speedup": 7.0}, "concepts": {"batch": 2, "ratio": 1.01}})
    assert s["conditioning_speedup"] == 7.0 and s["concepts_vs_one_concept"]["unet_ms_per_step_ratio"] == 1.01


def test_training_bench_variants_compute_the_trainers_step(tmp_path):
    """bench/training.py: the official algorithm's transcription (VAE every micro-batch, 16 sequential
    CLIP passes) and every speed variant give the trainer's loss and mapper gradients: the rung
    measures the same work. Two micro-batches, so the data order, flips and captions advance alike.
    In float64: on the random tiny model the mapper's gradient is so ill-conditioned that fp32
    rounding alone (a batch encoded at once or image by image) moves it by a few percent; in float64
    the variants agree to 1e-9 while a wrong layer order or latent would be off by O(1)."""
    from neti_fast.bench import training as tb
    from neti_fast.sd.models import load_model
    from neti_fast.training.trainer import _micro_step
    imgs = tb.write_images(tmp_path / "imgs", 3)
    tiny64 = load_model("tiny", "cpu", torch.float64)

    def micro_steps(variant):
        run, state, _ = tb.setup_run(tiny64, 64, 2, 1, imgs)
        run.trainable.mapper.double()
        out = []
        for micro in range(2):
            with tb._variant(run, variant):
                torch.manual_seed(micro)  # the nested-dropout draws
                loss = (tb.official_micro_step(run, state, batched_text=variant == "batched")
                        if variant in ("official", "batched") else _micro_step(run, state))
            out.append((loss, [p.grad.clone() for p in run.trainable.parameters()]))
            run.optimizer.zero_grad(set_to_none=True)
        return out
    want = micro_steps("neti-fast")
    assert want[0][0] != pytest.approx(want[1][0], rel=1e-3)  # two different batches
    for variant in ("official", "batched", "channels-last", "checkpointing"):
        for (loss, grads), (want_loss, want_grads) in zip(micro_steps(variant), want):
            assert loss == pytest.approx(want_loss, rel=1e-6), variant
            g, w = torch.cat([x.flatten() for x in grads]), torch.cat([x.flatten() for x in want_grads])
            assert float((g - w).norm() / w.norm()) < 1e-7, variant


def test_roofline_sdxl_conditioning_line():
    """The SDXL model line: 50 x 11 + 1 text-encoder rows per encoder, each about 2 FLOPs per
    weight per token (the transformer layers' 12 * width^2 weights), a share of the image in (0, 1)."""
    from neti_fast.bench.roofline import SDXL_TEXT, sdxl_conditioning
    from neti_fast.sd.models import sdxl_configs
    r = sdxl_conditioning(1024, steps=50)
    assert r["text_encoder_rows"] == 551 and r["modules"] == 11
    for k, part in SDXL_TEXT.items():
        c = sdxl_configs()[part]
        per_row = 2 * 77 * c["num_hidden_layers"] * 12 * c["hidden_size"] ** 2
        assert 0.9 < r["tflop"]["text:" + k] * 1e12 / (551 * per_row) < 1.2, k
    assert 0 < r["plain_sdxl_conditioning_flop_share"] < r["conditioning_flop_share"] < 0.5
    assert all(0 < m["conditioning_time_share"] < 1 for m in r["model"].values())
    # per transformer block: 50 x 70 + 1 rows, the same work per row, so its share of FLOPs follows
    b, t = r["per_block"], r["conditioning_flop_share"]
    assert b["text_encoder_rows"] == 3501
    assert b["conditioning_flop_share"] == pytest.approx(t * 3501 / 551 / (1 - t + t * 3501 / 551))
    assert all(m["conditioning_time_share"] < m["per_block_conditioning_time_share"] < 1 for m in r["model"].values())


def test_training_peak_memory_bench_on_tiny_xl(tiny_xl_model):
    """bench/training.py --peak-memory on tiny-xl: one setting measured in a fresh process (its
    resident memory after loading and its peak after ONE step), the counted sizes of what it held
    (bf16 frozen networks, fp32 mapper and AdamW state), a setting over --max-gib skipped with the
    reason, and the GPU figures labelled an estimate, checkpointing below no checkpointing."""
    from neti_fast.bench import training as tb
    res = tb.peak_memory("tiny-xl", 64, [("bfloat16", "bfloat16", True)], gpu_resolution=128, log=lambda *a: None)
    ran, = res["measured"]
    assert ran["kind"].startswith("measured on CPU") and ran["gradient_checkpointing"] and ran["loss"] > 0
    assert ran["maxrss_after_step_bytes"] >= ran["rss_after_load_bytes"] > ran["rss_at_start_bytes"] > 0
    assert ran["step_peak_above_loaded_bytes"] == ran["maxrss_after_step_bytes"] - ran["rss_after_load_bytes"]
    c = ran["counted"]
    unet_numel = sum(p.numel() for p in tiny_xl_model.unet.parameters())
    text_numel = sum(p.numel() for te in tiny_xl_model.text_encoders for p in te.parameters())
    assert (c["unet_param_bytes"], c["text_encoder_param_bytes"]) == (2 * unet_numel, 2 * text_numel)  # bf16
    assert c["mapper_param_dtype"] == "float32" and c["adamw_state_bytes"] == 2 * c["mapper_param_bytes"]
    assert ran["estimate_same_size"]["frozen_param_bytes"] == c["unet_param_bytes"] + c["vae_param_bytes"] + \
        c["text_encoder_param_bytes"]  # the meta-device count is the loaded model's
    skipped, = tb.peak_memory("tiny-xl", 64, [("float32", "float32", False)], gpu_resolution=64,
                              log=lambda *a: None, max_bytes=2**20)["measured"]   # no process started
    assert "over the --max-gib cap" in skipped["skipped"] and skipped["dtype"] == "float32"
    g = res["gpu_estimate"]
    assert "estimate, not measured" in g["kind"] and g["resolution"] == 128
    for m in g["models"]:
        assert "estimate, not measured" in m["kind"] and m["dtype"] == "float16"
        off, on = m["rows"]
        assert on["activation_bytes"] < off["activation_bytes"] and on["total_bytes"] < off["total_bytes"]
        assert off["total_bytes"] == m["frozen_param_bytes"] + 4 * m["mapper_param_bytes"] + off["activation_bytes"]
    fp32_text, fp16_text = g["models"]
    assert fp32_text["frozen_param_bytes"] - fp16_text["frozen_param_bytes"] == 2 * text_numel
    assert "estimate" in tb.format_peak(res)


XL_RUNGS = ["reference", "diffusers", "batched", "concepts", "triton", "compile", "tensorrt"]


def test_ladder_on_tiny_xl(monkeypatch):
    """The ladder on SDXL's topology (tiny-xl: two text encoders, added conditioning, 11 modules):
    every CPU rung runs (diffusers' rung on StableDiffusionXLPipeline), the GPU-only ones say why in
    one line. The onnx rung is left out here (tiny-xl's export costs minutes; `--backend onnx` on
    SDXL: tests/export/test_export.py)."""
    import functools
    monkeypatch.setattr(ladder, "_alternate", functools.partial(ladder._alternate, budget_s=0))  # 1 round: fast
    result = ladder.cli(["--model", "tiny-xl", "--device", "cpu", "--quick", "--steps", "2", "--batch-sizes", "2",
                         "--threads", "1", "--rungs", *XL_RUNGS])
    by = {r["rung"]: r for r in result["rows"]}
    assert set(by) == set(XL_RUNGS)
    for name in ("reference", "diffusers", "batched", "concepts"):
        assert by[name]["status"] == "ok", by[name]
        assert math.isfinite(by[name]["images_per_s"]) and by[name]["unet_tflops"] > 0
    assert "StableDiffusionXLPipeline" in by["diffusers"]["notes"]
    # the reference encodes every (step, module) row once, plus the negative prompt, per image: SDXL's 11
    assert by["reference"]["text_encoder_rows"] == 2 * (2 * 11 + 1)
    assert by["batched"]["unet_calls"] == 2 and by["concepts"]["unet_calls"] == 2
    for name in ("triton", "compile", "tensorrt"):
        assert by[name]["status"] == "skipped" and by[name]["reason"] and "\n" not in by[name]["reason"]


def test_sdxl_shaped_flops_match_the_roofline_model():
    """`--model sdxl-shaped` (2.6 B-parameter U-Net: ~10 GB in fp32, more than this CI machine runs)
    is built here on the meta device: the bench's FLOP count runs with its added conditioning
    (text_embeds 1280, time_ids 6) over 70 K/V blocks, and equals the roofline model's count of
    SDXL's published U-Net config (bench/roofline.py, its own counter) within 10 %."""
    from neti_fast.bench.roofline import sdxl_conditioning
    from neti_fast.sd.models import build_shaped
    with torch.device("meta"):
        m = build_shaped("sdxl-shaped")
    assert len(m.cross_attention) == 70 and m.added_widths == {"text_embeds": 1280, "time_ids": 6}
    c = flops.count(m, 512, 512)
    want = sdxl_conditioning(512, steps=1)["tflop"]["unet"] * 1e12 / 2   # counted there on a batch of 2
    assert 0.9 < c["unet_per_sample"] / want < 1.1, (c["unet_per_sample"], want)
    assert c["text_encoder_pass"] > 0 and c["vae_decode"] > 0
