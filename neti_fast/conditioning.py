"""Text conditioning: placeholder injection, the textual bypass, and batched per-(t, l) encoding.

NeTI conditions each (timestep t, layer l) on its own text encoding: CLIP is run with the mapper's
token at the placeholder position, and the bypass is added to CLIP's last hidden state (before the
final layer norm) at that position:

    h = CLIP_pre_ln(tokens with e_(t,l) at p)          (keys use LN(h))
    h'[p] = h[p] + 0.2 * b / ||b|| * ||h[p]||           (values use LN(h'))

The official inference does this 50 x 16 times per prompt, one call each. `encode_rows` does the same
in one deduplicated, chunked batch (TI rows are all equal, XTI rows repeat over t).

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


def tokenize(tokenizer, prompt: str, concepts: str | list[str] | None, default: str | None = None) -> PromptTokens:
    """Tokenize `prompt` with each `{name}` marker turned into its concept's slot token.

    `concepts`: None (a plain prompt), one concept's placeholder (every marker means it: slot 0),
    or the names of several concepts, slot k being the k-th name (bare `{}`: see resolve_markers).
    """
    if isinstance(concepts, str):
        found = markers(prompt)
        if not found:
            raise NetiError(f"prompt {prompt!r}: no {{}} marks where the concept goes")
        names, slot_of = [""] * len(found), {"": 0}
    else:
        names = resolve_markers(prompt, list(concepts or []), default)
        slot_of = {n: k for k, n in enumerate(concepts or [])}
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
    h = captured["pre_ln"]
    b = bypass.to(dev, h.dtype)
    b = b[:, None] if b.ndim == 2 else b
    unit = b / b.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(b.dtype).tiny)  # 0 stays 0
    step = BYPASS_SCALE * _per_position(unit, slot) * h.norm(dim=-1, keepdim=True)
    enc_b = _text_model(text_encoder).final_layer_norm(h + (slot >= 0)[..., None] * step)
    return enc, enc_b


def encode_rows(text_encoder, tokens: PromptTokens, token: torch.Tensor, bypass: torch.Tensor | None,
                chunk: int = 64, dedup: bool = True):
    """One prompt encoded for N rows of concept tokens: token / bypass [N, K, D] (or [N, D]) ->
    ([N, 77, D], [N, 77, D]).

    With `dedup`, equal rows are encoded once (torch.unique); the rest run in batches of `chunk`.
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
        n = len(u)
        e, eb = encode(text_encoder, tokens.input_ids.expand(n, -1), tokens.slot.expand(n, -1),
                       u[:, :K], None if bypass is None else u[:, K:])
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
