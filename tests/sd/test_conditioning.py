"""Batched conditioning (shared prefix and first-layer keys, several slots, bypass) equals CLIP run row by row."""
import pytest
import torch

from neti_fast.sd.conditioning import encode, encode_shared, encode_rows, tokenize


@pytest.mark.parametrize("prompt,names", [
    ("a photo of {} on a beach", None),                        # placeholder at position 4
    ("{} on a beach", None),                                   # right after BOS: prefix of one
    ("a painting of {cat} in the style of {style}, {cat} again", ["cat", "style"]),
    ("{style} first, then {cat}", ["cat", "style"]),            # slot 1 before slot 0; adjacent to BOS
])
def test_prefixed_equals_full_forward(tiny_model, prompt, names):
    te = tiny_model.text_encoder
    toks = tokenize(tiny_model.tokenizer, prompt, names or ["c"])
    K = 1 if names is None else len(names)
    g = torch.Generator().manual_seed(0)
    token = torch.randn(5, K, tiny_model.text_dim, generator=g)
    bypass = torch.randn(5, K, tiny_model.text_dim, generator=g)
    bypass[1, 0] = 0  # a zero bypass row (TI / XTI beside NeTI) leaves that slot unchanged
    with torch.no_grad():
        ref = encode(te, toks.input_ids.expand(5, -1), toks.slot.expand(5, -1), token, bypass)
        fast = encode_shared(te, toks, token, bypass)
        rows = encode_rows(te, toks, token, bypass, chunk=2)
        one = [encode(te, toks.input_ids[None], toks.slot[None], token[i:i + 1], bypass[i:i + 1]) for i in range(5)]
    for a, b in zip(ref, fast):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(ref, rows):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([o[1] for o in one]), ref[1], rtol=1e-5, atol=1e-5)
    # the prefix is shared, the rest really depends on the row
    p = int(toks.mask.nonzero()[0, 0])
    assert torch.equal(fast[0][0, :p], fast[0][1, :p]) and not torch.allclose(fast[0][0, p:], fast[0][1, p:])
    no_bypass = encode(te, toks.input_ids[None], toks.slot[None], token[1:2], None)[0]
    if K == 1:  # slot 0 of row 1 has a zero bypass: values' encoding equals keys' encoding
        torch.testing.assert_close(ref[1][1:2], no_bypass, rtol=1e-5, atol=1e-5)


def test_plain_prompt_equals_clip(tiny_model):
    """A prompt with no concept (negative prompts) through the shared path equals CLIP's forward."""
    te, tok = tiny_model.text_encoder, tiny_model.tokenizer
    toks = tokenize(tok, "a blurry photo, low quality", None)
    with torch.no_grad():
        enc, enc_b = encode_rows(te, toks, None, None)
        ref = te(toks.input_ids[None]).last_hidden_state
    assert enc.shape == (1, 77, tiny_model.text_dim) and enc_b is enc
    torch.testing.assert_close(enc, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_like_clips_own(tiny_model, dtype):
    """fp16 / bf16 (the GPU dtypes): the shared-work path's error against fp32 is at most twice CLIP's
    own same-dtype error plus a small atol (flash-attention's test rule)."""
    import copy
    te32 = tiny_model.text_encoder
    te = copy.deepcopy(te32).to(dtype)
    toks = tokenize(tiny_model.tokenizer, "a painting of {cat} in the style of {style}", ["cat", "style"])
    g = torch.Generator().manual_seed(1)
    token, bypass = torch.randn(6, 2, tiny_model.text_dim, generator=g), torch.randn(6, 2, tiny_model.text_dim, generator=g)
    ids, slot = toks.input_ids.expand(6, -1), toks.slot.expand(6, -1)
    with torch.no_grad():
        ref = encode(te32, ids, slot, token, bypass)
        ours = encode_rows(te, toks, token.to(dtype), bypass.to(dtype))
        theirs = encode(te, ids, slot, token.to(dtype), bypass.to(dtype))
    for r, a, b in zip(ref, ours, theirs):
        assert a.dtype == dtype
        assert (a.float() - r).abs().max() <= 2 * (b.float() - r).abs().max() + 1e-3


def test_slot_ids_are_cached_per_tokenizer(tiny_model, monkeypatch):
    """The slot token's id is looked up once per tokenizer, not per request (get_vocab copies the
    whole vocabulary)."""
    from neti_fast.sd.conditioning import tokenize
    tok = tiny_model.tokenizer
    first = tokenize(tok, "a photo of {}", ["c"])
    calls = []
    orig = type(tok).get_vocab
    monkeypatch.setattr(type(tok), "get_vocab", lambda self: calls.append(1) or orig(self))
    again = tokenize(tok, "a painting of {}", ["c"])
    assert calls == []
    assert int(first.slot.max()) == 0 and int(again.slot.max()) == 0 and bool(again.mask.any())
    assert torch.equal(first.input_ids[first.mask], again.input_ids[again.mask])


def test_clip_skip_is_a1111s_and_diffusers_arithmetic(tiny_model):
    """CLIP skip n: hidden state -n, then the final layer norm (A1111's CLIP_stop_at_last_layers n,
    diffusers' encode_prompt clip_skip n - 1: hidden_states[-(clip_skip + 1)]); the batched path, the
    row-by-row path and a concept's bypass all use that state; n = 1 is the plain encoding."""
    from neti_fast.sd.conditioning import _text_model, encode_plain
    te, tok = tiny_model.text_encoder, tiny_model.tokenizer
    ids = tokenize(tok, "a photo of a dog", None).input_ids[None]
    out = te(ids, output_hidden_states=True)
    ln = _text_model(te).final_layer_norm
    diffusers_skip_1 = ln(out.hidden_states[-(1 + 1)])                     # diffusers clip_skip=1 == A1111 2
    assert torch.equal(encode_plain(te, tok, "a photo of a dog", clip_skip=1), out.last_hidden_state)
    torch.testing.assert_close(encode_plain(te, tok, "a photo of a dog", clip_skip=2), diffusers_skip_1)
    torch.testing.assert_close(encode(te, ids, clip_skip=2)[0], diffusers_skip_1)
    assert not torch.allclose(diffusers_skip_1, out.last_hidden_state, atol=1e-3)  # the skip changes it
    toks = tokenize(tok, "a photo of {} on a beach", ["c"])
    g = torch.Generator().manual_seed(1)
    token, bypass = torch.randn(3, 1, tiny_model.text_dim, generator=g), torch.randn(3, 1, tiny_model.text_dim, generator=g)
    fast = encode_rows(te, toks, token, bypass, clip_skip=2)
    ref = encode(te, toks.input_ids.expand(3, -1), toks.slot.expand(3, -1), token, bypass, clip_skip=2)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fast[1], encode_rows(te, toks, token, bypass)[1], atol=1e-3)
