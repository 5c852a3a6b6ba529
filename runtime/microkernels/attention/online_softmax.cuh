// The online softmax's row statistics, shared by the CUDA forward kernels (sm_80 and sm_90).
//
// Scores live in the exp2 domain (scale · log2 e folded in). Each row keeps a running shift m and
// sum ℓ; a key tile's probabilities are P = exp2(s − m), and O and ℓ are multiplied by exp2(m_old − m)
// whenever m moves. m need not be the exact running maximum: O / ℓ and the log-sum-exp m + log2 ℓ
// come out the same for any m that both were computed with. So m moves only when a tile's maximum
// passes it by more than kMaxSlack; P then stays ≤ 2^kMaxSlack (256: exact range in fp16 and bf16,
// and fp32 sums of it cannot overflow at any sequence length we take), and O's rescale — a multiply
// per accumulator — is skipped for nearly every tile after the first few (FlashAttention-4's lazy
// rescaling).
#pragma once

#include "mma_sm80.cuh"  // kNegInf, fast_exp2

namespace flashmlir {

#ifndef FLASHMLIR_MAX_SLACK
#define FLASHMLIR_MAX_SLACK 8
#endif
constexpr float kMaxSlack = FLASHMLIR_MAX_SLACK;

// Reduce v[0..N) with `op` pairwise, as a tree (N a power of two, or any N: the odd one waits):
// more independent instructions in flight than a chain.
template <int N, typename Op>
__device__ __forceinline__ float tree_reduce(float (&v)[N], Op op) {
#pragma unroll
  for (int width = 1; width < N; width *= 2)
#pragma unroll
    for (int i = 0; i + width < N; i += 2 * width) v[i] = op(v[i], v[i + width]);
  return v[0];
}

// Advance one row's shift past a tile whose largest score is `tile_max` (exp2 domain, -inf when
// the tile is masked for the row). `shift` is what the tile's P subtracts; `rescale` what O and ℓ
// are multiplied by: exactly 1 when the shift holds, and 1 while the row has seen no key (O and ℓ
// are still 0), so that a warp can skip the multiplies when all its factors are 1. A row that never
// sees a key keeps shift 0, m = -inf and ℓ = 0.
__device__ __forceinline__ void advance_shift(float& row_max, float tile_max, float& shift, float& rescale) {
  const float new_max = tile_max > row_max + kMaxSlack ? tile_max : row_max;
  shift = new_max == kNegInf ? 0.f : new_max;
  rescale = row_max == kNegInf ? 1.f : fast_exp2(row_max - shift);
  row_max = new_max;
}

}  // namespace flashmlir
