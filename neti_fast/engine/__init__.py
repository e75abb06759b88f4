"""Generation: requests and their one check (`request`), schedulers, seeds and decoding
(`sampling`), the batched `engine` (conditionings, K/V packing, the denoising loop), the denoiser
interface (`denoiser`), U-Net runtimes (`backends`, with `cudagraph` and `neti_fast.export`), the
K/V buffers batches share (`kv_arena`), the official algorithm it is held to (`reference`), NeTI in
a diffusers pipeline (`adapter`), and where a process sits in a torchrun run (`distributed`).

Imports `neti_fast.sd`, `neti_fast.concepts`, `neti_fast.export` and the leaves; nothing above.
"""
