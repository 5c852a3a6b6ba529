// Attention dropout in the CPU kernels: dropout.cuh's function (attention_op.dropout_keep), with
// 32-bit integer lanes. An element (b·H + h, row, key) is kept when 16 bits of the mixed
//   x = (((b·H + h)·Sq + (row & ~8))·Sk + key) · 0x9E3779B1 + seed   (mod 2³²)
// — the low half for rows with bit 3 clear, the high half for the others — reach ⌈p · 2¹⁶⌉. (The
// GPU kernels hold rows r and r + 8 in one thread and hash once for both; here each lane hashes
// its own.) The kernels keep ℓ and lse of the undropped P and fold 1 / (1 − p) into O's and dV's
// final scale and into dP where dS needs it.
#ifndef FLASHMLIR_CPU_DROPOUT_H_
#define FLASHMLIR_CPU_DROPOUT_H_

#include <stdint.h>

#include "cpu_simd.h"

#if defined(__AVX512F__)
typedef __m512i vu;
FLASHMLIR_INLINE vu vu_set1(uint32_t x) { return _mm512_set1_epi32((int)x); }
FLASHMLIR_INLINE vu vu_add(vu a, vu b) { return _mm512_add_epi32(a, b); }
FLASHMLIR_INLINE vu vu_mul(vu a, vu b) { return _mm512_mullo_epi32(a, b); }
FLASHMLIR_INLINE vu vu_xor_shift16(vu x) { return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16)); }
FLASHMLIR_INLINE vmask vu_ge(vu a, vu b) { return _mm512_cmpge_epu32_mask(a, b); }
FLASHMLIR_INLINE vu vu_and(vu a, vu b) { return _mm512_and_si512(a, b); }
FLASHMLIR_INLINE vu vu_srlv(vu a, vu n) { return _mm512_srlv_epi32(a, n); }
FLASHMLIR_INLINE vu vu_lanes(void) { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
#else
typedef __m256i vu;
FLASHMLIR_INLINE vu vu_set1(uint32_t x) { return _mm256_set1_epi32((int)x); }
FLASHMLIR_INLINE vu vu_add(vu a, vu b) { return _mm256_add_epi32(a, b); }
FLASHMLIR_INLINE vu vu_mul(vu a, vu b) { return _mm256_mullo_epi32(a, b); }
FLASHMLIR_INLINE vu vu_xor_shift16(vu x) { return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16)); }
FLASHMLIR_INLINE vmask vu_ge(vu a, vu b) {  // unsigned: a ≥ b where max(a, b) = a
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_max_epu32(a, b), a));
}
FLASHMLIR_INLINE vu vu_lanes(void) { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
FLASHMLIR_INLINE vu vu_and(vu a, vu b) { return _mm256_and_si256(a, b); }
FLASHMLIR_INLINE vu vu_srlv(vu a, vu n) { return _mm256_srlv_epi32(a, n); }
#endif

enum { kDropoutGolden = 0x9E3779B1u, kDropoutMultiplier = 0x45D9F3Bu };

// What a call drops: `on` is 0 in the kernels without dropout, a constant after inlining, so their
// code has none of it.
typedef struct {
  int on;
  uint32_t seed;
  uint32_t threshold;  // ⌈p · 2¹⁶⌉
  float scale;         // 1 / (1 − p)
} Dropout;

FLASHMLIR_INLINE Dropout no_dropout(void) {
  const Dropout none = {0, 0, 0, 1.f};
  return none;
}

// The lanes kept, for x = index · golden + seed in each lane and `shift` 0 (the pair's first row)
// or 16 (its second).
FLASHMLIR_INLINE vmask dropout_kept(vu x, vu shift, Dropout d) {
  const vu m = vu_set1(kDropoutMultiplier);
  x = vu_mul(vu_xor_shift16(x), m);
  x = vu_mul(vu_xor_shift16(x), m);
  const vu bits = vu_and(vu_srlv(vu_xor_shift16(x), shift), vu_set1(0xFFFFu));
  return vu_ge(bits, vu_set1(d.threshold));
}

// index · golden for indices first + lane · step.
FLASHMLIR_INLINE vu dropout_lane_x(uint32_t first, uint32_t step) {
  return vu_mul(vu_add(vu_set1(first), vu_mul(vu_lanes(), vu_set1(step))), vu_set1(kDropoutGolden));
}

// For rows first, first + 1, … in the lanes: x at key 0 (index of the pair's first row, in a head
// whose row 0 has index `head_index`) and the lanes' shifts.
FLASHMLIR_INLINE void dropout_rows(size_t first, size_t head_index, size_t seq_k, Dropout d, vu* x, vu* shift) {
  const vu rows = vu_add(vu_set1((uint32_t)first), vu_lanes());
  const vu pair_first = vu_and(rows, vu_set1(~8u));
  const vu index = vu_add(vu_set1((uint32_t)head_index), vu_mul(pair_first, vu_set1((uint32_t)seq_k)));
  *x = vu_add(vu_mul(index, vu_set1(kDropoutGolden)), vu_set1(d.seed));
  *shift = vu_mul(vu_and(vu_srlv(rows, vu_set1(3)), vu_set1(1)), vu_set1(16));
}

#endif  // FLASHMLIR_CPU_DROPOUT_H_
