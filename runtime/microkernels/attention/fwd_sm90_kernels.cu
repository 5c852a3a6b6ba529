// Entry points of the sm_90a forward kernel for one (element type, head dim), in IREE's CUDA ABI
// (the same as the sm_80 kernel's: bindings as device pointers, then 32-bit push constants).
// The build compiles this file once per catalog entry:
//
//   nvcc --fatbin -gencode arch=compute_90a,code=sm_90a -DFLASHMLIR_ELEMENT=half -DFLASHMLIR_HEAD_DIM=128 ...
//
// exports  flashmlir_attention_fwd_sm90_<f16|bf16>_d<D>      (q, k, v, o, constants)
//          flashmlir_attention_fwd_sm90_<f16|bf16>_d<D>_lse  (q, k, v, o, lse, constants)
//          flashmlir_attention_fwd_sm90_<f16|bf16>_d<D>_lse_dropout
//                                                       (q, k, v, seed, o, lse, constants, threshold, keep scale)
// constants group (Hq / Hkv), seq_q, seq_k, scale (f32 bits), causal (0 or 1), batch_heads
//           (B·Hq: every CUDA kernel takes it; the persistent sm_90 one reads it, its grid has no heads)
// The dropout entry (the training forward on the torch path; dropout.cuh) also reads an int64 seed
// from device memory and takes ⌈p · 2¹⁶⌉ and 1 / (1 − p) (f32 bits) after the constants.
#include "fwd_sm90_wgmma.cuh"
#include "kernel_entry.cuh"

#ifndef FLASHMLIR_BLOCK_N
#define FLASHMLIR_BLOCK_N 128
#endif
#ifndef FLASHMLIR_STAGES
#define FLASHMLIR_STAGES 2
#endif
#ifndef FLASHMLIR_PINGPONG
#define FLASHMLIR_PINGPONG 0
#endif
#ifndef FLASHMLIR_BLOCK_M
#define FLASHMLIR_BLOCK_M 128
#endif

#define FLASHMLIR_KERNEL FLASHMLIR_KERNEL_NAME(sm90)
#define FLASHMLIR_KERNEL_LSE FLASHMLIR_KERNEL_NAME_LSE(sm90)

namespace {
using Element = FLASHMLIR_ELEMENT;
constexpr int kHeadDim = FLASHMLIR_HEAD_DIM;
constexpr int kBlockN = FLASHMLIR_BLOCK_N;
constexpr int kStages = FLASHMLIR_STAGES;
constexpr bool kPingPong = FLASHMLIR_PINGPONG != 0;
constexpr int kConsumers = FLASHMLIR_BLOCK_M / 64;  // a consumer warpgroup per 64 query rows
using Config = flashmlir::sm90::Sm90Config<Element, kHeadDim, kBlockN, kStages, kConsumers>;
}  // namespace

// The catalog's tile fields (what the passes compute grids and shared memory from) must be the tiles
// this code has.
static_assert(FLASHMLIR_BLOCK_M == Config::kBlockM, "block_m must be 64 per consumer warpgroup");
#ifdef FLASHMLIR_WARPS
static_assert(FLASHMLIR_WARPS * 32 == Config::kThreads, "kernels.json's warps differ from Sm90Config's threads");
#endif

// With TMA (FLASHMLIR_TMA, catalog `tma`) the last binding is a workspace of 384 bytes a block (512
// with tma_store) and 128 more where each block makes its tensor maps (kernel_entry.cuh).

extern "C" __global__ void __launch_bounds__(Config::kThreads, Config::kBlocksPerSm)
    FLASHMLIR_KERNEL(const Element* __restrict__ q, const Element* __restrict__ k, const Element* __restrict__ v,
                     Element* __restrict__ o FLASHMLIR_MAPS_PARAMETER, uint32_t group, uint32_t seq_q,
                     uint32_t seq_k, uint32_t scale_bits, uint32_t causal, uint32_t batch_heads) {
  flashmlir::sm90::attention_fwd_sm90<Element, kHeadDim, kBlockN, kStages, kPingPong, kConsumers>(
      q, k, v, o, nullptr, FLASHMLIR_MAPS, group, batch_heads, seq_q, seq_k, __uint_as_float(scale_bits),
      causal != 0);
}

extern "C" __global__ void __launch_bounds__(Config::kThreads, Config::kBlocksPerSm)
    FLASHMLIR_KERNEL_LSE(const Element* __restrict__ q, const Element* __restrict__ k, const Element* __restrict__ v,
                         Element* __restrict__ o, float* __restrict__ lse FLASHMLIR_MAPS_PARAMETER, uint32_t group,
                         uint32_t seq_q, uint32_t seq_k, uint32_t scale_bits, uint32_t causal,
                         uint32_t batch_heads) {
  flashmlir::sm90::attention_fwd_sm90<Element, kHeadDim, kBlockN, kStages, kPingPong, kConsumers>(
      q, k, v, o, lse, FLASHMLIR_MAPS, group, batch_heads, seq_q, seq_k, __uint_as_float(scale_bits), causal != 0);
}

extern "C" __global__ void __launch_bounds__(Config::kThreads, Config::kBlocksPerSm)
    FLASHMLIR_CAT(FLASHMLIR_KERNEL_LSE, _dropout, , )(
        const Element* __restrict__ q, const Element* __restrict__ k, const Element* __restrict__ v,
        const int64_t* __restrict__ seed, Element* __restrict__ o, float* __restrict__ lse FLASHMLIR_MAPS_PARAMETER,
        uint32_t group, uint32_t seq_q, uint32_t seq_k, uint32_t scale_bits, uint32_t causal, uint32_t batch_heads,
        uint32_t dropout_threshold, uint32_t dropout_scale_bits) {
  flashmlir::sm90::attention_fwd_sm90<Element, kHeadDim, kBlockN, kStages, kPingPong, kConsumers, true>(
      q, k, v, o, lse, FLASHMLIR_MAPS, group, batch_heads, seq_q, seq_k, __uint_as_float(scale_bits), causal != 0,
      flashmlir::Dropout{seed, dropout_threshold, __uint_as_float(dropout_scale_bits)});
}
