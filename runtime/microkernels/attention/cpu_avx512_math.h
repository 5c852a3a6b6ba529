// Vector exp2 and log2 for the freestanding AVX-512 CPU kernels (no libm in IREE's embedded ELF).
#ifndef FLASHMLIR_CPU_AVX512_MATH_H_
#define FLASHMLIR_CPU_AVX512_MATH_H_

#include <immintrin.h>

static const float kLog2e = 1.4426950408889634f;
static const float kLn2 = 0.6931471805599453f;

// 2^x for x < 128 (or -inf): round to nearest n, a degree-6 polynomial for 2^(x - n) on
// [-1/2, 1/2] (relative error < 1.2e-7), scaled by 2^n with vscalefps. Below 2^-126 gives 0.
static inline __m512 exp2_below_128(__m512 x) {
  const __m512 clamped = _mm512_max_ps(x, _mm512_set1_ps(-127.f));
  const __m512 n = _mm512_roundscale_ps(clamped, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(clamped, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.f), _CMP_GE_OQ);
  return _mm512_maskz_mov_ps(normal, _mm512_scalef_ps(p, n));
}

// log2 x for finite x > 0: x = m · 2^e with m in [0.75, 1.5), then log2 m = 2 atanh(t) / ln 2 with
// t = (m - 1) / (m + 1), |t| ≤ 0.2, by its odd series to t^9 (truncation < 1e-8 absolute).
static inline __m512 log2_positive(__m512 x) {
  __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_zero);
  const __m512 e = _mm512_getexp_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.f / 0.75f)));
  const __m512 t = _mm512_div_ps(_mm512_sub_ps(m, _mm512_set1_ps(1.f)), _mm512_add_ps(m, _mm512_set1_ps(1.f)));
  const __m512 t2 = _mm512_mul_ps(t, t);
  __m512 s = _mm512_set1_ps(1.f / 9.f);
  s = _mm512_fmadd_ps(s, t2, _mm512_set1_ps(1.f / 7.f));
  s = _mm512_fmadd_ps(s, t2, _mm512_set1_ps(1.f / 5.f));
  s = _mm512_fmadd_ps(s, t2, _mm512_set1_ps(1.f / 3.f));
  s = _mm512_fmadd_ps(s, t2, _mm512_set1_ps(1.f));
  return _mm512_fmadd_ps(_mm512_mul_ps(s, t), _mm512_set1_ps(2.f * kLog2e), e);
}

#endif  // FLASHMLIR_CPU_AVX512_MATH_H_
