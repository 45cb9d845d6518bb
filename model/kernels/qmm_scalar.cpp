// The scalar kernels: the reference every SIMD path is tested against, and the path of CPUs without AVX2.
#include "qmm_ref.h"

namespace homeswarm {
namespace {

void quantize(const float* x, int64_t M, int64_t K, int64_t Kp, int8_t* q, int8_t* qp, float* d, float* sl4,
              float* c) {
  int64_t blocks = Kp / kBlock;
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    int8_t* qr = q + m * Kp;
    for (int64_t b = 0; b < blocks; ++b) {
      int64_t k0 = b * kBlock;
      float amax = 0.0f;
      for (int64_t k = k0; k < k0 + kBlock && k < K; ++k) amax = std::fmax(amax, std::fabs(xr[k]));
      float inv;
      float db = block_scale(amax, &inv);
      int32_t sum = 0;
      for (int64_t k = k0; k < k0 + kBlock; ++k) {
        int32_t v = k < K ? static_cast<int32_t>(std::nearbyint(xr[k] * inv)) : 0;
        qr[k] = static_cast<int8_t>(v);
        sum += v;
      }
      d[m * blocks + b] = db;
      finish_block_sums(sum, db, &sl4[m * blocks + b]);
    }
    std::memcpy(qp + m * Kp, qr, Kp);
    c[m] = row_total(sl4 + m * blocks, blocks);
  }
}

void int8_row(const int8_t* w, int64_t K, float scale, const QRows& a, const int64_t* rows, int count, float* out,
              int64_t ldo) {
  int64_t blocks = a.Kp / kBlock;
  for (int i = 0; i < count; ++i) {
    int64_t r = rows[i];
    out[i * ldo] = scale * int8_dot_ref(w, 0, K, a.q + r * a.Kp, a.d + r * blocks);
  }
}

void int4_row(const Int4Weights& w, int64_t K, const QRows& a, const int64_t* rows, int count, float* out,
              int64_t ldo) {
  int64_t blocks = a.Kp / kBlock;
  for (int i = 0; i < count; ++i) {
    int64_t r = rows[i];
    out[i * ldo] = int4_dot_ref(w, 0, K, a.q + r * a.Kp, a.d + r * blocks, a.sl4 + r * blocks);
  }
}

const Kernels kScalar = {"scalar", quantize, int8_row, int4_row};

}  // namespace

const Kernels* scalar_kernels() { return &kScalar; }

}  // namespace homeswarm
