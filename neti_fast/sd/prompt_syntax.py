"""A1111 prompt syntax: emphasis, escapes, BREAK and prompts longer than one CLIP chunk.

Follows stable-diffusion-webui:
- `modules/prompt_parser.py::parse_prompt_attention`: `(a)` x1.1, `[a]` / 1.1, `(a:1.3)`, escapes
  `\\(` `\\)` `\\[` `\\]` `\\\\`, unbalanced brackets closed at the end, `BREAK` as its own fragment,
  runs of equal weight merged;
- `modules/sd_hijack_clip.py::FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line`: each fragment
  tokenized alone (no start / end), chunks of 75 tokens, a chunk break moved back to just after
  the last comma when it is at most 20 tokens back (`comma_padding_backtrack`, A1111's default),
  BREAK ends the chunk (padded), an embedding's vectors never straddle two chunks; each chunk
  padded with the end token and framed by start / end (77);
- `process_tokens` + `modules/sd_emphasis.py::EmphasisOriginal` ("Original", A1111's default):
  see `emphasize`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

SYNTAXES = ("plain", "a1111")
CHUNK = 75                  # prompt tokens per chunk (77 with start and end)
COMMA_BACKTRACK = 20        # A1111's comma_padding_backtrack default
MAX_CHUNKS = 8              # 600 prompt tokens: a bound on one request's conditioning memory

_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """[(fragment, weight)]; a BREAK is ("BREAK", -1). As A1111's function of that name."""
    res: list[list] = []
    round_open, square_open = [], []

    def multiply(start: int, by: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= by

    for m in _ATTENTION.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])
        elif tok == "(":
            round_open.append(len(res))
        elif tok == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif tok == ")" and round_open:
            multiply(round_open.pop(), 1.1)
        elif tok == "]" and square_open:
            multiply(square_open.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_BREAK.split(tok)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for pos in round_open:
        multiply(pos, 1.1)
    for pos in square_open:
        multiply(pos, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):  # merge runs of equal weight
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return [(t, float(w)) for t, w in res]


@dataclass
class Chunks:
    ids: list[int]          # 77 x chunks
    weights: list[float]    # one per id


def chunk_tokens(tokenizer, text: str, unit: dict[int, int]) -> Chunks:
    """A1111's tokenize_line for `text` (concept slots already written as their added tokens).
    `unit`: {id of a concept's first slot token: its vector count}, kept within one chunk."""
    parsed = parse_prompt_attention(text)
    # verbose=False: a fragment longer than 77 is expected here (it is chunked), not worth transformers' warning
    tokenized = tokenizer([t for t, _ in parsed], truncation=False, add_special_tokens=False, verbose=False).input_ids
    comma = tokenizer.convert_tokens_to_ids(",</w>")  # A1111's vocab.get(",</w>"); get_vocab() copies 49k entries
    comma = None if comma == tokenizer.unk_token_id else comma
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    out = Chunks([], [])
    toks: list[int] = []
    mults: list[float] = []
    last_comma = -1

    def next_chunk():
        nonlocal toks, mults, last_comma
        fill = CHUNK - len(toks)
        # A1111 pads with the end token, then (SD 2's tokenizer, where pad != end) everything after
        # the first end token becomes pad: the same ids as the tokenizer's own max_length padding
        ids = [start] + toks + [end] + [pad if pad != end else end] * fill
        out.ids += ids
        out.weights += [1.0] + mults + [1.0] * (fill + 1)
        toks, mults, last_comma = [], [], -1

    for tokens, (frag, weight) in zip(tokenized, parsed):
        if frag == "BREAK" and weight == -1:
            next_chunk()
            continue
        pos = 0
        while pos < len(tokens):
            tok = tokens[pos]
            if tok == comma:
                last_comma = len(toks)
            elif len(toks) == CHUNK and last_comma != -1 and len(toks) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                moved, moved_w = toks[cut:], mults[cut:]
                toks, mults = toks[:cut], mults[:cut]
                next_chunk()
                toks, mults = moved, moved_w
            if len(toks) == CHUNK:
                next_chunk()
            n = unit.get(tok, 1)
            if len(toks) + n > CHUNK:
                next_chunk()
            toks += tokens[pos:pos + n]
            mults += [weight] * n
            pos += n
    if toks or not out.ids:
        next_chunk()
    return out


def emphasize(z, weight):
    """A1111's "Original" emphasis of one chunk's encodings z [N, 77, D] with weights [77]: each
    position scaled by its weight, then the whole so its mean is the unweighted one's (per row:
    A1111 encodes one prompt per call)."""
    mean = z.mean(dim=(1, 2), keepdim=True)
    z = z * weight.to(z.device, z.dtype)[None, :, None]
    new = z.mean(dim=(1, 2), keepdim=True)
    # A mean of exactly 0 (a final layer norm without bias, as on the random built-in models) has
    # nothing to restore: A1111's ratio would zero the encoding (0 / new) or make it NaN (0 / 0).
    return z * (mean / new).where((mean != 0) & (new != 0), mean.new_ones(()))  # no torch import: the CLI's --help reads SYNTAXES
