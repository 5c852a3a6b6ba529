// Flash-attention forward for sm_80 and newer: FlashAttention-2's work partitioning on mma.sync.
//
//   grid  (ceil(Sq / kBlockM), B * Hq)        one block = kBlockM query rows of one (batch, head);
//         with GQA, `group` = Hq / Hkv consecutive query heads read one K/V head
//   block kWarps warps, each owning kBlockM / kWarps consecutive rows of the block: softmax
//         statistics stay in the warp (no shared-memory reduction between warps)
//   loop  over kBlockN-key tiles of K and V, double-buffered in shared memory with cp.async;
//         causal: tiles right of the diagonal are skipped, only diagonal (and ragged-tail) tiles mask
//
// S = Q·Kᵀ and O += P·V are mma.sync.m16n8k16 (fp16 or bf16 in, fp32 accumulate). P is converted
// in registers from S's accumulator layout straight into the A-operand layout of the second MMA.
// The row statistics are online_softmax.cuh's (exp2 domain, scale · log2 e folded in); O and the
// row sums are rescaled only when a row's shift moves and divided once at the end. Blocks of a
// causal grid run longest first. With kDropout (the training forward's twin, `_lse_dropout`) P is
// dropped by dropout.cuh's seeded hash after the row sums took it in and before P·V, and O takes
// the kept values' scale 1 / (1 − p) with 1 / ℓ.
#pragma once

#include "dropout.cuh"
#include "mma_sm80.cuh"
#include "online_softmax.cuh"

namespace flashmlir {

// kBlockM query rows per block over kWarps warps: each warp owns kBlockM / kWarps rows, in 16-row
// MMA tiles. With one such tile per warp Q's fragments are kept in registers for the whole loop;
// with more, the accumulators need those registers and Q is re-read from shared memory (ldmatrix)
// at every step, while each K and V fragment read from shared memory then feeds kMTiles MMAs.
template <typename T, int kD, int kBlockM, int kBlockN, int kWarps>
struct FwdConfig {
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpRows = kBlockM / kWarps;
  static constexpr int kMTiles = kWarpRows / 16;
  static constexpr bool kQInRegisters = kMTiles == 1;
  static constexpr int kTileBytesQ = kBlockM * kD * 2;
  static constexpr int kTileBytesKV = kBlockN * kD * 2;
  // Q, then two stages of (K, V).
  static constexpr int kSharedBytes = kTileBytesQ + 4 * kTileBytesKV;
  static_assert(kWarpRows % 16 == 0 && kBlockN % 16 == 0 && kD % 64 == 0, "unsupported tile shape");
};

template <typename T, int kD, int kBlockM, int kBlockN, int kWarps, bool kDropout = false>
__device__ __forceinline__ void attention_fwd_sm80(const T* __restrict__ q, const T* __restrict__ k,
                                                   const T* __restrict__ v, T* __restrict__ o,
                                                   float* __restrict__ lse, int group, int seq_q, int seq_k,
                                                   float scale, bool causal, Dropout dropout = {}) {
  using Cfg = FwdConfig<T, kD, kBlockM, kBlockN, kWarps>;
  using E = Element<T>;
  constexpr int kChunks = kD / 8;
  constexpr int kKSteps = kD / 16;      // 16-wide steps over the head dim (S = Q·Kᵀ)
  constexpr int kNTiles = kBlockN / 8;  // 8-key column tiles of S
  constexpr int kDTiles = kD / 8;       // 8-wide column tiles of O
  constexpr int kMTiles = Cfg::kMTiles;
  extern __shared__ __align__(128) unsigned char shared[];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // Causal blocks further down have more keys to visit: launch them first, so that the short
  // ones fill the machine at the end instead of leaving a tail of long ones.
  const int q_block = causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int q0 = q_block * kBlockM;
  const int warp_row0 = warp * Cfg::kWarpRows;      // in the block
  const int64_t bh = blockIdx.y, bh_kv = bh / group;  // (batch, query head) and its K/V head
  const T* qb = q + bh * seq_q * kD;
  const T* kb = k + bh_kv * seq_k * kD;
  const T* vb = v + bh_kv * seq_k * kD;
  T* ob = o + bh * seq_q * kD;

  const uint32_t tile_q = smem_address(shared);
  auto tile_k = [&](int stage) { return tile_q + Cfg::kTileBytesQ + stage * 2 * Cfg::kTileBytesKV; };
  auto tile_v = [&](int stage) { return tile_k(stage) + Cfg::kTileBytesKV; };
  // The A fragment of rows [16 mt, 16 mt + 16) of this warp, head-dim step ks.
  auto load_q = [&](int mt, int ks, uint32_t(&a)[4]) {
    ldmatrix_x4(tile_q + tile_offset<kChunks>(warp_row0 + mt * 16 + (lane & 15), ks * 2 + (lane >> 4)), a);
  };

  const int kv_tiles = (seq_k + kBlockN - 1) / kBlockN;
  const int end = causal ? min(kv_tiles, (q0 + kBlockM + kBlockN - 1) / kBlockN) : kv_tiles;

  // Commit groups, in order: Q, K0, V0, then per iteration K(j+1), V(j+1). Waiting for K(j)
  // leaves V(j) and the next tile's two groups in flight; waiting for V(j), the next two.
  load_tile<T, kBlockM, kD, Cfg::kThreads>(tile_q, qb, q0, seq_q);
  cp_async_commit();
  if (end > 0) load_tile<T, kBlockN, kD, Cfg::kThreads>(tile_k(0), kb, 0, seq_k);
  cp_async_commit();
  if (end > 0) load_tile<T, kBlockN, kD, Cfg::kThreads>(tile_v(0), vb, 0, seq_k);
  cp_async_commit();
  cp_async_wait<2>();
  __syncthreads();

  uint32_t qf[Cfg::kQInRegisters ? kKSteps : 1][4];
  if constexpr (Cfg::kQInRegisters) {
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) load_q(0, ks, qf[ks]);
  }

  const float scale_log2 = scale * kLog2e;
  // This thread's rows: row(mt, h) = q0 + warp_row0 + 16 mt + 8 h + lane / 4.
  const int lane_row = q0 + warp_row0 + (lane >> 2);
  const uint32_t dropout_seed = kDropout ? static_cast<uint32_t>(*dropout.seed) : 0u;
  float row_max[kMTiles][2], row_sum[kMTiles][2];
  float acc[kMTiles][kDTiles][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    row_max[mt][0] = row_max[mt][1] = kNegInf;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) acc[mt][d][0] = acc[mt][d][1] = acc[mt][d][2] = acc[mt][d][3] = 0.f;
  }

  for (int j = 0; j < end; ++j) {
    const int stage = j & 1;
    const bool prefetch = j + 1 < end;
    if (prefetch) {
      load_tile<T, kBlockN, kD, Cfg::kThreads>(tile_k(stage ^ 1), kb, (j + 1) * kBlockN, seq_k);
      cp_async_commit();
      load_tile<T, kBlockN, kD, Cfg::kThreads>(tile_v(stage ^ 1), vb, (j + 1) * kBlockN, seq_k);
      cp_async_commit();
      cp_async_wait<3>();  // K(j) has landed
    } else {
      cp_async_wait<1>();
    }
    __syncthreads();

    // S = Q·Kᵀ for this warp's rows and the tile's kBlockN keys.
    float s[kMTiles][kNTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        if constexpr (Cfg::kQInRegisters) {
#pragma unroll
          for (int r = 0; r < 4; ++r) a[mt][r] = qf[ks][r];
        } else {
          load_q(mt, ks, a[mt]);
        }
      }
#pragma unroll
      for (int n = 0; n < kNTiles; n += 2) {
        uint32_t b[4];
        const int key = n * 8 + (lane & 7) + ((lane >> 4) << 3);
        ldmatrix_x4(tile_k(stage) + tile_offset<kChunks>(key, ks * 2 + ((lane >> 3) & 1)), b);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          E::mma(s[mt][n], a[mt], b[0], b[1]);
          E::mma(s[mt][n + 1], a[mt], b[2], b[3]);
        }
      }
    }

    // Mask keys past the end and, on diagonal tiles, keys after the query (top-left causal).
    const int key0 = j * kBlockN;
    const bool tail = key0 + kBlockN > seq_k;
    const bool diagonal = causal && key0 + kBlockN - 1 > q0 + warp_row0;
    if (tail || diagonal) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int n = 0; n < kNTiles; ++n)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int key = key0 + n * 8 + (lane & 3) * 2 + (c & 1);
            const int row = lane_row + mt * 16 + (c >> 1) * 8;
            if (key >= seq_k || (causal && key > row)) s[mt][n][c] = kNegInf;
          }
    }

    // Online softmax in the exp2 domain (online_softmax.cuh); each row is spread over the 4 threads
    // of a quad. Done in phases over all of this thread's rows at once, with trees for the maxima
    // and sums, so that independent instructions interleave instead of each row's chain waiting out
    // its own latencies. P is packed to 16 bits as soon as it exists, straight into the A-operand
    // layout of P·V: S's accumulators of key tiles (2i, 2i+1) form the A fragment of key step i.
    // Packing early ends the fp32 scores' lives before the second MMA (fewer registers live).
    float mx[kMTiles][2], shift[kMTiles][2], rescale[kMTiles][2];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float m[kNTiles];
#pragma unroll
        for (int n = 0; n < kNTiles; ++n) m[n] = fmaxf(s[mt][n][2 * h], s[mt][n][2 * h + 1]);
        mx[mt][h] = tree_reduce(m, [](float a, float b) { return fmaxf(a, b); });
      }
#pragma unroll
    for (int lane_mask = 1; lane_mask <= 2; lane_mask *= 2)
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) mx[mt][h] = fmaxf(mx[mt][h], __shfl_xor_sync(0xffffffff, mx[mt][h], lane_mask));
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) advance_shift(row_max[mt][h], mx[mt][h] * scale_log2, shift[mt][h], rescale[mt][h]);
    uint32_t p[kMTiles][kBlockN / 16][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float sum[2] = {0.f, 0.f};  // two partial sums: half the length of the add chain
#pragma unroll
        for (int n = 0; n < kNTiles; ++n) {
          const float e0 = fast_exp2(fmaf(s[mt][n][2 * h], scale_log2, -shift[mt][h]));
          const float e1 = fast_exp2(fmaf(s[mt][n][2 * h + 1], scale_log2, -shift[mt][h]));
          sum[n & 1] += e0 + e1;
          p[mt][n / 2][(n & 1) * 2 + h] = E::pack(e0, e1);
        }
        row_sum[mt][h] = fmaf(row_sum[mt][h], rescale[mt][h], sum[0] + sum[1]);
      }
    if constexpr (kDropout) {
      // Rows lane_row + 16 mt and the one 8 below are a pair of dropout.cuh (an aligned 16-row
      // group's r and r + 8): one hash for both, its low half for the first. Key 8n + 2·(lane % 4)
      // + e of the tile is half e of the packed word (row h) that holds it.
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        const uint32_t row_index = static_cast<uint32_t>(bh * seq_q + lane_row + 16 * mt);
        const uint32_t start =
            dropout_start(row_index * static_cast<uint32_t>(seq_k) + key0 + (lane & 3) * 2, dropout_seed);
#pragma unroll
        for (int n = 0; n < kNTiles; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const uint32_t mixed = dropout_mix(start + static_cast<uint32_t>(8 * n + e) * kDropoutGolden);
            const uint32_t half = 0xFFFFu << (16 * e);  // key e of the word
            if (!dropout_keeps_low(mixed, dropout.threshold)) p[mt][n / 2][(n & 1) * 2] &= ~half;
            if (!dropout_keeps_high(mixed, dropout.threshold)) p[mt][n / 2][(n & 1) * 2 + 1] &= ~half;
          }
      }
    }

    if (prefetch) {
      cp_async_wait<2>();  // V(j) has landed
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    // O's rescale, skipped when every factor of the warp is 1 (nearly every tile after the first
    // few, online_softmax.cuh): kMTiles · kD / 2 multiplies per thread (128 at head dim 128).
    bool moved = false;
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) moved |= rescale[mt][0] != 1.f || rescale[mt][1] != 1.f;
    if (__any_sync(0xffffffff, moved)) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int d = 0; d < kDTiles; ++d)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[mt][d][c] *= rescale[mt][c >> 1];
    }

    // O += P·V.
#pragma unroll
    for (int ks = 0; ks < kBlockN / 16; ++ks) {
#pragma unroll
      for (int d = 0; d < kDTiles; d += 2) {
        uint32_t b[4];
        const int key = ks * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
        ldmatrix_x4_trans(tile_v(stage) + tile_offset<kChunks>(key, d + (lane >> 4)), b);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          E::mma(acc[mt][d], p[mt][ks], b[0], b[1]);
          E::mma(acc[mt][d + 1], p[mt][ks], b[2], b[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

  // O = acc / row sum (0 for a row whose every key was masked), written where the row exists;
  // lse (when asked for) = ln Σ exp(scale · s), -inf for such a row: what the backward needs.
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float sum = row_sum[mt][h];
      sum += __shfl_xor_sync(0xffffffff, sum, 1);
      sum += __shfl_xor_sync(0xffffffff, sum, 2);
      const float inv = sum == 0.f ? 0.f : (kDropout ? dropout.scale : 1.f) / sum;
      const int row = lane_row + mt * 16 + h * 8;
      if (row >= seq_q) continue;
      if (lse != nullptr && (lane & 3) == 0)
        lse[bh * seq_q + row] = sum == 0.f ? kNegInf : (row_max[mt][h] + __log2f(sum)) * kLn2;
      T* out = ob + static_cast<int64_t>(row) * kD + (lane & 3) * 2;
#pragma unroll
      for (int d = 0; d < kDTiles; ++d)
        *reinterpret_cast<uint32_t*>(out + d * 8) = E::pack(acc[mt][d][2 * h] * inv, acc[mt][d][2 * h + 1] * inv);
    }
}

}  // namespace flashmlir
