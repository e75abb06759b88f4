"""Text conditioning: placeholder injection, the textual bypass, and batched per-(t, l) encoding.

NeTI conditions each (timestep t, layer l) on its own text encoding: CLIP is run with the mapper's
token at the placeholder position, and the bypass is added to CLIP's last hidden state (before the
final layer norm) at that position:

    h = CLIP_pre_ln(tokens with e_(t,l) at p)          (keys use LN(h))
    h'[p] = h[p] + 0.2 * b / ||b|| * ||h[p]||           (values use LN(h'))

The official inference does this 50 x 16 times per prompt, one call each. `encode_rows` does the same
in one deduplicated, chunked batch (TI rows are all equal, XTI rows repeat over t), computing once
what no row changes (`PromptState`: the causal prefix, and the first layer's shared keys).

CLIP skip n (A1111's "Clip skip", diffusers' `clip_skip` n - 1): the state n - 1 layers before the
last one stands for CLIP's last hidden state above, final layer norm and bypass included; the
skipped layers are never run. n = 1 is the plain encoding, computed exactly as without it.
`final_norm=False` (SDXL's text encoders, whose penultimate hidden state conditions the U-Net as
it is): the state is used without the final layer norm, the bypass added to it likewise.

Several concepts in one prompt (`{cat} ... {painting}`): each marker is a slot k with its own token
and bypass rows; the bypass is added at every slot's position with that slot's vector. A
multi-vector TI embedding (n vectors) takes n consecutive slots, one position each, as in A1111 and
diffusers.

Prompt syntax (`syntax`): "plain" is one CLIP chunk of 77 tokens, text as written; "a1111" is
A1111's emphasis, BREAK and long prompts (prompt_syntax.py): k chunks, each encoded on its own as
a 77-token prompt, emphasized, and concatenated -> [.., 77 k, D].
"""
from __future__ import annotations

import re
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import NetiError
from .prompt_syntax import CHUNK, MAX_CHUNKS, SYNTAXES, chunk_tokens, emphasize

BYPASS_SCALE = 0.2  # official NeTI
MAX_TOKENS = 77


@dataclass
class PromptTokens:
    input_ids: torch.Tensor      # [77 k] ids fed to CLIP (placeholder ids replaced by a valid one); k chunks
    slot: torch.Tensor           # [77 k] long: j where slot j's token goes (a concept's vector), -1 elsewhere
    text: str
    weight: torch.Tensor | None = None  # [77 k] A1111 emphasis per position; None: every weight is 1

    @property
    def mask(self) -> torch.Tensor:
        """[77 k] bool: positions that take a concept's token."""
        return self.slot >= 0

    @property
    def chunks(self) -> int:
        return len(self.input_ids) // MAX_TOKENS

    def chunk(self, i: int) -> "PromptTokens":
        """The i-th 77-token chunk, encoded by CLIP on its own."""
        cut = slice(i * MAX_TOKENS, (i + 1) * MAX_TOKENS)
        w = None if self.weight is None else self.weight[cut]
        return PromptTokens(self.input_ids[cut], self.slot[cut], self.text,
                            None if w is None or bool((w == 1).all()) else w)


MARKER = re.compile(r"\{([^{}]*)\}")


_TOKEN_IDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> {added token: id}


def ensure_placeholder(tokenizer, placeholder: str) -> int:
    """Register the placeholder as one added token (idempotent); returns its id.

    Cached per tokenizer: `get_vocab()` copies the whole vocabulary (49k entries for CLIP), too much
    to do per request. Added tokens are never removed, so a cached id stays right."""
    try:
        ids = _TOKEN_IDS.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no cache
        ids = {}
    if placeholder not in ids:
        if placeholder not in tokenizer.get_vocab():
            tokenizer.add_tokens([placeholder])
        ids[placeholder] = tokenizer.convert_tokens_to_ids(placeholder)
    return ids[placeholder]


def markers(prompt: str) -> list[str]:
    """Names inside the prompt's `{...}` markers, in order (`{}` gives "")."""
    return [m.strip() for m in MARKER.findall(prompt)]


def resolve_markers(prompt: str, names: list[str], default: str | None = None) -> list[str]:
    """Which concept each `{...}` of `prompt` means. Bare `{}` means `default`, else the only concept."""
    found = markers(prompt)
    if names and not found:
        raise NetiError("no {} marks where the concept goes", field="prompt", value=prompt)
    if not names and found:
        raise NetiError("has {} but no concept was given", field="prompt", value=prompt)
    out = []
    for name in found:
        if name == "":
            if default is None and len(names) != 1:
                raise NetiError(f"bare {{}} is ambiguous with {len(names)} concepts; "
                                f"write {{NAME}} with one of: {', '.join(names)}", field="prompt", value=prompt)
            name = default if default is not None else names[0]
        if name not in names:
            raise NetiError(f"{{{name}}} is not a concept given here (have: {', '.join(names) or 'none'})",
                            field="prompt", value=prompt)
        out.append(name)
    return out


def slot_token(k: int) -> str:
    """The token a prompt's k-th concept is tokenized as. Its embedding is always replaced, so only
    its being one added token matters: concepts' own placeholders (`*`, `<cat>`, ...) can never clash
    or collide with a real word's BPE pieces."""
    return f"<neti-slot-{k}>"


def tokenize(tokenizer, prompt: str, concepts: list[str] | None, default: str | None = None,
             vectors: list[int] | None = None, syntax: str = "plain") -> PromptTokens:
    """Tokenize `prompt` with each `{name}` marker turned into its concept's slot tokens.

    `concepts`: the names a marker may use (None or [] for a plain prompt); `vectors`: each one's
    vector count (default 1), concept k taking slots sum(vectors[:k]) ... + vectors[k] - 1; bare
    `{}` means `default`, or the only concept (resolve_markers). `syntax`: "plain" (one chunk, at
    most 77 tokens) or "a1111" (prompt_syntax.py).
    """
    if syntax not in SYNTAXES:
        raise NetiError(f"must be one of {', '.join(SYNTAXES)}", field="prompt_syntax", value=syntax)
    concepts = list(concepts or [])
    vectors = list(vectors or [1] * len(concepts))
    names = resolve_markers(prompt, concepts, default)
    first = {n: sum(vectors[:k]) for k, n in enumerate(concepts)}
    count = dict(zip(concepts, vectors))
    pids = [ensure_placeholder(tokenizer, slot_token(j)) for j in range(sum(vectors))]
    it = iter(names)

    def slots(_m):
        n = next(it)
        return " ".join(slot_token(first[n] + j) for j in range(count[n]))
    text = MARKER.sub(slots, prompt)
    weight = None
    if syntax == "plain":
        ids = tokenizer(text, padding="max_length", max_length=MAX_TOKENS, truncation=False).input_ids
        if len(ids) > MAX_TOKENS:
            raise NetiError(f"is {len(ids)} tokens long; CLIP takes at most {MAX_TOKENS} (with start and end; "
                            "A1111 prompt syntax takes longer prompts)", field="prompt", value=prompt)
    else:
        got = chunk_tokens(tokenizer, text, {pids[first[n]]: count[n] for n in concepts})
        ids = got.ids
        if len(ids) > MAX_CHUNKS * MAX_TOKENS:
            raise NetiError(f"takes {len(ids) // MAX_TOKENS} chunks of {CHUNK} tokens; at most {MAX_CHUNKS} are "
                            "allowed", field="prompt", value=prompt)
        if any(w != 1.0 for w in got.weights):
            weight = torch.tensor(got.weights)
    ids = torch.tensor(ids)
    slot = torch.full((len(ids),), -1, dtype=torch.long)
    for k, pid in enumerate(pids):
        slot[ids == pid] = k
    ids = torch.where(slot >= 0, torch.tensor(tokenizer.eos_token_id), ids)  # any valid id: its embedding is replaced
    return PromptTokens(ids, slot, text, weight)


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
           token: torch.Tensor | None = None, bypass: torch.Tensor | None = None, clip_skip: int = 1,
           final_norm: bool = True):
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
        if clip_skip == 1:
            enc = text_encoder(input_ids).last_hidden_state
        else:  # hidden_states[-1] is the last layer's output before the final LN (captured["pre_ln"])
            h = text_encoder(input_ids, output_hidden_states=True).hidden_states[-clip_skip]
            captured["pre_ln"], enc = h, _text_model(text_encoder).final_layer_norm(h) if final_norm else h
    if bypass is None:
        return enc, enc
    return enc, _bypassed(text_encoder, captured["pre_ln"], slot, bypass, final_norm)


def _bypassed(text_encoder, h: torch.Tensor, slot: torch.Tensor, bypass: torch.Tensor,
              final_norm: bool = True) -> torch.Tensor:
    """LN(h + 0.2 b / ||b|| ||h||) at each slot's positions; h is CLIP's state before its final LN."""
    b = bypass.to(h.device, h.dtype)
    b = b[:, None] if b.ndim == 2 else b
    unit = b / b.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(b.dtype).tiny)  # 0 stays 0
    step = BYPASS_SCALE * _per_position(unit, slot) * h.norm(dim=-1, keepdim=True)
    out = h + (slot >= 0)[..., None] * step
    return _text_model(text_encoder).final_layer_norm(out) if final_norm else out


# ----------------------------------------------------------------------------- shared work
# Row r of a prompt differs from every other row only in the token embeddings at the slot positions.
# Two things follow, both exact (same math as `encode`, reordered):
# 1. CLIP's text transformer is causal: positions before the first slot p never see a concept, so
#    they run once (batch 1), and each layer keeps their keys / values for the rows to attend to.
# 2. In the first layer, every non-slot position's LN / q / k / v is the same for all rows too; rows
#    differ only in the keys at the slot positions. So the shared keys' softmax is done once
#    (batch 1: max m, sum l, unnormalized output o per query), and each row only adds its slot keys:
#        out_ri = (e^(m_i - M) o_i + sum_s e^(q_i.k_rs - M) v_rs) / (e^(m_i - M) l_i + sum_s e^(q_i.k_rs - M))
#    with M the running max; queries at slot positions (row-specific) attend in full, K' x 77.
# That removes the first layer's attention (half of the text encoder on `tiny`, 1/12 on SD's CLIP)
# and p/77 of the rest. Layers after the first run positions p..76 for all rows at once.

def _layers(text_encoder):
    return _text_model(text_encoder).encoder.layers


def _heads(attn, x: torch.Tensor):
    """q, k, v of x [B, n, D], each [B, H, n, dh]."""
    shape = (*x.shape[:2], attn.num_heads, attn.head_dim)
    return tuple(proj(x).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))


def _finish_layer(layer, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """Residual + out projection of attention output o [B, H, n, dh], then the MLP."""
    B, n, D = x.shape
    x = x + layer.self_attn.out_proj(o.transpose(1, 2).reshape(B, n, D))
    return x + layer.mlp(layer.layer_norm2(x))


def _clip_blocks(layers, x: torch.Tensor, start: int, cache: list | None):
    """CLIP encoder `layers` over positions start..start+n-1 (x [B, n, D]), attending to `cache`
    (per layer: K, V [1, H, start, dh] of the earlier positions) and causally to themselves.
    Returns (x after the layers, this call's per-layer K, V)."""
    import torch.nn.functional as F
    B, n, _ = x.shape
    allowed = torch.ones(n, start + n, dtype=torch.bool, device=x.device).tril(start)  # query i sees keys <= start + i
    kv = []
    for i, layer in enumerate(layers):
        q, k, v = _heads(layer.self_attn, layer.layer_norm1(x))
        kv.append((k, v))
        if cache:
            k = torch.cat([cache[i][0].expand(B, -1, -1, -1), k], dim=2)
            v = torch.cat([cache[i][1].expand(B, -1, -1, -1), v], dim=2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=layer.self_attn.scale)
        x = _finish_layer(layer, x, o)
    return x, kv


class PromptState:
    """The part of a prompt's encoding that no concept row changes (see the comment above)."""

    def __init__(self, text_encoder, tokens: PromptTokens, clip_skip: int = 1, final_norm: bool = True):
        tm, dev = _text_model(text_encoder), text_encoder.device
        self.final_norm = final_norm
        layers = _layers(text_encoder)
        layers = layers[:len(layers) - (clip_skip - 1)]   # CLIP skip: the last clip_skip - 1 layers never run
        self.text_encoder, self.layers = text_encoder, layers
        ids, self.slot = tokens.input_ids.to(dev)[None], tokens.slot.to(dev)
        pos = torch.arange(ids.shape[1], device=dev)
        self.pos_emb = tm.embeddings.position_embedding(pos)                       # [77, D]
        x = tm.embeddings.token_embedding(ids) + self.pos_emb                       # [1, 77, D]
        slots = (self.slot >= 0).nonzero()[:, 0]
        self.p = int(slots[0]) if len(slots) else ids.shape[1]
        self.prefix, self.cache = _clip_blocks(layers, x[:, :self.p], 0, None)
        if not len(slots):
            return
        p, l0 = self.p, layers[0]
        self.slot_pos = slots - p                                                    # [K'] positions in the suffix
        self.x = x[:, p:]                                                            # [1, n, D] (slot rows replaced per row)
        q, k, v = _heads(l0.self_attn, l0.layer_norm1(self.x))
        self.q = q[0]                                                                # [H, n, dh]
        self.k_all = torch.cat([self.cache[0][0], k], dim=2)[0]                      # [H, 77, dh] (slot keys: placeholders)
        self.v_all = torch.cat([self.cache[0][1], v], dim=2)[0]
        n = self.x.shape[1]
        causal = torch.ones(n, p + n, dtype=torch.bool, device=dev).tril(p)
        shared_key = torch.ones(p + n, dtype=torch.bool, device=dev)
        shared_key[slots] = False
        self.mask_shared = causal & shared_key                                       # [n, 77]: query -> shared key
        self.mask_slot = self.slot_pos[None, :] <= torch.arange(n, device=dev)[:, None]  # [n, K']: query -> slot key
        s = torch.einsum("hid,hjd->hij", self.q, self.k_all) * l0.self_attn.scale
        s = s.masked_fill(~self.mask_shared, float("-inf"))
        self.m = s.amax(-1)                                                          # finite: key 0 (BOS) is always shared
        e = (s - self.m[..., None]).exp()
        self.l, self.o = e.sum(-1), e @ self.v_all                                   # [H, n], [H, n, dh]

    def first_layer(self, x: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """Layer 0 for N rows: x [N, n, D] with the rows' slot inputs xs [N, K', D] in place."""
        l0 = self.layers[0]
        scale = l0.self_attn.scale
        q_s, k_s, v_s = _heads(l0.self_attn, l0.layer_norm1(xs))                    # [N, H, K', dh]
        # shared queries: the shared keys' softmax (once) merged with each row's slot keys
        s = torch.einsum("hid,nhkd->nhik", self.q, k_s) * scale
        s = s.masked_fill(~self.mask_slot, float("-inf"))
        top = torch.maximum(self.m, s.amax(-1))                                     # [N, H, n]
        w0 = (self.m - top).exp()
        ws = (s - top[..., None]).exp()
        o = (w0[..., None] * self.o + ws @ v_s) / (w0 * self.l + ws.sum(-1))[..., None]
        # slot queries: row-specific, over shared keys and slot keys
        at = self.slot_pos
        s_sh = (torch.einsum("nhkd,hjd->nhkj", q_s, self.k_all) * scale).masked_fill(~self.mask_shared[at], float("-inf"))
        s_ss = (q_s @ k_s.transpose(-1, -2) * scale).masked_fill(~self.mask_slot[at], float("-inf"))
        a = torch.cat([s_sh, s_ss], dim=-1).softmax(-1)
        o[:, :, at] = a[..., :s_sh.shape[-1]] @ self.v_all + a[..., s_sh.shape[-1]:] @ v_s
        return _finish_layer(l0, x, o)

    def encode_slots(self, token: torch.Tensor) -> torch.Tensor:
        """CLIP's state before the final LN for N rows of slot tokens [N, K, D]: [N, 77, D]."""
        N = token.shape[0]
        at = self.slot_pos
        xs = token.to(self.x.dtype)[:, self.slot[self.p + at]] + self.pos_emb[self.p + at]  # [N, K', D]
        x = self.x.expand(N, -1, -1).clone()
        x[:, at] = xs
        x = self.first_layer(x, xs)
        x, _ = _clip_blocks(self.layers[1:], x, self.p, self.cache[1:])
        return torch.cat([self.prefix.expand(N, -1, -1), x], dim=1)

    def bypassed(self, h: torch.Tensor, enc: torch.Tensor, bypass: torch.Tensor) -> torch.Tensor:
        """`_bypassed`, computed only at the slot positions (the final LN is per position)."""
        at = self.p + self.slot_pos
        out = enc.clone()
        out[:, at] = _bypassed(self.text_encoder, h[:, at], self.slot[at].expand(h.shape[0], -1), bypass,
                               self.final_norm)
        return out


def encode_shared(text_encoder, tokens: PromptTokens, token: torch.Tensor | None, bypass: torch.Tensor | None,
                  state: PromptState | None = None):
    """`encode` for N rows of one prompt (token / bypass [N, K, D]), sharing what no row changes.
    A plain prompt (no slot, token None) gives its one encoding ([1, 77, D], same)."""
    state = state or PromptState(text_encoder, tokens)
    ln = _text_model(text_encoder).final_layer_norm if state.final_norm else (lambda h: h)
    if token is None:
        enc = ln(state.prefix)
        return enc, enc
    h = state.encode_slots(token.to(text_encoder.device))
    enc = ln(h)
    if bypass is None:
        return enc, enc
    return enc, state.bypassed(h, enc, bypass.to(h.device))


def encode_rows(text_encoder, tokens: PromptTokens, token: torch.Tensor | None, bypass: torch.Tensor | None,
                chunk: int | None = None, dedup: bool = True, clip_skip: int = 1, final_norm: bool = True):
    """One prompt encoded for N rows of concept tokens: token / bypass [N, K, D] (or [N, D]) ->
    ([N, 77 k, D], [N, 77 k, D]); a plain prompt (token None) -> ([1, 77 k, D], same); k chunks.

    With `dedup`, equal rows are encoded once (torch.unique); the rest run in batches of `chunk`
    rows (default: about 64 MB of MLP activations per batch) sharing one `PromptState`. Each
    chunk is encoded on its own, then emphasized (A1111 syntax); a chunk with no concept is
    encoded once for all rows.
    """
    if tokens.chunks == 1 and tokens.weight is None:
        return _encode_chunk(text_encoder, tokens, token, bypass, chunk, dedup, clip_skip, final_norm)
    parts = [_encode_chunk(text_encoder, tokens.chunk(i), token, bypass, chunk, dedup, clip_skip, final_norm)
             for i in range(tokens.chunks)]
    N = max(e.shape[0] for e, _ in parts)
    return tuple(torch.cat([p[j].expand(N, -1, -1) for p in parts], dim=1) for j in (0, 1))


def _encode_chunk(text_encoder, tokens: PromptTokens, token, bypass, chunk, dedup, clip_skip, final_norm):
    """`encode_rows` of one 77-token chunk, emphasized when it has weights."""
    if not bool(tokens.mask.any()):
        token = bypass = None
    enc, enc_b = _encode_rows77(text_encoder, tokens, token, bypass, chunk, dedup, clip_skip, final_norm)
    if tokens.weight is None:
        return enc, enc_b
    e = emphasize(enc, tokens.weight)
    return e, (e if enc_b is enc else emphasize(enc_b, tokens.weight))


def _encode_rows77(text_encoder, tokens: PromptTokens, token, bypass, chunk, dedup, clip_skip, final_norm):
    state = PromptState(text_encoder, tokens, clip_skip, final_norm)
    if token is None:
        return encode_shared(text_encoder, tokens, None, None, state)
    N = token.shape[0]
    token = token.reshape(N, -1, token.shape[-1])
    K, D = token.shape[1:]
    rows = token if bypass is None else torch.cat([token, bypass.reshape(N, K, D)], dim=1)
    rows = rows.reshape(N, -1)
    if dedup:
        rows, inverse = torch.unique(rows, dim=0, return_inverse=True)
    if chunk is None:
        width = text_encoder.config.intermediate_size
        chunk = max(1, 2**26 // (MAX_TOKENS * width * rows.element_size()))
    enc, enc_b = [], []
    for i in range(0, len(rows), chunk):
        u = rows[i:i + chunk].view(-1, rows.shape[1] // D, D)
        e, eb = encode_shared(text_encoder, tokens, u[:, :K], None if bypass is None else u[:, K:], state)
        enc.append(e)
        enc_b.append(eb)
    enc, enc_b = torch.cat(enc), torch.cat(enc_b)
    if dedup:
        inverse = inverse.to(enc.device)
        enc, enc_b = enc[inverse], enc_b[inverse]
    return enc, enc_b


def encode_plain(text_encoder, tokenizer, prompt: str, clip_skip: int = 1, syntax: str = "plain") -> torch.Tensor:
    """CLIP encoding of a prompt with no concept (negative / unconditional prompts): [1, 77 k, D]."""
    return encode_rows(text_encoder, tokenize(tokenizer, prompt, None, syntax=syntax), None, None,
                       clip_skip=clip_skip)[0]


def encode_tokens(text_encoder, tokens: PromptTokens, token=None, bypass=None, clip_skip: int = 1,
                  final_norm: bool = True):
    """The straightforward `encode` of every chunk (each a 77-token CLIP call), emphasized and
    concatenated: ([B, 77 k, D], same) for B rows (the reference path's text encoding)."""
    B = 1 if token is None else token.shape[0]
    encs, encs_b = [], []
    for i in range(tokens.chunks):
        c = tokens.chunk(i)
        has = token is not None and bool(c.mask.any())
        b = B if has else 1
        e, eb = encode(text_encoder, c.input_ids[None].expand(b, -1), c.slot[None].expand(b, -1) if has else None,
                       token if has else None, bypass if has else None, clip_skip, final_norm)
        if c.weight is not None:
            e, eb = emphasize(e, c.weight), (emphasize(e, c.weight) if eb is e else emphasize(eb, c.weight))
        encs.append(e.expand(B, -1, -1))
        encs_b.append(eb.expand(B, -1, -1))
    return torch.cat(encs, dim=1), torch.cat(encs_b, dim=1)


def pad_chunks(enc: torch.Tensor, chunks: int, empty: torch.Tensor) -> torch.Tensor:
    """enc [N, 77 k, D] (or [N, L, 77 k, D]) padded to `chunks` chunks with the empty prompt's
    encoding `empty` [1, 77, D], as A1111 pads the shorter of prompt / negative prompt
    ("Pad prompt/negative prompt", sd_samplers_cfg_denoiser.pad_cond_uncond)."""
    have = enc.shape[-2] // MAX_TOKENS
    if have >= chunks:
        return enc
    pad = empty.to(enc.dtype).reshape((1,) * (enc.ndim - 2) + empty.shape[-2:])
    pad = pad.expand(*enc.shape[:-2], -1, -1)
    return torch.cat([enc] + [pad] * (chunks - have), dim=-2)
