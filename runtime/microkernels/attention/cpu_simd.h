// The vector layer the CPU attention kernels are written in: one source, one object per
// instruction set (kernels.json's "isa" and "march"). -march=x86-64-v4 gives AVX-512 (16 fp32
// lanes, 32 registers, mask registers); -march=x86-64-v3 gives AVX2 + FMA (8 lanes, 16
// registers, masks as all-ones lanes). Each function is one instruction or a short fixed
// sequence, so the kernels' loops compile as if written in the intrinsics themselves.
//
// Also exp2 and log2 as vector code: the objects are linked into IREE's embedded ELF, no libm.
#ifndef FLASHMLIR_CPU_SIMD_H_
#define FLASHMLIR_CPU_SIMD_H_

#include <immintrin.h>
#include <stddef.h>

#define FLASHMLIR_INLINE static inline __attribute__((always_inline))

static const float kLog2e = 1.4426950408889634f;
static const float kLn2 = 0.6931471805599453f;

#if defined(__AVX512F__)

enum { kLanes = 16 };
typedef __m512 vf;
typedef __mmask16 vmask;

FLASHMLIR_INLINE vf vzero(void) { return _mm512_setzero_ps(); }
FLASHMLIR_INLINE vf vset1(float x) { return _mm512_set1_ps(x); }
FLASHMLIR_INLINE vf vload(const float* p) { return _mm512_load_ps(p); }  // 64-byte aligned
FLASHMLIR_INLINE vf vloadu(const float* p) { return _mm512_loadu_ps(p); }
FLASHMLIR_INLINE void vstore(float* p, vf x) { _mm512_store_ps(p, x); }
FLASHMLIR_INLINE void vstoreu(float* p, vf x) { _mm512_storeu_ps(p, x); }
FLASHMLIR_INLINE vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
FLASHMLIR_INLINE vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
FLASHMLIR_INLINE vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
FLASHMLIR_INLINE vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
FLASHMLIR_INLINE vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
FLASHMLIR_INLINE vf vfmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }  // a·b + c
FLASHMLIR_INLINE vf vfmsub(vf a, vf b, vf c) { return _mm512_fmsub_ps(a, b, c); }  // a·b − c
FLASHMLIR_INLINE float vsum(vf a) { return _mm512_reduce_add_ps(a); }
FLASHMLIR_INLINE vf vlanes(void) { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }

FLASHMLIR_INLINE vmask vgt(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
FLASHMLIR_INLINE vmask vge(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
FLASHMLIR_INLINE vmask vle(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
FLASHMLIR_INLINE vmask vlt(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
FLASHMLIR_INLINE vmask vne(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_NEQ_OQ); }
FLASHMLIR_INLINE vmask vmask_all(void) { return (vmask)0xFFFF; }
FLASHMLIR_INLINE vmask vmask_none(void) { return 0; }
FLASHMLIR_INLINE vmask vmask_and(vmask a, vmask b) { return a & b; }
FLASHMLIR_INLINE vmask vmask_or(vmask a, vmask b) { return a | b; }
FLASHMLIR_INLINE int vmask_any(vmask m) { return m != 0; }
FLASHMLIR_INLINE vf vselect(vmask m, vf if_clear, vf if_set) { return _mm512_mask_mov_ps(if_clear, m, if_set); }
FLASHMLIR_INLINE vf vkeep(vmask m, vf x) { return _mm512_maskz_mov_ps(m, x); }  // 0 where clear

// x · 2^n for integral n in [-127, 127].
FLASHMLIR_INLINE vf vscale_pow2(vf x, vf n) { return _mm512_scalef_ps(x, n); }
FLASHMLIR_INLINE vf vround(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

// x = m · 2^e with m in [0.75, 1.5), for finite x > 0.
FLASHMLIR_INLINE vf vmantissa(vf x) { return _mm512_getmant_ps(x, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_zero); }
FLASHMLIR_INLINE vf vexponent(vf x) { return _mm512_getexp_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.f / 0.75f))); }

#elif defined(__AVX2__) && defined(__FMA__)

enum { kLanes = 8 };
typedef __m256 vf;
typedef __m256 vmask;  // all-ones lanes where set

FLASHMLIR_INLINE vf vzero(void) { return _mm256_setzero_ps(); }
FLASHMLIR_INLINE vf vset1(float x) { return _mm256_set1_ps(x); }
FLASHMLIR_INLINE vf vload(const float* p) { return _mm256_load_ps(p); }  // 32-byte aligned
FLASHMLIR_INLINE vf vloadu(const float* p) { return _mm256_loadu_ps(p); }
FLASHMLIR_INLINE void vstore(float* p, vf x) { _mm256_store_ps(p, x); }
FLASHMLIR_INLINE void vstoreu(float* p, vf x) { _mm256_storeu_ps(p, x); }
FLASHMLIR_INLINE vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
FLASHMLIR_INLINE vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
FLASHMLIR_INLINE vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
FLASHMLIR_INLINE vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
FLASHMLIR_INLINE vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
FLASHMLIR_INLINE vf vfmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
FLASHMLIR_INLINE vf vfmsub(vf a, vf b, vf c) { return _mm256_fmsub_ps(a, b, c); }
FLASHMLIR_INLINE float vsum(vf a) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)));
}
FLASHMLIR_INLINE vf vlanes(void) { return _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7); }

FLASHMLIR_INLINE vmask vgt(vf a, vf b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
FLASHMLIR_INLINE vmask vge(vf a, vf b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
FLASHMLIR_INLINE vmask vle(vf a, vf b) { return _mm256_cmp_ps(a, b, _CMP_LE_OQ); }
FLASHMLIR_INLINE vmask vlt(vf a, vf b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
FLASHMLIR_INLINE vmask vne(vf a, vf b) { return _mm256_cmp_ps(a, b, _CMP_NEQ_OQ); }
FLASHMLIR_INLINE vmask vmask_all(void) { return _mm256_castsi256_ps(_mm256_set1_epi32(-1)); }
FLASHMLIR_INLINE vmask vmask_none(void) { return _mm256_setzero_ps(); }
FLASHMLIR_INLINE vmask vmask_and(vmask a, vmask b) { return _mm256_and_ps(a, b); }
FLASHMLIR_INLINE vmask vmask_or(vmask a, vmask b) { return _mm256_or_ps(a, b); }
FLASHMLIR_INLINE int vmask_any(vmask m) { return _mm256_movemask_ps(m) != 0; }
FLASHMLIR_INLINE vf vselect(vmask m, vf if_clear, vf if_set) { return _mm256_blendv_ps(if_clear, if_set, m); }
FLASHMLIR_INLINE vf vkeep(vmask m, vf x) { return _mm256_and_ps(m, x); }

// x · 2^n for integral n in [-126, 127] (2^n built in the exponent field; n = -127 gives 0).
FLASHMLIR_INLINE vf vscale_pow2(vf x, vf n) {
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(x, _mm256_castsi256_ps(bits));
}
FLASHMLIR_INLINE vf vround(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

// x = m · 2^e with m in [0.75, 1.5), for normal x > 0: the exponent field gives m in [1, 2),
// halved (and e raised by one) where it is 1.5 or more.
FLASHMLIR_INLINE vf vmantissa_in_1_2(vf x) {
  const __m256i bits = _mm256_castps_si256(x);
  return _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)),
                                             _mm256_set1_epi32(0x3F800000)));
}
FLASHMLIR_INLINE vf vmantissa(vf x) {
  const vf m = vmantissa_in_1_2(x);
  return vselect(vge(m, vset1(1.5f)), m, vmul(m, vset1(0.5f)));
}
FLASHMLIR_INLINE vf vexponent(vf x) {
  const __m256i biased = _mm256_srli_epi32(_mm256_castps_si256(x), 23);
  const vf e = _mm256_cvtepi32_ps(_mm256_sub_epi32(biased, _mm256_set1_epi32(127)));
  return vselect(vge(vmantissa_in_1_2(x), vset1(1.5f)), e, vadd(e, vset1(1.f)));
}

#else
#error "the CPU attention kernels need AVX-512 (-march=x86-64-v4) or AVX2 + FMA (-march=x86-64-v3)"
#endif

// 2^x for x < 128 (or -inf): round to nearest n, a degree-6 polynomial for 2^(x - n) on
// [-1/2, 1/2] (relative error < 1.2e-7), scaled by 2^n. Below 2^-126 gives 0.
FLASHMLIR_INLINE vf exp2_below_128(vf x) {
  const vf clamped = vmax(x, vset1(-127.f));
  const vf n = vround(clamped);
  const vf f = vsub(clamped, n);
  vf p = vset1(1.5403530393381606e-4f);
  p = vfmadd(p, f, vset1(1.3333558146428443e-3f));
  p = vfmadd(p, f, vset1(9.6181291076284772e-3f));
  p = vfmadd(p, f, vset1(5.5504108664821580e-2f));
  p = vfmadd(p, f, vset1(2.4022650695910071e-1f));
  p = vfmadd(p, f, vset1(6.9314718055994531e-1f));
  p = vfmadd(p, f, vset1(1.f));
  return vkeep(vge(x, vset1(-126.f)), vscale_pow2(p, n));
}

// log2 x for finite x > 0 (normal on AVX2): x = m · 2^e with m in [0.75, 1.5), then
// log2 m = 2 atanh(t) / ln 2 with t = (m - 1) / (m + 1), |t| ≤ 0.2, by its odd series to t^9
// (truncation < 1e-8 absolute).
FLASHMLIR_INLINE vf log2_positive(vf x) {
  const vf m = vmantissa(x);
  const vf e = vexponent(x);
  const vf t = vdiv(vsub(m, vset1(1.f)), vadd(m, vset1(1.f)));
  const vf t2 = vmul(t, t);
  vf s = vset1(1.f / 9.f);
  s = vfmadd(s, t2, vset1(1.f / 7.f));
  s = vfmadd(s, t2, vset1(1.f / 5.f));
  s = vfmadd(s, t2, vset1(1.f / 3.f));
  s = vfmadd(s, t2, vset1(1.f));
  return vfmadd(vmul(s, t), vset1(2.f * kLog2e), e);
}

// first, first + 1, …, first + kLanes − 1.
FLASHMLIR_INLINE vf vlane_index(size_t first) { return vadd(vset1((float)first), vlanes()); }

#endif  // FLASHMLIR_CPU_SIMD_H_
