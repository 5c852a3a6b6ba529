// Entry points of the sm_80 backward kernels for one (element type, head dim), in IREE's CUDA ABI
// (bindings as device pointers in operand order, then results, then 32-bit push constants).
// flashmlir-dispatch-attention-microkernel emits two hal.dispatch.extern ops, dq then dkdv (which
// reads the Δ the first writes); the build compiles this file once per catalog entry:
//
//   nvcc --fatbin -DFLASHMLIR_ELEMENT=half -DFLASHMLIR_HEAD_DIM=128 ... bwd_sm80_kernels.cu
//
// exports  flashmlir_attention_bwd_sm80_<f16|bf16>_d<D>_dq    (q, k, v, o, do, lse, dq, delta, constants)
//          flashmlir_attention_bwd_sm80_<f16|bf16>_d<D>_dkdv  (q, k, v, do, lse, delta, dk, dv, constants)
//          ..._dq_dropout    (q, k, v, o, do, lse, seed, dq, delta, constants, threshold, keep scale)
//          ..._dkdv_dropout  (q, k, v, do, lse, delta, seed, dk, dv, constants, threshold, keep scale)
// constants group (Hq / Hkv), seq_q, seq_k, scale (f32 bits), causal (0 or 1), batch_heads
//           (B·Hq: every CUDA kernel takes it; the persistent sm_90 one reads it, its grid has no heads)
// lse and delta are float32 [B, Hq, Sq]. Both kernels have 32·WARPS threads and 16·WARPS resident
// rows a block: the dq grid is (ceil(Sq / (16·WARPS)), B·Hq) streaming BLOCK_N keys a tile, the dkdv
// grid (ceil(Sk / (16·WARPS)), B·Hkv) streaming BLOCK_M queries a tile. The dropout twins (the
// training pair's backward; dropout.cuh) both regenerate the forward's mask from the int64 seed they
// read on the device, with ⌈p · 2¹⁶⌉ and 1 / (1 − p) (f32 bits) after the constants.
#include "bwd_sm80_mma_sync.cuh"
#include "kernel_entry.cuh"

namespace {
using Element = FLASHMLIR_ELEMENT;
constexpr int kHeadDim = FLASHMLIR_HEAD_DIM;
#ifndef FLASHMLIR_BLOCK_M
#define FLASHMLIR_BLOCK_M 64
#endif
#ifndef FLASHMLIR_BLOCK_N
#define FLASHMLIR_BLOCK_N 64
#endif
#ifndef FLASHMLIR_WARPS
#define FLASHMLIR_WARPS 4
#endif
constexpr int kBlockM = FLASHMLIR_BLOCK_M;
constexpr int kBlockN = FLASHMLIR_BLOCK_N;
constexpr int kWarps = FLASHMLIR_WARPS;
constexpr int kThreads = kWarps * 32;
}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads)
    FLASHMLIR_BWD_KERNEL_NAME(sm80, _dq)(const Element* __restrict__ q, const Element* __restrict__ k,
                                         const Element* __restrict__ v, const Element* __restrict__ o,
                                         const Element* __restrict__ d_o, const float* __restrict__ lse,
                                         Element* __restrict__ dq, float* __restrict__ delta, uint32_t group,
                                         uint32_t seq_q, uint32_t seq_k, uint32_t scale_bits, uint32_t causal,
                                         uint32_t batch_heads) {
  flashmlir::bwd::attention_bwd_dq_sm80<Element, kHeadDim, kBlockM, kBlockN, kWarps>(
      q, k, v, o, d_o, lse, dq, delta, group, seq_q, seq_k, __uint_as_float(scale_bits), causal != 0);
}

extern "C" __global__ void __launch_bounds__(kThreads)
    FLASHMLIR_BWD_KERNEL_NAME(sm80, _dkdv)(const Element* __restrict__ q, const Element* __restrict__ k,
                                           const Element* __restrict__ v, const Element* __restrict__ d_o,
                                           const float* __restrict__ lse, const float* __restrict__ delta,
                                           Element* __restrict__ dk, Element* __restrict__ dv, uint32_t group,
                                           uint32_t seq_q, uint32_t seq_k, uint32_t scale_bits, uint32_t causal,
                                           uint32_t batch_heads) {
  flashmlir::bwd::attention_bwd_dkdv_sm80<Element, kHeadDim, kBlockM, kBlockN, kWarps>(
      q, k, v, d_o, lse, delta, dk, dv, group, seq_q, seq_k, __uint_as_float(scale_bits), causal != 0);
}

extern "C" __global__ void __launch_bounds__(kThreads)
    FLASHMLIR_BWD_KERNEL_NAME(sm80, _dq_dropout)(
        const Element* __restrict__ q, const Element* __restrict__ k, const Element* __restrict__ v,
        const Element* __restrict__ o, const Element* __restrict__ d_o, const float* __restrict__ lse,
        const int64_t* __restrict__ seed, Element* __restrict__ dq, float* __restrict__ delta, uint32_t group,
        uint32_t seq_q, uint32_t seq_k, uint32_t scale_bits, uint32_t causal, uint32_t batch_heads,
        uint32_t dropout_threshold, uint32_t dropout_scale_bits) {
  flashmlir::bwd::attention_bwd_dq_sm80<Element, kHeadDim, kBlockM, kBlockN, kWarps, true>(
      q, k, v, o, d_o, lse, dq, delta, group, seq_q, seq_k, __uint_as_float(scale_bits), causal != 0,
      flashmlir::Dropout{seed, dropout_threshold, __uint_as_float(dropout_scale_bits)});
}

extern "C" __global__ void __launch_bounds__(kThreads)
    FLASHMLIR_BWD_KERNEL_NAME(sm80, _dkdv_dropout)(
        const Element* __restrict__ q, const Element* __restrict__ k, const Element* __restrict__ v,
        const Element* __restrict__ d_o, const float* __restrict__ lse, const float* __restrict__ delta,
        const int64_t* __restrict__ seed, Element* __restrict__ dk, Element* __restrict__ dv, uint32_t group,
        uint32_t seq_q, uint32_t seq_k, uint32_t scale_bits, uint32_t causal, uint32_t batch_heads,
        uint32_t dropout_threshold, uint32_t dropout_scale_bits) {
  flashmlir::bwd::attention_bwd_dkdv_sm80<Element, kHeadDim, kBlockM, kBlockN, kWarps, true>(
      q, k, v, d_o, lse, delta, dk, dv, group, seq_q, seq_k, __uint_as_float(scale_bits), causal != 0,
      flashmlir::Dropout{seed, dropout_threshold, __uint_as_float(dropout_scale_bits)});
}
