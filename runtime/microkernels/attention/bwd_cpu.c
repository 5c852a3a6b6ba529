// Flash-attention backward for x86-64 CPUs (AVX-512 or AVX2 + FMA, cpu_simd.h), fp32, as IREE
// workgroups' work.
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
//
// One function per head dim that does all of it in one pass (FlashAttention-2's backward loop):
//   _fused  items of one (batch, K/V head): Δ for the group's rows, then _dkdv's loop over the
//           head's key blocks, adding each tile's dS·K into dQ as well (dQ rows in place, vectors
//           along the head dim). 5 matrix products a tile against the split's 7 (it need not
//           recompute S and dP for dQ), and still deterministic: one workgroup owns a head's dQ.
//           Only worth it where the heads share out evenly between the threads (the pass decides:
//           compiler/microkernels.py, CpuAttentionKernel.fused_backward).
// With FLASHMLIR_STREAM_ROWS (catalog `stream_rows`) the kernels keep that many streamed rows' dS
// (and P) in a small buffer and update the resident accumulators once for all of them
// (rank_update), instead of loading and storing the D × kBlock tiles for every register tile: the
// one-pass kernel +4-22% at head dim 128 on a Zen 3 (benchmarks/results/cpu-2026-12-02-avx2-stream-rows.md).
#include <stddef.h>
#include <stdint.h>

#include "cpu_dropout.h"
#include "cpu_simd.h"
#include "cpu_work_share.h"

#define FLASHMLIR_EXPORT __attribute__((visibility("default")))

#ifndef FLASHMLIR_ROW_VECTORS
#define FLASHMLIR_ROW_VECTORS 2
#endif
#ifndef FLASHMLIR_KEY_TILE
#define FLASHMLIR_KEY_TILE 4
#endif
#ifndef FLASHMLIR_STREAM_ROWS
#define FLASHMLIR_STREAM_ROWS 0
#endif

enum {
  kVectors = FLASHMLIR_ROW_VECTORS,  // vectors along a block
  kBlock = kLanes * kVectors,        // query rows (_dq) or keys (_dkdv) per item
  kTile = FLASHMLIR_KEY_TILE,        // keys (_dq) or query rows (_dkdv) per register tile
  // Rows of the streamed side (keys in _dq, query rows in _dkdv and _fused) whose dS (and P) wait in
  // a small buffer before the block's resident accumulators (dQᵀ; dKᵀ, dVᵀ) take them in one pass
  // over the head dim (rank_update); 0: each register tile updates them itself.
  kStreamRows = FLASHMLIR_STREAM_ROWS,
};

// lse in the exp2 domain; +inf for a row that attends nothing (then every P is 0).
static inline float lse2_of(float lse) { return lse == -__builtin_inff() ? __builtin_inff() : lse * kLog2e; }

// The two register-tile products both kernels start from, for t < width (a constant after
// inlining) over the block's kVectors vectors: s[t] = Σ_d a[t, d] · xᵀ[d], dp[t] = Σ_d b[t, d] · yᵀ[d],
// with a and b rows of D in memory and xᵀ, yᵀ the block's packed D × kBlock operands.
FLASHMLIR_INLINE void two_products(
    const float* restrict a, const float* restrict b, const float* restrict xt, const float* restrict yt, size_t D,
    const int width, vf (*s)[kVectors], vf (*dp)[kVectors]) {
  for (int t = 0; t < width; ++t)
    for (int r = 0; r < kVectors; ++r) s[t][r] = dp[t][r] = vzero();
  for (size_t d = 0; d < D; ++d) {
    vf x[kVectors], y[kVectors];
    for (int r = 0; r < kVectors; ++r) {
      x[r] = vload(xt + d * kBlock + r * kLanes);
      y[r] = vload(yt + d * kBlock + r * kLanes);
    }
    for (int t = 0; t < width; ++t) {
      const vf ab = vset1(a[t * D + d]), bb = vset1(b[t * D + d]);
      for (int r = 0; r < kVectors; ++r) {
        s[t][r] = vfmadd(ab, x[r], s[t][r]);
        dp[t][r] = vfmadd(bb, y[r], dp[t][r]);
      }
    }
  }
}

// out[d, :] += Σ_t a[t, d] · b[t, :] for d < D over `rows` rows: `out` a D × kBlock tile (dQᵀ, dKᵀ or
// dVᵀ), `a` rows of D in memory (K; Q or dO), `b` the buffered rows of kBlock (dS, or P). kStep
// head-dim entries at a time, their kStep × kVectors accumulators in registers over all the rows,
// so that `out` is read and written once per kStreamRows rows instead of once per register tile.
FLASHMLIR_INLINE void rank_update(
    const float* restrict a, const float* restrict b, size_t rows, float* restrict out, size_t D) {
  enum { kStep = 4 };  // 4 × kVectors accumulators: 8 of AVX2's 16 registers at kVectors 2
  for (size_t d0 = 0; d0 < D; d0 += kStep) {
    vf acc[kStep][kVectors];
    for (int x = 0; x < kStep; ++x)
      for (int r = 0; r < kVectors; ++r) acc[x][r] = vload(out + (d0 + x) * kBlock + r * kLanes);
    for (size_t t = 0; t < rows; ++t) {
      vf bt[kVectors];
      for (int r = 0; r < kVectors; ++r) bt[r] = vload(b + t * kBlock + r * kLanes);
      for (int x = 0; x < kStep; ++x) {
        const vf at = vset1(a[t * D + d0 + x]);
        for (int r = 0; r < kVectors; ++r) acc[x][r] = vfmadd(at, bt[r], acc[x][r]);
      }
    }
    for (int x = 0; x < kStep; ++x)
      for (int r = 0; r < kVectors; ++r) vstore(out + (d0 + x) * kBlock + r * kLanes, acc[x][r]);
  }
}

// ---------------------------------------------------------------------------------------------
// dQ

// Keys [j, j + width) against the block's rows: P and dS in registers, then dQᵀ += Kᵀ·dSᵀ.
FLASHMLIR_INLINE void dq_tile(
    const float* restrict krow, const float* restrict vrow, const float* restrict qt, const float* restrict dot,
    float* restrict dqt, const vf* lse2, const vf* delta, const vf* row, size_t D, size_t j,
    size_t seq_k, float c, int causal, Dropout drop, const vu* drop_x, const vu* drop_shift,
    float* restrict dsbuf, const float* restrict bias, const int width) {
  vf s[kTile][kVectors], dp[kTile][kVectors];
  two_products(krow, vrow, qt, dot, D, width, s, dp);  // S = K·Qᵀ, dP = V·dOᵀ
  const vf cv = vset1(c);
  for (int t = 0; t < width; ++t) {
    const vf key = vset1((float)(j + t));
    for (int r = 0; r < kVectors; ++r) {
      // With a key bias b (exp2 domain): P = 2^(s·c + b − lse₂); b = -inf drops the key.
      const vf l2 = bias ? vsub(lse2[r], vset1(bias[t])) : lse2[r];
      vf p = exp2_below_128(vfmsub(s[t][r], cv, l2));
      vmask keep = j + t < seq_k ? vmask_all() : vmask_none();
      if (causal) keep = vmask_and(keep, vle(key, row[r]));
      p = vkeep(keep, p);
      vf dpz = dp[t][r];  // dP, with dropout dP ∘ Z
      if (drop.on) {
        const vu x = vu_add(drop_x[r], vu_set1((uint32_t)(j + t) * kDropoutGolden));
        dpz = vkeep(dropout_kept(x, drop_shift[r], drop), vmul(dpz, vset1(drop.scale)));
      }
      s[t][r] = vmul(p, vsub(dpz, delta[r]));  // dS
    }
  }
  if (dsbuf) {  // dQᵀ takes these keys later (rank_update)
    for (int t = 0; t < width; ++t)
      for (int r = 0; r < kVectors; ++r) vstore(dsbuf + t * kBlock + r * kLanes, s[t][r]);
    return;
  }
  for (size_t d = 0; d < D; ++d) {
    vf acc[kVectors];
    for (int r = 0; r < kVectors; ++r) acc[r] = vload(dqt + d * kBlock + r * kLanes);
    for (int t = 0; t < width; ++t) {
      const vf kb = vset1(krow[t * D + d]);
      for (int r = 0; r < kVectors; ++r) acc[r] = vfmadd(kb, s[t][r], acc[r]);
    }
    for (int r = 0; r < kVectors; ++r) vstore(dqt + d * kBlock + r * kLanes, acc[r]);
  }
}

FLASHMLIR_INLINE void dq_rows(
    const float* restrict q, const float* restrict k, const float* restrict v, const float* restrict o,
    const float* restrict d_o, const float* restrict lse, const float* restrict key_bias, float* restrict dq,
    float* restrict delta_out, const size_t D, size_t group, size_t seq_q, size_t seq_k, float scale, int causal,
    Dropout drop, size_t block, size_t bh) {
  const size_t q0 = block * kBlock;
  const size_t rows = seq_q - q0 < kBlock ? seq_q - q0 : kBlock;
  const size_t row0 = bh * seq_q + q0;
  const float* restrict kb = k + (bh / group) * seq_k * D;
  const float* restrict vb = v + (bh / group) * seq_k * D;
  const float* restrict bias = key_bias ? key_bias + bh * seq_k : (const float*)0;

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
  vf lse2[kVectors], delta[kVectors], row[kVectors];
  vu drop_x[kVectors], drop_shift[kVectors];  // dropout: each lane's x at key 0, its 16 bits
  for (int r = 0; r < kVectors; ++r) {
    lse2[r] = vload(lse2v + r * kLanes);
    delta[r] = vload(deltav + r * kLanes);
    row[r] = vlane_index(q0 + r * kLanes);
    if (drop.on) dropout_rows(q0 + r * kLanes, bh * seq_q * seq_k, seq_k, drop, &drop_x[r], &drop_shift[r]);
  }
  const float c = scale * kLog2e;
  const size_t key_end = causal && q0 + rows < seq_k ? q0 + rows : seq_k;
  if (kStreamRows > 0) {
    float dsbuf[(kStreamRows > 0 ? kStreamRows : 1) * kBlock] __attribute__((aligned(64)));
    for (size_t j0 = 0; j0 < key_end; j0 += kStreamRows) {
      const size_t keys = key_end - j0 < kStreamRows ? key_end - j0 : kStreamRows;
      size_t j = j0;
      for (; j + kTile <= j0 + keys; j += kTile)
        dq_tile(kb + j * D, vb + j * D, qt, dot, dqt, lse2, delta, row, D, j, seq_k, c, causal, drop, drop_x,
                drop_shift, dsbuf + (j - j0) * kBlock, bias ? bias + j : 0, kTile);
      for (; j < j0 + keys; ++j)
        dq_tile(kb + j * D, vb + j * D, qt, dot, dqt, lse2, delta, row, D, j, seq_k, c, causal, drop, drop_x,
                drop_shift, dsbuf + (j - j0) * kBlock, bias ? bias + j : 0, 1);
      rank_update(kb + j0 * D, dsbuf, keys, dqt, D);  // dQᵀ += Kᵀ·dSᵀ
    }
  } else {
    size_t j = 0;
    for (; j + kTile <= key_end; j += kTile)
      dq_tile(kb + j * D, vb + j * D, qt, dot, dqt, lse2, delta, row, D, j, seq_k, c, causal, drop, drop_x, drop_shift,
              0, bias ? bias + j : 0, kTile);
    for (; j < key_end; ++j)
      dq_tile(kb + j * D, vb + j * D, qt, dot, dqt, lse2, delta, row, D, j, seq_k, c, causal, drop, drop_x, drop_shift,
              0, bias ? bias + j : 0, 1);
  }
  for (size_t i = 0; i < rows; ++i)
    for (size_t d = 0; d < D; ++d) dq[(row0 + i) * D + d] = dqt[d * kBlock + i] * scale;
}

// ---------------------------------------------------------------------------------------------
// dK, dV

// dQ[t, :] += Σ_j dS[t, j] · K[j, :] for t < width over j < keys, with dS as the tile holds it
// (vectors along keys). dS goes through a small buffer to be broadcast a key at a time; dQ and K
// are read along the head dim, in chunks of up to 4 vectors a row (16 accumulators for 4 rows).
FLASHMLIR_INLINE void dq_add(
    vf (*ds)[kVectors], const float* restrict krow, float* restrict dqrow, size_t keys, size_t D,
    const int width) {
  float dsv[kTile * kBlock] __attribute__((aligned(64)));
  for (int t = 0; t < width; ++t)
    for (int r = 0; r < kVectors; ++r) vstore(dsv + t * kBlock + r * kLanes, ds[t][r]);
  enum { kChunk = 4 };
  const size_t chunk = D / kLanes < kChunk ? D / kLanes : kChunk;  // head dims are multiples of 16
  for (size_t d0 = 0; d0 < D; d0 += chunk * kLanes) {
    vf acc[kTile][kChunk];
    for (int t = 0; t < width; ++t)
      for (size_t x = 0; x < chunk; ++x) acc[t][x] = vloadu(dqrow + t * D + d0 + x * kLanes);
    for (size_t j = 0; j < keys; ++j) {
      vf kv[kChunk];
      for (size_t x = 0; x < chunk; ++x) kv[x] = vloadu(krow + j * D + d0 + x * kLanes);
      for (int t = 0; t < width; ++t) {
        const vf b = vset1(dsv[t * kBlock + j]);
        for (size_t x = 0; x < chunk; ++x) acc[t][x] = vfmadd(b, kv[x], acc[t][x]);
      }
    }
    for (int t = 0; t < width; ++t)
      for (size_t x = 0; x < chunk; ++x) vstoreu(dqrow + t * D + d0 + x * kLanes, acc[t][x]);
  }
}

// Query rows [i, i + width) of one head against the block's keys: dVᵀ += dOᵀ·P, dKᵀ += Qᵀ·dS.
// With `dqrow` (the _fused kernel): dQ rows [i, i + width) += dS·K over the block's `keys` keys,
// K's rows `krow` as they lie in memory.
FLASHMLIR_INLINE void dkdv_tile(
    const float* restrict qrow, const float* restrict dorow, const float* restrict lse, const float* restrict delta,
    const float* restrict kt, const float* restrict vt, float* restrict dkt, float* restrict dvt,
    const float* restrict krow, float* restrict dqrow, size_t keys, const vf* key, vmask const* in_range,
    size_t D, size_t i, float c, int causal, Dropout drop, const vu* key_x, uint32_t head_x, uint32_t row_step,
    float* restrict pbuf, float* restrict dsbuf, const vf* kbias, const int width) {
  vf s[kTile][kVectors], dp[kTile][kVectors];
  two_products(qrow, dorow, kt, vt, D, width, s, dp);  // S = Q·Kᵀ, dP = dO·Vᵀ
  const vf cv = vset1(c);
  for (int t = 0; t < width; ++t) {
    const vf l2 = vset1(lse2_of(lse[t])), dl = vset1(delta[t]);
    const vf row = vset1((float)(i + t));
    for (int r = 0; r < kVectors; ++r) {
      vmask keep = in_range[r];
      if (causal) keep = vmask_and(keep, vle(key[r], row));
      const vf x = kbias ? vadd(vfmsub(s[t][r], cv, l2), kbias[r]) : vfmsub(s[t][r], cv, l2);  // + the keys' bias
      const vf p = vkeep(keep, exp2_below_128(x));  // P
      if (drop.on) {  // dV takes P ∘ kept (its 1 / (1 − p) at the end), dS P ∘ (dP ∘ Z − Δ)
        const uint32_t row_i = (uint32_t)(i + t);  // the pair's first row's x, this row's 16 bits
        const vmask kept = dropout_kept(vu_add(key_x[r], vu_set1(head_x + (row_i & ~8u) * row_step)),
                                        vu_set1(((row_i >> 3) & 1u) * 16u), drop);
        s[t][r] = vkeep(kept, p);
        dp[t][r] = vmul(p, vsub(vkeep(kept, vmul(dp[t][r], vset1(drop.scale))), dl));
      } else {
        s[t][r] = p;
        dp[t][r] = vmul(p, vsub(dp[t][r], dl));  // dS
      }
    }
  }
  if (pbuf) {  // dKᵀ and dVᵀ take these rows later (rank_update)
    for (int t = 0; t < width; ++t)
      for (int r = 0; r < kVectors; ++r) {
        vstore(pbuf + t * kBlock + r * kLanes, s[t][r]);
        vstore(dsbuf + t * kBlock + r * kLanes, dp[t][r]);
      }
    if (dqrow) dq_add(dp, krow, dqrow, keys, D, width);
    return;
  }
  for (size_t d = 0; d < D; ++d) {
    vf dk[kVectors], dv[kVectors];
    for (int r = 0; r < kVectors; ++r) {
      dk[r] = vload(dkt + d * kBlock + r * kLanes);
      dv[r] = vload(dvt + d * kBlock + r * kLanes);
    }
    for (int t = 0; t < width; ++t) {
      const vf qb = vset1(qrow[t * D + d]), db = vset1(dorow[t * D + d]);
      for (int r = 0; r < kVectors; ++r) {
        dk[r] = vfmadd(qb, dp[t][r], dk[r]);
        dv[r] = vfmadd(db, s[t][r], dv[r]);
      }
    }
    for (int r = 0; r < kVectors; ++r) {
      vstore(dkt + d * kBlock + r * kLanes, dk[r]);
      vstore(dvt + d * kBlock + r * kLanes, dv[r]);
    }
  }
  if (dqrow) dq_add(dp, krow, dqrow, keys, D, width);
}

// `dq` null: the split's _dkdv; else the _fused kernel's dQ, added into.
FLASHMLIR_INLINE void dkdv_keys(
    const float* restrict q, const float* restrict k, const float* restrict v, const float* restrict d_o,
    const float* restrict lse, const float* restrict delta, const float* restrict key_bias, float* restrict dk,
    float* restrict dv, float* restrict dq, const size_t D, size_t group, size_t seq_q, size_t seq_k, float scale,
    int causal, Dropout drop, size_t block, size_t bh_kv) {
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
  vf key[kVectors];
  vmask in_range[kVectors];
  vu key_x[kVectors];  // dropout: each lane's key · golden
  for (int r = 0; r < kVectors; ++r) {
    key[r] = vlane_index(k0 + r * kLanes);
    in_range[r] = vlt(key[r], vset1((float)seq_k));
    if (drop.on) key_x[r] = dropout_lane_x((uint32_t)(k0 + r * kLanes), 1);
  }
  const uint32_t row_step = (uint32_t)seq_k * kDropoutGolden;  // x from one query row to the next
  const float c = scale * kLog2e;
  const size_t first = causal ? k0 : 0;  // top-left causal: earlier rows see none of these keys
  for (size_t h = 0; h < group; ++h) {
    const size_t bh = bh_kv * group + h;
    const float* restrict qh = q + bh * seq_q * D;
    const float* restrict doh = d_o + bh * seq_q * D;
    const float* restrict lh = lse + bh * seq_q;
    const float* restrict deh = delta + bh * seq_q;
    float* restrict dqh = dq ? dq + bh * seq_q * D : 0;
    // With a key bias: this head's values for the block's keys, a vector per lane group.
    vf kbias_v[kVectors];
    if (key_bias) {
      float kb[kBlock] __attribute__((aligned(64)));
      for (size_t j = 0; j < kBlock; ++j) kb[j] = j < keys ? key_bias[bh * seq_k + k0 + j] : 0.f;
      for (int r = 0; r < kVectors; ++r) kbias_v[r] = vload(kb + r * kLanes);
    }
    const vf* kbias = key_bias ? kbias_v : (const vf*)0;
    // x of (this head, row 0, key 0)
    const uint32_t head_x = (uint32_t)(bh * seq_q * seq_k) * kDropoutGolden + drop.seed;
    if (kStreamRows > 0) {
      float pbuf[(kStreamRows > 0 ? kStreamRows : 1) * kBlock] __attribute__((aligned(64)));
      float dsbuf[(kStreamRows > 0 ? kStreamRows : 1) * kBlock] __attribute__((aligned(64)));
      for (size_t i0 = first; i0 < seq_q; i0 += kStreamRows) {
        const size_t rows = seq_q - i0 < kStreamRows ? seq_q - i0 : kStreamRows;
        size_t i = i0;
        for (; i + kTile <= i0 + rows; i += kTile)
          dkdv_tile(qh + i * D, doh + i * D, lh + i, deh + i, kt, vt, dkt, dvt, k + key0 * D, dq ? dqh + i * D : 0,
                    keys, key, in_range, D, i, c, causal, drop, key_x, head_x, row_step, pbuf + (i - i0) * kBlock,
                    dsbuf + (i - i0) * kBlock, kbias, kTile);
        for (; i < i0 + rows; ++i)
          dkdv_tile(qh + i * D, doh + i * D, lh + i, deh + i, kt, vt, dkt, dvt, k + key0 * D, dq ? dqh + i * D : 0,
                    keys, key, in_range, D, i, c, causal, drop, key_x, head_x, row_step, pbuf + (i - i0) * kBlock,
                    dsbuf + (i - i0) * kBlock, kbias, 1);
        rank_update(qh + i0 * D, dsbuf, rows, dkt, D);   // dKᵀ += Qᵀ·dS
        rank_update(doh + i0 * D, pbuf, rows, dvt, D);   // dVᵀ += dOᵀ·P
      }
      continue;
    }
    size_t i = first;
    for (; i + kTile <= seq_q; i += kTile)
      dkdv_tile(qh + i * D, doh + i * D, lh + i, deh + i, kt, vt, dkt, dvt, k + key0 * D, dq ? dqh + i * D : 0, keys,
                key, in_range, D, i, c, causal, drop, key_x, head_x, row_step, 0, 0, kbias, kTile);
    for (; i < seq_q; ++i)
      dkdv_tile(qh + i * D, doh + i * D, lh + i, deh + i, kt, vt, dkt, dvt, k + key0 * D, dq ? dqh + i * D : 0, keys,
                key, in_range, D, i, c, causal, drop, key_x, head_x, row_step, 0, 0, kbias, 1);
  }
  for (size_t j = 0; j < keys; ++j)
    for (size_t d = 0; d < D; ++d) {
      dk[(key0 + j) * D + d] = dkt[d * kBlock + j] * scale;
      dv[(key0 + j) * D + d] = dvt[d * kBlock + j] * drop.scale;
    }
}

// ---------------------------------------------------------------------------------------------
// dQ, dK, dV in one pass

// Row i's Δ = Σ_d dO[i, d] · O[i, d] (head dims are multiples of 16).
static inline float row_delta(const float* restrict o, const float* restrict d_o, size_t D) {
  vf sum = vzero();
  for (size_t d = 0; d < D; d += kLanes) sum = vfmadd(vloadu(d_o + d), vloadu(o + d), sum);
  return vsum(sum);
}

// One (batch, K/V head): its group's query heads are consecutive rows of Q, O, dO, dQ.
FLASHMLIR_INLINE void fused_head(
    const float* restrict q, const float* restrict k, const float* restrict v, const float* restrict o,
    const float* restrict d_o, const float* restrict lse, const float* restrict key_bias, float* restrict dq,
    float* restrict delta, float* restrict dk, float* restrict dv, const size_t D, size_t group, size_t seq_q,
    size_t seq_k, float scale, int causal, Dropout drop, size_t bh_kv) {
  const size_t row0 = bh_kv * group * seq_q, rows = group * seq_q;
  for (size_t i = row0; i < row0 + rows; ++i) {
    delta[i] = row_delta(o + i * D, d_o + i * D, D);
    for (size_t d = 0; d < D; d += kLanes) vstoreu(dq + i * D + d, vzero());
  }
  const size_t blocks = (seq_k + kBlock - 1) / kBlock;
  for (size_t b = 0; b < blocks; ++b)
    dkdv_keys(q, k, v, d_o, lse, delta, key_bias, dk, dv, dq, D, group, seq_q, seq_k, scale, causal, drop, b, bh_kv);
  const vf s = vset1(scale);
  for (size_t i = row0; i < row0 + rows; ++i)
    for (size_t d = 0; d < D; d += kLanes)
      vstoreu(dq + i * D + d, vmul(vloadu(dq + i * D + d), s));
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

FLASHMLIR_INLINE void dq_share(
    const float* q, const float* k, const float* v, const float* o, const float* d_o, const float* lse,
    const float* key_bias, float* dq, float* delta, const size_t D, size_t group, size_t batch_heads, size_t seq_q,
    size_t seq_k, float scale, int causal, Dropout drop, size_t wg, size_t wg_count) {
  const size_t blocks = (seq_q + kBlock - 1) / kBlock;
  FLASHMLIR_SHARE(dq_cost(b, seq_q, seq_k, causal), blocks, batch_heads,
                  dq_rows(q, k, v, o, d_o, lse, key_bias, dq, delta, D, group, seq_q, seq_k, scale, causal, drop, b,
                          h));
}

FLASHMLIR_INLINE void dkdv_share(
    const float* q, const float* k, const float* v, const float* d_o, const float* lse, const float* delta,
    const float* key_bias, float* dk, float* dv, const size_t D, size_t group, size_t batch_heads, size_t seq_q,
    size_t seq_k, float scale, int causal, Dropout drop, size_t wg, size_t wg_count) {
  const size_t blocks = (seq_k + kBlock - 1) / kBlock;
  FLASHMLIR_SHARE(dkdv_cost(b, seq_q, group, causal), blocks, batch_heads / group,
                  dkdv_keys(q, k, v, d_o, lse, delta, key_bias, dk, dv, 0, D, group, seq_q, seq_k, scale, causal,
                            drop, b, h));
}

FLASHMLIR_INLINE void fused_share(
    const float* q, const float* k, const float* v, const float* o, const float* d_o, const float* lse,
    const float* key_bias, float* dq, float* delta, float* dk, float* dv, const size_t D, size_t group,
    size_t batch_heads, size_t seq_q, size_t seq_k, float scale, int causal, Dropout drop, size_t wg,
    size_t wg_count) {
  FLASHMLIR_SHARE(1, 1, batch_heads / group,  // heads cost the same
                  fused_head(q, k, v, o, d_o, lse, key_bias, dq, delta, dk, dv, D, group, seq_q, seq_k, scale, causal,
                             drop, h));
}

// IREE's calls: bindings as MLIR's 1-d memref descriptors (see the forward), then the constants
// (batch_heads counts query heads), this workgroup's id and the grid's size.
#define FLASHMLIR_MEMREF(T, name) T* name##_allocated, T* restrict name, size_t name##_offset, size_t name##_size, \
                                  size_t name##_stride
#define NO_BIAS ((const float*)0)
#define FLASHMLIR_DEFINE_CPU_BACKWARD(D)                                                                     \
  FLASHMLIR_EXPORT void flashmlir_attention_bwd_cpu_f32_d##D##_dq(                                           \
      FLASHMLIR_MEMREF(const float, q), FLASHMLIR_MEMREF(const float, k), FLASHMLIR_MEMREF(const float, v),   \
      FLASHMLIR_MEMREF(const float, o), FLASHMLIR_MEMREF(const float, d_o), FLASHMLIR_MEMREF(const float, lse), \
      FLASHMLIR_MEMREF(float, dq), FLASHMLIR_MEMREF(float, delta), size_t group, size_t batch_heads,           \
      size_t seq_q, size_t seq_k, float scale, size_t causal, size_t wg, size_t wg_count) {                    \
    dq_share(q + q_offset, k + k_offset, v + v_offset, o + o_offset, d_o + d_o_offset, lse + lse_offset, NO_BIAS, \
             dq + dq_offset, delta + delta_offset, D, group, batch_heads, seq_q, seq_k, scale, causal != 0,     \
             no_dropout(), wg, wg_count);                                                                    \
  }                                                                                                          \
  FLASHMLIR_EXPORT void flashmlir_attention_bwd_cpu_f32_d##D##_dkdv(                                         \
      FLASHMLIR_MEMREF(const float, q), FLASHMLIR_MEMREF(const float, k), FLASHMLIR_MEMREF(const float, v),   \
      FLASHMLIR_MEMREF(const float, d_o), FLASHMLIR_MEMREF(const float, lse),                                \
      FLASHMLIR_MEMREF(const float, delta), FLASHMLIR_MEMREF(float, dk), FLASHMLIR_MEMREF(float, dv),          \
      size_t group, size_t batch_heads, size_t seq_q, size_t seq_k, float scale, size_t causal, size_t wg,     \
      size_t wg_count) {                                                                                     \
    dkdv_share(q + q_offset, k + k_offset, v + v_offset, d_o + d_o_offset, lse + lse_offset,                  \
               delta + delta_offset, NO_BIAS, dk + dk_offset, dv + dv_offset, D, group, batch_heads, seq_q, seq_k,      \
               scale, causal != 0, no_dropout(), wg, wg_count);                                              \
  }                                                                                                          \
  FLASHMLIR_EXPORT void flashmlir_attention_bwd_cpu_f32_d##D##_fused(                                        \
      FLASHMLIR_MEMREF(const float, q), FLASHMLIR_MEMREF(const float, k), FLASHMLIR_MEMREF(const float, v),   \
      FLASHMLIR_MEMREF(const float, o), FLASHMLIR_MEMREF(const float, d_o), FLASHMLIR_MEMREF(const float, lse), \
      FLASHMLIR_MEMREF(float, dq), FLASHMLIR_MEMREF(float, delta), FLASHMLIR_MEMREF(float, dk),                \
      FLASHMLIR_MEMREF(float, dv), size_t group, size_t batch_heads, size_t seq_q, size_t seq_k, float scale,  \
      size_t causal, size_t wg, size_t wg_count) {                                                           \
    fused_share(q + q_offset, k + k_offset, v + v_offset, o + o_offset, d_o + d_o_offset, lse + lse_offset, NO_BIAS, \
                dq + dq_offset, delta + delta_offset, dk + dk_offset, dv + dv_offset, D, group, batch_heads,   \
                seq_q, seq_k, scale, causal != 0, no_dropout(), wg, wg_count);                               \
  }                                                                                                          \
  FLASHMLIR_DEFINE_CPU_BACKWARD_DROPOUT(D)                                                                   \
  FLASHMLIR_DEFINE_CPU_BACKWARD_KEY_BIAS(D)

// The key-bias twins of the three (a key-padding mask, the forward's `_key_bias`): key_bias
// [batch_heads, seq_k], float32 in the exp2 domain, after the inputs; P = 2^(s·c + b − lse₂).
#define FLASHMLIR_DEFINE_CPU_BACKWARD_KEY_BIAS(D)                                                            \
  FLASHMLIR_EXPORT void flashmlir_attention_bwd_cpu_f32_d##D##_dq_key_bias(                                  \
      FLASHMLIR_MEMREF(const float, q), FLASHMLIR_MEMREF(const float, k), FLASHMLIR_MEMREF(const float, v),   \
      FLASHMLIR_MEMREF(const float, o), FLASHMLIR_MEMREF(const float, d_o), FLASHMLIR_MEMREF(const float, lse), \
      FLASHMLIR_MEMREF(const float, key_bias), FLASHMLIR_MEMREF(float, dq), FLASHMLIR_MEMREF(float, delta),    \
      size_t group, size_t batch_heads, size_t seq_q, size_t seq_k, float scale, size_t causal, size_t wg,     \
      size_t wg_count) {                                                                                     \
    dq_share(q + q_offset, k + k_offset, v + v_offset, o + o_offset, d_o + d_o_offset, lse + lse_offset,      \
             key_bias + key_bias_offset, dq + dq_offset, delta + delta_offset, D, group, batch_heads, seq_q,     \
             seq_k, scale, causal != 0, no_dropout(), wg, wg_count);                                         \
  }                                                                                                          \
  FLASHMLIR_EXPORT void flashmlir_attention_bwd_cpu_f32_d##D##_dkdv_key_bias(                                \
      FLASHMLIR_MEMREF(const float, q), FLASHMLIR_MEMREF(const float, k), FLASHMLIR_MEMREF(const float, v),   \
      FLASHMLIR_MEMREF(const float, d_o), FLASHMLIR_MEMREF(const float, lse),                                \
      FLASHMLIR_MEMREF(const float, delta), FLASHMLIR_MEMREF(const float, key_bias), FLASHMLIR_MEMREF(float, dk), \
      FLASHMLIR_MEMREF(float, dv), size_t group, size_t batch_heads, size_t seq_q, size_t seq_k, float scale,  \
      size_t causal, size_t wg, size_t wg_count) {                                                           \
    dkdv_share(q + q_offset, k + k_offset, v + v_offset, d_o + d_o_offset, lse + lse_offset,                  \
               delta + delta_offset, key_bias + key_bias_offset, dk + dk_offset, dv + dv_offset, D, group,     \
               batch_heads, seq_q, seq_k, scale, causal != 0, no_dropout(), wg, wg_count);                   \
  }                                                                                                          \
  FLASHMLIR_EXPORT void flashmlir_attention_bwd_cpu_f32_d##D##_fused_key_bias(                               \
      FLASHMLIR_MEMREF(const float, q), FLASHMLIR_MEMREF(const float, k), FLASHMLIR_MEMREF(const float, v),   \
      FLASHMLIR_MEMREF(const float, o), FLASHMLIR_MEMREF(const float, d_o), FLASHMLIR_MEMREF(const float, lse), \
      FLASHMLIR_MEMREF(const float, key_bias), FLASHMLIR_MEMREF(float, dq), FLASHMLIR_MEMREF(float, delta),    \
      FLASHMLIR_MEMREF(float, dk), FLASHMLIR_MEMREF(float, dv), size_t group, size_t batch_heads, size_t seq_q, \
      size_t seq_k, float scale, size_t causal, size_t wg, size_t wg_count) {                                \
    fused_share(q + q_offset, k + k_offset, v + v_offset, o + o_offset, d_o + d_o_offset, lse + lse_offset,   \
                key_bias + key_bias_offset, dq + dq_offset, delta + delta_offset, dk + dk_offset,              \
                dv + dv_offset, D, group, batch_heads, seq_q, seq_k, scale, causal != 0, no_dropout(), wg,     \
                wg_count);                                                                                   \
  }

// The dropout twins of the three (the training pair with dropout, cpu_dropout.h): the forward's int64
// seed after the inputs; ⌈p · 2¹⁶⌉ and 1 / (1 − p) after the constants.
#define FLASHMLIR_DROPOUT_CONSTANTS size_t dropout_threshold, float dropout_scale
#define FLASHMLIR_DROPOUT ((Dropout){1, (uint32_t)seed[seed_offset], (uint32_t)dropout_threshold, dropout_scale})
#define FLASHMLIR_DEFINE_CPU_BACKWARD_DROPOUT(D)                                                             \
  FLASHMLIR_EXPORT void flashmlir_attention_bwd_cpu_f32_d##D##_dq_dropout(                                   \
      FLASHMLIR_MEMREF(const float, q), FLASHMLIR_MEMREF(const float, k), FLASHMLIR_MEMREF(const float, v),   \
      FLASHMLIR_MEMREF(const float, o), FLASHMLIR_MEMREF(const float, d_o), FLASHMLIR_MEMREF(const float, lse), \
      FLASHMLIR_MEMREF(const int64_t, seed), FLASHMLIR_MEMREF(float, dq), FLASHMLIR_MEMREF(float, delta),      \
      size_t group, size_t batch_heads, size_t seq_q, size_t seq_k, float scale, size_t causal,               \
      FLASHMLIR_DROPOUT_CONSTANTS, size_t wg, size_t wg_count) {                                             \
    dq_share(q + q_offset, k + k_offset, v + v_offset, o + o_offset, d_o + d_o_offset, lse + lse_offset, NO_BIAS, \
             dq + dq_offset, delta + delta_offset, D, group, batch_heads, seq_q, seq_k, scale, causal != 0,     \
             FLASHMLIR_DROPOUT, wg, wg_count);                                                               \
  }                                                                                                          \
  FLASHMLIR_EXPORT void flashmlir_attention_bwd_cpu_f32_d##D##_dkdv_dropout(                                 \
      FLASHMLIR_MEMREF(const float, q), FLASHMLIR_MEMREF(const float, k), FLASHMLIR_MEMREF(const float, v),   \
      FLASHMLIR_MEMREF(const float, d_o), FLASHMLIR_MEMREF(const float, lse),                                \
      FLASHMLIR_MEMREF(const float, delta), FLASHMLIR_MEMREF(const int64_t, seed), FLASHMLIR_MEMREF(float, dk), \
      FLASHMLIR_MEMREF(float, dv), size_t group, size_t batch_heads, size_t seq_q, size_t seq_k, float scale,  \
      size_t causal, FLASHMLIR_DROPOUT_CONSTANTS, size_t wg, size_t wg_count) {                              \
    dkdv_share(q + q_offset, k + k_offset, v + v_offset, d_o + d_o_offset, lse + lse_offset,                  \
               delta + delta_offset, NO_BIAS, dk + dk_offset, dv + dv_offset, D, group, batch_heads, seq_q, seq_k,      \
               scale, causal != 0, FLASHMLIR_DROPOUT, wg, wg_count);                                         \
  }                                                                                                          \
  FLASHMLIR_EXPORT void flashmlir_attention_bwd_cpu_f32_d##D##_fused_dropout(                                \
      FLASHMLIR_MEMREF(const float, q), FLASHMLIR_MEMREF(const float, k), FLASHMLIR_MEMREF(const float, v),   \
      FLASHMLIR_MEMREF(const float, o), FLASHMLIR_MEMREF(const float, d_o), FLASHMLIR_MEMREF(const float, lse), \
      FLASHMLIR_MEMREF(const int64_t, seed), FLASHMLIR_MEMREF(float, dq), FLASHMLIR_MEMREF(float, delta),      \
      FLASHMLIR_MEMREF(float, dk), FLASHMLIR_MEMREF(float, dv), size_t group, size_t batch_heads, size_t seq_q, \
      size_t seq_k, float scale, size_t causal, FLASHMLIR_DROPOUT_CONSTANTS, size_t wg, size_t wg_count) {     \
    fused_share(q + q_offset, k + k_offset, v + v_offset, o + o_offset, d_o + d_o_offset, lse + lse_offset, NO_BIAS, \
                dq + dq_offset, delta + delta_offset, dk + dk_offset, dv + dv_offset, D, group, batch_heads,   \
                seq_q, seq_k, scale, causal != 0, FLASHMLIR_DROPOUT, wg, wg_count);                          \
  }

FLASHMLIR_DEFINE_CPU_BACKWARD(32)
FLASHMLIR_DEFINE_CPU_BACKWARD(64)
FLASHMLIR_DEFINE_CPU_BACKWARD(128)
