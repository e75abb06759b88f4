"""The NeTI mapper: (timestep t, cross-attention layer l) -> token embedding (+ textual bypass).

Faithful to the official implementation (yuval-alaluf/NeTI, models/neti_mapper.py and
models/positional_encoding.py) so its checkpoints give identical outputs:

    x = [t, l]                                   raw timestep 0..999 and layer index 0..15, floats
    v = [sin(W x), cos(W x)] / ||.||             W: fixed random [num_w=1024, 2], columns scaled
                                                 by sigma_t = 0.03 and sigma_l = 2.0
    h = LeakyReLU(LN(A2 LeakyReLU(LN(A1 (A0 v)))))   A0: 2048 -> 160, initialised with the
                                                 encodings of the 160 anchors (t in 0,100..900) x (l in 0..15)
    h[K:] = 0                                    nested dropout / inference truncation at K
    o = B h                                      128 -> 2D (token half, then bypass half)
    o = target_norm * o / ||o||                  the WHOLE 2D vector, before the split
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

HIDDEN = 128


@dataclass
class MapperConfig:
    """Architecture and behaviour of one mapper (stored in concept files as JSON)."""
    output_dim: int = 768                 # text encoder width D; the layer outputs 2D with the bypass
    num_layers: int = 16                  # U-Net cross-attention layers
    use_nested_dropout: bool = True
    nested_dropout_prob: float = 0.5
    target_norm: float | None = None      # ||init word embedding||; None disables output normalisation
    use_positional_encoding: bool = True  # False: the official BasicEncoder ([t, l] scaled to [-1, 1])
    num_pe_time_anchors: int = 10
    sigma_t: float = 0.03
    sigma_l: float = 2.0
    num_w: int = 1024
    output_bypass: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "MapperConfig":
        d = json.loads(s)
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class PositionalEncoding(nn.Module):
    """Random Fourier features of (t, l); `w` is a fixed random matrix, stored with the mapper."""

    def __init__(self, cfg: MapperConfig, generator: torch.Generator | None = None):
        super().__init__()
        w = torch.randn(cfg.num_w, 2, generator=generator)
        w[:, 0] *= cfg.sigma_t
        w[:, 1] *= cfg.sigma_l
        self.register_buffer("w", w)
        self.out_dim = 2 * cfg.num_w

    def forward(self, t: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        x = torch.stack([t, l]).to(self.w.dtype)                  # [2, N]
        wx = self.w @ x                                           # [num_w, N]
        v = torch.cat([torch.sin(wx), torch.cos(wx)])             # [2 num_w, N]
        return (v / v.norm(dim=0)).T                              # [N, 2 num_w]


class BasicEncoder(nn.Module):
    """The official non-PE option: t and l each mapped linearly onto [-1, 1]."""

    def __init__(self, cfg: MapperConfig):
        super().__init__()
        self.register_buffer("normalized_timesteps", torch.arange(1000) / 999 * 2 - 1)
        self.register_buffer("normalized_unet_layers", torch.arange(cfg.num_layers) / (cfg.num_layers - 1) * 2 - 1)
        self.out_dim = 2

    def forward(self, t: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.normalized_timesteps[t.long()], self.normalized_unet_layers[l.long()]]).T


class NeTIMapper(nn.Module):
    """Module names match the official code so its `state_dict` loads as is (`input_layer` is `net.0`)."""

    def __init__(self, cfg: MapperConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        if cfg.use_positional_encoding:
            self.encoder = PositionalEncoding(cfg, generator)
            self.input_dim = cfg.num_pe_time_anchors * cfg.num_layers
            self.input_layer = nn.Linear(self.encoder.out_dim, self.input_dim)
            with torch.no_grad():
                self.input_layer.weight.copy_(self.anchor_encodings())
        else:
            self.encoder = BasicEncoder(cfg)
            self.input_dim = 2
            self.input_layer = nn.Identity()
        self.net = nn.Sequential(self.input_layer,
                                 nn.Linear(self.input_dim, HIDDEN), nn.LayerNorm(HIDDEN), nn.LeakyReLU(),
                                 nn.Linear(HIDDEN, HIDDEN), nn.LayerNorm(HIDDEN), nn.LeakyReLU())
        out = cfg.output_dim * (2 if cfg.output_bypass else 1)
        self.output_layer = nn.Sequential(nn.Linear(HIDDEN, out))

    def anchor_encodings(self) -> torch.Tensor:
        """Encodings of the anchors (t in 0, 1000/n, ...) x (l in 0..L-1), t-major: [n * L, 2 num_w]."""
        n, L = self.cfg.num_pe_time_anchors, self.cfg.num_layers
        t = torch.arange(0, 1000, 1000 // n).repeat_interleave(L).float()
        l = torch.arange(L).repeat(len(t) // L).float()
        return self.encoder(t, l)

    def hidden(self, t: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        return self.net(self.encoder(t.float(), l.float()))

    def nested_dropout(self, h: torch.Tensor, truncation: int | None) -> torch.Tensor:
        """Training: with probability p (one draw per batch, as official), zero h[i, k_i:] with
        k_i ~ U{0..127} per sample. Inference: zero h[:, truncation:]."""
        if not self.cfg.use_nested_dropout:
            return h
        idx = torch.arange(h.shape[1], device=h.device)
        if self.training:
            if np.random.rand() < self.cfg.nested_dropout_prob:
                k = torch.randint(0, h.shape[1], (h.shape[0], 1), device=h.device)
                h = h * (idx < k)
        elif truncation is not None:
            h = h * (idx < truncation)
        return h

    def forward(self, t: torch.Tensor, l: torch.Tensor, truncation: int | None = None):
        """t, l: [N] (raw timesteps, layer indices). Returns (token [N, D], bypass [N, D] or None)."""
        o = self.output_layer(self.nested_dropout(self.hidden(t, l), truncation))
        if self.cfg.target_norm is not None:
            o = nn.functional.normalize(o, dim=-1) * self.cfg.target_norm
        if self.cfg.output_bypass:
            token, bypass = o.chunk(2, dim=-1)
            return token, bypass
        return o, None

    # --- flat tensor dict for safetensors (no shared storage: `input_layer.*` is dropped, it is `net.0.*`)
    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith("input_layer.")}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        sd = dict(tensors)
        for k in list(sd):
            if k.startswith("net.0."):
                sd["input_layer." + k[len("net.0."):]] = sd[k]
        self.load_state_dict(sd, strict=True)
