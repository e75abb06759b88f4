"""load_concept: every supported format, faithfulness to official NeTI, and restricted unpickling.

All fixtures (including pickles) are written into tmp_path at run time; none are committed.
"""
from __future__ import annotations

import builtins
import os
import sys
import types
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from neti_fast.concepts.concept import Concept
from neti_fast.errors import NetiError
from neti_fast.concepts.importers import load_concept
from neti_fast.concepts.mapper import MapperConfig, NeTIMapper

D = 32  # small text width keeps the tests fast; the importer infers it


# ---------------------------------------------------------------------------- a stand-in official repo
class NeTIPositionalEncoding(nn.Module):
    """As in yuval-alaluf/NeTI models/positional_encoding.py (CPU instead of .cuda())."""

    def __init__(self, sigma_t: float, sigma_l: float, num_w: int = 1024):
        super().__init__()
        self.sigma_t = sigma_t
        self.sigma_l = sigma_l
        self.num_w = num_w
        self.w = torch.randn((num_w, 2))
        self.w[:, 0] *= sigma_t
        self.w[:, 1] *= sigma_l
        self.w = nn.Parameter(self.w).to("cpu", copy=True)  # official: .cuda() -> plain non-leaf tensor

    def encode(self, t, l):
        if type(t) == int or t.ndim == 0:
            x = torch.tensor([t, l]).float()
        else:
            x = torch.stack([t, l], dim=1).T
        v = torch.cat([torch.sin(self.w.detach() @ x), torch.cos(self.w.detach() @ x)])
        if type(t) == int:
            v_norm = v / v.norm()
        else:
            v_norm = v / v.norm(dim=0)
            v_norm = v_norm.T
        return v_norm

    def init_layer(self, num_time_anchors: int, num_layers: int) -> torch.Tensor:
        anchor_vectors = []
        for t_anchor in range(0, 1000, 1000 // num_time_anchors):
            for l_anchor in range(0, num_layers):
                anchor_vectors.append(self.encode(t_anchor, l_anchor).float())
        return torch.stack(anchor_vectors)


class BasicEncoder(nn.Module):
    def __init__(self, num_denoising_timesteps: int = 1000, num_unet_layers: int = 16):
        super().__init__()
        self.normalized_timesteps = (torch.arange(num_denoising_timesteps) / (num_denoising_timesteps - 1)) * 2 - 1
        self.normalized_unet_layers = (torch.arange(num_unet_layers) / (num_unet_layers - 1)) * 2 - 1
        self.normalized_timesteps = nn.Parameter(self.normalized_timesteps).to("cpu", copy=True)
        self.normalized_unet_layers = nn.Parameter(self.normalized_unet_layers).to("cpu", copy=True)

    def encode(self, timestep, unet_layer):
        return torch.stack([self.normalized_timesteps[timestep.long()],
                            self.normalized_unet_layers[unet_layer.long()]]).T


class FourierPositionalEncoding(nn.Module):  # an official-repo class the importer does not know
    def __init__(self):
        super().__init__()
        self.w = torch.randn(4, 2)


class OfficialNeTIMapper(nn.Module):
    """As in yuval-alaluf/NeTI models/neti_mapper.py (reference for the outputs)."""

    def __init__(self, output_dim=768, num_unet_layers=16, use_nested_dropout=True, nested_dropout_prob=0.5,
                 norm_scale: Optional[float] = None, use_positional_encoding=True, num_pe_time_anchors=10,
                 sigma_t=0.03, sigma_l=2.0, output_bypass=True):
        super().__init__()
        self.use_nested_dropout = use_nested_dropout
        self.nested_dropout_prob = nested_dropout_prob
        self.norm_scale = norm_scale
        self.output_bypass = output_bypass
        if self.output_bypass:
            output_dim *= 2
        self.use_positional_encoding = use_positional_encoding
        if self.use_positional_encoding:
            self.encoder = NeTIPositionalEncoding(sigma_t=sigma_t, sigma_l=sigma_l)
            self.input_dim = num_pe_time_anchors * num_unet_layers
        else:
            self.encoder = BasicEncoder()
            self.input_dim = 2
        if self.use_positional_encoding:
            self.input_layer = nn.Linear(self.encoder.num_w * 2, self.input_dim)
            self.input_layer.weight.data = self.encoder.init_layer(num_pe_time_anchors, num_unet_layers)
        else:
            self.input_layer = nn.Identity()
        self.net = nn.Sequential(self.input_layer,
                                 nn.Linear(self.input_dim, 128), nn.LayerNorm(128), nn.LeakyReLU(),
                                 nn.Linear(128, 128), nn.LayerNorm(128), nn.LeakyReLU())
        self.output_layer = nn.Sequential(nn.Linear(128, output_dim))

    def forward(self, timestep, unet_layer, truncation_idx=None):
        embedding = self.net(self.encoder.encode(timestep, unet_layer))
        if self.use_nested_dropout:
            if not self.training and truncation_idx is not None:
                for idx in torch.arange(embedding.shape[0]):
                    embedding[idx][truncation_idx:] = 0
        embedding = self.output_layer(embedding)
        if self.norm_scale is not None:
            embedding = F.normalize(embedding, dim=-1) * self.norm_scale
        return embedding


@pytest.fixture
def official_module():
    """Register `models.positional_encoding` for torch.save only; removed before load_concept runs."""
    saved = {k: sys.modules.get(k) for k in ("models", "models.positional_encoding")}
    pkg, mod = types.ModuleType("models"), types.ModuleType("models.positional_encoding")
    pkg.positional_encoding = mod
    for cls in (NeTIPositionalEncoding, BasicEncoder, FourierPositionalEncoding):
        cls.__module__ = "models.positional_encoding"
        setattr(mod, cls.__name__, cls)
    sys.modules.update({"models": pkg, "models.positional_encoding": mod})

    def remove():
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    yield remove
    remove()


def _save_official(tmp_path, remove_module, *, use_pe=True, bypass=True, target_norm=0.38, steps=500,
                   encoder=None, write_embeds=True, sd_update=None):
    torch.manual_seed(0)
    ref = OfficialNeTIMapper(output_dim=D, norm_scale=target_norm, use_positional_encoding=use_pe,
                             output_bypass=bypass)
    with torch.no_grad():  # perturb so that a wrong wiring would show (fresh LayerNorms are trivial)
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = {"log": {"exp_name": "x"},
           "data": {"train_data_dir": "d", "placeholder_token": "<cat>", "super_category_token": "cat"},
           "model": {"pretrained_model_name_or_path": "CompVis/stable-diffusion-v1-4", "use_nested_dropout": True,
                     "nested_dropout_prob": 0.5, "normalize_mapper_output": target_norm is not None,
                     "use_positional_encoding": use_pe, "pe_sigmas": {"sigma_t": 0.03, "sigma_l": 2.0},
                     "num_pe_time_anchors": 10, "output_bypass": bypass, "revision": None,
                     "target_norm": target_norm}}
    mp = tmp_path / f"mapper-steps-{steps}.pt"
    torch.save({"state_dict": dict(ref.state_dict(), **(sd_update or {})), "cfg": cfg,
                "encoder": ref.encoder if encoder is None else encoder}, mp)
    if write_embeds:
        torch.save({"<cat>": torch.randn(D)}, tmp_path / f"learned_embeds-steps-{steps}.bin")
    remove_module()
    assert "models.positional_encoding" not in sys.modules
    return mp, ref.eval()


T_VALUES = torch.tensor([0.0, 999.0, 0.5, 1.0, 123.25, 499.5, 500.0, 998.75, 250.0, 761.0])


def _grid():
    t = T_VALUES.repeat_interleave(16)
    l = torch.arange(16).float().repeat(len(T_VALUES))
    return t, l


@pytest.mark.parametrize("use_pe,bypass,target_norm", [
    (True, True, 0.38), (True, False, 0.38), (True, True, None), (True, False, None),
    (False, True, 0.38), (False, False, None)])
def test_official_neti_matches_reference(tmp_path, official_module, use_pe, bypass, target_norm):
    mp, ref = _save_official(tmp_path, official_module, use_pe=use_pe, bypass=bypass, target_norm=target_norm)
    c = load_concept(mp)
    assert (c.method, c.placeholder, c.text_dim, c.init_word, c.source) == ("neti", "<cat>", D, "cat", "official-neti")
    assert c.base_model == "CompVis/stable-diffusion-v1-4"
    assert c.placeholder_embed is not None and c.placeholder_embed.shape == (D,)
    assert c.mapper.cfg.target_norm == target_norm and c.mapper.cfg.output_bypass == bypass
    t, l = _grid()
    for trunc in (None, 1, 7, 64, 128):
        with torch.no_grad():
            want = ref(t.clone(), l.clone(), trunc)
            token, byp = c.embeddings_at(t, l, trunc)
        if bypass:
            torch.testing.assert_close(token, want[:, :D], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(byp, want[:, D:], rtol=1e-5, atol=1e-6)
        else:
            assert byp is None
            torch.testing.assert_close(token, want, rtol=1e-5, atol=1e-6)
    # the imported concept survives our own safetensors round trip unchanged
    c.save(tmp_path / "c.safetensors")
    c2 = load_concept(tmp_path / "c.safetensors")
    torch.testing.assert_close(c2.embeddings_at(t, l, 5)[0], c.embeddings_at(t, l, 5)[0], rtol=0, atol=0)
    torch.testing.assert_close(c2.placeholder_embed, c.placeholder_embed)


def test_official_neti_encoder_w_copied_and_embeds_lookup(tmp_path, official_module):
    mp, ref = _save_official(tmp_path, official_module, steps=7, write_embeds=False)
    c = load_concept(mp, placeholder="<mine>")
    assert c.placeholder == "<mine>" and c.placeholder_embed is None
    torch.testing.assert_close(c.mapper.encoder.w, ref.encoder.w, rtol=0, atol=0)
    assert c.mapper.cfg.num_w == 1024
    # fallback learned_embeds.bin, then an explicit embeds_path
    torch.save({"<cat>": torch.ones(1, D)}, tmp_path / "learned_embeds.bin")
    assert torch.equal(load_concept(mp).placeholder_embed, torch.ones(D))
    torch.save({"<cat>": torch.full((D,), 2.0)}, tmp_path / "other.bin")
    assert torch.equal(load_concept(mp, embeds_path=str(tmp_path / "other.bin")).placeholder_embed,
                       torch.full((D,), 2.0))
    torch.save({"<cat>": torch.ones(D + 1)}, tmp_path / "bad.bin")
    with pytest.raises(NetiError, match="bad.bin"):
        load_concept(mp, embeds_path=str(tmp_path / "bad.bin"))
    # no safe global leaks out of the importer
    names = [g[1] if isinstance(g, tuple) else getattr(g, "__qualname__", "") for g in
             torch.serialization.get_safe_globals()]
    assert not any("positional_encoding" in n for n in names)


def test_official_learned_embeds_path_redirects_to_mapper(tmp_path, official_module):
    mp, _ = _save_official(tmp_path, official_module, steps=9)
    c = load_concept(tmp_path / "learned_embeds-steps-9.bin")
    assert c.method == "neti" and c.placeholder_embed is not None


def test_official_neti_unknown_encoder_refused(tmp_path, official_module):
    mp, _ = _save_official(tmp_path, official_module, encoder=FourierPositionalEncoding())
    with pytest.raises(NetiError, match=r"refused.*FourierPositionalEncoding") as e:
        load_concept(mp)
    assert str(mp) in str(e.value) and "\n" not in str(e.value)


def test_official_neti_encoder_cfg_mismatch(tmp_path, official_module):
    mp, _ = _save_official(tmp_path, official_module, use_pe=True, encoder=BasicEncoder())
    with pytest.raises(NetiError, match="BasicEncoder"):
        load_concept(mp)


# ---------------------------------------------------------------------------- A1111 / diffusers / own
def _a1111(vec, name="mystyle"):
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": nn.Parameter(vec)}, "name": name,
            "step": 3000, "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "v1-5-pruned-emaonly"}


def test_a1111_pt(tmp_path):
    v = torch.randn(1, D)
    torch.save(_a1111(v), tmp_path / "emb.pt")
    c = load_concept(tmp_path / "emb.pt")
    assert (c.method, c.placeholder, c.text_dim, c.source) == ("ti", "<mystyle>", D, "a1111")
    assert torch.equal(c.embeds, v)
    assert load_concept(tmp_path / "emb.pt", placeholder="<x>").placeholder == "<x>"
    torch.save(_a1111(torch.randn(1, D), name=None), tmp_path / "noname.pt")
    assert load_concept(tmp_path / "noname.pt").placeholder == "<noname>"
    v2 = torch.randn(2, D)
    torch.save(_a1111(v2), tmp_path / "two.pt")
    c = load_concept(tmp_path / "two.pt")
    assert c.vectors == 2 and torch.equal(c.embeds, v2)
    torch.save(_a1111(torch.randn(76, D)), tmp_path / "long.pt")
    with pytest.raises(NetiError, match=r"long\.pt.*76 vectors.*at most 75"):
        load_concept(tmp_path / "long.pt")


def test_a1111_safetensors(tmp_path):
    v = torch.randn(1, D)
    save_file({"emb_params": v}, tmp_path / "style.safetensors")
    c = load_concept(tmp_path / "style.safetensors")
    assert (c.method, c.placeholder, c.source) == ("ti", "<style>", "a1111") and torch.equal(c.embeds, v)
    v4 = torch.randn(4, D)
    save_file({"emb_params": v4}, tmp_path / "four.safetensors")
    c = load_concept(tmp_path / "four.safetensors")
    assert (c.vectors, c.placeholder) == (4, "<four>") and torch.equal(c.embeds, v4)


def test_diffusers_learned_embeds(tmp_path):
    v = torch.randn(D)
    torch.save({"<cat-toy>": v}, tmp_path / "learned_embeds.bin")
    c = load_concept(tmp_path / "learned_embeds.bin")
    assert (c.method, c.placeholder, c.text_dim) == ("ti", "<cat-toy>", D) and torch.equal(c.embeds[0], v)
    torch.save({"<cat-toy>": v[None].half()}, tmp_path / "half.bin")
    assert load_concept(tmp_path / "half.bin").embeds.dtype == torch.float32
    save_file({"<cat-toy>": v[None]}, tmp_path / "learned_embeds.safetensors")
    assert torch.equal(load_concept(tmp_path / "learned_embeds.safetensors").embeds[0], v)
    v3 = torch.randn(3, D)
    torch.save({"<cat-toy>": v3}, tmp_path / "three.bin")
    save_file({"<cat-toy>": v3}, tmp_path / "three.safetensors")
    for f in ("three.bin", "three.safetensors"):
        c = load_concept(tmp_path / f)
        assert c.vectors == 3 and torch.equal(c.embeds, v3)


def test_multi_vector_round_trip_and_old_files(tmp_path):
    """A multi-vector concept / table keeps its vector count; files from before `vectors` existed
    (single-vector TI, no such metadata) still load as one vector."""
    from safetensors import safe_open
    from neti_fast.concepts.table import load_table, precompute
    c = Concept("ti", "<m>", D, embeds=torch.randn(3, D))
    c.save(tmp_path / "m.safetensors")
    assert torch.equal(load_concept(tmp_path / "m.safetensors").embeds, c.embeds)
    t = precompute(c, progress=False)
    assert t.token[None].shape == (1000, 16, 3, D)
    t.save(tmp_path / "m.table.safetensors")
    back = load_table(tmp_path / "m.table.safetensors")
    assert back.vectors == 3 and torch.equal(back.token[None], t.token[None])
    one = Concept("ti", "<o>", D, embeds=torch.randn(1, D))
    tensors, md = precompute(one, progress=False).file_contents()
    assert "vectors" not in md  # single-vector files are written as before multi-vector support
    save_file(tensors, tmp_path / "old.safetensors", metadata=md)
    with safe_open(str(tmp_path / "old.safetensors"), "pt") as f:
        assert "vectors" not in f.metadata()
    old = load_table(tmp_path / "old.safetensors")
    assert old.vectors == 1 and torch.equal(old.token[None], tensors["token"])


@pytest.mark.parametrize("method", ["neti", "xti", "ti"])
def test_neti_fast_round_trip(tmp_path, method):
    torch.manual_seed(1)
    if method == "neti":
        c = Concept("neti", "<d>", D, mapper=NeTIMapper(MapperConfig(output_dim=D, target_norm=0.4)).eval(),
                    init_word="dog", placeholder_embed=torch.randn(D))
    else:
        c = Concept(method, "<d>", D, embeds=torch.randn(16 if method == "xti" else 1, D), init_word="dog")
    c.save(tmp_path / "c.safetensors")
    c2 = load_concept(tmp_path / "c.safetensors")
    assert (c2.method, c2.placeholder, c2.text_dim, c2.init_word) == (method, "<d>", D, "dog")
    t, l = _grid()
    torch.testing.assert_close(c2.embeddings_at(t, l)[0], c.embeddings_at(t, l)[0], rtol=0, atol=0)
    assert load_concept(tmp_path / "c.safetensors", placeholder="<e>").placeholder == "<e>"


def test_neti_fast_table_file(tmp_path):
    c = Concept("xti", "<d>", D, embeds=torch.randn(16, D))
    md = dict(c.metadata(), **{"neti_fast.format": "table"})
    save_file(dict(c.tensors(), **{"table.token": torch.randn(1000, 16, D)}), tmp_path / "t.safetensors", metadata=md)
    c2 = load_concept(tmp_path / "t.safetensors")
    assert c2.method == "xti" and torch.equal(c2.embeds, c.embeds)


# ---------------------------------------------------------------------------- security
class _SystemPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


class _EvalPayload(_ExecPayload):
    def __reduce__(self):
        return (builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload,name", [(_SystemPayload, "system"), (_ExecPayload, "exec"), (_EvalPayload, "eval")])
@pytest.mark.parametrize("wrap", ["a1111", "official"])
def test_malicious_pickle_refused(tmp_path, payload, name, wrap):
    marker = tmp_path / "MARKER"
    evil = payload(marker)
    obj = (dict(_a1111(torch.randn(1, D)), name=evil) if wrap == "a1111"
           else {"state_dict": {}, "cfg": {"model": {}}, "encoder": evil})
    p = tmp_path / "evil.pt"
    torch.save(obj, p)
    assert not marker.exists()
    with pytest.raises(NetiError, match=rf"evil\.pt: refused to load: .*{name}.*nothing was executed"):
        load_concept(p)
    assert not marker.exists()


# ---------------------------------------------------------------------------- errors
def test_errors_name_the_file(tmp_path):
    def bad(p, match=None, **kw):
        with pytest.raises(NetiError) as e:
            load_concept(p, **kw)
        msg = str(e.value)
        assert str(p) in msg and "\n" not in msg, msg
        if match:
            assert match in msg, msg

    bad(tmp_path / "missing.pt", "no such file")
    (tmp_path / "empty.pt").write_bytes(b"")
    bad(tmp_path / "empty.pt", "empty")
    (tmp_path / "random.bin").write_bytes(os.urandom(4096))
    bad(tmp_path / "random.bin")
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02" + os.urandom(100))
    bad(tmp_path / "junk.pt")
    torch.save({"<x>": torch.randn(D)}, tmp_path / "trunc.bin")
    data = (tmp_path / "trunc.bin").read_bytes()
    (tmp_path / "trunc.bin").write_bytes(data[: len(data) // 2])
    bad(tmp_path / "trunc.bin")
    save_file({"foo": torch.randn(2, 3), "bar": torch.randn(3)}, tmp_path / "unknown.safetensors")
    bad(tmp_path / "unknown.safetensors", "no known concept tensors")
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(1, 1280)}, tmp_path / "sdxl.safetensors")
    bad(tmp_path / "sdxl.safetensors", "different numbers of vectors")
    save_file({"emb": torch.randn(2, 3, 4)}, tmp_path / "3d.safetensors")
    bad(tmp_path / "3d.safetensors")
    torch.save({"a": torch.randn(D), "b": torch.randn(D)}, tmp_path / "twokeys.bin")
    bad(tmp_path / "twokeys.bin", "unrecognized")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    bad(tmp_path / "list.pt", "unrecognized")
    torch.save({"<x>": torch.ones(D, dtype=torch.long)}, tmp_path / "int.bin")
    bad(tmp_path / "int.bin", "float tensor")
    nan = torch.randn(1, D)
    nan[0, 3] = float("nan")
    save_file({"emb_params": nan}, tmp_path / "nan.safetensors")
    bad(tmp_path / "nan.safetensors", "NaN")
    inf = torch.randn(D)
    inf[0] = float("inf")
    torch.save({"<x>": inf}, tmp_path / "inf.bin")
    bad(tmp_path / "inf.bin", "NaN or Inf")
    c = Concept("ti", "<d>", D, embeds=torch.randn(1, D))
    save_file(c.tensors(), tmp_path / "fmt.safetensors", metadata=dict(c.metadata(), **{"neti_fast.format": "weird"}))
    bad(tmp_path / "fmt.safetensors", "weird")
    save_file({"embeds": torch.randn(2, D)}, tmp_path / "shape.safetensors", metadata=c.metadata())
    bad(tmp_path / "shape.safetensors", "shape")


def test_official_neti_malformed(tmp_path, official_module):
    sd = {"net.1.weight": torch.randn(128, 161)}
    mp, ref = _save_official(tmp_path, official_module, sd_update=sd)
    with pytest.raises(NetiError, match=r"mapper-steps-500\.pt: official NeTI weights do not match"):
        load_concept(mp)
    torch.save({"state_dict": ref.state_dict(), "cfg": "not a dict", "encoder": None}, tmp_path / "m2.pt")
    with pytest.raises(NetiError, match=r"m2\.pt.*cfg"):
        load_concept(tmp_path / "m2.pt")
    torch.save({"state_dict": ref.state_dict(), "cfg": {"model": {}}, "encoder": None}, tmp_path / "m3.pt")
    with pytest.raises(NetiError, match=r"m3\.pt.*encoder is NoneType"):
        load_concept(tmp_path / "m3.pt")


def test_sd2_embeddings_import_in_every_format(tmp_path):
    """1024-d (SD 2.x, OpenCLIP-H) embeddings load from every format 768-d ones do, as SD 2.x concepts."""
    from neti_fast.sd.families import SD2
    v = torch.randn(1, 1024)
    torch.save(_a1111(v.clone()), tmp_path / "a.pt")
    save_file({"emb_params": v}, tmp_path / "a.safetensors")
    torch.save({"<x>": v[0]}, tmp_path / "learned_embeds.bin")
    save_file({"<x>": v}, tmp_path / "learned_embeds.safetensors")
    for name in ("a.pt", "a.safetensors", "learned_embeds.bin", "learned_embeds.safetensors"):
        c = load_concept(tmp_path / name)
        assert (c.method, c.text_dim, c.family) == ("ti", 1024, SD2) and torch.equal(c.embeds, v), name
        c.save(tmp_path / f"{name}.concept.safetensors")            # and back as a neti-fast concept
        assert load_concept(tmp_path / f"{name}.concept.safetensors").family is SD2


def test_sdxl_embeddings(tmp_path):
    """A1111 / civitai SDXL files (clip_l + clip_g in one .safetensors) and diffusers' two files
    (learned_embeds + learned_embeds_2) read as one SDXL TI concept: CLIP-L's vector, then bigG's."""
    from neti_fast.sd.families import SDXL
    lv, gv = torch.randn(1, 768), torch.randn(1, 1280)
    save_file({"clip_l": lv, "clip_g": gv}, tmp_path / "xlstyle.safetensors")
    c = load_concept(tmp_path / "xlstyle.safetensors")
    assert (c.method, c.family, c.text_dim, c.placeholder, c.source) == ("ti", SDXL, 2048, "<xlstyle>", "a1111")
    assert torch.equal(c.embeds, torch.cat([lv, gv], dim=-1))
    c.save(tmp_path / "c.safetensors")
    assert load_concept(tmp_path / "c.safetensors").family is SDXL
    for suffix, write in ((".safetensors", lambda d, p: save_file(d, p)), (".bin", lambda d, p: torch.save(d, p))):
        write({"<tok>": lv}, tmp_path / f"learned_embeds{suffix}")
        write({"<tok>": gv[0]}, tmp_path / f"learned_embeds_2{suffix}")
        c = load_concept(tmp_path / f"learned_embeds{suffix}")
        assert (c.family, c.placeholder) == (SDXL, "<tok>") and torch.equal(c.embeds, torch.cat([lv, gv], dim=-1))
    write({"<other>": gv}, tmp_path / "learned_embeds_2.bin")
    with pytest.raises(NetiError, match="learned_embeds_2.bin: holds '<other>'"):
        load_concept(tmp_path / "learned_embeds.bin")


def test_raw_vector_of_the_models_width_takes_its_family(tmp_path, tiny_sd2_model, tiny_xl_model, tiny_model):
    """A raw TI vector records no family; its width guesses one (768: SD 1.x, 1024: SD 2.x), and a toy
    width was always taken for SD 1.x, which refused it on tiny-sd2 / tiny-xl. Used with a model of
    exactly its width, the model's family decides (and precomputed rows follow its layers); a file
    that records its family, or a vector of another width, is refused as before."""
    from neti_fast.concepts.concept import Concept
    from neti_fast.concepts.table import Table, load_table, precompute
    from neti_fast.engine.engine import Engine
    from neti_fast.engine.request import GenerateConfig, Request
    from neti_fast.sd.families import SD1
    for model in (tiny_sd2_model, tiny_xl_model):
        v = torch.randn(model.text_dim, generator=torch.Generator().manual_seed(model.text_dim))
        torch.save({"<x>": v}, tmp_path / f"raw{model.text_dim}.bin")
        t = load_table(tmp_path / f"raw{model.text_dim}.bin")
        assert t.family is SD1 and t.concept.family_from_width
        t.check(model, None, "raw")
        assert t.family is model.family
        t.concept.save(tmp_path / f"c{model.text_dim}.safetensors")      # saved, it records the family it took
        assert load_concept(tmp_path / f"c{model.text_dim}.safetensors").family is model.family
        with pytest.raises(NetiError, match="width"):                   # another width: refused as before
            load_table(tmp_path / f"raw{model.text_dim}.bin").check(tiny_model, None, "raw")
    # rows precomputed under the guess (16 layers) are evaluated again for SDXL's 11: the image is the
    # one of the same vector made as an SDXL concept
    raw = precompute(load_concept(tmp_path / f"raw{tiny_xl_model.text_dim}.bin"), progress=False)
    assert raw.token[None].shape[1] == 16
    made = Table(Concept("ti", "<x>", tiny_xl_model.text_dim, embeds=raw.concept.embeds.clone(),
                         family=tiny_xl_model.family))
    cfg = GenerateConfig(steps=2, scheduler="euler")
    a = Engine(tiny_xl_model, cfg).generate([Request("a photo of {}", 0, raw)])[0]
    b = Engine(tiny_xl_model, cfg).generate([Request("a photo of {}", 0, made)])[0]
    assert (a == b).all()
    # a neti-fast file without `family` is SD 1.x by the format's rule: still refused on tiny-sd2
    sd1 = Concept("ti", "<y>", tiny_sd2_model.text_dim, embeds=torch.randn(1, tiny_sd2_model.text_dim))
    sd1.save(tmp_path / "sd1.safetensors")
    with pytest.raises(NetiError, match=r"SD 1.x \(sd1\), but the model is SD 2.x"):
        load_table(tmp_path / "sd1.safetensors").check(tiny_sd2_model, None, "sd1")
