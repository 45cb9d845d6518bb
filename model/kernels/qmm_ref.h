// The scalar reference arithmetic, included by every ISA's file (internal linkage: each file's copy is
// compiled with that file's instruction set, so the linker never mixes them).
#pragma once
#include <cmath>
#include <cstring>

#include "qmm.h"

namespace homeswarm {
namespace {

inline float load_scale(const void* s, int stype, int64_t i) {
  if (stype == kFloat32) return static_cast<const float*>(s)[i];
  uint16_t h = static_cast<const uint16_t*>(s)[i];
  uint32_t bits;
  if (stype == kBFloat16) {
    bits = static_cast<uint32_t>(h) << 16;
  } else {  // float16
    uint32_t sign = (h >> 15) & 1u, exp = (h >> 10) & 31u, man = h & 1023u;
    if (exp == 0 && man == 0) {
      bits = sign << 31;
    } else if (exp == 0) {  // subnormal: normalise
      uint32_t e = 0;
      while (!(man & 1024u)) { man <<= 1; ++e; }
      bits = (sign << 31) | ((113u - e) << 23) | ((man & 1023u) << 13);
    } else if (exp == 31) {
      bits = (sign << 31) | (255u << 23) | (man << 13);
    } else {
      bits = (sign << 31) | ((exp + 112u) << 23) | (man << 13);
    }
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The block's scale and its rounding, the same in every ISA: d = amax / 127, q = round(x / d) (half to
// even, as the vector conversions round), so every path sees the same integers.
inline float block_scale(float amax, float* inv) {
  float d = amax / 127.0f;
  *inv = d > 0.0f ? 1.0f / d : 0.0f;
  return d;
}

inline void finish_block_sums(int32_t sum, float d, float* sl4) { *sl4 = d * static_cast<float>(sum) * 0.25f; }

// Row totals of block sums: c = sum_b 4 * sl4_b, in block order.
inline float row_total(const float* sl4, int64_t blocks) {
  float c = 0.0f;
  for (int64_t b = 0; b < blocks; ++b) c += 4.0f * sl4[b];
  return c;
}

// int8 weights: sum over inputs [k0, k1) (k0 on a block boundary) of w * x, x dequantized per block.
inline float int8_dot_ref(const int8_t* w, int64_t k0, int64_t k1, const int8_t* q, const float* d) {
  float acc = 0.0f;
  for (int64_t b0 = k0; b0 < k1; b0 += kBlock) {
    int32_t dot = 0;
    int64_t end = b0 + kBlock < k1 ? b0 + kBlock : k1;
    for (int64_t k = b0; k < end; ++k) dot += static_cast<int32_t>(w[k]) * q[k];
    acc += d[b0 / kBlock] * static_cast<float>(dot);
  }
  return acc;
}

// int4 weights: sum over inputs [k0, k1) (both on group boundaries) of ((v - 8) * s + z) * x.
inline float int4_dot_ref(const Int4Weights& w, int64_t k0, int64_t k1, const int8_t* q, const float* d,
                          const float* sl4) {
  float acc = 0.0f;
  for (int64_t g0 = k0; g0 < k1; g0 += w.group) {
    int64_t g = g0 / w.group;
    float s = load_scale(w.s, w.stype, g * w.Z);
    float z = w.Z == 2 ? load_scale(w.s, w.stype, g * w.Z + 1) : 0.0f;
    float part = 0.0f, sums = 0.0f;
    for (int64_t b0 = g0; b0 < g0 + w.group; b0 += kBlock) {
      int32_t dot = 0;
      for (int64_t k = b0; k < b0 + kBlock; ++k) {
        uint8_t byte = w.w[k >> 1];
        int32_t v = (k & 1) ? (byte >> 4) : (byte & 15);
        dot += v * q[k];
      }
      float sl = 4.0f * sl4[b0 / kBlock];
      part += d[b0 / kBlock] * static_cast<float>(dot) - 8.0f * sl;
      sums += sl;
    }
    acc += s * part + z * sums;
  }
  return acc;
}

}  // namespace
}  // namespace homeswarm
