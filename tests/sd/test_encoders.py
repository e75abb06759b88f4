"""The family's text encoders side by side (neti_fast.sd.encoders): one encoder is exactly
conditioning.encode_rows; SDXL's pooled embedding is taken where transformers takes it."""
from types import SimpleNamespace

import torch

from neti_fast.sd.conditioning import encode_rows
from neti_fast.sd.encoders import encode_plain_all, encode_rows_all, pool_positions, pooled_all, tokenize_all


def test_one_encoder_is_encode_rows_exactly(tiny_model):
    m = tiny_model
    toks = tokenize_all(m, "a photo of {} on a beach", ["c"])
    token = torch.randn(5, 1, m.text_dim)
    bypass = torch.randn(5, 1, m.text_dim)
    with torch.no_grad():
        got = encode_rows_all(m, toks, token, bypass)
        want = encode_rows(m.text_encoder, toks[0], token, bypass)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert pooled_all(m, toks, token) is None   # SD 1.x has no pooled conditioning


def test_pool_position_rules():
    ids = torch.tensor([[49406, 320, 1125, 49407, 49407, 49407]])
    slot = torch.tensor([[-1, -1, 0, -1, -1, -1]])      # a concept token at position 2
    legacy = SimpleNamespace(eos_token_id=2, vocab_size=49408)
    fixed = SimpleNamespace(eos_token_id=49407, vocab_size=49408)
    assert pool_positions(legacy, ids, None).tolist() == [3]     # the highest id: the first end token
    assert pool_positions(legacy, ids, slot).tolist() == [2]     # ... unless an added concept token is higher
    assert pool_positions(fixed, ids, slot).tolist() == [3]      # newer configs: the first end token


def test_sdxl_pooled_follows_the_concept_and_matches_transformers(tiny_xl_model):
    m = tiny_xl_model
    te2 = m.text_encoders[1]
    with torch.no_grad():
        plain = pooled_all(m, tokenize_all(m, "a photo of a dog", None), None)
        ids = m.tokenizers[1]("a photo of a dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
        torch.testing.assert_close(plain, te2(ids).text_embeds, rtol=1e-5, atol=1e-6)
        toks = tokenize_all(m, "a photo of {}", ["c"])
        rows = torch.randn(2, 1, m.text_dim)
        with_concept = pooled_all(m, toks, rows)
    assert with_concept.shape == (2, te2.config.projection_dim) and not torch.allclose(with_concept[0], with_concept[1])
    assert encode_plain_all(m, "a dog").shape == (1, 77, sum(m.text_widths))
