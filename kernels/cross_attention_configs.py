"""Tile sizes of the cross-attention kernel per (GPU family, head dim, dtype): (BLOCK_N, num_warps).

Chosen by `python -m neti_fast.kernels.check --search` from what ptxas reports when the kernel is
compiled for that target (no spills, shared memory within the target's limit, then the rule in
`check.choose`); `python -m neti_fast.kernels.check` (run by CI) re-compiles every entry and fails
if one spills or overflows.  Not yet timed on a GPU: `bench/gpu_check.sh` measures the candidates.
Families: 80 = sm_80 / sm_86 / sm_89 (mma.sync), 90 = sm_90 (wgmma), 100 = sm_100 (tcgen05).
"""
CONFIGS: dict[tuple[int, int, str], tuple[int, int]] = {
    (80, 4, 'bf16'): (128, 8),
    (80, 4, 'fp16'): (128, 8),
    (80, 8, 'bf16'): (128, 8),
    (80, 8, 'fp16'): (128, 8),
    (80, 40, 'bf16'): (128, 8),
    (80, 40, 'fp16'): (128, 8),
    (80, 80, 'bf16'): (128, 4),
    (80, 80, 'fp16'): (128, 4),
    (80, 160, 'bf16'): (128, 8),
    (80, 160, 'fp16'): (128, 8),
    (90, 4, 'bf16'): (128, 8),
    (90, 4, 'fp16'): (128, 8),
    (90, 8, 'bf16'): (128, 8),
    (90, 8, 'fp16'): (128, 8),
    (90, 40, 'bf16'): (128, 8),
    (90, 40, 'fp16'): (128, 8),
    (90, 80, 'bf16'): (128, 8),
    (90, 80, 'fp16'): (128, 8),
    (90, 160, 'bf16'): (128, 8),
    (90, 160, 'fp16'): (128, 8),
    (100, 4, 'bf16'): (128, 8),
    (100, 4, 'fp16'): (128, 8),
    (100, 8, 'bf16'): (128, 8),
    (100, 8, 'fp16'): (128, 8),
    (100, 40, 'bf16'): (128, 8),
    (100, 40, 'fp16'): (128, 8),
    (100, 80, 'bf16'): (128, 8),
    (100, 80, 'fp16'): (128, 8),
    (100, 160, 'bf16'): (128, 4),
    (100, 160, 'fp16'): (128, 4),
}
