// Attention dropout inside the kernels: which probabilities are kept, as a pure function of a seed
// and the element's place, so that the backward regenerates the forward's mask instead of storing
// it (S×S bits). The function is `flashmlir.frontend.attention_op.dropout_keep`, bit for bit:
//
//   x = (index · 0x9E3779B1 + seed) mod 2³², index = ((b·H + h)·Sq + r)·Sk + key
//   x = ((x >> 16) ^ x) · 0x45D9F3B, twice (mod 2³²), then x = (x >> 16) ^ x
//
// for r the first row of a pair (r, r + 8) in an aligned group of 16 rows: row r's probability
// takes x's low 16 bits, row r + 8's its high 16 bits, and is kept when they are ≥ ⌈p · 2¹⁶⌉ (the
// `threshold` the launch passes). Both kernels hold such a pair in one thread (the forward's
// accumulator rows lane / 4 and lane / 4 + 8 of a warp's 16; dkdv's query columns c and c + 8 of
// 16), so a hash serves two probabilities: it doubled the forward's key loop when each had its own.
// Only the index's low 32 bits matter, so unsigned 32-bit arithmetic wrapping is exact. Kept
// probabilities are scaled by 1 / (1 − p) — the kernels fold that into O's (and dV's) final scale
// where they can. The statistics (ℓ, lse) are those of the undropped softmax, as in PyTorch and
// FlashAttention-2: dropout applies to normalized probabilities.
#pragma once

#include <stdint.h>

namespace flashmlir {

constexpr uint32_t kDropoutGolden = 0x9E3779B1u;
constexpr uint32_t kDropoutMultiplier = 0x45D9F3Bu;

// The mixed value of x = index · golden + seed.
__device__ __forceinline__ uint32_t dropout_mix(uint32_t x) {
  x = ((x >> 16) ^ x) * kDropoutMultiplier;
  x = ((x >> 16) ^ x) * kDropoutMultiplier;
  return (x >> 16) ^ x;
}

// x of element `index` (its low 32 bits) for this seed.
__device__ __forceinline__ uint32_t dropout_start(uint32_t index, uint32_t seed) { return index * kDropoutGolden + seed; }

// Whether the pair's first row (low half of the mixed x) and its second (high half) are kept.
__device__ __forceinline__ bool dropout_keeps_low(uint32_t mixed, uint32_t threshold) {
  return (mixed & 0xFFFFu) >= threshold;
}
__device__ __forceinline__ bool dropout_keeps_high(uint32_t mixed, uint32_t threshold) {
  return (mixed >> 16) >= threshold;
}

// What a launch passes for dropout: the seed is read on the device (it is a tensor the graph drew,
// and reading it on the host would wait for the GPU); threshold and the kept values' scale are
// constants.
struct Dropout {
  const int64_t* seed;
  uint32_t threshold;  // ⌈p · 2¹⁶⌉
  float scale;         // 1 / (1 − p)
};

}  // namespace flashmlir
