// Attention dropout inside the kernels: which probabilities are kept, as a pure function of a seed
// and the element's place, so that the backward regenerates the forward's mask instead of storing
// it (S×S bits). The function is `flashmlir.frontend.attention_op.dropout_keep`, bit for bit:
//
//   x = (index · 0x9E3779B1 + seed) mod 2³², index = ((b·H + h)·Sq + query)·Sk + key
//   x = ((x >> 16) ^ x) · 0x45D9F3B, twice (mod 2³²), then x = (x >> 16) ^ x
//   kept ⇔ x ≥ ⌈p · 2³²⌉ (the `threshold` the launch passes; x / 2³² ≥ p in the reference)
//
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

// What a launch passes for dropout: the seed is read on the device (it is a tensor the graph drew,
// and reading it on the host would wait for the GPU); threshold and the kept values' scale are
// constants.
struct Dropout {
  const int64_t* seed;
  uint32_t threshold;
  float scale;  // 1 / (1 − p)
};

}  // namespace flashmlir
