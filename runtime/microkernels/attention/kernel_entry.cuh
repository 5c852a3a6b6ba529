// What the CUDA entry-point files share: the element type and head dim the build passes
// (-DFLASHMLIR_ELEMENT, -DFLASHMLIR_ELEMENT_NAME, -DFLASHMLIR_HEAD_DIM; defaults for a build by hand)
// and the exported names, flashmlir_attention_<fwd|bwd>_<family>_<element>_d<D>[_part], which the
// catalog (compiler/microkernels.py `CudaAttentionKernel.name`) spells the same way; a forward tiling
// for long sequences appends its tag (-DFLASHMLIR_NAME_TAG=_from<min_seq>).
#pragma once

#ifndef FLASHMLIR_ELEMENT
#define FLASHMLIR_ELEMENT half
#endif
#ifndef FLASHMLIR_HEAD_DIM
#define FLASHMLIR_HEAD_DIM 128
#endif
#ifndef FLASHMLIR_ELEMENT_NAME
#define FLASHMLIR_ELEMENT_NAME f16
#endif

#ifndef FLASHMLIR_NAME_TAG
#define FLASHMLIR_NAME_TAG
#endif

#define FLASHMLIR_CAT_(a, b, c, d) a##b##c##d
#define FLASHMLIR_CAT(a, b, c, d) FLASHMLIR_CAT_(a, b, c, d)
// FLASHMLIR_KERNEL_NAME(sm80) → flashmlir_attention_fwd_sm80_f16_d128 (for the defaults).
#define FLASHMLIR_KERNEL_NAME(family) \
  FLASHMLIR_CAT(flashmlir_attention_fwd_##family##_, FLASHMLIR_ELEMENT_NAME, _d,  \
                FLASHMLIR_CAT(FLASHMLIR_HEAD_DIM, FLASHMLIR_NAME_TAG, , ))
#define FLASHMLIR_KERNEL_NAME_LSE(family) FLASHMLIR_CAT(FLASHMLIR_KERNEL_NAME(family), _lse, , )
// FLASHMLIR_BWD_KERNEL_NAME(sm80, _dq) → flashmlir_attention_bwd_sm80_f16_d128_dq (for the defaults).
#define FLASHMLIR_BWD_KERNEL_NAME(family, part)                                                    \
  FLASHMLIR_CAT(FLASHMLIR_CAT(flashmlir_attention_bwd_##family##_, FLASHMLIR_ELEMENT_NAME, _d, FLASHMLIR_HEAD_DIM), \
                part, , )

// A TMA kernel's last binding (FLASHMLIR_TMA, catalog `tma`): a workspace where each block makes its
// tensor maps (IREE passes pointers, not maps), 128 bytes of slack for the kernel to align them;
// nothing reads it after the launch. FLASHMLIR_MAPS_PARAMETER follows the outputs in a signature,
// FLASHMLIR_MAPS is the argument passed on (nullptr without TMA).
#ifndef FLASHMLIR_TMA
#define FLASHMLIR_TMA 0
#endif
#if FLASHMLIR_TMA
#define FLASHMLIR_MAPS_PARAMETER , uint8_t* __restrict__ maps
#define FLASHMLIR_MAPS maps
#else
#define FLASHMLIR_MAPS_PARAMETER
#define FLASHMLIR_MAPS nullptr
#endif
