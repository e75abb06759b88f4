// neti_fast._C: registers torch.ops.neti_fast.cross_attention_native (no Python.h; the library is
// loaded with torch.ops.load_library by neti_fast/sd/native.py, which also registers the op's fake
// implementation for torch.compile / torch.export).
//
// Why a new op name rather than another kernel of `neti_fast::cross_attention`: that op is a Python
// torch.library.custom_op whose implementation is the Triton launcher (kernels/cross_attention.py).
// Registering C++ kernels under the same name would make its behaviour depend on import order, and
// a Python custom_op and a C++ schema cannot both define it.  So the extension adds its own op to
// the same namespace with TORCH_LIBRARY_FRAGMENT (the namespace already has a Python fragment;
// only one TORCH_LIBRARY block may exist per namespace) and the dispatcher picks one of the two.

#include "cross_attention.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <cstdlib>
#include <mutex>
#include <string>

namespace neti_fast {
namespace {

enum class Isa { DEFAULT, AVX2, AVX512 };

// The ISA of the kernel variant to run: the best one this CPU has, capped by ATEN_CPU_CAPABILITY
// (the variable PyTorch's own kernels obey) so that one switch governs both.
Isa pick_isa() {
  Isa best = Isa::DEFAULT;
#if defined(__x86_64__) && defined(NETI_FAST_HAVE_X86_VARIANTS)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::AVX2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    best = Isa::AVX512;
#endif
  if (const char* cap = std::getenv("ATEN_CPU_CAPABILITY")) {
    const std::string c(cap);
    if (c == "default") best = Isa::DEFAULT;
    else if (c == "avx2" && best == Isa::AVX512) best = Isa::AVX2;
  }
  return best;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& row,
                  int64_t heads, bool cuda = false) {
  TORCH_CHECK(q.dim() == 3, "cross_attention_native: q must be [B, N, C], got ", q.sizes());
  TORCH_CHECK(k.dim() == 3, "cross_attention_native: k_table must be [R, L, C], got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "cross_attention_native: v_table ", v.sizes(), " != k_table ", k.sizes());
  TORCH_CHECK(row.dim() == 1 && row.size(0) == q.size(0),
              "cross_attention_native: row_idx must be [B=", q.size(0), "], got ", row.sizes());
  TORCH_CHECK(k.size(2) == q.size(2), "cross_attention_native: channel mismatch: q C=", q.size(2),
              ", tables C=", k.size(2));
  TORCH_CHECK(heads > 0 && q.size(2) % heads == 0, "cross_attention_native: C=", q.size(2),
              " not divisible by heads=", heads);
  TORCH_CHECK(k.size(1) >= 1 && k.size(1) <= INT32_MAX, "cross_attention_native: L=", k.size(1),
              " keys, supported 1..", INT32_MAX);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 ||
                  (cuda && q.scalar_type() == at::kHalf),
              "cross_attention_native: dtype ", q.scalar_type(), " unsupported (float32 or bfloat16",
              cuda ? " or float16)" : " on CPU)");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "cross_attention_native: dtype mismatch: q ", q.scalar_type(), ", k_table ", k.scalar_type(),
              ", v_table ", v.scalar_type());
  TORCH_CHECK(row.scalar_type() == at::kInt || row.scalar_type() == at::kLong,
              "cross_attention_native: row_idx must be int32 or int64, got ", row.scalar_type());
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device() && q.device() == row.device(),
              "cross_attention_native: all tensors must be on one device");
}

CrossAttnParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& row64, at::Tensor& out, int64_t heads, double scale) {
  CrossAttnParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.row = row64.data_ptr<int64_t>();
  p.out = out.data_ptr();
  p.B = q.size(0); p.N = q.size(1); p.C = q.size(2); p.L = k.size(1);
  p.H = heads; p.D = p.C / heads;
  p.q_sb = q.stride(0); p.q_sn = q.stride(1);
  p.k_sr = k.stride(0); p.k_sl = k.stride(1);
  p.v_sr = v.stride(0); p.v_sl = v.stride(1);
  p.o_sb = out.stride(0); p.o_sn = out.stride(1);
  p.scale = static_cast<float>(scale);
  p.dtype = q.scalar_type() == at::kBFloat16 ? kBFloat16 : q.scalar_type() == at::kHalf ? kFloat16 : kFloat32;
  return p;
}

// Last dim contiguous is all the kernels need; anything else is copied once.
at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

at::Tensor cross_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                               const at::Tensor& row_idx, int64_t heads, double scale) {
  check_inputs(q_in, k_in, v_in, row_idx, heads);
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const at::Tensor row64 = row_idx.to(at::kLong).contiguous();
  const int64_t R = k.size(0);
  const int64_t* rp = row64.data_ptr<int64_t>();
  for (int64_t b = 0; b < row64.size(0); ++b)
    TORCH_CHECK(rp[b] >= 0 && rp[b] < R, "cross_attention_native: row_idx[", b, "]=", rp[b],
                " out of range for a table of ", R, " rows");
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) return out;
  CrossAttnParams p = make_params(q, k, v, row64, out, heads, scale);
  // 32 queries per item: enough work to amortize packing K / V (L*D) against 2*32*L*D FMAs, and
  // still B*H*ceil(N/32) items to spread over threads (SD 1.5's smallest level: 2*8*2 = 32).
  p.block_n = 32;
  const int64_t items = p.B * p.H * ((p.N + p.block_n - 1) / p.block_n);
  static const Isa isa = pick_isa();
  auto fn = cpu::DEFAULT::cross_attention_range;
#if defined(NETI_FAST_HAVE_X86_VARIANTS)
  if (isa == Isa::AVX512) fn = cpu::AVX512::cross_attention_range;
  else if (isa == Isa::AVX2) fn = cpu::AVX2::cross_attention_range;
#endif
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) { fn(p, begin, end); });
  return out;
}

// ---- CUDA: the kernels live in libneti_fast_cuda.so (built by nvcc, linked to the static CUDA
// runtime, no torch headers), loaded on first use from the directory of this library.  _C itself
// never links CUDA, so the same _C works with CPU-only and CUDA builds of torch.
using CudaLaunch = int (*)(const CrossAttnParams*, void*);
using CudaErrStr = const char* (*)(int);

struct CudaLib {
  CudaLaunch launch = nullptr;
  CudaErrStr err = nullptr;
  std::string why;
};

const CudaLib& cuda_lib() {
  static CudaLib lib;
  static std::once_flag once;
  std::call_once(once, [] {
    Dl_info info;
    if (!dladdr(reinterpret_cast<void*>(&cuda_lib), &info) || !info.dli_fname) {
      lib.why = "cannot locate _C's own path";
      return;
    }
    std::string dir(info.dli_fname);
    dir = dir.substr(0, dir.find_last_of('/') + 1);
    const std::string path = dir + "libneti_fast_cuda.so";
    void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      lib.why = std::string("cannot load ") + path + ": " + dlerror() +
                " (built only where nvcc was found at install time)";
      return;
    }
    lib.launch = reinterpret_cast<CudaLaunch>(dlsym(h, "neti_fast_cross_attention_cuda"));
    lib.err = reinterpret_cast<CudaErrStr>(dlsym(h, "neti_fast_cuda_error_string"));
    if (!lib.launch || !lib.err) lib.why = path + " lacks the launcher symbols";
  });
  return lib;
}

at::Tensor cross_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                const at::Tensor& row_idx, int64_t heads, double scale) {
  check_inputs(q_in, k_in, v_in, row_idx, heads, /*cuda=*/true);
  TORCH_CHECK(q_in.size(2) / heads <= 256, "cross_attention_native (CUDA): head_dim ", q_in.size(2) / heads,
              " > 256");
  const CudaLib& lib = cuda_lib();
  TORCH_CHECK(lib.launch, "cross_attention_native: CUDA kernels unavailable: ", lib.why);
  const c10::DeviceGuard guard(q_in.device());
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const at::Tensor row64 = row_idx.to(at::kLong).contiguous();  // not bounds-checked on device
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) return out;
  CrossAttnParams p = make_params(q, k, v, row64, out, heads, scale);
  p.block_n = 64;
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  void* stream = impl.getStream(q.device()).native_handle();
  const int rc = lib.launch(&p, stream);
  TORCH_CHECK(rc == 0, "cross_attention_native (CUDA) launch failed: ", lib.err(rc));
  return out;
}

}  // namespace
}  // namespace neti_fast

TORCH_LIBRARY_FRAGMENT(neti_fast, m) {
  // The fake (meta) implementation is registered in Python: neti_fast/sd/native.py.
  m.set_python_module("neti_fast.sd.native");
  m.def("cross_attention_native(Tensor q, Tensor k_table, Tensor v_table, Tensor row_idx, int heads, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(neti_fast, CPU, m) { m.impl("cross_attention_native", &neti_fast::cross_attention_cpu); }

TORCH_LIBRARY_IMPL(neti_fast, CUDA, m) { m.impl("cross_attention_native", &neti_fast::cross_attention_cuda); }
