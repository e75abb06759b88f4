// Shared declarations of the row-gathered cross-attention kernels (CPU and CUDA).
// The math is in cross_attention_cpu.cpp; the Python twin is kernels/cross_attention.py.
#pragma once

#include <cstdint>

namespace neti_fast {

enum : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One launch: out[b, n, h*D:(h+1)*D] = softmax(q[b, n, h] . K[row[b], :, h] * scale) @ V[row[b], :, h].
// Any L >= 1 (77 per CLIP chunk; long prompts concatenate chunks).
// Strides are in elements; the last dimension of q / k / v / out is contiguous.
struct CrossAttnParams {
  const void* q;        // [B, N, C]
  const void* k;        // [R, L, C]
  const void* v;        // [R, L, C]
  const int64_t* row;   // [B], already bounds-checked, values in [0, R)
  void* out;            // [B, N, C]
  int64_t B, N, L, C, H, D;
  int64_t q_sb, q_sn, k_sr, k_sl, v_sr, v_sl, o_sb, o_sn;
  float scale;
  int32_t dtype;        // kFloat32 | kBFloat16 | kFloat16 (CUDA only)
  int64_t block_n;      // queries per work item
};

namespace cpu {
// Work item i in [begin, end) is (b, h, query block) = unravel(i, [B, H, ceil(N / block_n)]).
#define NETI_DECLARE_CPU_KERNEL(ISA) \
  namespace ISA { void cross_attention_range(const CrossAttnParams& p, int64_t begin, int64_t end); }
NETI_DECLARE_CPU_KERNEL(DEFAULT)
NETI_DECLARE_CPU_KERNEL(AVX2)
NETI_DECLARE_CPU_KERNEL(AVX512)
#undef NETI_DECLARE_CPU_KERNEL
}  // namespace cpu

}  // namespace neti_fast

// The CUDA launcher, exported with C linkage from libneti_fast_cuda (csrc/cross_attention_cuda.cu).
// Returns 0 on success, else a cudaError_t value; `stream` is a cudaStream_t.
extern "C" int neti_fast_cross_attention_cuda(const neti_fast::CrossAttnParams* p, void* stream);
extern "C" const char* neti_fast_cuda_error_string(int code);
