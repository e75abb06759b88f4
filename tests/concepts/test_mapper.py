"""The mapper reproduces the facts of the official NeTI implementation."""
import math

import numpy as np
import torch

from neti_fast.concepts.mapper import HIDDEN, MapperConfig, NeTIMapper


def make(**kw):
    torch.manual_seed(0)
    return NeTIMapper(MapperConfig(output_dim=32, **kw), generator=torch.Generator().manual_seed(0)).eval()


def test_positional_encoding_formula():
    m = make()
    w = m.encoder.w
    assert w.shape == (1024, 2)
    # columns scaled by sigma_t = 0.03 and sigma_l = 2.0 (std of N(0, 1) * sigma)
    assert abs(w[:, 0].std().item() / 0.03 - 1) < 0.1 and abs(w[:, 1].std().item() / 2.0 - 1) < 0.1
    t, l = 517.0, 9.0
    x = torch.tensor([t, l])
    v = torch.cat([torch.sin(w @ x), torch.cos(w @ x)])
    expect = v / v.norm()
    got = m.encoder(torch.tensor([t]), torch.tensor([l]))[0]
    torch.testing.assert_close(got, expect)
    assert got.shape == (2048,) and math.isclose(got.norm().item(), 1.0, rel_tol=1e-5)


def test_input_layer_initialised_with_anchor_encodings():
    m = make()
    W = m.input_layer.weight
    assert W.shape == (160, 2048) and m.net[0] is m.input_layer
    for row, (t, l) in [(0, (0, 0)), (1, (0, 1)), (16, (100, 0)), (159, (900, 15))]:
        torch.testing.assert_close(W[row], m.encoder(torch.tensor([float(t)]), torch.tensor([float(l)]))[0])


def test_architecture():
    m = make()
    kinds = [type(x).__name__ for x in m.net]
    assert kinds == ["Linear", "Linear", "LayerNorm", "LeakyReLU", "Linear", "LayerNorm", "LeakyReLU"]
    assert m.net[1].in_features == 160 and m.net[1].out_features == HIDDEN == 128
    assert m.output_layer[0].out_features == 2 * 32
    assert make(output_bypass=False).output_layer[0].out_features == 32


def test_output_normalisation_over_whole_vector_then_split():
    m = make(target_norm=0.37)
    t, l = torch.tensor([0.0, 250.0, 999.0]), torch.tensor([0.0, 7.0, 15.0])
    token, bypass = m(t, l)
    whole = torch.cat([token, bypass], dim=-1)
    torch.testing.assert_close(whole.norm(dim=-1), torch.full((3,), 0.37))
    assert not torch.allclose(token.norm(dim=-1), torch.full((3,), 0.37))  # halves are not normalised alone
    raw = m.output_layer(m.hidden(t, l))
    torch.testing.assert_close(whole, torch.nn.functional.normalize(raw, dim=-1) * 0.37)
    m_plain = make(target_norm=None)
    tok2, _ = m_plain(t, l)
    torch.testing.assert_close(tok2, m_plain.output_layer(m_plain.hidden(t, l))[:, :32])


def test_truncation_zeroes_features_from_k():
    m = make(target_norm=None)
    t, l = torch.tensor([300.0]), torch.tensor([3.0])
    h = m.hidden(t, l)
    for k in (1, 16, 64):
        hk = h.clone()
        hk[:, k:] = 0
        torch.testing.assert_close(m(t, l, truncation=k)[0], m.output_layer(hk)[:, :32])
    torch.testing.assert_close(m(t, l, truncation=128)[0], m(t, l)[0])


def test_nested_dropout_in_training():
    m = make(target_norm=None).train()
    h = torch.ones(4000, 128)
    np.random.seed(0)
    torch.manual_seed(0)
    applied = 0
    for _ in range(40):
        out = m.nested_dropout(h, None)
        if (out == 0).any():
            applied += 1
            k = (out != 0).sum(dim=1)                      # kept prefix length per sample
            assert all(((out[i, :k[i]] == 1).all() and (out[i, k[i]:] == 0).all()) for i in range(0, 4000, 97))
            assert k.float().std() > 20                      # uniform per-sample index, not one index
    assert 10 <= applied <= 30                               # probability 0.5 per batch
    assert torch.equal(m.eval().nested_dropout(h, None), h)   # no dropout at inference


def test_state_dict_round_trip_and_shared_input_layer():
    m = make(target_norm=0.5)
    tensors = m.tensors()
    assert not any(k.startswith("input_layer.") for k in tensors)
    m2 = NeTIMapper(MapperConfig(output_dim=32, target_norm=0.5)).eval()
    m2.load_tensors(tensors)
    t, l = torch.rand(50) * 999, torch.randint(0, 16, (50,)).float()
    torch.testing.assert_close(m2(t, l)[0], m(t, l)[0], rtol=0, atol=0)
    assert m2.net[0] is m2.input_layer


def test_basic_encoder_variant():
    m = make(use_positional_encoding=False)
    enc = m.encoder(torch.tensor([0.0, 999.0]), torch.tensor([0.0, 15.0]))
    torch.testing.assert_close(enc, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    assert m(torch.tensor([10.0]), torch.tensor([2.0]))[0].shape == (1, 32)
