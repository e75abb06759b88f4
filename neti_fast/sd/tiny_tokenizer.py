"""A real CLIP-format BPE tokenizer, learned deterministically from a small built-in corpus.

The built-in `tiny` model needs a tokenizer that behaves like SD's (byte-level BPE with `</w>`
word ends, <|startoftext|> / <|endoftext|>, padding with <|endoftext|>), but nothing may be
downloaded. So we learn BPE merges here from the Textual Inversion caption templates plus a
word list; every corpus word (and so every template word and common init word such as "dog")
ends up as one token, and any other text still tokenizes through byte fallback.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .templates import IMAGENET_STYLE_TEMPLATES, IMAGENET_TEMPLATES

# Common init words and prompt words, so that they are single tokens like in CLIP's vocabulary.
WORDS = """
a an the of in on at with and or by for to from is are this that photo picture painting ball teddy van gogh
rendition art style drawing sketch cropped bright dark clean dirty good bad close up small
large big nice weird cool one two three four cat dog person man woman child toy car house
tree flower bird horse sculpture statue mug cup teapot vase chair table book clock backpack
bowl shoe hat glasses bear duck fish boat train plane robot monster candle lamp plant pot
beach snow forest city street mountain river lake sea sky sun moon night day garden room
kitchen desk floor wall window road field park bridge castle tower space jungle desert
red orange yellow green blue purple pink brown black white gray golden silver wooden
oil watercolor pencil pixel anime cartoon cubist impressionist surreal vintage modern
standing sitting sleeping running wearing holding looking next near under over inside
portrait landscape still life abstract texture pattern object thing concept render
high quality detailed realistic cinematic lighting background foreground
""".split()

_NUM_MERGES = 4000


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable-unicode map (so BPE never sees raw bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def corpus_words() -> Counter:
    words: Counter = Counter(WORDS)
    for template in IMAGENET_TEMPLATES + IMAGENET_STYLE_TEMPLATES:
        for w in template.replace("{}", " ").replace(".", " ").replace(",", " ").split():
            words[w.lower()] += 1
    return words


def learn_bpe(words: Counter, num_merges: int = _NUM_MERGES) -> list[tuple[str, str]]:
    """Classic BPE (Sennrich et al.): repeatedly merge the most frequent adjacent pair.

    Ties break on the pair itself so the result is fully deterministic.
    """
    byte_enc = bytes_to_unicode()
    seqs = {}
    for w, c in words.items():
        chars = [byte_enc[b] for b in w.encode("utf-8")]
        chars[-1] += "</w>"
        seqs[tuple(chars)] = c
    merges = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for seq, c in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = best[0] + best[1]
        new = {}
        for seq, c in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            new[tuple(out)] = new.get(tuple(out), 0) + c
        seqs = new
    return merges


def write_clip_bpe_files(out_dir: str | Path) -> tuple[Path, Path]:
    """Write `vocab.json` and `merges.txt` in CLIP's layout; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merges = learn_bpe(corpus_words())
    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for tok in vocab_list:  # a merge can re-create an existing token; keep the first id
        vocab.setdefault(tok, len(vocab))
    vocab_path, merges_path = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return vocab_path, merges_path
