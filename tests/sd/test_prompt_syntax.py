"""A1111 prompt syntax (sd/prompt_syntax.py) against a transcription of A1111's own algorithm, and the
plain path left byte for byte as it was."""
import logging

import pytest
import torch

from neti_fast.errors import NetiError
from neti_fast.sd.conditioning import encode_plain, encode_rows, encode_tokens, tokenize
from neti_fast.sd.prompt_syntax import chunk_tokens, emphasize, parse_prompt_attention


@pytest.fixture(scope="module")
def clip_like(tiny_model):
    """`tiny` with a final layer norm bias, as real CLIP has: emphasis rescales to the encoding's
    mean, which is ~1e-8 (float noise) under tiny's zero bias and so would be meaningless there."""
    import copy
    m = copy.deepcopy(tiny_model)
    ln = m.text_encoder.final_layer_norm if hasattr(m.text_encoder, "final_layer_norm") \
        else m.text_encoder.text_model.final_layer_norm
    with torch.no_grad():
        ln.bias.copy_(torch.randn(ln.bias.shape, generator=torch.Generator().manual_seed(0)) * 0.3 + 0.2)
    return m


# ---------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text,want", [  # A1111's doctests of parse_prompt_attention (modules/prompt_parser.py)
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("[unbalanced", [("unbalanced", 0.9090909090909091)]),
    ("\\\\", [("\\", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("", [("", 1.0)]),
    ("(word : 1.5 )", [("word ", 1.5)]),
])
def test_parse_prompt_attention(text, want):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want], rel=1e-12)


# ---------------------------------------------------------------------------- chunking: A1111 transcribed
class _PromptChunk:
    def __init__(self):
        self.tokens, self.multipliers = [], []


def tokenize_line_ref(tokenizer, line: str, embedding_len: dict) -> tuple[list, list]:
    """modules/sd_hijack_clip.py FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line, transcribed
    (comma_padding_backtrack 20, emphasis on); `embedding_len` {first token id: vectors} stands for
    the embedding database (our concept slots). Returns (ids, multipliers), chunks concatenated."""
    chunk_length, backtrack = 75, 20
    id_start, id_end = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma_token = tokenizer.get_vocab().get(",</w>", None)
    parsed = parse_prompt_attention(line)
    tokenized = tokenizer([text for text, _ in parsed], truncation=False, add_special_tokens=False)["input_ids"]
    chunks, chunk, last_comma = [], _PromptChunk(), -1

    def next_chunk():
        nonlocal last_comma, chunk
        to_add = chunk_length - len(chunk.tokens)
        if to_add > 0:
            chunk.tokens += [id_end] * to_add
            chunk.multipliers += [1.0] * to_add
        chunk.tokens = [id_start] + chunk.tokens + [id_end]
        chunk.multipliers = [1.0] + chunk.multipliers + [1.0]
        last_comma = -1
        chunks.append(chunk)
        chunk = _PromptChunk()

    for tokens, (text, weight) in zip(tokenized, parsed):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma_token:
                last_comma = len(chunk.tokens)
            elif len(chunk.tokens) == chunk_length and last_comma != -1 and len(chunk.tokens) - last_comma <= backtrack:
                break_location = last_comma + 1
                reloc_tokens = chunk.tokens[break_location:]
                reloc_mults = chunk.multipliers[break_location:]
                chunk.tokens = chunk.tokens[:break_location]
                chunk.multipliers = chunk.multipliers[:break_location]
                next_chunk()
                chunk.tokens = reloc_tokens
                chunk.multipliers = reloc_mults
            if len(chunk.tokens) == chunk_length:
                next_chunk()
            emb_len = embedding_len.get(token)
            if emb_len is None:
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
                position += 1
                continue
            if len(chunk.tokens) + emb_len > chunk_length:
                next_chunk()
            chunk.tokens += tokens[position:position + emb_len]
            chunk.multipliers += [weight] * emb_len
            position += emb_len
    if chunk.tokens or not chunks:
        next_chunk()
    return [t for c in chunks for t in c.tokens], [m for c in chunks for m in c.multipliers]


WORDS = "a photo of cat dog red blue house hill sun sky tree river".split()


def _long(n: int, comma_every: int = 0, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        out.append(WORDS[int(torch.randint(len(WORDS), (1,), generator=g))])
        if comma_every and i % comma_every == comma_every - 1:
            out[-1] += ","
    return " ".join(out)


PROMPTS = [
    "a photo of a dog",
    "a (photo:1.3) of [a dog] ((on)) the \\(beach\\)",
    "masterpiece BREAK a dog BREAK",
    _long(120),                                     # two chunks, no comma: hard break at 75
    _long(160, comma_every=7, seed=1),              # comma backtracking at each chunk end
    "(" + _long(90, comma_every=30, seed=2) + ":1.2), " + _long(40, seed=3),  # a weighted span across the break
    _long(72) + " {c} " + _long(10, seed=4),        # a 4-vector concept that must not straddle the break
    "BREAK",
    "",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_chunks_equal_a1111(tiny_model, prompt):
    tok = tiny_model.tokenizer
    toks = tokenize(tok, prompt, ["c"] if "{c}" in prompt else None, vectors=[4], syntax="a1111")
    text = toks.text
    from neti_fast.sd.conditioning import ensure_placeholder, slot_token
    units = {ensure_placeholder(tok, slot_token(0)): 4} if "{c}" in prompt else {}
    ids, mults = tokenize_line_ref(tok, text, units)
    got = chunk_tokens(tok, text, units)
    assert got.ids == ids and got.weights == pytest.approx(mults, rel=0, abs=0)
    assert toks.chunks == len(ids) // 77
    if "{c}" in prompt:
        s = toks.slot.tolist()
        first = s.index(0)
        assert s[first:first + 4] == [0, 1, 2, 3] and first // 77 == (first + 3) // 77


def test_long_prompts_chunk_count(tiny_model):
    tok = tiny_model.tokenizer
    one = next(w for w in WORDS if len(tok(w, add_special_tokens=False).input_ids) == 1)
    assert tokenize(tok, " ".join([one] * 75), None, syntax="a1111").chunks == 1
    assert tokenize(tok, " ".join([one] * 76), None, syntax="a1111").chunks == 2
    assert tokenize(tok, " ".join([one] * 75), None).chunks == 1
    with pytest.raises(NetiError) as e:
        tokenize(tok, " ".join([one] * 76), None)
    assert e.value.field == "prompt" and "78 tokens long" in e.value.message
    with pytest.raises(NetiError) as e:
        tokenize(tok, _long(1000), None, syntax="a1111")
    assert e.value.field == "prompt" and "chunks" in e.value.message
    with pytest.raises(NetiError) as e:
        tokenize(tok, "a dog", None, syntax="comfy")
    assert e.value.field == "prompt_syntax"


# ---------------------------------------------------------------------------- encoding
def encode_ref(text_encoder, ids: list, mults: list) -> torch.Tensor:
    """process_tokens + sd_emphasis.EmphasisOriginal, per chunk (batch of one prompt), concatenated."""
    zs = []
    for i in range(0, len(ids), 77):
        z = text_encoder(torch.tensor([ids[i:i + 77]])).last_hidden_state
        m = torch.tensor([mults[i:i + 77]])
        original_mean = z.mean()
        z = z * m.reshape(m.shape + (1,)).expand(z.shape)
        new_mean = z.mean()
        zs.append(z * (original_mean / new_mean))
    return torch.hstack(zs)


@pytest.mark.parametrize("prompt", PROMPTS[:6])
def test_encoding_equals_a1111(clip_like, prompt):
    tiny_model = clip_like
    te, tok = tiny_model.text_encoder, tiny_model.tokenizer
    ids, mults = tokenize_line_ref(tok, prompt, {})
    with torch.no_grad():
        ours = encode_plain(te, tok, prompt, syntax="a1111")
        ref = encode_ref(te, ids, mults)
    assert ours.shape == ref.shape == (1, len(ids), tiny_model.text_dim)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_concepts_in_weighted_spans(clip_like):
    """The batched per-row encoding (shared prefix, chunks without a concept encoded once) equals
    CLIP run per row; the weight scales the concept's position like any token's."""
    tiny_model = clip_like
    te, tok = tiny_model.text_encoder, tiny_model.tokenizer
    prompt = "(a photo of {c}:1.4), " + _long(80, comma_every=9) + " [{d}] BREAK in ({c})"
    toks = tokenize(tok, prompt, ["c", "d"], vectors=[2, 1], syntax="a1111")
    assert toks.chunks == 3 and toks.weight is not None
    for j, want in ((0, [1.4, 1.1]), (1, [1.4, 1.1]), (2, [1 / 1.1])):  # {c}'s two vectors, twice; {d}
        assert toks.weight[toks.slot == j].tolist() == pytest.approx(want)
    g = torch.Generator().manual_seed(0)
    token, bypass = torch.randn(3, 3, tiny_model.text_dim, generator=g), torch.randn(3, 3, tiny_model.text_dim, generator=g)
    with torch.no_grad():
        fast = encode_rows(te, toks, token, bypass, chunk=2)
        ref = encode_tokens(te, toks, token, bypass)
    for a, b in zip(fast, ref):
        assert a.shape == (3, 3 * 77, tiny_model.text_dim)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_plain_path_byte_identical(tiny_model):
    """Syntax plain, or A1111 syntax on a prompt without any: exactly CLIP on the tokenizer's ids, as before."""
    te, tok = tiny_model.text_encoder, tiny_model.tokenizer
    prompt = "a photo of a dog on a beach"
    ids = torch.tensor([tok(prompt, padding="max_length", max_length=77).input_ids])
    with torch.no_grad():
        clip = te(ids).last_hidden_state
        for syntax in ("plain", "a1111"):
            toks = tokenize(tok, prompt, None, syntax=syntax)
            assert torch.equal(toks.input_ids, ids[0]) and toks.weight is None
            assert torch.equal(encode_plain(te, tok, prompt, syntax=syntax), clip)
    # "(a)" is plain text to the plain syntax: the parentheses are tokens
    assert tokenize(tok, "(a)", None).weight is None
    assert not torch.equal(tokenize(tok, "(a)", None).input_ids, tokenize(tok, "(a)", None, syntax="a1111").input_ids)


# ---------------------------------------------------------------------------- through the engine
def test_engine_long_prompts(max_diff, clip_like, make_concept, caplog, monkeypatch):
    """Long / weighted prompts: fast = reference; plain text gives the same bytes in either syntax;
    a batch mixing context lengths gives each image as alone; the attention backend for L = 154 is
    decided once per shape and logged (the native kernel where it is built, else SDPA)."""
    from neti_fast.concepts.table import precompute
    from neti_fast.engine.engine import Engine
    from neti_fast.engine.reference import generate_reference
    from neti_fast.engine.request import GenerateConfig, Request
    from neti_fast.sd.attention import DISPATCH
    monkeypatch.setattr(DISPATCH, "choices", {})  # decide (and log) afresh: earlier tests may have decided L=154
    tiny_model = clip_like
    cfg = GenerateConfig(steps=3, batch_size=8, attention="auto")
    t = precompute(make_concept("neti", dim=tiny_model.text_dim, seed=3), progress=False)
    long_ = Request("(a photo of {}:1.2), " + _long(90, comma_every=6), 1, t, prompt_syntax="a1111",
                    negative_prompt="blurry, [ugly]")
    short = Request("a photo of {} on a beach", 2, t, prompt_syntax="a1111")
    plain = Request("a photo of {} on a beach", 2, t)
    eng = Engine(tiny_model, cfg)
    with caplog.at_level(logging.INFO, logger="neti_fast.sd.attention"):
        both = eng.generate([long_, short, long_])
    assert max_diff(both[0], both[2]) == 0
    alone = Engine(tiny_model, cfg).generate([long_])[0]
    assert max_diff(both[0], alone) <= 1  # the U-Net batch size changes float summation order only
    assert (eng.generate([plain])[0] == both[1]).all()
    assert max_diff(both[0], generate_reference(tiny_model, long_, cfg)[0]) <= 1
    lines = [r.getMessage() for r in caplog.records if "L=154" in r.getMessage()]
    from neti_fast.sd.native import native_available
    want = "native" if native_available()[0] else "sdpa"
    assert lines and all(f": {want} (" in x for x in lines) and len(lines) == len(set(lines)), lines
    with pytest.raises(NetiError, match="one context length"):
        eng.kv_tables([long_, short], eng.make_scheduler().timesteps, True)


def test_emphasis_of_a_zero_mean_encoding_is_the_weighted_one():
    """A final layer norm without bias (the built-in random models) makes the encoding's mean exactly
    0: there is nothing to restore, and A1111's ratio (0 / new mean) would zero the encoding."""
    z = torch.randint(-3, 4, (1, 77, 8), generator=torch.Generator().manual_seed(0)).float()
    z[..., -1] = -z[..., :-1].sum(-1)       # every position sums to exactly 0 (integers), as after a bias-free LN
    w = torch.ones(77)
    w[3] = 1.3
    assert z.mean() == 0
    assert torch.equal(emphasize(z, w), z * w[None, :, None])
    zb = z + 0.5                            # a non-zero mean is restored
    assert torch.allclose(emphasize(zb, w).mean(), zb.mean())
