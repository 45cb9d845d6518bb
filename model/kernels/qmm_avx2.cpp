// AVX2 kernels (with FMA and F16C): 32 weight bytes a step, u8 x s8 multiply-adds (vpmaddubsw, then
// vpmaddwd into 32-bit lanes). int8: |w| times x with w's sign, one 32-input block a step; int4: the low
// and high nibbles of 32 bytes against the even and odd inputs of a 64-input chunk, each 32-bit lane
// then holding 8 consecutive inputs of one block and one group.
#include <immintrin.h>

#include <array>

#include "qmm_ref.h"

namespace homeswarm {
namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 int32 -> 8 int8 (values within -127..127)
inline int64_t narrow(__m256i v) {
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  return _mm_cvtsi128_si64(_mm_packs_epi16(w, w));
}

void quantize(const float* x, int64_t M, int64_t K, int64_t Kp, int8_t* q, int8_t* qp, float* d, float* sl4,
              float* c) {
  const int64_t blocks = Kp / kBlock;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    int8_t* qr = q + m * Kp;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t k0 = b * kBlock;
      alignas(32) float buf[kBlock];
      const float* src = xr + k0;
      if (k0 + kBlock > K) {  // the last, short block: zeros past K
        for (int64_t k = 0; k < kBlock; ++k) buf[k] = k0 + k < K ? xr[k0 + k] : 0.0f;
        src = buf;
      }
      __m256 v[4];
      __m256 mx = _mm256_setzero_ps();
      for (int j = 0; j < 4; ++j) {
        v[j] = _mm256_loadu_ps(src + 8 * j);
        mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[j]));
      }
      float inv;
      const float db = block_scale(hmax(mx), &inv);
      const __m256 vi = _mm256_set1_ps(inv);
      __m256i sum = _mm256_setzero_si256();
      for (int j = 0; j < 4; ++j) {
        const __m256i iv = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], vi));
        sum = _mm256_add_epi32(sum, iv);
        const int64_t bytes = narrow(iv);
        std::memcpy(qr + k0 + 8 * j, &bytes, 8);
      }
      d[m * blocks + b] = db;
      finish_block_sums(hsum_epi32(sum), db, &sl4[m * blocks + b]);
    }
    int8_t* pr = qp + m * Kp;
    const __m256i low = _mm256_set1_epi16(0xFF);
    for (int64_t k = 0; k < Kp; k += 64) {  // evens, then odds, of each 64-input chunk
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr + k));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr + k + 32));
      const __m256i ev = _mm256_packus_epi16(_mm256_and_si256(v0, low), _mm256_and_si256(v1, low));
      const __m256i od = _mm256_packus_epi16(_mm256_srli_epi16(v0, 8), _mm256_srli_epi16(v1, 8));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + k), _mm256_permute4x64_epi64(ev, 0xD8));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + k + 32), _mm256_permute4x64_epi64(od, 0xD8));
    }
    c[m] = row_total(sl4 + m * blocks, blocks);
  }
}

template <int R>
void int8_rows(const int8_t* w, int64_t K, const QRows& a, const int64_t* rows, float* res) {
  const int64_t blocks = a.Kp / kBlock, chunks = K / kBlock;
  const int8_t* qr[R];
  const float* dr[R];
  __m256 acc[R];
  for (int r = 0; r < R; ++r) {
    qr[r] = a.q + rows[r] * a.Kp;
    dr[r] = a.d + rows[r] * blocks;
    acc[r] = _mm256_setzero_ps();
  }
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t c = 0; c < chunks; ++c) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kBlock * c));
    const __m256i aw = _mm256_abs_epi8(wv);
    for (int r = 0; r < R; ++r) {
      const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr[r] + kBlock * c));
      const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(av, wv)), ones);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(dr[r] + c), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) res[r] = hsum(acc[r]) + int8_dot_ref(w, kBlock * chunks, K, qr[r], dr[r]);
}

void int8_row(const int8_t* w, int64_t K, float scale, const QRows& a, const int64_t* rows, int count, float* out,
              int64_t ldo) {
  float res[4];
  for (int i = 0; i < count; i += 4) {
    const int n = count - i < 4 ? count - i : 4;
    switch (n) {
      case 1: int8_rows<1>(w, K, a, rows + i, res); break;
      case 2: int8_rows<2>(w, K, a, rows + i, res); break;
      case 3: int8_rows<3>(w, K, a, rows + i, res); break;
      default: int8_rows<4>(w, K, a, rows + i, res); break;
    }
    for (int j = 0; j < n; ++j) out[(i + j) * ldo] = scale * res[j];
  }
}

// 2 consecutive floats, spread so that lane i holds p[i / 4]
inline __m256 spread2(const float* p) {
  const __m256i idx = _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0);
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p)))), idx);
}

// The N scale values (N in 1, 2, 4) of a chunk as floats in the low lanes (loads of exactly N values:
// a wider load could run past the end of the last row).
template <int ST, int N>
inline __m256 load_scales(const void* s, int64_t start) {
  if constexpr (ST == kFloat32) {
    const float* f = static_cast<const float*>(s) + start;
    if constexpr (N == 1) return _mm256_castps128_ps256(_mm_load_ss(f));
    if constexpr (N == 2) return _mm256_castps128_ps256(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(f))));
    if constexpr (N == 4) return _mm256_castps128_ps256(_mm_loadu_ps(f));
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(s) + start;
    __m128i v;
    if constexpr (N == 1) v = _mm_cvtsi32_si128(h[0]);
    if constexpr (N == 2) { int32_t b; std::memcpy(&b, h, 4); v = _mm_cvtsi32_si128(b); }
    if constexpr (N == 4) v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(h));
    if constexpr (ST == kBFloat16) {
      return _mm256_castps128_ps256(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(v), 16)));
    } else {
      return _mm256_castps128_ps256(_mm_cvtph_ps(v));
    }
  }
}

// lane i -> Z * (8i / G) + O: where lane i's scale (O = 0) or zero (O = 1) is among a step's values
template <int Z, int G, int O>
struct Lanes {
  alignas(64) static constexpr std::array<int32_t, 8> v = [] {
    std::array<int32_t, 8> a{};
    for (int i = 0; i < 8; ++i) a[i] = Z * (8 * i / G) + O;
    return a;
  }();
};

template <int Z, int G, int O>
inline __m256i lane_groups() {
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(Lanes<Z, G, O>::v.data()));
}

template <int R, int ST, int Z, int G>
void int4_rows(const Int4Weights& w, int64_t K, const QRows& a, const int64_t* rows, float* res) {
  constexpr int kStep = 64;                                   // inputs a step
  constexpr int N = Z * (kStep >= G ? kStep / G : 1);         // scale values a step
  const int64_t blocks = a.Kp / kBlock, chunks = K / kStep;
  const __m256i idx_s = lane_groups<Z, G, 0>(), idx_z = lane_groups<Z, G, 1>();
  const int8_t* pr[R];
  const float* dr[R];
  const float* sr[R];
  __m256 acc[R], accz[R];
  for (int r = 0; r < R; ++r) {
    pr[r] = a.qp + rows[r] * a.Kp;
    dr[r] = a.d + rows[r] * blocks;
    sr[r] = a.sl4 + rows[r] * blocks;
    acc[r] = _mm256_setzero_ps();
    accz[r] = _mm256_setzero_ps();
  }
  const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  const __m256 eight = _mm256_set1_ps(8.0f);
  for (int64_t c = 0; c < chunks; ++c) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.w + 32 * c));
    const __m256i lo = _mm256_and_si256(wv, low);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low);
    const __m256 raw = load_scales<ST, N>(w.s, Z * (kStep * c / G));
    const __m256 sv = _mm256_permutevar8x32_ps(raw, idx_s);
    for (int r = 0; r < R; ++r) {
      const __m256i ae = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pr[r] + kStep * c));
      const __m256i ao = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pr[r] + kStep * c + 32));
      const __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, ae), _mm256_maddubs_epi16(hi, ao));
      const __m256i dot = _mm256_madd_epi16(p16, ones);
      const __m256 slv = spread2(sr[r] + 2 * c);
      const __m256 t = _mm256_fmsub_ps(_mm256_cvtepi32_ps(dot), spread2(dr[r] + 2 * c), _mm256_mul_ps(slv, eight));
      acc[r] = _mm256_fmadd_ps(t, sv, acc[r]);
      if constexpr (Z == 2) accz[r] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(raw, idx_z), slv, accz[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t row = rows[r];
    res[r] = hsum(_mm256_add_ps(acc[r], accz[r])) + int4_dot_ref(w, kStep * chunks, K, a.q + row * a.Kp, dr[r], sr[r]);
  }
}

template <int ST, int Z, int G>
void int4_any(const Int4Weights& w, int64_t K, const QRows& a, const int64_t* rows, int count, float* out,
              int64_t ldo) {
  float res[4];
  for (int i = 0; i < count; i += 4) {
    const int n = count - i < 4 ? count - i : 4;
    switch (n) {
      case 1: int4_rows<1, ST, Z, G>(w, K, a, rows + i, res); break;
      case 2: int4_rows<2, ST, Z, G>(w, K, a, rows + i, res); break;
      case 3: int4_rows<3, ST, Z, G>(w, K, a, rows + i, res); break;
      default: int4_rows<4, ST, Z, G>(w, K, a, rows + i, res); break;
    }
    for (int j = 0; j < n; ++j) out[(i + j) * ldo] = res[j];
  }
}

template <int ST, int Z>
void int4_group(const Int4Weights& w, int64_t K, const QRows& a, const int64_t* rows, int count, float* out,
                int64_t ldo) {
  if (w.group == 32) return int4_any<ST, Z, 32>(w, K, a, rows, count, out, ldo);
  if (w.group == 64) return int4_any<ST, Z, 64>(w, K, a, rows, count, out, ldo);
  return int4_any<ST, Z, 128>(w, K, a, rows, count, out, ldo);
}

template <int ST>
void int4_type(const Int4Weights& w, int64_t K, const QRows& a, const int64_t* rows, int count, float* out,
               int64_t ldo) {
  if (w.Z == 2) return int4_group<ST, 2>(w, K, a, rows, count, out, ldo);
  return int4_group<ST, 1>(w, K, a, rows, count, out, ldo);
}

void int4_row(const Int4Weights& w, int64_t K, const QRows& a, const int64_t* rows, int count, float* out,
              int64_t ldo) {
  if (w.stype == kFloat32) return int4_type<kFloat32>(w, K, a, rows, count, out, ldo);
  if (w.stype == kBFloat16) return int4_type<kBFloat16>(w, K, a, rows, count, out, ldo);
  return int4_type<kFloat16>(w, K, a, rows, count, out, ldo);
}

const Kernels kAvx2 = {"avx2", quantize, int8_row, int4_row};

}  // namespace

const Kernels* avx2_kernels() { return &kAvx2; }

}  // namespace homeswarm
