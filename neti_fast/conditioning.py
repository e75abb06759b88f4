"""Text conditioning: placeholder injection, the textual bypass, and batched per-(t, l) encoding.

NeTI conditions each (timestep t, layer l) on its own text encoding: CLIP is run with the mapper's
token at the placeholder position, and the bypass is added to CLIP's last hidden state (before the
final layer norm) at that position:

    h = CLIP_pre_ln(tokens with e_(t,l) at p)          (keys use LN(h))
    h'[p] = h[p] + 0.2 * b / ||b|| * ||h[p]||           (values use LN(h'))

The official inference does this 50 x 16 times per prompt, one call each. `encode_rows` does the same
in one deduplicated, chunked batch (TI rows are all equal, XTI rows repeat over t).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .errors import NetiError

BYPASS_SCALE = 0.2  # official NeTI
MAX_TOKENS = 77


@dataclass
class PromptTokens:
    input_ids: torch.Tensor      # [77] ids fed to CLIP (placeholder id replaced by a valid one)
    mask: torch.Tensor           # [77] bool, True where the concept's token goes
    text: str


def ensure_placeholder(tokenizer, placeholder: str) -> int:
    """Register the placeholder as one added token (idempotent); returns its id."""
    if placeholder not in tokenizer.get_vocab():
        tokenizer.add_tokens([placeholder])
    return tokenizer.convert_tokens_to_ids(placeholder)


def tokenize(tokenizer, prompt: str, placeholder: str | None) -> PromptTokens:
    """Tokenize `prompt`, with `{}` replaced by the concept's placeholder token."""
    if placeholder is not None and "{}" not in prompt:
        raise NetiError(f"prompt {prompt!r}: no {{}} marks where the concept goes")
    if placeholder is None and "{}" in prompt:
        raise NetiError(f"prompt {prompt!r}: has {{}} but no --concept was given")
    text = prompt.replace("{}", placeholder) if placeholder is not None else prompt
    pid = ensure_placeholder(tokenizer, placeholder) if placeholder is not None else None
    ids = tokenizer(text, padding="max_length", max_length=MAX_TOKENS, truncation=False).input_ids
    if len(ids) > MAX_TOKENS:
        raise NetiError(f"prompt {prompt!r}: is {len(ids)} tokens long; CLIP takes at most {MAX_TOKENS} (with start and end)")
    ids = torch.tensor(ids)
    mask = torch.zeros(MAX_TOKENS, dtype=torch.bool)
    if placeholder is not None:
        mask = ids == pid
        ids = torch.where(mask, torch.tensor(tokenizer.eos_token_id), ids)  # any valid id: its embedding is replaced
    return PromptTokens(ids, mask, text)


def _text_model(text_encoder):
    return getattr(text_encoder, "text_model", text_encoder)  # transformers 4.x nests it; 5.x does not


@contextmanager
def _hooks(text_encoder, mask, token):
    """Swap the token embedding at `mask` for `token`, and capture the input of the final layer norm."""
    tm = _text_model(text_encoder)
    captured = {}

    def inject(_m, _inp, out):
        return torch.where(mask[..., None], token[:, None, :].to(out.dtype), out)

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


def encode(text_encoder, input_ids: torch.Tensor, mask: torch.Tensor | None = None,
           token: torch.Tensor | None = None, bypass: torch.Tensor | None = None):
    """CLIP encodings for a batch: input_ids/mask [B, 77], token/bypass [B, D] (or None).

    Returns (enc, enc_bypass), each [B, 77, D]; enc_bypass is enc when there is no bypass.
    """
    dev = text_encoder.device
    input_ids = input_ids.to(dev)
    if mask is not None:
        mask = mask.to(dev)
    if token is not None:
        token = token.to(dev)
    if bypass is not None:
        bypass = bypass.to(dev)
    with _hooks(text_encoder, mask, token) as captured:
        enc = text_encoder(input_ids).last_hidden_state
    if bypass is None:
        return enc, enc
    h = captured["pre_ln"]
    b = bypass.to(h.dtype)
    step = BYPASS_SCALE * (b / b.norm(dim=-1, keepdim=True))[:, None, :] * h.norm(dim=-1, keepdim=True)
    enc_b = _text_model(text_encoder).final_layer_norm(h + mask[..., None] * step)
    return enc, enc_b


def encode_rows(text_encoder, tokens: PromptTokens, token: torch.Tensor, bypass: torch.Tensor | None,
                chunk: int = 64):
    """One prompt encoded for N (token, bypass) rows: [N, D] each -> ([N, 77, D], [N, 77, D]).

    Equal rows are encoded once (torch.unique), the rest in batches of `chunk`.
    """
    rows = token if bypass is None else torch.cat([token, bypass], dim=-1)
    uniq, inverse = torch.unique(rows, dim=0, return_inverse=True)
    D = token.shape[-1]
    enc, enc_b = [], []
    for i in range(0, len(uniq), chunk):
        u = uniq[i:i + chunk]
        n = len(u)
        e, eb = encode(text_encoder, tokens.input_ids.expand(n, -1), tokens.mask.expand(n, -1),
                       u[:, :D], None if bypass is None else u[:, D:])
        enc.append(e)
        enc_b.append(eb)
    inverse = inverse.to(enc[0].device)
    enc, enc_b = torch.cat(enc)[inverse], torch.cat(enc_b)[inverse]
    return enc, enc_b


def encode_plain(text_encoder, tokenizer, prompt: str) -> torch.Tensor:
    """Plain CLIP encoding of a prompt with no concept (negative / unconditional prompts): [1, 77, D]."""
    toks = tokenize(tokenizer, prompt, None)
    return encode(text_encoder, toks.input_ids[None])[0]
