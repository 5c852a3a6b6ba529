// Per-query-row quantities both CUDA backward kernels (sm_80 and sm_90) compute before the tiles:
// Δ = rowsum(dO ∘ O) by one warp, and the forward's log-sum-exp in the exp2 domain.
#pragma once

#include "mma_sm80.cuh"  // kLog2e, kNegInf

namespace flashmlir {

// lse in the exp2 domain, and +inf for a row that attended to nothing (lse = -inf), so that its P is 0.
__device__ __forceinline__ float lse_log2(float lse) { return lse == kNegInf ? -kNegInf : lse * kLog2e; }

// Δ of the row of O and dO at `row_at` (its first element), in fp32, in every lane of the warp: each
// lane a strided share of the head dim, then a butterfly sum.
template <typename T, int kD>
__device__ __forceinline__ float warp_row_delta(const T* __restrict__ o, const T* __restrict__ d_o, int64_t row_at,
                                                int lane) {
  float sum = 0.f;
  for (int d = lane * 2; d < kD; d += 64) {
    const int64_t at = row_at + d;
    sum += static_cast<float>(o[at]) * static_cast<float>(d_o[at]) +
           static_cast<float>(o[at + 1]) * static_cast<float>(d_o[at + 1]);
  }
#pragma unroll
  for (int m = 16; m >= 1; m /= 2) sum += __shfl_xor_sync(0xffffffff, sum, m);
  return sum;
}

}  // namespace flashmlir
