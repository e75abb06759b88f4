"""Model families as data: detection from a diffusers folder, the descriptions, and the family a
concept or table file records (and the refusal to use it with another family's model)."""
import json

import pytest
import torch

from neti_fast.concepts.concept import Concept, random_concept
from neti_fast.concepts.table import load_table, precompute
from neti_fast.errors import NetiError
from neti_fast.sd import families
from neti_fast.sd.families import SD1, SD2, SDXL
from neti_fast.sd.models import load_model, tiny_model_dir


def test_descriptions():
    assert (SD1.num_layers, SD2.num_layers, SDXL.num_layers) == (16, 16, 11)
    assert SD1.widths == (768,) and SD2.widths == (1024,) and SDXL.widths == (768, 1280)
    assert SDXL.context_width == 2048 and SDXL.transformer_blocks == 70
    assert SD2.head_dim == (64,) * 16 and SD1.head_dim[:2] == (40, 40) and SD1.head_dim[6] == 160
    assert [e.hidden_state for e in SDXL.encoders] == [-2, -2] and [e.pooled for e in SDXL.encoders] == [False, True]
    assert (SDXL.default_size, SDXL.default_scheduler, SDXL.default_guidance) == (1024, "euler", 5.0)
    assert families.by_widths((1024,)) is SD2 and families.by_widths((768, 1280)) is SDXL and families.by_widths((32,)) is None


def test_detects_the_builtin_folders(_cache_dir):
    assert load_model("tiny").family is SD1
    m = load_model("tiny-sd2")
    assert m.family is SD2 and len(m.cross_attention) == 16 and m.attn_layer == list(range(16))
    assert m.scheduler_config["prediction_type"] == "v_prediction"
    assert {a.heads * 64 for a in m.cross_attention} == {a.to_q.out_features for a in m.cross_attention}  # head dim 64
    assert all(a.upcast_attention for a in m.cross_attention)
    assert m.tokenizer.pad_token == "!"


def _folder(tmp_path, class_name, act="quick_gelu"):
    (tmp_path / "text_encoder").mkdir(parents=True)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    (tmp_path / "text_encoder" / "config.json").write_text(json.dumps({"hidden_act": act}))
    return tmp_path


@pytest.mark.parametrize("found", ["StableDiffusion3Pipeline", "FluxPipeline"])
def test_unsupported_family_is_refused_in_one_line(tmp_path, found):
    with pytest.raises(NetiError) as e:
        load_model(str(_folder(tmp_path, found)))
    msg = str(e.value)
    assert "\n" not in msg and found in msg and "SD 1.x, SD 2.x, SDXL" in msg


def test_detection_rules(tmp_path):
    where = "--model x"
    assert families.detect({"_class_name": "StableDiffusionPipeline"}, {"hidden_act": "quick_gelu"}, where) is SD1
    assert families.detect({"_class_name": "StableDiffusionPipeline"}, {"hidden_act": "gelu"}, where) is SD2
    assert families.detect({"_class_name": "StableDiffusionXLPipeline"}, {"hidden_act": "quick_gelu"}, where) is SDXL
    # a folder missing a part names the family's parts
    with pytest.raises(NetiError, match="not a SD 2.x diffusers folder .*missing tokenizer"):
        load_model(str(_folder(tmp_path, "StableDiffusionPipeline", "gelu")))


def test_sd1_files_are_unchanged_and_others_record_their_family(tmp_path):
    c1 = random_concept("xti", dim=32, seed=1)
    assert "family" not in c1.metadata()            # SD 1.x files: byte for byte as before
    c2 = random_concept("xti", dim=32, seed=1, family=SD2)
    assert c2.metadata()["family"] == "sd2"
    p = c2.save(tmp_path / "c2.safetensors")
    assert Concept.from_tensors(c2.tensors(), c2.metadata(), "x").family is SD2
    t = precompute(random_concept("neti", dim=32, seed=2, family=SD2), progress=False)
    t.save(tmp_path / "t2.safetensors")
    back = load_table(tmp_path / "t2.safetensors")
    assert back.family is SD2 and back.token[None].shape == (1000, 16, 32)
    assert load_table(p).family is SD2
    old = dict(c1.metadata())                        # a file without `family` is SD 1.x
    assert Concept.from_tensors(c1.tensors(), old, "x").family is SD1


def test_unknown_family_and_layer_count_mismatch():
    c = random_concept("xti", dim=32, seed=1)
    with pytest.raises(NetiError, match="unknown model family 'sd9'"):
        Concept.from_tensors(c.tensors(), {**c.metadata(), "family": "sd9"}, "f.safetensors")
    with pytest.raises(NetiError, match=r"shape \[11, 32\]"):   # 16 rows where SDXL has 11 layers
        Concept.from_tensors(c.tensors(), {**c.metadata(), "family": "sdxl"}, "f.safetensors")
    n = random_concept("neti", dim=32, seed=1)
    with pytest.raises(NetiError, match="mapper covers 16 layers; SDXL has 11"):
        Concept.from_tensors(n.tensors(), {**n.metadata(), "family": "sdxl"}, "f.safetensors")


def test_cross_family_use_is_refused_naming_both(tiny_model):
    t = precompute(random_concept("ti", dim=tiny_model.text_dim, seed=3, family=SD2), progress=False)
    with pytest.raises(NetiError) as e:
        t.check(tiny_model, None, "concept 'c'")
    msg = str(e.value)
    assert "\n" not in msg and "SD 2.x (sd2)" in msg and "SD 1.x (sd1)" in msg


def test_a_mix_of_families_is_refused():
    from neti_fast.concepts.mixing import parse_layer_mix
    a = precompute(random_concept("ti", dim=32, seed=1), progress=False)
    b = precompute(random_concept("ti", dim=32, seed=2, family=SD2, placeholder="<d>"), progress=False)
    with pytest.raises(NetiError, match="different model families"):
        parse_layer_mix("IN01-IN08:c,MID-OUT11:d", {"c": a, "d": b})


def test_raw_embeddings_take_the_family_of_their_width(tmp_path):
    from neti_fast.concepts.importers import load_concept
    torch.save({"<x>": torch.randn(1024)}, tmp_path / "learned_embeds.bin")
    assert load_concept(tmp_path / "learned_embeds.bin").family is SD2
    torch.save({"<x>": torch.randn(768)}, tmp_path / "l768.bin")
    assert load_concept(tmp_path / "l768.bin").family is SD1
    assert tiny_model_dir("tiny-sd2").name.startswith("tiny-sd2-v")


def test_layer_mix_uses_the_family_layer_names():
    from neti_fast.concepts.mixing import parse_layer_mix
    a = precompute(random_concept("xti", dim=96, seed=1, family=SDXL), progress=False)
    b = precompute(random_concept("xti", dim=96, seed=2, family=SDXL, placeholder="<d>"), progress=False)
    mix = parse_layer_mix("IN04-IN08:c,MID-OUT05:d", {"c": a, "d": b})
    assert mix.layer_part == [0] * 4 + [1] * 7 and mix.family is SDXL
    token, _ = mix.schedule_rows(torch.tensor([999.0, 500.0]))
    assert token.shape == (2, 11, 96)
    with pytest.raises(NetiError, match="unknown layer 'IN01'; layers are IN04, IN05"):
        parse_layer_mix("IN01-IN08:c,MID-OUT05:d", {"c": a, "d": b})


@pytest.mark.parametrize("name", ["sd15-shaped", "sd2-shaped", "sdxl-shaped"])
def test_descriptions_match_the_published_unets(name):
    """What each family's published U-Net config launches at its default size (run on the meta
    device, attn2 calls recorded) is what the description says (layers, head dims, transformer
    blocks) and what kernels.check compiles and bench.attention times (kernels/shapes.py)."""
    from diffusers import UNet2DConditionModel

    from neti_fast.kernels.shapes import SHAPES
    from neti_fast.sd.models import SHAPED, cross_attention_modules
    b = SHAPED[name]
    fam, cfg = b.family, b.configs()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg["unet"])
    mods, layer_of = cross_attention_modules(unet, fam)
    seen = []  # (layer, query positions, heads, head dim) per attn2 call
    for a, layer in zip(mods, layer_of):
        a.register_forward_hook(lambda m, args, kw, out, layer=layer: seen.append(
            (layer, (args[0] if args else kw["hidden_states"]).shape[1], m.heads, m.inner_dim // m.heads)),
            with_kwargs=True)
    side = fam.default_size // 8
    meta = dict(device="meta")
    kw = {"added_cond_kwargs": {"text_embeds": torch.empty(1, cfg["text_2"]["projection_dim"], **meta),
                                "time_ids": torch.empty(1, 6, **meta)}} if fam.added_conditioning else {}
    unet(torch.empty(1, 4, side, side, **meta), torch.empty(1, **meta),
         encoder_hidden_states=torch.empty(1, 77, fam.context_width, **meta), **kw)
    assert cfg["unet"]["cross_attention_dim"] == fam.context_width
    assert len(seen) == fam.transformer_blocks
    assert tuple(d for layer, *_, d in dict((s[0], s) for s in seen).values()) == fam.head_dim
    assert [s[0] for s in seen] == sorted(s[0] for s in seen) and {s[0] for s in seen} == set(range(fam.num_layers))
    launched = list(dict.fromkeys((n, h, d) for _, n, h, d in seen))  # distinct, in execution order
    assert launched == [(s.N, s.heads, s.head_dim) for s in SHAPES[fam.name]]
