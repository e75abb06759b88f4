"""Text conditioning: placeholder injection, the textual bypass, and batched per-(t, l) encoding.

NeTI conditions each (timestep t, layer l) on its own text encoding: CLIP is run with the mapper's
token at the placeholder position, and the bypass is added to CLIP's last hidden state (before the
final layer norm) at that position:

    h = CLIP_pre_ln(tokens with e_(t,l) at p)          (keys use LN(h))
    h'[p] = h[p] + 0.2 * b / ||b|| * ||h[p]||           (values use LN(h'))

The official inference does this 50 x 16 times per prompt, one call each. `encode_rows` does the same
in one deduplicated, chunked batch (TI rows are all equal, XTI rows repeat over t), running the
causal prefix before the first placeholder once (`encode_prefixed`).

Several concepts in one prompt (`{cat} ... {painting}`): each marker is a slot k with its own token
and bypass rows; the bypass is added at every slot's position with that slot's vector.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .errors import NetiError

BYPASS_SCALE = 0.2  # official NeTI
MAX_TOKENS = 77


@dataclass
class PromptTokens:
    input_ids: torch.Tensor      # [77] ids fed to CLIP (placeholder ids replaced by a valid one)
    slot: torch.Tensor           # [77] long: k where concept k's token goes, -1 elsewhere
    text: str

    @property
    def mask(self) -> torch.Tensor:
        """[77] bool: positions that take a concept's token."""
        return self.slot >= 0


MARKER = re.compile(r"\{([^{}]*)\}")


def ensure_placeholder(tokenizer, placeholder: str) -> int:
    """Register the placeholder as one added token (idempotent); returns its id."""
    if placeholder not in tokenizer.get_vocab():
        tokenizer.add_tokens([placeholder])
    return tokenizer.convert_tokens_to_ids(placeholder)


def markers(prompt: str) -> list[str]:
    """Names inside the prompt's `{...}` markers, in order (`{}` gives "")."""
    return [m.strip() for m in MARKER.findall(prompt)]


def resolve_markers(prompt: str, names: list[str], default: str | None = None) -> list[str]:
    """Which concept each `{...}` of `prompt` means. Bare `{}` means `default`, else the only concept."""
    found = markers(prompt)
    if names and not found:
        raise NetiError(f"prompt {prompt!r}: no {{}} marks where the concept goes")
    if not names and found:
        raise NetiError(f"prompt {prompt!r}: has {{}} but no --concept was given")
    out = []
    for name in found:
        if name == "":
            if default is None and len(names) != 1:
                raise NetiError(f"prompt {prompt!r}: bare {{}} is ambiguous with {len(names)} concepts; "
                                f"write {{NAME}} with one of: {', '.join(names)}")
            name = default if default is not None else names[0]
        if name not in names:
            raise NetiError(f"prompt {prompt!r}: {{{name}}} is not a concept given here (have: {', '.join(names) or 'none'})")
        out.append(name)
    return out


def slot_token(k: int) -> str:
    """The token a prompt's k-th concept is tokenized as. Its embedding is always replaced, so only
    its being one added token matters: concepts' own placeholders (`*`, `<cat>`, ...) can never clash
    or collide with a real word's BPE pieces."""
    return f"<neti-slot-{k}>"


def tokenize(tokenizer, prompt: str, concepts: list[str] | None, default: str | None = None) -> PromptTokens:
    """Tokenize `prompt` with each `{name}` marker turned into its concept's slot token.

    `concepts`: the names a marker may use (None or [] for a plain prompt), slot k being the k-th
    name; bare `{}` means `default`, or the only concept (resolve_markers).
    """
    concepts = list(concepts or [])
    names = resolve_markers(prompt, concepts, default)
    slot_of = {n: k for k, n in enumerate(concepts)}
    pids = [ensure_placeholder(tokenizer, slot_token(k)) for k in range(len(slot_of))]
    it = iter(names)
    text = MARKER.sub(lambda _m: slot_token(slot_of[next(it)]), prompt)
    ids = tokenizer(text, padding="max_length", max_length=MAX_TOKENS, truncation=False).input_ids
    if len(ids) > MAX_TOKENS:
        raise NetiError(f"prompt {prompt!r}: is {len(ids)} tokens long; CLIP takes at most {MAX_TOKENS} (with start and end)")
    ids = torch.tensor(ids)
    slot = torch.full((MAX_TOKENS,), -1, dtype=torch.long)
    for k, pid in enumerate(pids):
        slot[ids == pid] = k
    ids = torch.where(slot >= 0, torch.tensor(tokenizer.eos_token_id), ids)  # any valid id: its embedding is replaced
    return PromptTokens(ids, slot, text)


def _text_model(text_encoder):
    return getattr(text_encoder, "text_model", text_encoder)  # transformers 4.x nests it; 5.x does not


def _per_position(rows: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """rows [B, K, D], slot [B, 77] -> [B, 77, D]: the row of each position's slot (slot 0 where none)."""
    return rows.gather(1, slot.clamp(min=0)[..., None].expand(-1, -1, rows.shape[-1]))


@contextmanager
def _hooks(text_encoder, slot, token):
    """Swap the token embedding where slot >= 0 for that slot's token; capture the final LN's input."""
    tm = _text_model(text_encoder)
    captured = {}

    def inject(_m, _inp, out):
        return torch.where((slot >= 0)[..., None], _per_position(token, slot).to(out.dtype), out)

    def capture(_m, inp, _out):
        captured["pre_ln"] = inp[0]

    handles = [tm.final_layer_norm.register_forward_hook(capture)]
    if token is not None:
        handles.append(tm.embeddings.token_embedding.register_forward_hook(inject))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def encode(text_encoder, input_ids: torch.Tensor, slot: torch.Tensor | None = None,
           token: torch.Tensor | None = None, bypass: torch.Tensor | None = None):
    """CLIP encodings for a batch of B prompts with K concept slots.

    input_ids [B, 77]; slot [B, 77] long (k or -1) or bool (one concept); token / bypass [B, K, D]
    or [B, D] (one concept), or None. A zero bypass row means "no bypass" for its slot (TI / XTI
    beside a NeTI concept). Returns (enc, enc_bypass), each [B, 77, D]; enc_bypass is enc when
    there is no bypass.
    """
    dev = text_encoder.device
    input_ids = input_ids.to(dev)
    if slot is not None:
        slot = slot.to(dev)
        if slot.dtype == torch.bool:
            slot = torch.where(slot, 0, -1)
    if token is not None:
        token = token.to(dev)
        token = token[:, None] if token.ndim == 2 else token
    with _hooks(text_encoder, slot, token) as captured:
        enc = text_encoder(input_ids).last_hidden_state
    if bypass is None:
        return enc, enc
    return enc, _bypassed(text_encoder, captured["pre_ln"], slot, bypass)


def _bypassed(text_encoder, h: torch.Tensor, slot: torch.Tensor, bypass: torch.Tensor) -> torch.Tensor:
    """LN(h + 0.2 b / ||b|| ||h||) at each slot's positions; h is CLIP's state before its final LN."""
    b = bypass.to(h.device, h.dtype)
    b = b[:, None] if b.ndim == 2 else b
    unit = b / b.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(b.dtype).tiny)  # 0 stays 0
    step = BYPASS_SCALE * _per_position(unit, slot) * h.norm(dim=-1, keepdim=True)
    return _text_model(text_encoder).final_layer_norm(h + (slot >= 0)[..., None] * step)


# ----------------------------------------------------------------------------- prefix reuse
# CLIP's text transformer is causal: positions before the first placeholder see only the prompt,
# never the concept, so they are the same for every (t, l) row. `encode_prefixed` runs them once
# (batch 1), keeps each layer's keys / values, and runs only positions p..76 for the N rows,
# attending to the cached prefix. Same math as `encode`; it saves p/77 of the text encoder's work
# and memory traffic per row (more for prompts whose concept comes late), and skips the hooks.

def _clip_blocks(text_encoder, x: torch.Tensor, start: int, cache: list | None):
    """CLIP's encoder layers over positions start..start+n-1 (x [B, n, D], embeddings included),
    attending to `cache` (each layer's K, V [1, H, start, dh] of the earlier positions) and causally
    to themselves. Returns (state before the final LN [B, n, D], this call's per-layer K, V)."""
    import torch.nn.functional as F
    B, n, D = x.shape
    allowed = torch.ones(n, start + n, dtype=torch.bool, device=x.device).tril(start)  # query i sees keys <= start + i
    kv = []
    for i, layer in enumerate(_text_model(text_encoder).encoder.layers):
        a = layer.self_attn
        h = layer.layer_norm1(x)
        heads = (B, n, a.num_heads, a.head_dim)
        q, k, v = (proj(h).view(heads).transpose(1, 2) for proj in (a.q_proj, a.k_proj, a.v_proj))
        kv.append((k, v))
        if cache:
            k = torch.cat([cache[i][0].expand(B, -1, -1, -1), k], dim=2)
            v = torch.cat([cache[i][1].expand(B, -1, -1, -1), v], dim=2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=a.scale)
        x = x + a.out_proj(o.transpose(1, 2).reshape(B, n, D))
        x = x + layer.mlp(layer.layer_norm2(x))
    return x, kv


def encode_prefixed(text_encoder, tokens: PromptTokens, token: torch.Tensor, bypass: torch.Tensor | None):
    """`encode` for N rows of one prompt (token / bypass [N, K, D]), with the prefix run once."""
    tm = _text_model(text_encoder)
    dev = text_encoder.device
    ids, slot = tokens.input_ids.to(dev)[None], tokens.slot.to(dev)[None]
    N = token.shape[0]
    p = int(tokens.mask.nonzero()[0, 0])
    emb = tm.embeddings
    tok_emb = emb.token_embedding(ids)                                           # [1, 77, D]
    pos_emb = emb.position_embedding(torch.arange(ids.shape[1], device=dev))[None]
    prefix, cache = _clip_blocks(text_encoder, (tok_emb + pos_emb)[:, :p], 0, None)
    rows = torch.where((slot >= 0)[..., None], _per_position(token.to(dev, tok_emb.dtype), slot.expand(N, -1)), tok_emb)
    suffix, _ = _clip_blocks(text_encoder, (rows + pos_emb)[:, p:], p, cache)
    h = torch.cat([prefix.expand(N, -1, -1), suffix], dim=1)
    enc = tm.final_layer_norm(h)
    if bypass is None:
        return enc, enc
    return enc, _bypassed(text_encoder, h, slot.expand(N, -1), bypass.to(dev))


def encode_rows(text_encoder, tokens: PromptTokens, token: torch.Tensor, bypass: torch.Tensor | None,
                chunk: int = 64, dedup: bool = True):
    """One prompt encoded for N rows of concept tokens: token / bypass [N, K, D] (or [N, D]) ->
    ([N, 77, D], [N, 77, D]).

    With `dedup`, equal rows are encoded once (torch.unique); the rest run in batches of `chunk`
    through `encode_prefixed` (the positions before the first placeholder run once).
    """
    N = token.shape[0]
    token = token.reshape(N, -1, token.shape[-1])
    K, D = token.shape[1:]
    rows = token if bypass is None else torch.cat([token, bypass.reshape(N, K, D)], dim=1)
    rows = rows.reshape(N, -1)
    if dedup:
        rows, inverse = torch.unique(rows, dim=0, return_inverse=True)
    enc, enc_b = [], []
    for i in range(0, len(rows), chunk):
        u = rows[i:i + chunk].view(-1, rows.shape[1] // D, D)
        e, eb = encode_prefixed(text_encoder, tokens, u[:, :K], None if bypass is None else u[:, K:])
        enc.append(e)
        enc_b.append(eb)
    enc, enc_b = torch.cat(enc), torch.cat(enc_b)
    if dedup:
        inverse = inverse.to(enc.device)
        enc, enc_b = enc[inverse], enc_b[inverse]
    return enc, enc_b


def encode_plain(text_encoder, tokenizer, prompt: str) -> torch.Tensor:
    """Plain CLIP encoding of a prompt with no concept (negative / unconditional prompts): [1, 77, D]."""
    toks = tokenize(tokenizer, prompt, None)
    return encode(text_encoder, toks.input_ids[None])[0]
