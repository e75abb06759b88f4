// Row-gathered cross-attention, CUDA kernel (fp32 / bf16 / fp16 in, fp32 math), sm_80 and sm_90.
// Same op and math as cross_attention_cpu.cpp (see there); Python twin: kernels/cross_attention.py.
//
//     out[b, n, h] = softmax_l(scale * q[b, n, h] . K[row[b], l, h]) @ V[row[b], :, h]
//
// Why CUDA C++ rather than Triton compiled ahead of time: the build must work where only nvcc is
// installed (Triton is an optional extra here, and its AOT compiler's output is tied to the Triton
// version and emits one cubin per architecture and per specialization), whereas nvcc emits SASS for
// sm_80 and sm_90 plus compute_90 PTX (forward compatible) into one fatbin with no Python at run
// time and no JIT on first call.  The Triton kernel stays the tuned GPU path of the dispatcher; this
// one is the dependency-free native twin.
//
// Layout: grid (ceil(N / block_n), B * H), 4 warps per block.  A block stages K[row[b], :, h] in
// shared memory as fp32 ([L][D + 1]: the +1 pad puts the keys a warp reads at once into distinct
// banks), then each warp takes one query at a time: lane i scores keys i, i+32, i+64, i+96 (a
// full single-pass softmax with warp-shuffle max / sum, no online softmax since L <= 128), writes
// p to its shared slot, and computes out[j] for j = lane, lane + 32, ... reading V straight from
// global memory (lanes read consecutive channels: coalesced; a (row, head) slice is 77 x D and
// stays in L2).  Scalar FMAs, no tensor cores: a portable baseline, not a Triton replacement.
//
// L > 128 (long prompts: 77-token chunks concatenated) runs `cross_attention_long_kernel`: the
// keys are staged kChunk = 64 at a time, and each query keeps an online softmax across chunks in
// registers (running max m, denominator l, numerator acc; per chunk c with scores s_c:
//     m' = max(m, max s_c),  a = exp(m - m'),  l = a * l + sum exp(s_c - m'),
//     acc = a * acc + exp(s_c - m') @ V_c,  and out = acc / l after the last chunk;
// the first chunk has a = exp(-inf) = 0).  Each warp owns kQw = 4 queries for the whole key loop
// (their state is 4 x (2 + D / 32) registers per lane), so a block of 16 queries stages each
// chunk once.  Shared memory: the chunk [64][D + 1] plus the warps' queries and probabilities,
// at most 86 KB (D = 256), within every target's opt-in limit (sm_86 / sm_89: 99 KB).  The
// L <= 128 kernel is left exactly as it was.
//
// Built without torch headers, linked to the static CUDA runtime: libneti_fast_cuda.so needs only
// the driver at run time, and a CPU-only build of torch can still build (and CI can inspect) it.

#include "cross_attention.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

namespace {

constexpr int kWarps = 4;
constexpr int kMaxL = 128;   // the one-pass kernel's limit: its scores are kMaxL / 32 registers per lane
constexpr int kMaxD = 256;
constexpr int kChunk = 64;   // long kernel: keys staged per chunk
constexpr int kQw = 4;       // long kernel: queries per warp

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) cross_attention_kernel(neti_fast::CrossAttnParams p) {
  extern __shared__ float smem[];
  const int D = static_cast<int>(p.D), L = static_cast<int>(p.L), KS = D + 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.y / p.H, h = blockIdx.y % p.H;
  const int64_t r = p.row[b];

  float* ks = smem;                          // [L][D + 1]
  float* qs = smem + L * KS + warp * (D + kMaxL);  // this warp's query [D] ...
  float* ps = qs + D;                        // ... and probabilities [L]

  const T* k = static_cast<const T*>(p.k) + r * p.k_sr + h * D;
  for (int i = threadIdx.x; i < L * D; i += blockDim.x) {
    const int l = i / D, j = i % D;
    ks[l * KS + j] = to_f(k[l * p.k_sl + j]);
  }
  __syncthreads();

  const T* v = static_cast<const T*>(p.v) + r * p.v_sr + h * D;
  const int64_t n_begin = static_cast<int64_t>(blockIdx.x) * p.block_n;
  const int64_t n_end = n_begin + p.block_n < p.N ? n_begin + p.block_n : p.N;
  for (int64_t n = n_begin + warp; n < n_end; n += kWarps) {
    const T* qn = static_cast<const T*>(p.q) + b * p.q_sb + n * p.q_sn + h * D;
    for (int j = lane; j < D; j += 32) qs[j] = to_f(qn[j]) * p.scale;
    __syncwarp();

    float s[kMaxL / 32];
    float m = -INFINITY;
#pragma unroll
    for (int c = 0; c < kMaxL / 32; ++c) {
      const int l = lane + 32 * c;
      float acc = -INFINITY;
      if (l < L) {
        acc = 0.f;
        const float* kl = ks + l * KS;
        for (int j = 0; j < D; ++j) acc = fmaf(qs[j], kl[j], acc);
      }
      s[c] = acc;
      m = fmaxf(m, acc);
    }
    m = warp_max(m);
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < kMaxL / 32; ++c) {
      const int l = lane + 32 * c;
      const float e = l < L ? expf(s[c] - m) : 0.f;
      if (l < L) ps[l] = e;
      sum += e;
    }
    sum = warp_sum(sum);
    __syncwarp();

    const float inv = 1.f / sum;
    T* on = static_cast<T*>(p.out) + b * p.o_sb + n * p.o_sn + h * D;
    for (int j = lane; j < D; j += 32) {
      float acc = 0.f;
      for (int l = 0; l < L; ++l) acc = fmaf(ps[l], to_f(v[l * p.v_sl + j]), acc);
      on[j] = from_f<T>(acc * inv);
    }
    __syncwarp();  // qs / ps are rewritten by the next query
  }
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) cross_attention_long_kernel(neti_fast::CrossAttnParams p) {
  extern __shared__ float smem[];
  const int D = static_cast<int>(p.D), L = static_cast<int>(p.L), KS = D + 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.y / p.H, h = blockIdx.y % p.H;
  const int64_t r = p.row[b];

  float* ks = smem;                                               // [kChunk][D + 1]
  float* qs = smem + kChunk * KS + warp * kQw * (D + kChunk);     // this warp's queries [kQw][D] ...
  float* ps = qs + kQw * D;                                       // ... and probabilities [kQw][kChunk]

  // This warp's queries n0 .. n0 + nq - 1 (nq is warp-uniform: the shuffles below see all lanes).
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * (kWarps * kQw) + warp * kQw;
  const int nq = n0 >= p.N ? 0 : static_cast<int>(p.N - n0 < kQw ? p.N - n0 : kQw);
  for (int i = 0; i < nq; ++i) {
    const T* qn = static_cast<const T*>(p.q) + b * p.q_sb + (n0 + i) * p.q_sn + h * D;
    for (int j = lane; j < D; j += 32) qs[i * D + j] = to_f(qn[j]) * p.scale;
  }

  float m[kQw], l[kQw], acc[kQw][kMaxD / 32];
#pragma unroll
  for (int i = 0; i < kQw; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int t = 0; t < kMaxD / 32; ++t) acc[i][t] = 0.f;
  }

  const T* k = static_cast<const T*>(p.k) + r * p.k_sr + h * D;
  const T* v = static_cast<const T*>(p.v) + r * p.v_sr + h * D;
  for (int c0 = 0; c0 < L; c0 += kChunk) {
    const int cl = L - c0 < kChunk ? L - c0 : kChunk;  // keys in this chunk (>= 1)
    __syncthreads();  // every warp is done with the previous chunk (and the queries are staged)
    for (int i = threadIdx.x; i < cl * D; i += blockDim.x) {
      const int kl = i / D, j = i % D;
      ks[kl * KS + j] = to_f(k[(c0 + kl) * p.k_sl + j]);
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kQw; ++i) {  // unrolled: m / l / acc stay in registers
      if (i >= nq) break;
      const float* qi = qs + i * D;
      float s[kChunk / 32];
      float cm = -INFINITY;
#pragma unroll
      for (int c = 0; c < kChunk / 32; ++c) {
        const int kl = lane + 32 * c;
        float a = -INFINITY;
        if (kl < cl) {
          a = 0.f;
          const float* kr = ks + kl * KS;
          for (int j = 0; j < D; ++j) a = fmaf(qi[j], kr[j], a);
        }
        s[c] = a;
        cm = fmaxf(cm, a);
      }
      const float m_new = fmaxf(m[i], warp_max(cm));  // finite: key c0 is real
      const float alpha = expf(m[i] - m_new);
      float sum = 0.f;
#pragma unroll
      for (int c = 0; c < kChunk / 32; ++c) {
        const int kl = lane + 32 * c;
        const float e = kl < cl ? expf(s[c] - m_new) : 0.f;
        if (kl < cl) ps[i * kChunk + kl] = e;
        sum += e;
      }
      l[i] = l[i] * alpha + warp_sum(sum);
      m[i] = m_new;
      __syncwarp();
      const float* pi = ps + i * kChunk;
#pragma unroll
      for (int t = 0; t < kMaxD / 32; ++t) {
        const int j = lane + 32 * t;
        if (j < D) {
          float a = 0.f;
          for (int kl = 0; kl < cl; ++kl) a = fmaf(pi[kl], to_f(v[(c0 + kl) * p.v_sl + j]), a);
          acc[i][t] = acc[i][t] * alpha + a;
        }
      }
      __syncwarp();  // ps is rewritten by the next chunk
    }
  }

#pragma unroll
  for (int i = 0; i < kQw; ++i) {
    if (i >= nq) break;
    const float inv = 1.f / l[i];
    T* on = static_cast<T*>(p.out) + b * p.o_sb + (n0 + i) * p.o_sn + h * D;
#pragma unroll
    for (int t = 0; t < kMaxD / 32; ++t) {
      const int j = lane + 32 * t;
      if (j < D) on[j] = from_f<T>(acc[i][t] * inv);
    }
  }
}

// Dynamic shared memory above the default 48 KB needs an opt-in (sm_80: up to 163 KB, sm_90: 227 KB).
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

template <typename T>
int launch(const neti_fast::CrossAttnParams& p, cudaStream_t stream) {
  if (p.L > kMaxL) {  // queries per block are fixed (kWarps * kQw); p.block_n is the one-pass kernel's
    const size_t smem = sizeof(float) * (static_cast<size_t>(kChunk) * (p.D + 1) + kWarps * kQw * (p.D + kChunk));
    const cudaError_t e = allow_smem(cross_attention_long_kernel<T>, smem);
    if (e != cudaSuccess) return static_cast<int>(e);
    const int per_block = kWarps * kQw;
    const dim3 grid(static_cast<unsigned>((p.N + per_block - 1) / per_block), static_cast<unsigned>(p.B * p.H));
    cross_attention_long_kernel<T><<<grid, kWarps * 32, smem, stream>>>(p);
    return static_cast<int>(cudaGetLastError());
  }
  const size_t smem = sizeof(float) * (static_cast<size_t>(p.L) * (p.D + 1) + kWarps * (p.D + kMaxL));
  const cudaError_t e = allow_smem(cross_attention_kernel<T>, smem);
  if (e != cudaSuccess) return static_cast<int>(e);
  const dim3 grid(static_cast<unsigned>((p.N + p.block_n - 1) / p.block_n), static_cast<unsigned>(p.B * p.H));
  cross_attention_kernel<T><<<grid, kWarps * 32, smem, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int neti_fast_cross_attention_cuda(
    const neti_fast::CrossAttnParams* p, void* stream) {
  if (p->L < 1 || p->L > INT32_MAX || p->D < 1 || p->D > kMaxD || p->B * p->H > 65535 || p->block_n < 1)
    return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p->dtype) {
    case neti_fast::kFloat32: return launch<float>(*p, s);
    case neti_fast::kBFloat16: return launch<__nv_bfloat16>(*p, s);
    case neti_fast::kFloat16: return launch<__half>(*p, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" __attribute__((visibility("default"))) const char* neti_fast_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
