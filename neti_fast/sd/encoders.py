"""A family's text encoders side by side (one for SD 1.x / 2.x; CLIP-L and bigG for SDXL).

A concept row is the encoders' widths concatenated (`Model.text_dim`; SDXL: 768 + 1280): each
encoder encodes the prompt with its share of the row (`conditioning.encode_rows`, at the state its
`families.TextEncoderSpec` names), and the U-Net's context is their outputs concatenated, as
diffusers' StableDiffusionXLPipeline.encode_prompt builds it. One encoder gives exactly
`encode_rows`'s result.

The pooled, projected embedding (SDXL's `text_embeds`) is the pooled encoder's full output
(every layer, final layer norm) at the position transformers pools for the checkpoint's token ids:
with the legacy eos_token_id 2 of SD-style configs the highest id, which a concept token (an added
token, above the whole vocabulary) is when the prompt has one; else the first end token.
"""
from __future__ import annotations

import torch

from .conditioning import PromptTokens, encode, encode_rows, encode_tokens, tokenize


def tokenize_all(model, prompt: str, concepts: list[str] | None, default: str | None = None,
                 vectors: list[int] | None = None, syntax: str = "plain") -> list[PromptTokens]:
    """The prompt tokenized by each of the model's tokenizers (same slots and chunks: they share
    CLIP's BPE); `conditioning.tokenize`'s arguments."""
    return [tokenize(tok, prompt, concepts, default, vectors, syntax) for tok in model.tokenizers]


def _shares(model):
    """(spec, text encoder, slice of a concept row) for each of the model's text encoders."""
    out, start = [], 0
    for spec, te, w in zip(model.family.encoders, model.text_encoders, model.text_widths):
        out.append((spec, te, slice(start, start + w)))
        start += w
    return out


def encode_rows_all(model, toks: list[PromptTokens], token: torch.Tensor | None, bypass: torch.Tensor | None,
                    dedup: bool = True, clip_skip: int = 1):
    """`encode_rows` by every text encoder on its share of the rows ([N, K, D] or None), outputs
    concatenated: ([N, 77 k, D], [N, 77 k, D]); a plain prompt -> ([1, 77 k, D], same); k chunks."""
    outs = []
    for (spec, te, share), tk in zip(_shares(model), toks):
        outs.append(encode_rows(te, tk, None if token is None else token[..., share],
                                None if bypass is None else bypass[..., share], dedup=dedup,
                                clip_skip=spec.clip_skip(clip_skip), final_norm=spec.final_norm))
    return torch.cat([o[0] for o in outs], dim=-1), torch.cat([o[1] for o in outs], dim=-1)


def encode_plain_all(model, prompt: str, clip_skip: int = 1, syntax: str = "plain") -> torch.Tensor:
    """Plain encoding of a prompt with no concept by every encoder, concatenated: [1, 77 k, D]."""
    return encode_rows_all(model, tokenize_all(model, prompt, None, syntax=syntax), None, None,
                           clip_skip=clip_skip)[0]


def encode_tokens_all(model, toks: list[PromptTokens], token: torch.Tensor | None = None,
                      bypass: torch.Tensor | None = None, clip_skip: int = 1):
    """`conditioning.encode_tokens` (the reference path's: every chunk a plain CLIP call) by every
    encoder on its share of the rows [B, K, D], concatenated: ([B, 77 k, D], same)."""
    outs = [encode_tokens(te, tk, None if token is None else token[..., share],
                          None if bypass is None else bypass[..., share], spec.clip_skip(clip_skip), spec.final_norm)
            for (spec, te, share), tk in zip(_shares(model), toks)]
    return torch.cat([o[0] for o in outs], dim=-1), torch.cat([o[1] for o in outs], dim=-1)


def pool_positions(config, ids: torch.Tensor, slot: torch.Tensor | None) -> torch.Tensor:
    """Where transformers' CLIPTextTransformer pools each row of ids [N, 77], concept tokens (slot
    [N, 77] long, or None) counted as added tokens: ids above the vocabulary, in slot order."""
    if slot is not None:
        ids = torch.where(slot.to(ids.device) >= 0, config.vocab_size + slot.to(ids.device), ids)
    if config.eos_token_id == 2:  # transformers keeps the pre-#24773 rule for such configs: the highest id
        return ids.argmax(-1)
    return (ids == config.eos_token_id).int().argmax(-1)


def pooled_rows(model, ids: list, slot: torch.Tensor | None, token: torch.Tensor | None) -> torch.Tensor | None:
    """The pooled, projected embedding of each row ([N, P]): ids per encoder [N, 77], slot [N, 77]
    and token [N, K, D] (or None: plain); None where the family has none (SD 1.x / 2.x)."""
    outs = []
    for (spec, te, share), x in zip(_shares(model), ids):
        if not spec.pooled:
            continue
        enc, _ = encode(te, x, slot, None if token is None else token[..., share])  # last layer, final LN
        pos = pool_positions(te.config, x.to(enc.device), slot)
        outs.append(te.text_projection(enc[torch.arange(len(enc), device=enc.device), pos]))
    return torch.cat(outs, dim=-1) if outs else None


def pooled_all(model, toks: list[PromptTokens], token: torch.Tensor | None) -> torch.Tensor | None:
    """`pooled_rows` for one prompt's tokens and N rows of its concept tokens (None: plain, N = 1).
    A long (A1111-syntax) prompt's pooled embedding is its first chunk's, unemphasized, as A1111's
    FrozenCLIPEmbedderWithCustomWordsBase.forward returns it."""
    toks = [tk.chunk(0) for tk in toks]
    n = 1 if token is None else token.shape[0]
    return pooled_rows(model, [tk.input_ids[None].expand(n, -1) for tk in toks],
                       None if token is None else toks[0].slot[None].expand(n, -1), token)


def encode_all(model, ids: list, slot: torch.Tensor | None = None, token: torch.Tensor | None = None,
               bypass: torch.Tensor | None = None, clip_skip: int = 1):
    """`conditioning.encode` (one plain batched pass: the reference path's and training's) by every
    text encoder on its share of the rows, concatenated: ([B, 77, D], [B, 77, D]). ids: per encoder
    [B, 77]; slot [B, 77] (long, or bool for one concept); token / bypass [B, K, D] / [B, D] or None."""
    outs = []
    for (spec, te, share), x in zip(_shares(model), ids):
        outs.append(encode(te, x, slot, None if token is None else token[..., share],
                           None if bypass is None else bypass[..., share],
                           clip_skip=spec.clip_skip(clip_skip), final_norm=spec.final_norm))
    return torch.cat([o[0] for o in outs], dim=-1), torch.cat([o[1] for o in outs], dim=-1)
