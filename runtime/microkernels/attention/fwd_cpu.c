// Flash-attention forward for x86-64 CPUs (AVX-512 or AVX2 + FMA, cpu_simd.h), fp32, as one IREE
// workgroup's work.
//
// The work is items of kRows query rows of one (batch, head); an item loops over blocks of kKeys
// keys with online softmax, causal blocks skipped. IREE calls `flashmlir_attention_fwd_cpu_f32_d<D>`
// once per workgroup of a 1-d grid of a few workgroups per worker thread, and each call takes an
// equal share of the items' cost (work_share): IREE's task system hands out tiles of a large grid
// eight at a time, which on a small machine leaves one worker a whole reservation behind (88 items
// on 2 threads: 48 against 40), and causal items differ in cost anyway. The object is linked into IREE's embedded ELF executable, so
// this file is freestanding: no libc, no globals, no thread-locals, stack only.
//
// Orientation: vectors run along query rows. Q is packed once per call as Qᵀ (D × kRows, with
// scale · log2 e folded in); then for each key block
//   Sᵀ[j, rows]  = Σ_d K[j, d] · Qᵀ[d, rows]      K read in place, one broadcast per kRowVectors FMAs;
//                  masked and its row maxima taken in registers
//   m, l, α       row shift / sum / rescale: plain vector ops across j (no horizontal reductions);
//                  the shift may lag the row maximum by up to 8 (P ≤ 2^8): most blocks skip α (= 1)
//   Pᵀ[j, rows]  = 2^(Sᵀ[j, rows] - m)
//   Oᵀ[d, rows]  = α · Oᵀ[d, rows] + Σ_j V[j, d] · Pᵀ[j, rows]   V read in place
// and O = Oᵀ / l is written back row by row at the end. K and V need no packing, and every FMA's
// scalar operand is a broadcast load (vbroadcastss) from memory.
#include <stddef.h>
#include <stdint.h>

#include "cpu_dropout.h"
#include "cpu_simd.h"
#include "cpu_work_share.h"

#define FLASHMLIR_EXPORT __attribute__((visibility("default")))

#ifndef FLASHMLIR_ROW_VECTORS
#define FLASHMLIR_ROW_VECTORS 3
#endif
#ifndef FLASHMLIR_KEY_TILE
#define FLASHMLIR_KEY_TILE 8
#endif
#ifndef FLASHMLIR_DIM_TILE
#define FLASHMLIR_DIM_TILE 8
#endif
#ifndef FLASHMLIR_KEYS
#define FLASHMLIR_KEYS 64
#endif

enum {
  kRowVectors = FLASHMLIR_ROW_VECTORS,      // query rows per call: kRows = kLanes · kRowVectors
  kRows = kLanes * kRowVectors,
  kKeys = FLASHMLIR_KEYS,                   // keys per block
  kKeyTile = FLASHMLIR_KEY_TILE,            // keys per register tile of Sᵀ
  kDimTile = FLASHMLIR_DIM_TILE,            // head-dim entries per register tile of Oᵀ
  kMaxSlack = 8,                            // how far (exp2 units) a row's scores may pass its shift
};

// s, or -inf where `key` comes after the row (top-left causal masking).
FLASHMLIR_INLINE vf masked_after_row(vf s, size_t key, vf row) {
  return vselect(vgt(vset1((float)key), row), s, vset1(-__builtin_inff()));
}

// Oᵀ[d : d + width] = α · Oᵀ[d : d + width] + Σ_j V[j, d : d + width] · Pᵀ[j] (width ≤ kDimTile,
// a constant after inlining: the accumulators stay in registers across the key loop). α is 1, and
// not applied, when `alpha` is null.
FLASHMLIR_INLINE void pv_tile(float* restrict ot, const float* restrict st,
                                                          const float* restrict vrow, size_t D, size_t keys,
                                                          const vf* alpha, size_t d, const int width) {
  vf acc[kDimTile][kRowVectors];
  for (int t = 0; t < width; ++t)
    for (int r = 0; r < kRowVectors; ++r) {
      const vf o = vload(ot + (d + t) * kRows + r * kLanes);
      acc[t][r] = alpha ? vmul(o, alpha[r]) : o;
    }
  for (size_t j = 0; j < keys; ++j) {
    _mm_prefetch((const char*)(vrow + (kKeys + j) * D), _MM_HINT_T0);  // the next key block's row j
    vf p[kRowVectors];
    for (int r = 0; r < kRowVectors; ++r) p[r] = vload(st + j * kRows + r * kLanes);
    for (int t = 0; t < width; ++t) {
      const vf vv = vset1(vrow[j * D + t]);
      for (int r = 0; r < kRowVectors; ++r) acc[t][r] = vfmadd(vv, p[r], acc[t][r]);
    }
  }
  for (int t = 0; t < width; ++t)
    for (int r = 0; r < kRowVectors; ++r) vstore(ot + (d + t) * kRows + r * kLanes, acc[t][r]);
}

// One item: rows [q0, q0 + kRows) of query head `bh` (batch-major), every key it attends; with
// `lse` (may be null) also ln Σ_j exp(scale · q·k_j) per row, -inf for a row with no key. With
// dropout, Pᵀ is dropped after the row sums took it in (cpu_dropout.h). With `key_bias` (null, or
// [batch_heads, seq_k] in the exp2 domain: a key-padding mask, bool as 0 / -inf, a float one times
// log2 e) key j's bias is added to every row's score of it; its callers raise finite values below
// -1e30 to -1e30 first (attention_op.sdpa_mask), so that a row whose every key is masked so gets
// equal weights, as the op's arithmetic gives it, instead of overflowing to -inf.
FLASHMLIR_INLINE void attention_rows(
    const float* restrict q, const float* restrict k, const float* restrict v, float* restrict o,
    float* restrict lse, const float* restrict key_bias, const size_t d_model, size_t group, size_t seq_q,
    size_t seq_k, float scale, int causal, Dropout drop, size_t q_block, size_t bh) {
  const size_t D = d_model;
  const size_t q0 = q_block * kRows;
  const size_t rows = seq_q - q0 < kRows ? seq_q - q0 : kRows;
  const float* restrict qb = q + (bh * seq_q + q0) * D;
  const float* restrict kb = k + (bh / group) * seq_k * D;
  const float* restrict vb = v + (bh / group) * seq_k * D;
  float* restrict ob = o + (bh * seq_q + q0) * D;
  const float* restrict bias = key_bias ? key_bias + bh * seq_k : (const float*)0;

  float qt[D * kRows] __attribute__((aligned(64)));  // Qᵀ · scale · log2 e, zero past `rows`
  float ot[D * kRows] __attribute__((aligned(64)));  // Oᵀ, unnormalized
  float st[kKeys * kRows] __attribute__((aligned(64)));  // Sᵀ, then Pᵀ, of one key block
  const float qscale = scale * kLog2e;
  for (size_t d = 0; d < D; ++d)
    for (size_t i = 0; i < kRows; ++i) {
      qt[d * kRows + i] = i < rows ? qb[i * D + d] * qscale : 0.f;
      ot[d * kRows + i] = 0.f;
    }

  // P = 2^(S - shift) per row. The shift moves to a key block's maximum only when that passes it by
  // more than kMaxSlack, so P ≤ 2^kMaxSlack and most blocks leave O and l as they are (α = 1).
  vf shift[kRowVectors], row_sum[kRowVectors], row_index[kRowVectors];
  vu drop_x[kRowVectors], drop_shift[kRowVectors];  // dropout: each lane's x at key 0, its 16 bits
  for (int r = 0; r < kRowVectors; ++r) {
    shift[r] = vset1(-__builtin_inff());
    row_sum[r] = vzero();
    row_index[r] = vlane_index(q0 + r * kLanes);
    if (drop.on) dropout_rows(q0 + r * kLanes, bh * seq_q * seq_k, seq_k, drop, &drop_x[r], &drop_shift[r]);
  }
  // Top-left causal: row i attends keys 0..i, so keys past the block's last row are never needed.
  const size_t key_end = causal && q0 + rows < seq_k ? q0 + rows : seq_k;

  for (size_t k0 = 0; k0 < key_end; k0 += kKeys) {
    const size_t keys = key_end - k0 < kKeys ? key_end - k0 : kKeys;
    // Causal: keys after a row are -inf (only blocks reaching past the first row have any).
    const int diagonal = causal && k0 + keys - 1 > q0;
    vf block_max[kRowVectors];
    for (int r = 0; r < kRowVectors; ++r) block_max[r] = vset1(-__builtin_inff());

    // Sᵀ = K · Qᵀ, kKeyTile keys at a time (a ragged tail one key at a time), masked and its row
    // maxima taken while still in registers.
    size_t j = 0;
    for (; j + kKeyTile <= keys; j += kKeyTile) {
      vf acc[kKeyTile][kRowVectors];
      for (int t = 0; t < kKeyTile; ++t)
        for (int r = 0; r < kRowVectors; ++r) acc[t][r] = vzero();
      const float* restrict krow = kb + (k0 + j) * D;
      const float* knext = krow + kKeyTile * D;  // the next tile's rows, contiguous
      for (size_t d = 0; d < D; ++d) {
        _mm_prefetch((const char*)(knext + d * kKeyTile), _MM_HINT_T0);
        vf qv[kRowVectors];
        for (int r = 0; r < kRowVectors; ++r) qv[r] = vload(qt + d * kRows + r * kLanes);
        for (int t = 0; t < kKeyTile; ++t) {
          const vf kv = vset1(krow[t * D + d]);
          for (int r = 0; r < kRowVectors; ++r) acc[t][r] = vfmadd(kv, qv[r], acc[t][r]);
        }
      }
      for (int t = 0; t < kKeyTile; ++t)
        for (int r = 0; r < kRowVectors; ++r) {
          if (bias) acc[t][r] = vadd(acc[t][r], vset1(bias[k0 + j + t]));
          if (diagonal) acc[t][r] = masked_after_row(acc[t][r], k0 + j + t, row_index[r]);
          block_max[r] = vmax(block_max[r], acc[t][r]);
          vstore(st + (j + t) * kRows + r * kLanes, acc[t][r]);
        }
    }
    for (; j < keys; ++j) {
      vf acc[kRowVectors];
      for (int r = 0; r < kRowVectors; ++r) acc[r] = vzero();
      const float* restrict krow = kb + (k0 + j) * D;
      for (size_t d = 0; d < D; ++d) {
        const vf kv = vset1(krow[d]);
        for (int r = 0; r < kRowVectors; ++r) acc[r] = vfmadd(kv, vload(qt + d * kRows + r * kLanes), acc[r]);
      }
      for (int r = 0; r < kRowVectors; ++r) {
        if (bias) acc[r] = vadd(acc[r], vset1(bias[k0 + j]));
        if (diagonal) acc[r] = masked_after_row(acc[r], k0 + j, row_index[r]);
        block_max[r] = vmax(block_max[r], acc[r]);
        vstore(st + j * kRows + r * kLanes, acc[r]);
      }
    }

    // Online softmax in the exp2 domain, along j for all rows at once.
    vf alpha[kRowVectors];
    vmask moved = vmask_none();
    for (int r = 0; r < kRowVectors; ++r) {
      // A row whose keys so far are all masked keeps shift -inf: P = 0, its sums stay 0.
      const vmask move = vgt(block_max[r], vadd(shift[r], vset1(kMaxSlack)));
      moved = vmask_or(moved, move);
      const vf next = vselect(move, shift[r], block_max[r]);
      const vf base = vkeep(vne(next, vset1(-__builtin_inff())), next);
      alpha[r] = exp2_below_128(vsub(shift[r], base));  // 0 for a row seeing its first key
      shift[r] = next;
      vf sum = vzero();
      for (size_t jj = 0; jj < keys; ++jj) {
        float* s = st + jj * kRows + r * kLanes;
        const vf p = exp2_below_128(vsub(vload(s), base));
        sum = vadd(sum, p);
        if (drop.on) {
          const vu x = vu_add(drop_x[r], vu_set1((uint32_t)(k0 + jj) * kDropoutGolden));
          vstore(s, vkeep(dropout_kept(x, drop_shift[r], drop), p));
        } else {
          vstore(s, p);
        }
      }
      row_sum[r] = vfmadd(row_sum[r], alpha[r], sum);
    }

    // Oᵀ = α · Oᵀ + V[k0 : k0 + keys]ᵀ · Pᵀ, kDimTile head-dim entries at a time.
    const vf* rescale = vmask_any(moved) ? alpha : (const vf*)0;
    size_t d = 0;
    for (; d + kDimTile <= D; d += kDimTile) pv_tile(ot, st, vb + k0 * D + d, D, keys, rescale, d, kDimTile);
    for (; d < D; ++d) pv_tile(ot, st, vb + k0 * D + d, D, keys, rescale, d, 1);
  }

  // O = Oᵀ / l, 0 for a row whose every key was masked.
  float inv[kRows] __attribute__((aligned(64)));
  for (int r = 0; r < kRowVectors; ++r) {
    vstore(inv + r * kLanes, vkeep(vne(row_sum[r], vzero()), vdiv(vset1(drop.scale), row_sum[r])));
  }
  for (size_t i = 0; i < rows; ++i)
    for (size_t d = 0; d < D; ++d) ob[i * D + d] = ot[d * kRows + i] * inv[i];
  if (lse) {  // (shift + log2 Σ) in the exp2 domain, back to natural log
    float row_lse[kRows] __attribute__((aligned(64)));
    for (int r = 0; r < kRowVectors; ++r) {
      const vmask nonzero = vne(row_sum[r], vzero());
      const vf l2 = vadd(shift[r], log2_positive(vselect(nonzero, vset1(1.f), row_sum[r])));
      vstore(row_lse + r * kLanes, vselect(nonzero, vset1(-__builtin_inff()), vmul(l2, vset1(kLn2))));
    }
    for (size_t i = 0; i < rows; ++i) lse[bh * seq_q + q0 + i] = row_lse[i];
  }
}

// Cost of item `block` of a head, in key blocks, plus one for its fixed work (packing Qᵀ, writing O).
static inline size_t item_cost(size_t block, size_t seq_q, size_t seq_k, int causal) {
  const size_t q0 = block * kRows;
  const size_t rows = seq_q - q0 < kRows ? seq_q - q0 : kRows;
  const size_t key_end = causal && q0 + rows < seq_k ? q0 + rows : seq_k;
  return (key_end + kKeys - 1) / kKeys + 1;
}

// This workgroup's items (cpu_work_share.h).
FLASHMLIR_INLINE void work_share(
    const float* restrict q, const float* restrict k, const float* restrict v, float* restrict o,
    float* restrict lse, const float* restrict key_bias, const size_t D, size_t group, size_t batch_heads,
    size_t seq_q, size_t seq_k, float scale, int causal, Dropout drop, size_t wg, size_t wg_count) {
  const size_t blocks = (seq_q + kRows - 1) / kRows;
  FLASHMLIR_SHARE(item_cost(b, seq_q, seq_k, causal), blocks, batch_heads,
                  attention_rows(q, k, v, o, lse, key_bias, D, group, seq_q, seq_k, scale, causal, drop, b, h));
}

// IREE's call. Each binding arrives as MLIR's descriptor of a 1-d memref (allocated pointer,
// aligned pointer, element offset, size, stride): IREE may pack several tensors into one buffer,
// and the offset is where this one starts. Then the launch's constants and this workgroup's id
// and the grid's size.
#define FLASHMLIR_MEMREF(T, name) T* name##_allocated, T* restrict name, size_t name##_offset, size_t name##_size, \
                                  size_t name##_stride
#define FLASHMLIR_DEFINE_CPU_KERNEL(D)                                                                  \
  FLASHMLIR_EXPORT void flashmlir_attention_fwd_cpu_f32_d##D(                                           \
      FLASHMLIR_MEMREF(const float, q), FLASHMLIR_MEMREF(const float, k), FLASHMLIR_MEMREF(const float, v), \
      FLASHMLIR_MEMREF(float, o), size_t group, size_t batch_heads, size_t seq_q, size_t seq_k, float scale, \
      size_t causal, size_t workgroup, size_t workgroup_count) {                                         \
    work_share(q + q_offset, k + k_offset, v + v_offset, o + o_offset, (float*)0, (const float*)0, D,      \
               group, batch_heads, seq_q, seq_k, scale, causal != 0, no_dropout(), workgroup,            \
               workgroup_count);                                                                        \
  }                                                                                                     \
  /* With a key-padding mask: key_bias [batch_heads, seq_k], float32 in the exp2 domain, after v */     \
  /* (attention_rows; the torch path's masked sites, runtime/cpu_kernels.py). */                        \
  FLASHMLIR_EXPORT void flashmlir_attention_fwd_cpu_f32_d##D##_key_bias(                                \
      FLASHMLIR_MEMREF(const float, q), FLASHMLIR_MEMREF(const float, k), FLASHMLIR_MEMREF(const float, v), \
      FLASHMLIR_MEMREF(const float, key_bias), FLASHMLIR_MEMREF(float, o), size_t group,                   \
      size_t batch_heads, size_t seq_q, size_t seq_k, float scale, size_t causal, size_t workgroup,          \
      size_t workgroup_count) {                                                                          \
    work_share(q + q_offset, k + k_offset, v + v_offset, o + o_offset, (float*)0, key_bias + key_bias_offset, \
               D, group, batch_heads, seq_q, seq_k, scale, causal != 0, no_dropout(), workgroup,         \
               workgroup_count);                                                                        \
  }                                                                                                     \
  /* The training forward: also the rows' log-sum-exp, float32 [batch_heads, seq_q]. */                  \
  FLASHMLIR_EXPORT void flashmlir_attention_fwd_cpu_f32_d##D##_lse(                                     \
      FLASHMLIR_MEMREF(const float, q), FLASHMLIR_MEMREF(const float, k), FLASHMLIR_MEMREF(const float, v), \
      FLASHMLIR_MEMREF(float, o), FLASHMLIR_MEMREF(float, lse), size_t group, size_t batch_heads,          \
      size_t seq_q, size_t seq_k, float scale, size_t causal, size_t workgroup, size_t workgroup_count) {   \
    work_share(q + q_offset, k + k_offset, v + v_offset, o + o_offset, lse + lse_offset, (const float*)0, D, \
               group, batch_heads, seq_q, seq_k, scale, causal != 0, no_dropout(), workgroup,             \
               workgroup_count);                                                                         \
  }                                                                                                     \
  /* The training forward with a key-padding mask (as _key_bias, and the log-sum-exp). */                \
  FLASHMLIR_EXPORT void flashmlir_attention_fwd_cpu_f32_d##D##_lse_key_bias(                            \
      FLASHMLIR_MEMREF(const float, q), FLASHMLIR_MEMREF(const float, k), FLASHMLIR_MEMREF(const float, v), \
      FLASHMLIR_MEMREF(const float, key_bias), FLASHMLIR_MEMREF(float, o), FLASHMLIR_MEMREF(float, lse),   \
      size_t group, size_t batch_heads, size_t seq_q, size_t seq_k, float scale, size_t causal,             \
      size_t workgroup, size_t workgroup_count) {                                                        \
    work_share(q + q_offset, k + k_offset, v + v_offset, o + o_offset, lse + lse_offset,                   \
               key_bias + key_bias_offset, D, group, batch_heads, seq_q, seq_k, scale, causal != 0,        \
               no_dropout(), workgroup, workgroup_count);                                                \
  }                                                                                                     \
  /* The training forward with dropout: the int64 seed after v; ⌈p · 2¹⁶⌉ and 1 / (1 − p) after the */  \
  /* constants (cpu_dropout.h). */                                                                      \
  FLASHMLIR_EXPORT void flashmlir_attention_fwd_cpu_f32_d##D##_lse_dropout(                             \
      FLASHMLIR_MEMREF(const float, q), FLASHMLIR_MEMREF(const float, k), FLASHMLIR_MEMREF(const float, v), \
      FLASHMLIR_MEMREF(const int64_t, seed), FLASHMLIR_MEMREF(float, o), FLASHMLIR_MEMREF(float, lse),      \
      size_t group, size_t batch_heads, size_t seq_q, size_t seq_k, float scale, size_t causal,             \
      size_t dropout_threshold, float dropout_scale, size_t workgroup, size_t workgroup_count) {            \
    const Dropout drop = {1, (uint32_t)seed[seed_offset], (uint32_t)dropout_threshold, dropout_scale};   \
    work_share(q + q_offset, k + k_offset, v + v_offset, o + o_offset, lse + lse_offset, (const float*)0, D, \
               group, batch_heads, seq_q, seq_k, scale, causal != 0, drop, workgroup, workgroup_count);    \
  }

FLASHMLIR_DEFINE_CPU_KERNEL(32)
FLASHMLIR_DEFINE_CPU_KERNEL(64)
FLASHMLIR_DEFINE_CPU_KERNEL(128)
