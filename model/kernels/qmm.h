// Quantized matrix products for a few rows: the kernels' shared interface.
//
// Activations: each row quantized once to int8 in blocks of 32 inputs (scale d = max|x| / 127,
// q = round(x / d), half to even), padded with zeros to a multiple of 128 inputs. Kernels read weights
// row-major as they are stored:
// - int8: q int8 [N, K], one scale per output channel (read by the caller).
// - int4: uint8 [N, K / 2], byte j of a row holding input 2j in its low nibble and 2j + 1 in its high one
//   (the plain layout, which is also compressed-tensors' int32 words read as bytes); values v in 0..15;
//   per group of `group` inputs a scale s and, when Z == 2, a zero z, stored [N, K / group, Z] in
//   float32, bfloat16 or float16: w = (v - 8) * s + z.
// Every SIMD kernel has the scalar one beside it as its reference; all take the same quantized rows.
#pragma once
#include <cstdint>

namespace homeswarm {

constexpr int64_t kBlock = 32;   // inputs per activation block
constexpr int64_t kChunk = 128;  // activations are padded to a multiple of this

enum ScaleType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct QRows {
  int64_t M = 0, K = 0, Kp = 0;  // rows, inputs, inputs padded to kChunk
  const int8_t* q = nullptr;     // [M, Kp], natural order
  const int8_t* qp = nullptr;    // [M, Kp], the order the ISA's int4 kernel reads (may be q)
  const float* d = nullptr;      // [M, Kp / 32] block scales
  const float* sl4 = nullptr;    // [M, Kp / 32] d * sum(q of the block) / 4
  const float* c = nullptr;      // [M] sum over blocks of d * sum(q of the block)
};

struct Int4Weights {
  const uint8_t* w;  // one row: K / 2 bytes
  const void* s;     // one row: K / group * Z values
  int stype;         // ScaleType
  int Z;             // 1 (symmetric: z = 0) or 2
  int64_t group;     // 32, 64 or 128
};

// One ISA's kernels. `rows` lists `count` activation rows; out[i * ldo] receives row rows[i]'s dot.
struct Kernels {
  const char* name;
  // x [M, K] float32 -> QRows whose buffers are q, qp ([M, Kp] each), d, sl4 ([M, Kp/32] each), c [M]
  void (*quantize)(const float* x, int64_t M, int64_t K, int64_t Kp, int8_t* q, int8_t* qp, float* d,
                   float* sl4, float* c);
  void (*int8_row)(const int8_t* w, int64_t K, float scale, const QRows& a, const int64_t* rows, int count,
                   float* out, int64_t ldo);
  void (*int4_row)(const Int4Weights& w, int64_t K, const QRows& a, const int64_t* rows, int count,
                   float* out, int64_t ldo);
};

const Kernels* scalar_kernels();
const Kernels* avx2_kernels();    // nullptr where not compiled
const Kernels* avx512_kernels();  // nullptr where not compiled

}  // namespace homeswarm
