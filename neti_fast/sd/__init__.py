"""The Stable Diffusion model neti-fast runs: loading diffusers folders, hub ids and the built-in
models (`models`, with the built-in tokenizer in `tiny_tokenizer` and the Textual Inversion caption
`templates` its vocabulary and the trainer share), text conditioning with placeholders and the
textual bypass (`conditioning`), and cross-attention: the per-layer processors and the attention
dispatcher (`attention`) with the native op's Python face beside it (`native`; the Triton kernel is
`neti_fast.kernels`).

Imports only `neti_fast.errors`, `neti_fast.utils` and `neti_fast.kernels` (tests/test_layout.py).
"""
