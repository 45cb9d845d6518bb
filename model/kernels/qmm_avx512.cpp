// AVX-512 kernels (F, BW, VL, DQ and VNNI): 64 weight bytes a step, integer multiply-adds by vpdpbusd.
// int8: |w| times x with w's sign (u8 x s8, exact); int4: the low and high nibbles of 64 bytes against
// the even and odd inputs of a 128-input chunk (the quantized rows are stored so), each 32-bit lane then
// holding 8 consecutive inputs of one block and one group.
#include <immintrin.h>

#include <array>

#include "qmm_ref.h"

namespace homeswarm {
namespace {

void quantize(const float* x, int64_t M, int64_t K, int64_t Kp, int8_t* q, int8_t* qp, float* d, float* sl4,
              float* c) {
  const int64_t blocks = Kp / kBlock;
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    int8_t* qr = q + m * Kp;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t k0 = b * kBlock;
      const int64_t n = K - k0 < 0 ? 0 : (K - k0 > kBlock ? kBlock : K - k0);
      const __mmask16 m0 = n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
      const __mmask16 m1 = n >= 32 ? 0xFFFF : (n > 16 ? static_cast<__mmask16>((1u << (n - 16)) - 1) : 0);
      const __m512 x0 = _mm512_maskz_loadu_ps(m0, xr + k0);
      const __m512 x1 = _mm512_maskz_loadu_ps(m1, xr + k0 + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
      float inv;
      const float db = block_scale(amax, &inv);
      const __m512 vi = _mm512_set1_ps(inv);
      const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, vi));
      const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, vi));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + k0), _mm512_cvtepi32_epi8(i0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + k0 + 16), _mm512_cvtepi32_epi8(i1));
      d[m * blocks + b] = db;
      finish_block_sums(_mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1)), db, &sl4[m * blocks + b]);
    }
    int8_t* pr = qp + m * Kp;
    for (int64_t k = 0; k < Kp; k += kChunk) {  // evens, then odds, of each 128-input chunk
      const __m512i v0 = _mm512_loadu_si512(qr + k), v1 = _mm512_loadu_si512(qr + k + 64);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + k), _mm512_cvtepi16_epi8(v0));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + k + 32), _mm512_cvtepi16_epi8(v1));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + k + 64), _mm512_cvtepi16_epi8(_mm512_srli_epi16(v0, 8)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + k + 96), _mm512_cvtepi16_epi8(_mm512_srli_epi16(v1, 8)));
    }
    c[m] = row_total(sl4 + m * blocks, blocks);
  }
}

// 2 (or 4) consecutive floats, spread so that lane i holds p[i / 8] (or p[i / 4])
inline __m512 spread2(const float* p) {
  const __m512i idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p)))));
}

inline __m512 spread4(const float* p) {
  const __m512i idx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_loadu_ps(p)));
}

template <int R>
void int8_rows(const int8_t* w, int64_t K, const QRows& a, const int64_t* rows, float* res) {
  const int64_t blocks = a.Kp / kBlock, chunks = K / 64;
  const int8_t* qr[R];
  const float* dr[R];
  __m512 acc[R];
  for (int r = 0; r < R; ++r) {
    qr[r] = a.q + rows[r] * a.Kp;
    dr[r] = a.d + rows[r] * blocks;
    acc[r] = _mm512_setzero_ps();
  }
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t c = 0; c < chunks; ++c) {
    const __m512i wv = _mm512_loadu_si512(w + 64 * c);
    const __m512i aw = _mm512_abs_epi8(wv);
    const __mmask64 neg = _mm512_movepi8_mask(wv);
    for (int r = 0; r < R; ++r) {
      __m512i av = _mm512_loadu_si512(qr[r] + 64 * c);
      av = _mm512_mask_sub_epi8(av, neg, zero, av);
      const __m512i dot = _mm512_dpbusd_epi32(zero, aw, av);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), spread2(dr[r] + 2 * c), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) res[r] = _mm512_reduce_add_ps(acc[r]) + int8_dot_ref(w, 64 * chunks, K, qr[r], dr[r]);
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

// The N scale values (N <= 8) of a chunk as floats in the low lanes.
template <int ST, int N>
inline __m512 load_scales(const void* s, int64_t start) {
  constexpr __mmask16 mask = static_cast<__mmask16>((1u << N) - 1);
  if constexpr (ST == kFloat32) {
    return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(s) + start);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(s) + start);
    if constexpr (ST == kBFloat16) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(h);
    }
  }
}

// lane i -> Z * (8i / G) + O: where lane i's scale (O = 0) or zero (O = 1) is among a step's values
template <int Z, int G, int O>
struct Lanes {
  alignas(64) static constexpr std::array<int32_t, 16> v = [] {
    std::array<int32_t, 16> a{};
    for (int i = 0; i < 16; ++i) a[i] = Z * (8 * i / G) + O;
    return a;
  }();
};

template <int Z, int G, int O>
inline __m512i lane_groups() {
  return _mm512_load_si512(Lanes<Z, G, O>::v.data());
}

template <int R, int ST, int Z, int G>
void int4_rows(const Int4Weights& w, int64_t K, const QRows& a, const int64_t* rows, float* res) {
  constexpr int N = Z * kChunk / G;  // scale values per chunk
  const int64_t blocks = a.Kp / kBlock, chunks = K / kChunk;
  // lane i holds inputs 8i..8i+7 of the chunk: group 8i / G of it (constants: no work per row)
  const __m512i idx_s = lane_groups<Z, G, 0>(), idx_z = lane_groups<Z, G, 1>();
  const int8_t* pr[R];
  const float* dr[R];
  const float* sr[R];
  __m512 acc[R], accz[R];
  for (int r = 0; r < R; ++r) {
    pr[r] = a.qp + rows[r] * a.Kp;
    dr[r] = a.d + rows[r] * blocks;
    sr[r] = a.sl4 + rows[r] * blocks;
    acc[r] = _mm512_setzero_ps();
    accz[r] = _mm512_setzero_ps();
  }
  const __m512i low = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
  const __m512 eight = _mm512_set1_ps(8.0f);
  for (int64_t c = 0; c < chunks; ++c) {
    const __m512i wv = _mm512_loadu_si512(w.w + 64 * c);
    const __m512i lo = _mm512_and_si512(wv, low);
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low);
    const __m512 raw = load_scales<ST, N>(w.s, c * N);
    const __m512 sv = _mm512_permutexvar_ps(idx_s, raw);
    for (int r = 0; r < R; ++r) {
      const __m512i ae = _mm512_loadu_si512(pr[r] + kChunk * c);
      const __m512i ao = _mm512_loadu_si512(pr[r] + kChunk * c + 64);
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, ae), hi, ao);
      const __m512 slv = spread4(sr[r] + 4 * c);
      const __m512 t = _mm512_fmsub_ps(_mm512_cvtepi32_ps(dot), spread4(dr[r] + 4 * c), _mm512_mul_ps(slv, eight));
      acc[r] = _mm512_fmadd_ps(t, sv, acc[r]);
      if constexpr (Z == 2) accz[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(idx_z, raw), slv, accz[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t row = rows[r];
    res[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], accz[r])) +
             int4_dot_ref(w, kChunk * chunks, K, a.q + row * a.Kp, dr[r], sr[r]);
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

const Kernels kAvx512 = {"avx512", quantize, int8_row, int4_row};

}  // namespace

const Kernels* avx512_kernels() { return &kAvx512; }

}  // namespace homeswarm
