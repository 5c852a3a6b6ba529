// Flash-attention backward for sm_80 and newer on mma.sync: FlashAttention-2's recomputation from
// the forward's log-sum-exp, deterministic (no atomics), in two kernels:
//
//   dq    grid (ceil(Sq / kBlockM), B * Hq): one block = kBlockM query rows of one (batch, head),
//         each warp 16 rows. First Δ = rowsum(dO ∘ O) for its rows (written out for the dkdv
//         kernel), then a loop over key tiles: S = Q·Kᵀ, P = exp(s·S − lse), dP = dO·Vᵀ,
//         dS = P ∘ (dP − Δ), dQ += dS·K.  dQ = s·dQ at the end.
//   dkdv  grid (ceil(Sk / kBlockN), B * Hkv): one block = kBlockN keys of one (batch, K/V head),
//         each warp 16 keys, over every query tile of every query head of its group (GQA: dK and
//         dV are summed over the group in registers). Transposed products keep keys as rows, so
//         no fragment is ever transposed in registers: Sᵀ = K·Qᵀ, Pᵀ = exp(s·Sᵀ − lse),
//         dV += Pᵀ·dO, dPᵀ = V·dOᵀ, dSᵀ = Pᵀ ∘ (dPᵀ − Δ), dK += dSᵀ·Q.  dK = s·dK at the end.
//
// Seven tile products per (query tile, key tile) instead of FlashAttention-2's five with atomic dQ
// accumulation: the price of a deterministic dQ, paid in the dq kernel's recomputation of S and dP.
// Causal (top-left, key > query masked): the dq kernel stops at the diagonal, the dkdv kernel starts
// there; only diagonal and ragged tiles are masked. Q and dO tiles stream through two shared-memory
// stages (cp.async) while K and V stay resident (dkdv), and the other way round (dq).
//
// The operand patterns are the forward kernel's (fwd_sm80_mma_sync.cuh): "A·Bᵀ" with both operands
// row-major in swizzled shared memory (S = Q·Kᵀ), and "P·B" with P packed from accumulators into
// A fragments and B read with ldmatrix.trans (O += P·V).
//
// With kDropout (the dropout twins) both kernels regenerate the forward's mask Z (dropout.cuh),
// Z = kept / (1 − p): dS = P ∘ (dP ∘ Z − Δ) in both, and dV = Σ (P ∘ kept)ᵀ·dO scaled by 1 / (1 − p)
// once at the end. Δ = rowsum(dO ∘ O) from the dropped O needs no change.
#pragma once

#include "backward_rows.cuh"  // lse_log2, warp_row_delta
#include "dropout.cuh"
#include "mma_sm80.cuh"

namespace flashmlir {
namespace bwd {

// c[n] += A[row0 .. row0+16) · B[8n .. 8n+8)ᵀ over the head dim: A and B row-major [rows, kD] tiles.
template <typename T, int kD, int kNTiles>
__device__ __forceinline__ void mma_abt(float (&c)[kNTiles][4], uint32_t tile_a, int row0, uint32_t tile_b) {
  constexpr int kChunks = kD / 8;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int ks = 0; ks < kD / 16; ++ks) {
    uint32_t a[4];
    ldmatrix_x4(tile_a + tile_offset<kChunks>(row0 + (lane & 15), ks * 2 + (lane >> 4)), a);
#pragma unroll
    for (int n = 0; n < kNTiles; n += 2) {
      uint32_t b[4];
      const int row = n * 8 + (lane & 7) + ((lane >> 4) << 3);
      ldmatrix_x4(tile_b + tile_offset<kChunks>(row, ks * 2 + ((lane >> 3) & 1)), b);
      Element<T>::mma(c[n], a, b[0], b[1]);
      Element<T>::mma(c[n + 1], a, b[2], b[3]);
    }
  }
}

// acc[d] += P · B[:, 8d .. 8d+8): P as kKSteps A fragments (16 columns each), B a row-major
// [16 kKSteps, kD] tile (its rows are P's columns).
template <typename T, int kD, int kKSteps>
__device__ __forceinline__ void mma_pb(float (&acc)[kD / 8][4], const uint32_t (&p)[kKSteps][4], uint32_t tile_b) {
  constexpr int kChunks = kD / 8;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
    for (int d = 0; d < kD / 8; d += 2) {
      uint32_t b[4];
      const int row = ks * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
      ldmatrix_x4_trans(tile_b + tile_offset<kChunks>(row, d + (lane >> 4)), b);
      Element<T>::mma(acc[d], p[ks], b[0], b[1]);
      Element<T>::mma(acc[d + 1], p[ks], b[2], b[3]);
    }
  }
}

// Accumulators of kNTiles 8-column tiles → kNTiles / 2 A fragments of 16 columns (the forward's P hand-off).
template <typename T, int kNTiles>
__device__ __forceinline__ void pack_a(uint32_t (&a)[kNTiles / 2][4], const float (&c)[kNTiles][4]) {
#pragma unroll
  for (int n = 0; n < kNTiles; ++n)
#pragma unroll
    for (int h = 0; h < 2; ++h) a[n / 2][(n & 1) * 2 + h] = Element<T>::pack(c[n][2 * h], c[n][2 * h + 1]);
}

template <int kN>
__device__ __forceinline__ void zero(float (&c)[kN][4]) {
#pragma unroll
  for (int n = 0; n < kN; ++n) c[n][0] = c[n][1] = c[n][2] = c[n][3] = 0.f;
}

// Rows of a [rows, kD] matrix written from accumulators (scaled), where the row exists.
template <typename T, int kD>
__device__ __forceinline__ void store_rows(T* base, const float (&acc)[kD / 8][4], int row, int rows, float scale) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = row + h * 8;
    if (r >= rows) continue;
    T* out = base + static_cast<int64_t>(r) * kD + (lane & 3) * 2;
#pragma unroll
    for (int d = 0; d < kD / 8; ++d)
      *reinterpret_cast<uint32_t*>(out + d * 8) = Element<T>::pack(acc[d][2 * h] * scale, acc[d][2 * h + 1] * scale);
  }
}

// Both kernels keep kRows = 16 · kWarps rows resident per block (dq: query rows, dkdv: keys), 16 per
// warp, and stream tiles of the other side: dq kBlockN keys, dkdv kBlockM queries.
template <typename T, int kD, int kBlockM, int kBlockN, int kWarps>
struct BwdConfig {
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRows = 16 * kWarps;
  static constexpr int kTileBytesRows = kRows * kD * 2;
  static constexpr int kTileBytesM = kBlockM * kD * 2;
  static constexpr int kTileBytesN = kBlockN * kD * 2;
  // dq: Q and dO tiles, then two stages of (K, V) tiles.
  static constexpr int kSharedBytesDq = 2 * kTileBytesRows + 4 * kTileBytesN;
  // dkdv: K and V tiles, then two stages of (Q, dO tiles, lse and Δ of their rows).
  static constexpr int kSharedBytesDkdv = 2 * kTileBytesRows + 2 * (2 * kTileBytesM + 2 * kBlockM * 4);
  static_assert(kBlockM % 16 == 0 && kBlockN % 16 == 0 && kD % 64 == 0 && kD <= 128, "unsupported tile shape");
};

// ---- dQ (and Δ) ----------------------------------------------------------------------------------
// 16 · kWarps query rows per block, kBlockN keys per tile.
template <typename T, int kD, int kBlockM, int kBlockN, int kWarps, bool kDropout = false>
__device__ __forceinline__ void attention_bwd_dq_sm80(const T* __restrict__ q, const T* __restrict__ k,
                                                      const T* __restrict__ v, const T* __restrict__ o,
                                                      const T* __restrict__ d_o, const float* __restrict__ lse,
                                                      T* __restrict__ dq, float* __restrict__ delta, int group,
                                                      int seq_q, int seq_k, float scale, bool causal,
                                                      Dropout dropout = {}) {
  using Cfg = BwdConfig<T, kD, kBlockM, kBlockN, kWarps>;
  constexpr int kRows = Cfg::kRows;
  constexpr int kNTiles = kBlockN / 8;
  extern __shared__ __align__(128) unsigned char shared[];
  __shared__ float row_delta[kRows], row_lse2[kRows];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int q_block = causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;  // longest first
  const int q0 = q_block * kRows;
  const int64_t bh = blockIdx.y, bh_kv = bh / group;
  const T* qb = q + bh * seq_q * kD;
  const T* ob = o + bh * seq_q * kD;
  const T* dob = d_o + bh * seq_q * kD;
  const T* kb = k + bh_kv * seq_k * kD;
  const T* vb = v + bh_kv * seq_k * kD;

  const uint32_t tile_q = smem_address(shared);
  const uint32_t tile_do = tile_q + Cfg::kTileBytesRows;
  auto tile_k = [&](int stage) { return tile_do + Cfg::kTileBytesRows + stage * 2 * Cfg::kTileBytesN; };
  auto tile_v = [&](int stage) { return tile_k(stage) + Cfg::kTileBytesN; };

  const int kv_tiles = (seq_k + kBlockN - 1) / kBlockN;
  const int end = causal ? min(kv_tiles, (q0 + kRows + kBlockN - 1) / kBlockN) : kv_tiles;

  load_tile<T, kRows, kD, Cfg::kThreads>(tile_q, qb, q0, seq_q);
  load_tile<T, kRows, kD, Cfg::kThreads>(tile_do, dob, q0, seq_q);
  cp_async_commit();
  if (end > 0) {
    load_tile<T, kBlockN, kD, Cfg::kThreads>(tile_k(0), kb, 0, seq_k);
    load_tile<T, kBlockN, kD, Cfg::kThreads>(tile_v(0), vb, 0, seq_k);
  }
  cp_async_commit();

  // Δ = rowsum(dO ∘ O) in fp32, one warp per row in turn (each lane a strided share of the head dim),
  // while the tiles are in flight; written out for the dkdv kernel.
  for (int r = warp; r < kRows; r += kWarps) {
    const int row = q0 + r;
    const float sum = row < seq_q ? warp_row_delta<T, kD>(ob, dob, static_cast<int64_t>(row) * kD, lane) : 0.f;
    if (lane == 0) {
      row_delta[r] = sum;
      row_lse2[r] = row < seq_q ? lse_log2(lse[bh * seq_q + row]) : -kNegInf;
      if (row < seq_q) delta[bh * seq_q + row] = sum;
    }
  }

  const float scale_log2 = scale * kLog2e;
  const int warp_row0 = warp * 16;
  const int lane_row = q0 + warp_row0 + (lane >> 2);  // this thread's rows: lane_row, lane_row + 8
  const uint32_t dropout_seed = kDropout ? static_cast<uint32_t>(*dropout.seed) : 0u;
  float dq_acc[kD / 8][4];
  zero(dq_acc);
  __syncthreads();  // row_delta, row_lse2
  float my_delta[2], my_lse2[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    my_delta[h] = row_delta[warp_row0 + (lane >> 2) + 8 * h];
    my_lse2[h] = row_lse2[warp_row0 + (lane >> 2) + 8 * h];
  }

  for (int j = 0; j < end; ++j) {
    const int stage = j & 1;
    if (j + 1 < end) {
      load_tile<T, kBlockN, kD, Cfg::kThreads>(tile_k(stage ^ 1), kb, (j + 1) * kBlockN, seq_k);
      load_tile<T, kBlockN, kD, Cfg::kThreads>(tile_v(stage ^ 1), vb, (j + 1) * kBlockN, seq_k);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    float s[kNTiles][4], dp[kNTiles][4];
    zero(s);
    zero(dp);
    mma_abt<T, kD, kNTiles>(s, tile_q, warp_row0, tile_k(stage));
    mma_abt<T, kD, kNTiles>(dp, tile_do, warp_row0, tile_v(stage));

    const int key0 = j * kBlockN;
    const bool masked = key0 + kBlockN > seq_k || (causal && key0 + kBlockN - 1 > q0 + warp_row0);
    if constexpr (kDropout) {
      // Rows lane_row and lane_row + 8 are a pair of dropout.cuh: one hash for key e of tile n of
      // both, its low half for the first row (h = 0).
      const uint32_t start = dropout_start(
          static_cast<uint32_t>(bh * seq_q + lane_row) * static_cast<uint32_t>(seq_k) + key0 + (lane & 3) * 2,
          dropout_seed);
#pragma unroll
      for (int n = 0; n < kNTiles; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const uint32_t mixed = dropout_mix(start + static_cast<uint32_t>(8 * n + e) * kDropoutGolden);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int c = 2 * h + e;
            float p = fast_exp2(s[n][c] * scale_log2 - my_lse2[h]);
            if (masked) {
              const int key = key0 + n * 8 + (lane & 3) * 2 + e;
              if (key >= seq_k || (causal && key > lane_row + 8 * h)) p = 0.f;
            }
            const bool kept = h == 0 ? dropout_keeps_low(mixed, dropout.threshold)
                                     : dropout_keeps_high(mixed, dropout.threshold);
            s[n][c] = p * ((kept ? dp[n][c] * dropout.scale : 0.f) - my_delta[h]);  // dS
          }
        }
    } else {
#pragma unroll
      for (int n = 0; n < kNTiles; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int h = c >> 1;
          float p = fast_exp2(s[n][c] * scale_log2 - my_lse2[h]);
          if (masked) {
            const int key = key0 + n * 8 + (lane & 3) * 2 + (c & 1);
            if (key >= seq_k || (causal && key > lane_row + 8 * h)) p = 0.f;
          }
          s[n][c] = p * (dp[n][c] - my_delta[h]);  // dS
        }
    }
    uint32_t ds[kNTiles / 2][4];
    pack_a<T, kNTiles>(ds, s);
    mma_pb<T, kD, kNTiles / 2>(dq_acc, ds, tile_k(stage));
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  store_rows<T, kD>(dq + bh * seq_q * kD, dq_acc, lane_row, seq_q, scale);
}

// ---- dK, dV ---------------------------------------------------------------------------------------
// 16 · kWarps keys per block, kBlockM queries per tile.
template <typename T, int kD, int kBlockM, int kBlockN, int kWarps, bool kDropout = false>
__device__ __forceinline__ void attention_bwd_dkdv_sm80(const T* __restrict__ q, const T* __restrict__ k,
                                                        const T* __restrict__ v, const T* __restrict__ d_o,
                                                        const float* __restrict__ lse,
                                                        const float* __restrict__ delta, T* __restrict__ dk,
                                                        T* __restrict__ dv, int group, int seq_q, int seq_k,
                                                        float scale, bool causal, Dropout dropout = {}) {
  using Cfg = BwdConfig<T, kD, kBlockM, kBlockN, kWarps>;
  constexpr int kMTiles = kBlockM / 8;  // 8-query column tiles of Sᵀ
  extern __shared__ __align__(128) unsigned char shared[];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int k0 = blockIdx.x * Cfg::kRows;
  const int64_t bh_kv = blockIdx.y;
  const T* kb = k + bh_kv * seq_k * kD;
  const T* vb = v + bh_kv * seq_k * kD;

  const uint32_t tile_k = smem_address(shared);
  const uint32_t tile_v = tile_k + Cfg::kTileBytesRows;
  auto tile_q = [&](int stage) { return tile_v + Cfg::kTileBytesRows + stage * 2 * Cfg::kTileBytesM; };
  auto tile_do = [&](int stage) { return tile_q(stage) + Cfg::kTileBytesM; };
  float* stats = reinterpret_cast<float*>(shared + 2 * Cfg::kTileBytesRows + 4 * Cfg::kTileBytesM);
  auto stage_lse2 = [&](int stage) { return stats + stage * 2 * kBlockM; };
  auto stage_delta = [&](int stage) { return stats + stage * 2 * kBlockM + kBlockM; };

  // Work items: (query head of the group, query tile), causal: from the tile holding query k0 on.
  const int q_tiles = (seq_q + kBlockM - 1) / kBlockM;
  const int first = causal ? min(q_tiles, k0 / kBlockM) : 0;
  const int per_head = q_tiles - first;
  const int items = group * per_head;
  auto issue = [&](int t, int stage) {
    const int64_t bh = bh_kv * group + t / per_head;
    const int row0 = (first + t % per_head) * kBlockM;
    load_tile<T, kBlockM, kD, Cfg::kThreads>(tile_q(stage), q + bh * seq_q * kD, row0, seq_q);
    load_tile<T, kBlockM, kD, Cfg::kThreads>(tile_do(stage), d_o + bh * seq_q * kD, row0, seq_q);
    cp_async_commit();
    // lse (exp2 domain) and Δ of the tile's rows; past the end, +inf makes P 0.
    for (int r = threadIdx.x; r < kBlockM; r += Cfg::kThreads) {
      const int row = row0 + r;
      const bool valid = row < seq_q;
      stage_lse2(stage)[r] = valid ? lse_log2(lse[bh * seq_q + row]) : -kNegInf;
      stage_delta(stage)[r] = valid ? delta[bh * seq_q + row] : 0.f;
    }
  };

  load_tile<T, Cfg::kRows, kD, Cfg::kThreads>(tile_k, kb, k0, seq_k);
  load_tile<T, Cfg::kRows, kD, Cfg::kThreads>(tile_v, vb, k0, seq_k);
  cp_async_commit();
  if (items > 0) issue(0, 0);

  const float scale_log2 = scale * kLog2e;
  const int warp_key0 = warp * 16;
  const int lane_key = k0 + warp_key0 + (lane >> 2);  // this thread's keys: lane_key, lane_key + 8
  const uint32_t dropout_seed = kDropout ? static_cast<uint32_t>(*dropout.seed) : 0u;
  const uint32_t query_step = static_cast<uint32_t>(seq_k) * kDropoutGolden;  // the next query's x, same key
  float dk_acc[kD / 8][4], dv_acc[kD / 8][4];
  zero(dk_acc);
  zero(dv_acc);

  for (int t = 0; t < items; ++t) {
    const int stage = t & 1;
    if (t + 1 < items) {
      issue(t + 1, stage ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    float s[kMTiles][4], dp[kMTiles][4];
    zero(s);
    zero(dp);
    mma_abt<T, kD, kMTiles>(s, tile_k, warp_key0, tile_q(stage));    // Sᵀ = K·Qᵀ
    mma_abt<T, kD, kMTiles>(dp, tile_v, warp_key0, tile_do(stage));  // dPᵀ = V·dOᵀ

    const int row0 = (first + t % per_head) * kBlockM;
    const bool masked = causal && k0 + warp_key0 + 15 > row0;
    const float* lse2 = stage_lse2(stage);
    const float* dlt = stage_delta(stage);
    // Pᵀ of accumulator c of query tile n (key lane_key + 8·(c / 2), query column col(n, c)).
    auto col_of = [&](int n, int c) { return n * 8 + (lane & 3) * 2 + (c & 1); };
    auto probability = [&](int n, int c) {
      const int col = col_of(n, c);
      const float p = fast_exp2(s[n][c] * scale_log2 - lse2[col]);
      return masked && lane_key + 8 * (c >> 1) > row0 + col ? 0.f : p;
    };
    if constexpr (kDropout) {
      // Query columns n·8 + … of tiles n and n + 1 (n even) are rows r and r + 8 of an aligned
      // group of 16 (row0 is a multiple of 16), a pair of dropout.cuh: one hash for both, from the
      // first's index, its low half for tile n. Accumulator c is key lane_key + 8·(c / 2), query
      // column 8n + 2·(lane % 4) + c % 2.
      const uint32_t bh = static_cast<uint32_t>(bh_kv * group + t / per_head);
      const uint32_t start = dropout_start(
          (bh * seq_q + row0 + (lane & 3) * 2) * static_cast<uint32_t>(seq_k) + lane_key, dropout_seed);
#pragma unroll
      for (int n = 0; n < kMTiles; n += 2)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const uint32_t step = static_cast<uint32_t>(n * 8 + (c & 1)) * query_step + (c >> 1) * 8 * kDropoutGolden;
          const uint32_t mixed = dropout_mix(start + step);
#pragma unroll
          for (int second = 0; second < 2; ++second) {
            const int col = col_of(n + second, c);
            const float p = probability(n + second, c);
            const bool kept = second == 0 ? dropout_keeps_low(mixed, dropout.threshold)
                                          : dropout_keeps_high(mixed, dropout.threshold);
            s[n + second][c] = kept ? p : 0.f;                                                  // (P ∘ kept)ᵀ
            dp[n + second][c] = p * ((kept ? dp[n + second][c] * dropout.scale : 0.f) - dlt[col]);  // dSᵀ
          }
        }
    } else {
#pragma unroll
      for (int n = 0; n < kMTiles; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const float p = probability(n, c);
          s[n][c] = p;                                   // Pᵀ
          dp[n][c] = p * (dp[n][c] - dlt[col_of(n, c)]);  // dSᵀ
        }
    }
    uint32_t pa[kMTiles / 2][4];
    pack_a<T, kMTiles>(pa, s);
    mma_pb<T, kD, kMTiles / 2>(dv_acc, pa, tile_do(stage));  // dV += Pᵀ·dO
    pack_a<T, kMTiles>(pa, dp);
    mma_pb<T, kD, kMTiles / 2>(dk_acc, pa, tile_q(stage));  // dK += dSᵀ·Q
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  cp_async_wait<0>();  // (nothing left in flight when there was no work item)
  store_rows<T, kD>(dk + bh_kv * seq_k * kD, dk_acc, lane_key, seq_k, scale);
  store_rows<T, kD>(dv + bh_kv * seq_k * kD, dv_acc, lane_key, seq_k, kDropout ? dropout.scale : 1.f);
}

}  // namespace bwd
}  // namespace flashmlir
