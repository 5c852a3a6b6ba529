// Entry points of the sm_80 forward kernel for one (element type, head dim), in IREE's CUDA ABI:
// the parameters are the dispatch's bindings (device pointers, in operand order, then results)
// followed by its 32-bit push constants. flashmlir-dispatch-attention-microkernel emits the
// matching hal.dispatch.extern; the build compiles this file once per (element, head dim):
//
//   nvcc --fatbin -DFLASHMLIR_ELEMENT=half -DFLASHMLIR_HEAD_DIM=128 ... fwd_sm80_kernels.cu
//
// exports  flashmlir_attention_fwd_sm80_<f16|bf16>_d<D>      (q, k, v, o, constants)
//          flashmlir_attention_fwd_sm80_<f16|bf16>_d<D>_lse  (q, k, v, o, lse, constants)
//          flashmlir_attention_fwd_sm80_<f16|bf16>_d<D>_lse_dropout
//                                                       (q, k, v, seed, o, lse, constants, threshold, keep scale)
// constants group (Hq / Hkv), seq_q, seq_k, scale (f32 bits), causal (0 or 1), batch_heads
//           (B·Hq: every CUDA kernel takes it; the persistent sm_90 one reads it, its grid has no heads)
// The dropout entry (the training forward; dropout.cuh) also reads an int64 seed from device memory
// and takes ⌈p · 2¹⁶⌉ and 1 / (1 − p) (f32 bits) after the constants, as the sm_90 one does.
#include "fwd_sm80_mma_sync.cuh"
#include "kernel_entry.cuh"


#define FLASHMLIR_KERNEL FLASHMLIR_KERNEL_NAME(sm80)
#define FLASHMLIR_KERNEL_LSE FLASHMLIR_KERNEL_NAME_LSE(sm80)

namespace {
using Element = FLASHMLIR_ELEMENT;
constexpr int kHeadDim = FLASHMLIR_HEAD_DIM;
#ifndef FLASHMLIR_BLOCK_M
#define FLASHMLIR_BLOCK_M 128
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
using Config = flashmlir::FwdConfig<Element, kHeadDim, kBlockM, kBlockN, kWarps>;
}  // namespace

extern "C" __global__ void __launch_bounds__(Config::kThreads)
    FLASHMLIR_KERNEL(const Element* __restrict__ q, const Element* __restrict__ k, const Element* __restrict__ v,
                     Element* __restrict__ o, uint32_t group, uint32_t seq_q, uint32_t seq_k, uint32_t scale_bits,
                     uint32_t causal, uint32_t batch_heads) {
  flashmlir::attention_fwd_sm80<Element, kHeadDim, kBlockM, kBlockN, kWarps>(
      q, k, v, o, nullptr, group, seq_q, seq_k, __uint_as_float(scale_bits), causal != 0);
}

extern "C" __global__ void __launch_bounds__(Config::kThreads)
    FLASHMLIR_KERNEL_LSE(const Element* __restrict__ q, const Element* __restrict__ k, const Element* __restrict__ v,
                         Element* __restrict__ o, float* __restrict__ lse, uint32_t group, uint32_t seq_q,
                         uint32_t seq_k, uint32_t scale_bits, uint32_t causal, uint32_t batch_heads) {
  flashmlir::attention_fwd_sm80<Element, kHeadDim, kBlockM, kBlockN, kWarps>(
      q, k, v, o, lse, group, seq_q, seq_k, __uint_as_float(scale_bits), causal != 0);
}

extern "C" __global__ void __launch_bounds__(Config::kThreads)
    FLASHMLIR_CAT(FLASHMLIR_KERNEL_LSE, _dropout, , )(
        const Element* __restrict__ q, const Element* __restrict__ k, const Element* __restrict__ v,
        const int64_t* __restrict__ seed, Element* __restrict__ o, float* __restrict__ lse, uint32_t group,
        uint32_t seq_q, uint32_t seq_k, uint32_t scale_bits, uint32_t causal, uint32_t batch_heads,
        uint32_t dropout_threshold, uint32_t dropout_scale_bits) {
  flashmlir::attention_fwd_sm80<Element, kHeadDim, kBlockM, kBlockN, kWarps, true>(
      q, k, v, o, lse, group, seq_q, seq_k, __uint_as_float(scale_bits), causal != 0,
      flashmlir::Dropout{seed, dropout_threshold, __uint_as_float(dropout_scale_bits)});
}
