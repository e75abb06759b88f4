// Row-gathered cross-attention, CPU kernel (fp32 / bf16 in, fp32 math).  Python twin and
// reference: kernels/cross_attention.py (cross_attention_ref).
//
// Sample b reads row r = row[b] of the precomputed [R, L, C] K / V tables (L text tokens: 77 per
// CLIP chunk, 77k for long prompts; C = H * D).  For head h (channels h*D .. h*D+D-1) and image token n:
//
//     s[l]   = scale * sum_j q[b, n, h*D + j] * K[r, l, h*D + j]         l < L
//     p[l]   = exp(s[l] - max_l s)                                        (exact softmax: all
//     out[b, n, h*D + j] = sum_l p[l] * V[r, l, h*D + j] / sum_l p[l]      keys in one pass)
//
// All L keys are scored in one padded block (Lp = L rounded up to the vector width), for any L,
// so there is no online softmax: unlike the GPU kernels, whose scores live in registers / shared
// memory and which loop over key blocks above 128 keys, this one keeps them in a heap buffer of
// kQ * Lp floats (7.5 KB at L = 231, within L1) and K^T in one of D * Lp (at most 245 KB at
// L = 231, D = 256: L2, as L = 77's 80 KB already is), so longer contexts cost only
// proportionally more and keep the exact single-pass numerics.  The gather happens here: the kernel offsets its K / V reads by r * stride_r;
// no per-sample copy of K / V is ever made.
//
// Work item = (b, h, block of block_n queries).  Per (r, h), K[r, :, h] is packed transposed into
// Kt[D][Lp] (fp32, zero padded), so the scores of one query are D fused multiply-adds of
// Lp-long vectors (vectorized over keys: efficient for any head dim, including tiny's 4 / 8).
// V is used in its table layout [L][D] when D >= the vector width (out = L multiply-adds of D-long
// vectors; read in place for fp32, widened into a copy for bf16), else transposed as Vt[D][Lp]
// (out[j] = dot(p, Vt[j])).
// Packing costs L*D per item against block_n*L*D*2 multiply-adds, and consecutive items of one
// thread usually share (r, h), in which case the packed tiles are reused.  Eight queries (times two
// vectors on AVX512) are processed together: independent FMA chains, fewer loads than FMAs.
//
// bf16 inputs are widened to fp32 on load and the output rounded once on store, so the only bf16
// rounding is of the inputs and the result (PyTorch's own bf16 attention rounds the scores and
// probabilities too, hence the equivalence tests bound our error by PyTorch's).
//
// This file is compiled once per CPU ISA (DEFAULT, AVX2, AVX512; CMakeLists.txt sets the flags
// and CPU_CAPABILITY), like ATen's own kernels; csrc/ops.cpp picks one at run time.

#include "cross_attention.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#ifndef CPU_CAPABILITY
#error "compile with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512"
#endif

namespace neti_fast::cpu::CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kQ = 8;  // queries processed together: 8 FMA chains hide the FMA latency

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

// Register blocks: NT vectors x kQ queries of accumulators.  Each loaded K / V vector feeds kQ FMAs
// and each broadcast query / probability value NT of them, so loads stay below the FMA count
// (AVX512: NT = 2, 16 accumulators of its 32 registers; narrower ISAs have 16 registers: NT = 1).
constexpr int kNT = Vec::size() == 16 ? 2 : 1;

// s_i[t0*W ..) = sum_j qf_i[j] * Kt[j][t0*W ..) for NT vectors of keys.
template <int NT>
inline void score_block(const float* kt, int64_t Lp, int64_t D, const float* qf, float* s, int64_t t0) {
  constexpr int64_t W = Vec::size();
  Vec a[NT][kQ];
  for (int t = 0; t < NT; ++t)
    for (int64_t i = 0; i < kQ; ++i) a[t][i] = Vec(0.f);
  const float* kcol = kt + t0 * W;
  for (int64_t j = 0; j < D; ++j) {
    Vec kv[NT];
    for (int t = 0; t < NT; ++t) kv[t] = Vec::loadu(kcol + j * Lp + t * W);
#pragma GCC unroll 8
    for (int64_t i = 0; i < kQ; ++i) {
      const Vec qb(qf[i * D + j]);
      for (int t = 0; t < NT; ++t) a[t][i] = at::vec::fmadd(qb, kv[t], a[t][i]);
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int64_t i = 0; i < kQ; ++i) a[t][i].store(s + i * Lp + (t0 + t) * W);
}

// acc_i[t0*W ..) = inv_sum_i * sum_l p_i[l] * V[l][t0*W ..) for NT vectors of channels, the last
// of which may hold only `rem` < W channels (then NT == 1).
template <int NT>
inline void pv_block(const float* vsrc, int64_t vstride, int64_t L, const float* s, int64_t Lp,
                     const float* inv_sum, float* acc, int64_t Dp, int64_t t0, int64_t rem) {
  constexpr int64_t W = Vec::size();
  Vec a[NT][kQ];
  for (int t = 0; t < NT; ++t)
    for (int64_t i = 0; i < kQ; ++i) a[t][i] = Vec(0.f);
  const float* vcol = vsrc + t0 * W;
  for (int64_t l = 0; l < L; ++l) {
    Vec vv[NT];
    for (int t = 0; t < NT; ++t)
      vv[t] = rem == W ? Vec::loadu(vcol + l * vstride + t * W) : Vec::loadu(vcol + l * vstride + t * W, rem);
#pragma GCC unroll 8
    for (int64_t i = 0; i < kQ; ++i) {
      const Vec pb(s[i * Lp + l]);
      for (int t = 0; t < NT; ++t) a[t][i] = at::vec::fmadd(pb, vv[t], a[t][i]);
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int64_t i = 0; i < kQ; ++i) (a[t][i] * Vec(inv_sum[i])).store(acc + i * Dp + (t0 + t) * W);
}

template <typename T>
void run(const CrossAttnParams& p, int64_t begin, int64_t end) {
  constexpr int64_t W = Vec::size();
  const int64_t D = p.D, L = p.L, H = p.H, N = p.N;
  const int64_t Lp = round_up(L, W), Dp = round_up(D, W);
  const int64_t nv_l = Lp / W;
  const bool v_rows = D >= W;  // V layout: [L][Dp] (axpy over D) or Vt[D][Lp] (dot over L)
  const int64_t nblocks = (N + p.block_n - 1) / p.block_n;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);

  std::vector<float> kt(D * Lp), vb(v_rows ? L * Dp : D * Lp), qf(kQ * D), s(kQ * Lp), acc(kQ * Dp);
  int64_t packed_r = -1, packed_h = -1;

  for (int64_t item = begin; item < end; ++item) {
    const int64_t nb = item % nblocks, bh = item / nblocks;
    const int64_t h = bh % H, b = bh / H;
    const int64_t r = p.row[b];

    // fp32 V in the [L][D] row layout is read in place from the table (no copy); otherwise packed.
    const bool v_in_place = v_rows && std::is_same_v<T, float>;
    if (r != packed_r || h != packed_h) {  // pack K^T (and V) of (row r, head h) as fp32
      for (int64_t j = 0; j < D; ++j)  // padding keys: zero (their scores are masked anyway)
        std::fill(kt.begin() + j * Lp + L, kt.begin() + (j + 1) * Lp, 0.f);
      if (!v_rows) std::fill(vb.begin(), vb.end(), 0.f);
      for (int64_t l = 0; l < L; ++l) {
        const T* kl = k + r * p.k_sr + l * p.k_sl + h * D;
        const T* vl = v + r * p.v_sr + l * p.v_sl + h * D;
        for (int64_t j = 0; j < D; ++j) kt[j * Lp + l] = to_float(kl[j]);
        if (v_in_place) continue;
        if (v_rows) {
          for (int64_t j = 0; j < D; ++j) vb[l * Dp + j] = to_float(vl[j]);
          for (int64_t j = D; j < Dp; ++j) vb[l * Dp + j] = 0.f;
        } else {
          for (int64_t j = 0; j < D; ++j) vb[j * Lp + l] = to_float(vl[j]);
        }
      }
      packed_r = r;
      packed_h = h;
    }
    const float* vsrc = v_in_place ? reinterpret_cast<const float*>(v) + r * p.v_sr + h * D : vb.data();
    const int64_t vstride = v_in_place ? p.v_sl : Dp;

    const int64_t n_begin = nb * p.block_n, n_end = std::min(N, n_begin + p.block_n);
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kQ) {
      const int64_t nq = std::min(kQ, n_end - n0);  // tail: lanes >= nq repeat the last query
      for (int64_t i = 0; i < kQ; ++i) {
        const T* qn = q + b * p.q_sb + (n0 + std::min(i, nq - 1)) * p.q_sn + h * D;
        for (int64_t j = 0; j < D; ++j) qf[i * D + j] = to_float(qn[j]) * p.scale;
      }

      // Scores: s_i[l] = sum_j qf_i[j] * Kt[j][l].
      int64_t t = 0;
      for (; t + kNT <= nv_l; t += kNT) score_block<kNT>(kt.data(), Lp, D, qf.data(), s.data(), t);
      for (; t < nv_l; ++t) score_block<1>(kt.data(), Lp, D, qf.data(), s.data(), t);

      // Softmax numerators p = exp(s - max) (padding keys -> -inf -> 0) and their sums.
      float inv_sum[kQ];
      for (int64_t i = 0; i < kQ; ++i) {
        float* si = s.data() + i * Lp;
        for (int64_t l = L; l < Lp; ++l) si[l] = -std::numeric_limits<float>::infinity();
        Vec m = Vec::loadu(si);
        for (int64_t t = 1; t < nv_l; ++t) m = at::vec::maximum(m, Vec::loadu(si + t * W));
        const float mx = at::vec::vec_reduce_all<float>(
            [](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, m);
        Vec sum(0.f);
        const Vec vmx(mx);
        for (int64_t t = 0; t < nv_l; ++t) {
          const Vec e = (Vec::loadu(si + t * W) - vmx).exp();
          e.store(si + t * W);
          sum = sum + e;
        }
        inv_sum[i] = 1.f / at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, sum);
      }

      // out_i = (p_i @ V) / sum_i.
      if (v_rows) {
        const int64_t full = D / W;  // channel vectors with all W lanes; then at most one partial
        int64_t t = 0;
        for (; t + kNT <= full; t += kNT)
          pv_block<kNT>(vsrc, vstride, L, s.data(), Lp, inv_sum, acc.data(), Dp, t, W);
        for (; t < Dp / W; ++t)
          pv_block<1>(vsrc, vstride, L, s.data(), Lp, inv_sum, acc.data(), Dp, t, std::min<int64_t>(W, D - t * W));
      } else {
        for (int64_t j = 0; j < D; ++j) {
          const float* vrow = vb.data() + j * Lp;
          for (int64_t i = 0; i < kQ; ++i) {
            Vec a(0.f);
            for (int64_t t = 0; t < nv_l; ++t)
              a = at::vec::fmadd(Vec::loadu(s.data() + i * Lp + t * W), Vec::loadu(vrow + t * W), a);
            acc[i * Dp + j] = inv_sum[i] *
                at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, a);
          }
        }
      }

      for (int64_t i = 0; i < nq; ++i) {
        T* on = out + b * p.o_sb + (n0 + i) * p.o_sn + h * D;
        for (int64_t j = 0; j < D; ++j) on[j] = static_cast<T>(acc[i * Dp + j]);
      }
    }
  }
}

void cross_attention_range(const CrossAttnParams& p, int64_t begin, int64_t end) {
  if (p.dtype == kBFloat16) run<c10::BFloat16>(p, begin, end);
  else run<float>(p, begin, end);
}

}  // namespace neti_fast::cpu::CPU_CAPABILITY
