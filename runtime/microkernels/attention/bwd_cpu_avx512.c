// Flash-attention backward for x86-64 CPUs with AVX-512, fp32, as IREE workgroups' work.
//
// Two functions per head dim, run one after the other (FlashAttention-2's deterministic split:
// no two workgroups write one output, so no atomics and the same bits on every run):
//   _dq    items of kBlock query rows of one (batch, query head). Δ = rowsum(dO ∘ O) for its rows
//          (written out for _dkdv), then over the keys the rows attend, kTile keys at a time:
//            Sᵀ, dPᵀ  = K·Qᵀ, V·dOᵀ          P = 2^(s·log2e·S − lse·log2e)   dS = P ∘ (dP − Δ)
//            dQᵀ    += Kᵀ·dSᵀ                 and at the end dQ = s · dQ
//          Vectors run along the block's query rows (Qᵀ, dOᵀ, dQᵀ packed once), as in the forward.
//   _dkdv  items of kBlock keys of one (batch, K/V head). Over the group's query heads and the
//          query rows that attend these keys, kTile rows at a time:
//            S, dP    = Q·Kᵀ, dO·Vᵀ          P, dS as above
//            dVᵀ    += dOᵀ·P                  dKᵀ += Qᵀ·dS        and at the end dK = s · dK
//          Vectors run along the block's keys (Kᵀ, Vᵀ, dKᵀ, dVᵀ packed once).
// Both recompute P from the forward's log-sum-exp: no S×S matrix exists anywhere. Causal is
// top-left (query i attends keys j ≤ i): _dq stops at the block's last row, _dkdv starts at the
// block's first key. Work is shared between workgroups by cost, as in the forward.
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

#include "cpu_avx512_math.h"
#include "cpu_work_share.h"

#define FLASHMLIR_EXPORT __attribute__((visibility("default")))

#ifndef FLASHMLIR_ROW_VECTORS
#define FLASHMLIR_ROW_VECTORS 2
#endif
#ifndef FLASHMLIR_KEY_TILE
#define FLASHMLIR_KEY_TILE 4
#endif

enum {
  kLanes = 16,
  kVectors = FLASHMLIR_ROW_VECTORS,  // vectors along a block
  kBlock = kLanes * kVectors,        // query rows (_dq) or keys (_dkdv) per item
  kTile = FLASHMLIR_KEY_TILE,        // keys (_dq) or query rows (_dkdv) per register tile
};

static inline __m512 lane_index(size_t first) {
  return _mm512_add_ps(_mm512_set1_ps((float)first),
                       _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}

// lse in the exp2 domain; +inf for a row that attends nothing (then every P is 0).
static inline float lse2_of(float lse) { return lse == -__builtin_inff() ? __builtin_inff() : lse * kLog2e; }

// The two register-tile products both kernels start from, for t < width (a constant after
// inlining) over the block's kVectors vectors: s[t] = Σ_d a[t, d] · xᵀ[d], dp[t] = Σ_d b[t, d] · yᵀ[d],
// with a and b rows of D in memory and xᵀ, yᵀ the block's packed D × kBlock operands.
static inline __attribute__((always_inline)) void two_products(
    const float* restrict a, const float* restrict b, const float* restrict xt, const float* restrict yt, size_t D,
    const int width, __m512 (*s)[kVectors], __m512 (*dp)[kVectors]) {
  for (int t = 0; t < width; ++t)
    for (int r = 0; r < kVectors; ++r) s[t][r] = dp[t][r] = _mm512_setzero_ps();
  for (size_t d = 0; d < D; ++d) {
    __m512 x[kVectors], y[kVectors];
    for (int r = 0; r < kVectors; ++r) {
      x[r] = _mm512_load_ps(xt + d * kBlock + r * kLanes);
      y[r] = _mm512_load_ps(yt + d * kBlock + r * kLanes);
    }
    for (int t = 0; t < width; ++t) {
      const __m512 ab = _mm512_set1_ps(a[t * D + d]), bb = _mm512_set1_ps(b[t * D + d]);
      for (int r = 0; r < kVectors; ++r) {
        s[t][r] = _mm512_fmadd_ps(ab, x[r], s[t][r]);
        dp[t][r] = _mm512_fmadd_ps(bb, y[r], dp[t][r]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// dQ

// Keys [j, j + width) against the block's rows: P and dS in registers, then dQᵀ += Kᵀ·dSᵀ.
static inline __attribute__((always_inline)) void dq_tile(
    const float* restrict krow, const float* restrict vrow, const float* restrict qt, const float* restrict dot,
    float* restrict dqt, const __m512* lse2, const __m512* delta, const __m512* row, size_t D, size_t j,
    size_t seq_k, float c, int causal, const int width) {
  __m512 s[kTile][kVectors], dp[kTile][kVectors];
  two_products(krow, vrow, qt, dot, D, width, s, dp);  // S = K·Qᵀ, dP = V·dOᵀ
  const __m512 cv = _mm512_set1_ps(c);
  for (int t = 0; t < width; ++t) {
    const __m512 key = _mm512_set1_ps((float)(j + t));
    for (int r = 0; r < kVectors; ++r) {
      __m512 p = exp2_below_128(_mm512_fmsub_ps(s[t][r], cv, lse2[r]));
      __mmask16 keep = j + t < seq_k ? (__mmask16)0xFFFF : 0;
      if (causal) keep &= _mm512_cmp_ps_mask(key, row[r], _CMP_LE_OQ);
      p = _mm512_maskz_mov_ps(keep, p);
      s[t][r] = _mm512_mul_ps(p, _mm512_sub_ps(dp[t][r], delta[r]));  // dS
    }
  }
  for (size_t d = 0; d < D; ++d) {
    __m512 acc[kVectors];
    for (int r = 0; r < kVectors; ++r) acc[r] = _mm512_load_ps(dqt + d * kBlock + r * kLanes);
    for (int t = 0; t < width; ++t) {
      const __m512 kb = _mm512_set1_ps(krow[t * D + d]);
      for (int r = 0; r < kVectors; ++r) acc[r] = _mm512_fmadd_ps(kb, s[t][r], acc[r]);
    }
    for (int r = 0; r < kVectors; ++r) _mm512_store_ps(dqt + d * kBlock + r * kLanes, acc[r]);
  }
}

static inline __attribute__((always_inline)) void dq_rows(
    const float* restrict q, const float* restrict k, const float* restrict v, const float* restrict o,
    const float* restrict d_o, const float* restrict lse, float* restrict dq, float* restrict delta_out,
    const size_t D, size_t group, size_t seq_q, size_t seq_k, float scale, int causal, size_t block, size_t bh) {
  const size_t q0 = block * kBlock;
  const size_t rows = seq_q - q0 < kBlock ? seq_q - q0 : kBlock;
  const size_t row0 = bh * seq_q + q0;
  const float* restrict kb = k + (bh / group) * seq_k * D;
  const float* restrict vb = v + (bh / group) * seq_k * D;

  float qt[D * kBlock] __attribute__((aligned(64)));
  float dot[D * kBlock] __attribute__((aligned(64)));
  float dqt[D * kBlock] __attribute__((aligned(64)));
  float lse2v[kBlock] __attribute__((aligned(64)));
  float deltav[kBlock] __attribute__((aligned(64)));
  for (size_t i = 0; i < kBlock; ++i) {
    float dsum = 0.f;
    if (i < rows)
      for (size_t d = 0; d < D; ++d) dsum += d_o[(row0 + i) * D + d] * o[(row0 + i) * D + d];
    deltav[i] = dsum;
    lse2v[i] = i < rows ? lse2_of(lse[row0 + i]) : __builtin_inff();
    if (i < rows) delta_out[row0 + i] = dsum;
  }
  for (size_t d = 0; d < D; ++d)
    for (size_t i = 0; i < kBlock; ++i) {
      qt[d * kBlock + i] = i < rows ? q[(row0 + i) * D + d] : 0.f;
      dot[d * kBlock + i] = i < rows ? d_o[(row0 + i) * D + d] : 0.f;
      dqt[d * kBlock + i] = 0.f;
    }
  __m512 lse2[kVectors], delta[kVectors], row[kVectors];
  for (int r = 0; r < kVectors; ++r) {
    lse2[r] = _mm512_load_ps(lse2v + r * kLanes);
    delta[r] = _mm512_load_ps(deltav + r * kLanes);
    row[r] = lane_index(q0 + r * kLanes);
  }
  const float c = scale * kLog2e;
  const size_t key_end = causal && q0 + rows < seq_k ? q0 + rows : seq_k;
  size_t j = 0;
  for (; j + kTile <= key_end; j += kTile)
    dq_tile(kb + j * D, vb + j * D, qt, dot, dqt, lse2, delta, row, D, j, seq_k, c, causal, kTile);
  for (; j < key_end; ++j)
    dq_tile(kb + j * D, vb + j * D, qt, dot, dqt, lse2, delta, row, D, j, seq_k, c, causal, 1);
  for (size_t i = 0; i < rows; ++i)
    for (size_t d = 0; d < D; ++d) dq[(row0 + i) * D + d] = dqt[d * kBlock + i] * scale;
}

// ---------------------------------------------------------------------------------------------
// dK, dV

// Query rows [i, i + width) of one head against the block's keys: dVᵀ += dOᵀ·P, dKᵀ += Qᵀ·dS.
static inline __attribute__((always_inline)) void dkdv_tile(
    const float* restrict qrow, const float* restrict dorow, const float* restrict lse, const float* restrict delta,
    const float* restrict kt, const float* restrict vt, float* restrict dkt, float* restrict dvt,
    const __m512* key, __mmask16 const* in_range, size_t D, size_t i, float c, int causal, const int width) {
  __m512 s[kTile][kVectors], dp[kTile][kVectors];
  two_products(qrow, dorow, kt, vt, D, width, s, dp);  // S = Q·Kᵀ, dP = dO·Vᵀ
  const __m512 cv = _mm512_set1_ps(c);
  for (int t = 0; t < width; ++t) {
    const __m512 l2 = _mm512_set1_ps(lse2_of(lse[t])), dl = _mm512_set1_ps(delta[t]);
    const __m512 row = _mm512_set1_ps((float)(i + t));
    for (int r = 0; r < kVectors; ++r) {
      __mmask16 keep = in_range[r];
      if (causal) keep &= _mm512_cmp_ps_mask(key[r], row, _CMP_LE_OQ);
      s[t][r] = _mm512_maskz_mov_ps(keep, exp2_below_128(_mm512_fmsub_ps(s[t][r], cv, l2)));  // P
      dp[t][r] = _mm512_mul_ps(s[t][r], _mm512_sub_ps(dp[t][r], dl));                              // dS
    }
  }
  for (size_t d = 0; d < D; ++d) {
    __m512 dk[kVectors], dv[kVectors];
    for (int r = 0; r < kVectors; ++r) {
      dk[r] = _mm512_load_ps(dkt + d * kBlock + r * kLanes);
      dv[r] = _mm512_load_ps(dvt + d * kBlock + r * kLanes);
    }
    for (int t = 0; t < width; ++t) {
      const __m512 qb = _mm512_set1_ps(qrow[t * D + d]), db = _mm512_set1_ps(dorow[t * D + d]);
      for (int r = 0; r < kVectors; ++r) {
        dk[r] = _mm512_fmadd_ps(qb, dp[t][r], dk[r]);
        dv[r] = _mm512_fmadd_ps(db, s[t][r], dv[r]);
      }
    }
    for (int r = 0; r < kVectors; ++r) {
      _mm512_store_ps(dkt + d * kBlock + r * kLanes, dk[r]);
      _mm512_store_ps(dvt + d * kBlock + r * kLanes, dv[r]);
    }
  }
}

static inline __attribute__((always_inline)) void dkdv_keys(
    const float* restrict q, const float* restrict k, const float* restrict v, const float* restrict d_o,
    const float* restrict lse, const float* restrict delta, float* restrict dk, float* restrict dv,
    const size_t D, size_t group, size_t seq_q, size_t seq_k, float scale, int causal, size_t block,
    size_t bh_kv) {
  const size_t k0 = block * kBlock;
  const size_t keys = seq_k - k0 < kBlock ? seq_k - k0 : kBlock;
  const size_t key0 = bh_kv * seq_k + k0;

  float kt[D * kBlock] __attribute__((aligned(64)));
  float vt[D * kBlock] __attribute__((aligned(64)));
  float dkt[D * kBlock] __attribute__((aligned(64)));
  float dvt[D * kBlock] __attribute__((aligned(64)));
  for (size_t d = 0; d < D; ++d)
    for (size_t j = 0; j < kBlock; ++j) {
      kt[d * kBlock + j] = j < keys ? k[(key0 + j) * D + d] : 0.f;
      vt[d * kBlock + j] = j < keys ? v[(key0 + j) * D + d] : 0.f;
      dkt[d * kBlock + j] = dvt[d * kBlock + j] = 0.f;
    }
  __m512 key[kVectors];
  __mmask16 in_range[kVectors];
  for (int r = 0; r < kVectors; ++r) {
    key[r] = lane_index(k0 + r * kLanes);
    in_range[r] = _mm512_cmp_ps_mask(key[r], _mm512_set1_ps((float)seq_k), _CMP_LT_OQ);
  }
  const float c = scale * kLog2e;
  const size_t first = causal ? k0 : 0;  // top-left causal: earlier rows see none of these keys
  for (size_t h = 0; h < group; ++h) {
    const size_t bh = bh_kv * group + h;
    const float* restrict qh = q + bh * seq_q * D;
    const float* restrict doh = d_o + bh * seq_q * D;
    const float* restrict lh = lse + bh * seq_q;
    const float* restrict deh = delta + bh * seq_q;
    size_t i = first;
    for (; i + kTile <= seq_q; i += kTile)
      dkdv_tile(qh + i * D, doh + i * D, lh + i, deh + i, kt, vt, dkt, dvt, key, in_range, D, i, c, causal, kTile);
    for (; i < seq_q; ++i)
      dkdv_tile(qh + i * D, doh + i * D, lh + i, deh + i, kt, vt, dkt, dvt, key, in_range, D, i, c, causal, 1);
  }
  for (size_t j = 0; j < keys; ++j)
    for (size_t d = 0; d < D; ++d) {
      dk[(key0 + j) * D + d] = dkt[d * kBlock + j] * scale;
      dv[(key0 + j) * D + d] = dvt[d * kBlock + j];
    }
}

// ---------------------------------------------------------------------------------------------
// Work sharing (cpu_work_share.h): the cost of an item, in rows or keys visited plus its fixed work.

static inline size_t dq_cost(size_t block, size_t seq_q, size_t seq_k, int causal) {
  const size_t q0 = block * kBlock, rows = seq_q - q0 < kBlock ? seq_q - q0 : kBlock;
  const size_t key_end = causal && q0 + rows < seq_k ? q0 + rows : seq_k;
  return key_end + kTile;  // keys visited, plus the fixed work of packing and writing back
}

static inline size_t dkdv_cost(size_t block, size_t seq_q, size_t group, int causal) {
  const size_t first = causal ? block * kBlock : 0;
  return group * (first < seq_q ? seq_q - first : 0) + kTile;
}

static inline __attribute__((always_inline)) void dq_share(
    const float* q, const float* k, const float* v, const float* o, const float* d_o, const float* lse, float* dq,
    float* delta, const size_t D, size_t group, size_t batch_heads, size_t seq_q, size_t seq_k, float scale,
    int causal, size_t wg, size_t wg_count) {
  const size_t blocks = (seq_q + kBlock - 1) / kBlock;
  FLASHMLIR_SHARE(dq_cost(b, seq_q, seq_k, causal), blocks, batch_heads,
                  dq_rows(q, k, v, o, d_o, lse, dq, delta, D, group, seq_q, seq_k, scale, causal, b, h));
}

static inline __attribute__((always_inline)) void dkdv_share(
    const float* q, const float* k, const float* v, const float* d_o, const float* lse, const float* delta,
    float* dk, float* dv, const size_t D, size_t group, size_t batch_heads, size_t seq_q, size_t seq_k,
    float scale, int causal, size_t wg, size_t wg_count) {
  const size_t blocks = (seq_k + kBlock - 1) / kBlock;
  FLASHMLIR_SHARE(dkdv_cost(b, seq_q, group, causal), blocks, batch_heads / group,
                  dkdv_keys(q, k, v, d_o, lse, delta, dk, dv, D, group, seq_q, seq_k, scale, causal, b, h));
}

// IREE's calls: bindings as MLIR's 1-d memref descriptors (see the forward), then the constants
// (batch_heads counts query heads), this workgroup's id and the grid's size.
#define FLASHMLIR_MEMREF(T, name) T* name##_allocated, T* restrict name, size_t name##_offset, size_t name##_size, \
                                  size_t name##_stride
#define FLASHMLIR_DEFINE_CPU_BACKWARD(D)                                                                     \
  FLASHMLIR_EXPORT void flashmlir_attention_bwd_cpu_f32_d##D##_dq(                                           \
      FLASHMLIR_MEMREF(const float, q), FLASHMLIR_MEMREF(const float, k), FLASHMLIR_MEMREF(const float, v),   \
      FLASHMLIR_MEMREF(const float, o), FLASHMLIR_MEMREF(const float, d_o), FLASHMLIR_MEMREF(const float, lse), \
      FLASHMLIR_MEMREF(float, dq), FLASHMLIR_MEMREF(float, delta), size_t group, size_t batch_heads,           \
      size_t seq_q, size_t seq_k, float scale, size_t causal, size_t wg, size_t wg_count) {                    \
    dq_share(q + q_offset, k + k_offset, v + v_offset, o + o_offset, d_o + d_o_offset, lse + lse_offset,      \
             dq + dq_offset, delta + delta_offset, D, group, batch_heads, seq_q, seq_k, scale, causal != 0, wg, \
             wg_count);                                                                                      \
  }                                                                                                          \
  FLASHMLIR_EXPORT void flashmlir_attention_bwd_cpu_f32_d##D##_dkdv(                                         \
      FLASHMLIR_MEMREF(const float, q), FLASHMLIR_MEMREF(const float, k), FLASHMLIR_MEMREF(const float, v),   \
      FLASHMLIR_MEMREF(const float, d_o), FLASHMLIR_MEMREF(const float, lse),                                \
      FLASHMLIR_MEMREF(const float, delta), FLASHMLIR_MEMREF(float, dk), FLASHMLIR_MEMREF(float, dv),          \
      size_t group, size_t batch_heads, size_t seq_q, size_t seq_k, float scale, size_t causal, size_t wg,     \
      size_t wg_count) {                                                                                     \
    dkdv_share(q + q_offset, k + k_offset, v + v_offset, d_o + d_o_offset, lse + lse_offset,                  \
               delta + delta_offset, dk + dk_offset, dv + dv_offset, D, group, batch_heads, seq_q, seq_k,      \
               scale, causal != 0, wg, wg_count);                                                            \
  }

FLASHMLIR_DEFINE_CPU_BACKWARD(32)
FLASHMLIR_DEFINE_CPU_BACKWARD(64)
FLASHMLIR_DEFINE_CPU_BACKWARD(128)
