"""Triton kernels for neti-fast (one file per kernel)."""

from .cross_attention import (
    HAS_TRITON,
    cross_attention_op,
    cross_attention_ref,
    cross_attention_triton,
    triton_supported,
)

__all__ = [
    "HAS_TRITON",
    "cross_attention_op",
    "cross_attention_ref",
    "cross_attention_triton",
    "triton_supported",
]
