// torch operators over the kernels: homeswarm::qmm (int8 and int4 products of a few rows, one weight or
// several experts' in one call) and homeswarm::best_isa. Threads: torch's pool (at::parallel_for), so
// torch.set_num_threads governs them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "qmm.h"

namespace homeswarm {

constexpr int64_t kAbiVersion = 1;  // the Python side refuses a library of another version

static int64_t best_isa() {
  __builtin_cpu_init();
  if (avx512_kernels() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vnni"))
    return 2;
  if (avx2_kernels() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
  return 0;
}

static const Kernels* kernels_for(int64_t isa) {
  TORCH_CHECK(isa >= 0 && isa <= best_isa(), "homeswarm::qmm: instruction set ", isa,
              " is not available on this CPU (best: ", best_isa(), ")");
  if (isa == 2) return avx512_kernels();
  if (isa == 1) return avx2_kernels();
  return scalar_kernels();
}

static int scale_type(const at::Tensor& s) {
  if (s.scalar_type() == at::kFloat) return kFloat32;
  if (s.scalar_type() == at::kBFloat16) return kBFloat16;
  TORCH_CHECK(s.scalar_type() == at::kHalf, "homeswarm::qmm: scales must be float32, bfloat16 or float16");
  return kFloat16;
}

// out[t] = x[row_index[t]] @ W_e.T for t in [offsets[e], offsets[e + 1]), every W_e [N, K]:
// group == 0: int8 weights [N, K] with scales [N]; else int4 (plain layout) [N, K / 2] with scales
// [N, K / group, Z]. x float32 [M, K]; the result float32 [T, N].
static at::Tensor qmm(const at::Tensor& x, at::TensorList weights, at::TensorList scales,
                      const at::Tensor& row_index, const at::Tensor& offsets, int64_t group, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "homeswarm::qmm: x must be a contiguous float32 CPU matrix");
  TORCH_CHECK(row_index.scalar_type() == at::kLong && row_index.dim() == 1 && row_index.is_contiguous());
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.is_contiguous());
  const int64_t E = static_cast<int64_t>(weights.size());
  TORCH_CHECK(E >= 1 && static_cast<int64_t>(scales.size()) == E && offsets.numel() == E + 1,
              "homeswarm::qmm: one scale tensor per weight and E + 1 offsets");
  const int64_t M = x.size(0), K = x.size(1), T = row_index.numel();
  const int64_t* ri = row_index.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[E] == T, "homeswarm::qmm: offsets must run from 0 to the rows listed");
  for (int64_t e = 0; e < E; ++e) TORCH_CHECK(off[e] <= off[e + 1], "homeswarm::qmm: offsets must not decrease");
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(ri[t] >= 0 && ri[t] < M, "homeswarm::qmm: row index out of range");
  const int64_t N = weights[0].size(0);
  const int Z = group ? static_cast<int>(scales[0].size(-1)) : 1;
  const int stype = scale_type(scales[0]);
  if (group) {
    TORCH_CHECK(group == 32 || group == 64 || group == 128, "homeswarm::qmm: int4 groups are 32, 64 or 128");
    TORCH_CHECK(K % group == 0, "homeswarm::qmm: int4 inputs (", K, ") must be a multiple of the group (", group, ")");
    TORCH_CHECK(Z == 1 || Z == 2, "homeswarm::qmm: int4 scales are [N, K / group, 1 or 2]");
  }
  std::vector<const void*> wp(E), sp(E);
  for (int64_t e = 0; e < E; ++e) {
    const at::Tensor& w = weights[e];
    const at::Tensor& s = scales[e];
    TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && s.is_contiguous() && w.dim() == 2 && w.size(0) == N,
                "homeswarm::qmm: weights must be contiguous CPU matrices of one shape");
    TORCH_CHECK(scale_type(s) == stype, "homeswarm::qmm: every weight's scales must have one dtype");
    if (group) {
      TORCH_CHECK(w.scalar_type() == at::kByte && w.size(1) * 2 == K, "homeswarm::qmm: int4 weights are uint8 [N, K / 2]");
      TORCH_CHECK(s.dim() == 3 && s.size(0) == N && s.size(1) == K / group && s.size(2) == Z,
                  "homeswarm::qmm: int4 scales must be [N, K / group, Z]");
    } else {
      TORCH_CHECK(w.scalar_type() == at::kChar && w.size(1) == K, "homeswarm::qmm: int8 weights are int8 [N, K]");
      TORCH_CHECK(s.numel() == N, "homeswarm::qmm: int8 scales are [N]");
    }
    wp[e] = w.data_ptr();
    sp[e] = s.data_ptr();
  }
  const Kernels* kern = kernels_for(isa);
  const int64_t Kp = (K + kChunk - 1) / kChunk * kChunk, blocks = Kp / kBlock;
  at::Tensor qbuf = at::empty({2, M, Kp}, x.options().dtype(at::kChar));
  at::Tensor fbuf = at::empty({2 * M * blocks + M}, x.options());
  int8_t* q = qbuf.data_ptr<int8_t>();
  float* f = fbuf.data_ptr<float>();
  QRows a;
  a.M = M;
  a.K = K;
  a.Kp = Kp;
  a.q = q;
  a.qp = q + M * Kp;
  a.d = f;
  a.sl4 = f + M * blocks;
  a.c = f + 2 * M * blocks;
  kern->quantize(x.data_ptr<float>(), M, K, Kp, q, q + M * Kp, f, f + M * blocks, f + 2 * M * blocks);

  at::Tensor out = at::empty({T, N}, x.options());
  float* o = out.data_ptr<float>();
  const int64_t row_bytes = group ? K / 2 : K;
  auto rows_of = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t e = i / N, n = i % N;
      const int count = static_cast<int>(off[e + 1] - off[e]);
      if (count == 0) continue;
      float* dst = o + off[e] * N + n;
      if (group) {
        Int4Weights w{static_cast<const uint8_t*>(wp[e]) + n * (K / 2),
                      static_cast<const char*>(sp[e]) + n * (K / group) * Z * (stype == kFloat32 ? 4 : 2), stype, Z,
                      group};
        kern->int4_row(w, K, a, ri + off[e], count, dst, N);
      } else {
        const void* s = sp[e];
        float scale = stype == kFloat32    ? static_cast<const float*>(s)[n]
                      : stype == kBFloat16 ? static_cast<float>(static_cast<const c10::BFloat16*>(s)[n])
                                           : static_cast<float>(static_cast<const c10::Half*>(s)[n]);
        kern->int8_row(static_cast<const int8_t*>(wp[e]) + n * K, K, scale, a, ri + off[e], count, dst, N);
      }
    }
  };
  // Rows are handed out in small batches from a shared counter rather than split evenly up front: a
  // thread that starts late (its core busy with other work) takes fewer, instead of the product
  // waiting for its whole share.
  const int64_t total = E * N;
  const int64_t step = std::max<int64_t>(1, (16 << 10) / std::max<int64_t>(1, row_bytes));
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (total + step - 1) / step);
  if (threads <= 1 || total * row_bytes < (256 << 10) || at::in_parallel_region()) {
    rows_of(0, total);
  } else {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      for (int64_t begin = next.fetch_add(step); begin < total; begin = next.fetch_add(step))
        rows_of(begin, std::min(total, begin + step));
    });
  }
  return out;
}

static int64_t abi_version() { return kAbiVersion; }

}  // namespace homeswarm

TORCH_LIBRARY(homeswarm, m) {
  m.def("qmm(Tensor x, Tensor[] weights, Tensor[] scales, Tensor row_index, Tensor offsets, int group, int isa) -> Tensor");
  m.def("best_isa() -> int", &homeswarm::best_isa);
  m.def("abi_version() -> int", &homeswarm::abi_version);
}

TORCH_LIBRARY_IMPL(homeswarm, CPU, m) { m.impl("qmm", &homeswarm::qmm); }
