// Entry points of the sm_90a backward kernels for one (element type, head dim), in IREE's CUDA ABI
// (bindings as device pointers in operand order, then results, then 32-bit push constants).
// flashmlir-dispatch-attention-training emits three hal.dispatch.extern ops, prep, dkdv (which adds
// into the accumulator prep zeroed: an operand tied to its result) and dq; the build compiles this
// file once per catalog entry:
//
//   nvcc --fatbin -gencode arch=compute_90a,code=sm_90a -DFLASHMLIR_ELEMENT=half -DFLASHMLIR_HEAD_DIM=128 ... bwd_sm90_kernels.cu
//
// exports  flashmlir_attention_bwd_sm90_<f16|bf16>_d<D>_prep  (o, do, lse, lse2, delta, dq_accum, constants)
//          flashmlir_attention_bwd_sm90_<f16|bf16>_d<D>_dkdv  (q, k, v, do, lse2, delta, dq_accum, dk, dv, constants)
//          flashmlir_attention_bwd_sm90_<f16|bf16>_d<D>_dq    (dq_accum, dq, constants)
//          flashmlir_attention_bwd_sm90_<f16|bf16>_d<D>_dkdv_dropout
//                                   (q, k, v, do, lse2, delta, seed, dq_accum, dk, dv, constants, threshold, keep scale)
// constants group (Hq / Hkv), seq_q, seq_k, scale (f32 bits), causal (0 or 1), batch_heads (B·Hq)
// lse is float32 [B·Hq, Sq]; lse2 and delta float32 [B·Hq, Sq padded to 64]; dq_accum float32,
// B·Hq · (Sq padded to 64) · D of them in 64 × 64 blocks (bwd_sm90_wgmma.cuh kDqBlock). Grids: prep and dq (⌈Sq / 64⌉, B·Hq) of 256 threads, dkdv
// (⌈Sk / 128⌉, B·Hkv) of 384 threads.
#include "bwd_sm90_wgmma.cuh"
#include "kernel_entry.cuh"

#ifndef FLASHMLIR_STAGES
#define FLASHMLIR_STAGES 2
#endif

namespace {
using Element = FLASHMLIR_ELEMENT;
constexpr int kHeadDim = FLASHMLIR_HEAD_DIM;
constexpr int kStages = FLASHMLIR_STAGES;
using Config = flashmlir::sm90::BwdSm90Config<Element, kHeadDim, kStages>;
}  // namespace

// The catalog's tile fields (what the passes compute grids and shared memory from) must be the tiles
// this code has.
#if defined(FLASHMLIR_BLOCK_M) && defined(FLASHMLIR_BLOCK_N) && defined(FLASHMLIR_WARPS)
static_assert(FLASHMLIR_BLOCK_M == Config::kBlockM && FLASHMLIR_BLOCK_N == Config::kBlockN &&
                  FLASHMLIR_WARPS * 32 == Config::kThreads,
              "kernels.json's attention_bwd_sm90 tiles differ from BwdSm90Config's");
#endif

extern "C" __global__ void __launch_bounds__(Config::kPrepThreads)
    FLASHMLIR_BWD_KERNEL_NAME(sm90, _prep)(const Element* __restrict__ o, const Element* __restrict__ d_o,
                                           const float* __restrict__ lse, float* __restrict__ lse2,
                                           float* __restrict__ delta, float* __restrict__ dq_accum, uint32_t group,
                                           uint32_t seq_q, uint32_t seq_k, uint32_t scale_bits, uint32_t causal,
                                           uint32_t batch_heads) {
  flashmlir::sm90::attention_bwd_prep_sm90<Element, kHeadDim>(o, d_o, lse, lse2, delta, dq_accum, seq_q);
}

// With TMA (FLASHMLIR_TMA, catalog `tma`) dkdv's last binding is a workspace of 512 bytes a block
// and 128 more where each block makes its Q, dO, K and V tensor maps (kernel_entry.cuh).

extern "C" __global__ void __launch_bounds__(Config::kThreads, 1)
    FLASHMLIR_BWD_KERNEL_NAME(sm90, _dkdv)(const Element* __restrict__ q, const Element* __restrict__ k,
                                           const Element* __restrict__ v, const Element* __restrict__ d_o,
                                           const float* __restrict__ lse2, const float* __restrict__ delta,
                                           float* __restrict__ dq_accum, Element* __restrict__ dk,
                                           Element* __restrict__ dv FLASHMLIR_MAPS_PARAMETER, uint32_t group,
                                           uint32_t seq_q, uint32_t seq_k, uint32_t scale_bits, uint32_t causal,
                                           uint32_t batch_heads) {
  flashmlir::sm90::attention_bwd_dkdv_sm90<Element, kHeadDim, kStages>(q, k, v, d_o, lse2, delta, dq_accum, dk, dv,
                                                                       FLASHMLIR_MAPS, group, seq_q, seq_k,
                                                                       __uint_as_float(scale_bits), causal != 0);
}

// The training pair with dropout (torch path; dropout.cuh): dkdv also reads the forward's int64 seed
// from device memory and takes ⌈p · 2¹⁶⌉ and 1 / (1 − p) (f32 bits) after the constants.
extern "C" __global__ void __launch_bounds__(Config::kThreads, 1)
    FLASHMLIR_BWD_KERNEL_NAME(sm90, _dkdv_dropout)(
        const Element* __restrict__ q, const Element* __restrict__ k, const Element* __restrict__ v,
        const Element* __restrict__ d_o, const float* __restrict__ lse2, const float* __restrict__ delta,
        const int64_t* __restrict__ seed, float* __restrict__ dq_accum, Element* __restrict__ dk,
        Element* __restrict__ dv FLASHMLIR_MAPS_PARAMETER, uint32_t group, uint32_t seq_q, uint32_t seq_k,
        uint32_t scale_bits, uint32_t causal, uint32_t batch_heads, uint32_t dropout_threshold,
        uint32_t dropout_scale_bits) {
  flashmlir::sm90::attention_bwd_dkdv_sm90<Element, kHeadDim, kStages, true>(
      q, k, v, d_o, lse2, delta, dq_accum, dk, dv, FLASHMLIR_MAPS, group, seq_q, seq_k, __uint_as_float(scale_bits),
      causal != 0, flashmlir::Dropout{seed, dropout_threshold, __uint_as_float(dropout_scale_bits)});
}

extern "C" __global__ void __launch_bounds__(Config::kPrepThreads)
    FLASHMLIR_BWD_KERNEL_NAME(sm90, _dq)(const float* __restrict__ dq_accum, Element* __restrict__ dq, uint32_t group,
                                         uint32_t seq_q, uint32_t seq_k, uint32_t scale_bits, uint32_t causal,
                                         uint32_t batch_heads) {
  flashmlir::sm90::attention_bwd_dq_sm90<Element, kHeadDim, Config::kPrepThreads, Config::kDqStaged>(
      dq_accum, dq, seq_q, __uint_as_float(scale_bits));
}
