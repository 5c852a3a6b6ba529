// Flash-attention backward for sm_90a (Hopper): FlashAttention-3's partitioning on WGMMA, with dQ
// summed in fp32 by the bulk copy engine's reductions. Three kernels, one after another on a stream:
//
//   prep  grid (⌈Sq / 64⌉, B·Hq): Δ = rowsum(dO ∘ O) and lse in the exp2 domain, per query row of
//         a sequence padded to whole 64-row tiles (a padded row gets lse₂ = +inf: its P is 0), and
//         the fp32 dQ accumulator (kDqBlock's layout) set to zero.
//   dkdv  grid (⌈Sk / 128⌉, B·Hkv): 128 resident keys (K, V) a block, over every 64-row query tile
//         of every query head of its K/V head's group (GQA sums dK, dV over the group in
//         registers). Warpgroup 0 is the producer (Q, dO, lse₂, Δ of each query tile into a ring
//         of stages, cp.async + mbarriers, as in the forward); warpgroups 1 and 2 each own 64
//         keys and compute, per query tile,
//             Sᵀ  = K·Qᵀ,  dPᵀ = V·dOᵀ          (wgmma, both operands in shared memory; at head
//                                                dim 64 K and V from registers, loaded once)
//             Pᵀ  = exp2(s·log2e·Sᵀ − lse₂),  dSᵀ = Pᵀ ∘ (dPᵀ − Δ)
//             dV += Pᵀ·dO,  dK += dSᵀ·Q         (wgmma, Pᵀ and dSᵀ from registers)
//             dQ += dS·K                        (wgmma: dSᵀ goes through shared memory, read
//                                                transposed; the fp32 product is staged in shared
//                                                memory and added into the accumulator by
//                                                cp.reduce.async.bulk of 16 KB, issued under the
//                                                next tile's Sᵀ and dPᵀ)
//         At head dim 64 warpgroup 0 computes dQ itself, besides its loads (kDqWarpgroup): the
//         consumers hand it each dSᵀ tile through a pair of mbarriers and go on with the next
//         tile, and it multiplies, stages and reduces while they do (+6-15%,
//         benchmarks/results/h200-2026-12-01-sm90-backward-dq-warpgroup.md). At head dim 128 it
//         can only do so in 32-column products, for want of registers (BwdSm90Config::kDqColumns),
//         which are bound by shared-memory reads: correct but 12-18% slower (same file), so off.
//   dq    grid (⌈Sq / 64⌉, B·Hq): dQ = s · accumulator, in the element type and row-major order.
//
// Five tile products per (query tile, key block), FlashAttention-2/3's count, against seven for the
// deterministic sm_80 pair (bwd_sm80_mma_sync.cuh), which recomputes S and dP to own dQ; the price
// is that the order of dQ's fp32 additions varies from run to run (torch's deterministic mode
// takes the sm_80 kernels: compiler/microkernels.py select_attention_backward). The copy engine's
// reduction replaced per-thread float2 atomics (16 a thread a tile): +13-40% end to end
// (benchmarks/results/h100-2026-11-25-sm90-backward-ab.md), the consumers no longer wait on them.
// dQ's trip through shared memory was measured as the largest cost (without it the products ran
// ~30% faster: ...-sm90-backward-ab2.md; but that ablation very likely lost the dQ product too, as
// ptxas deletes a wgmma whose accumulators nothing reads: docs/ARCHITECTURE.md). Its fence, barrier
// and reduction are issued one tile
// late, while the tensor cores work on the next tile's Sᵀ and dPᵀ (two staging tiles a consumer
// alternate; +3-8%); staging the next share must wait for the reduction two tiles back.
//
// dQ's product: each consumer stores its dSᵀ (64 keys × 64 queries) into one 128-key tile, swizzled
// like every operand here; after a named barrier of both consumers, each multiplies the whole
// 128-key dS by K's 64 head-dim columns of its own (head dim 128), or, at head dim 64, its own 64
// keys of dS by all of K's columns. Two dS tiles alternate, so one barrier per query tile
// suffices: a consumer passes the barrier of tile t only after its dQ product of tile t − 1 has
// completed, the last reader of the buffer tile t + 1 overwrites. (Each consumer taking its own
// keys at head dim 128 too, in two m64n64 passes, needs no shared barrier but twice the dQ
// additions: 30% slower with atomics, same A/B.)
//
// Causal masking is top-left (key > query masked), as in the forward: a key block starts at the
// query tile holding its first key, and only tiles across the diagonal are masked. Ragged tails
// need no mask on the query side (rows past Sq are zero in Q and dO and have P = 0 through lse₂),
// and one on the key side only in the last block (a key past Sk has zero K and V rows but a
// non-zero P, which must not reach dQ as inf · 0).
#pragma once

#include "backward_rows.cuh"   // lse_log2, warp_row_delta
#include "fwd_sm90_wgmma.cuh"  // mbarriers, operand descriptors, load_tile, Wgmma wrappers

namespace flashmlir {
namespace sm90 {

template <typename T, int kD, int kStages>
struct BwdSm90Config {
  static constexpr int kBlockM = 64;        // query rows per streamed tile
  static constexpr int kBlockN = 128;       // resident keys: two consumers × 64
  static constexpr int kThreads = 3 * 128;  // producer + two consumers
  static constexpr int kPrepThreads = 256;  // prep and dq kernels: 8 warps over kBlockM rows
  // Whether warpgroup 0 computes dQ = dS·K and hands it to the copy engine, besides its loads, so
  // that the consumers only write dSᵀ and go on (else each consumer computes, stages and reduces its
  // own share of dQ).
#ifdef FLASHMLIR_DQ_WARPGROUP
  static constexpr bool kDqWarpgroup = FLASHMLIR_DQ_WARPGROUP != 0;
#else
  static constexpr bool kDqWarpgroup = kD == 64;
#endif
  // Warpgroup 0's dQ products: 64 columns each at head dim 64 (32 fp32 accumulators: 64 registers,
  // at 56 ptxas ignored the setmaxnreg; the consumers then get 216). Head dim 128's consumers need
  // 224 (at 216 ptxas serialized their wgmmas), which leaves warpgroup 0 56: enough for products of
  // 32 columns (16 accumulators), each reading dS again. That arrangement is correct but 12-18%
  // slower (a 32-column product reads 3 KB of shared memory for 64 K flops), hence off at head dim
  // 128 (the A/B: attention_backward.py sm90:DQ_WARPGROUP=1).
  static constexpr int kDqColumns = kD == 64 ? 64 : 32;
  static constexpr int kProducerRegisters = kDqWarpgroup ? (kDqColumns == 64 ? 64 : 56) : 32;
  static constexpr int kConsumerRegisters = kDqWarpgroup ? (kDqColumns == 64 ? 216 : 224) : 232;
  // setmaxnreg moves registers within what the launch gave the block (kThreads × the per-thread
  // count __launch_bounds__ leaves, 168): a consumer's setmaxnreg.inc past that waits forever.
  static_assert(kProducerRegisters + 2 * kConsumerRegisters <= 3 * (64 * 1024 / kThreads / 8 * 8),
                "setmaxnreg would ask for more registers than the launch gives the block");
  static constexpr int kTileBytesKV = kBlockN * kD * 2;
  static constexpr int kTileBytesQ = kBlockM * kD * 2;  // Q or dO
  static constexpr int kTileBytesDs = kBlockN * kBlockM * 2;
  static constexpr int kStatsBytes = 2 * kBlockM * 4;  // lse₂ and Δ of a query tile's rows
  static constexpr int kOffsetV = kTileBytesKV;
  static constexpr int kOffsetQ = 2 * kTileBytesKV;
  static constexpr int kOffsetDo = kOffsetQ + kStages * kTileBytesQ;
  static constexpr int kOffsetDs = kOffsetDo + kStages * kTileBytesQ;
  static constexpr int kOffsetStats = kOffsetDs + 2 * kTileBytesDs;
  static constexpr int kTileBytesDq = 64 * 64 * 4;  // an fp32 64 × 64 dQ share, staged for the bulk reduction
  static constexpr int kOffsetDq = kOffsetStats + kStages * kStatsBytes;
  // Four staging tiles: two a consumer, alternating; with the dQ warpgroup, two (column halves) a dSᵀ tile.
  static constexpr int kOffsetMaps = kOffsetDq + 4 * kTileBytesDq;
  // With TMA (FLASHMLIR_TMA, catalog `tma`): where the producer's warps make the Q, dO, K, V maps.
  static constexpr int kMaps = kTma ? 4 : 0;
  static constexpr int kOffsetBarriers = kOffsetMaps + kMaps * kTensorMapBytes;
  // K and V landed; per stage full and empty; per dSᵀ tile full and empty (the dQ warpgroup's)
  static constexpr int kBarriers = 1 + 2 * kStages + 4;
  static constexpr int kSharedBytes = kOffsetBarriers + 8 * kBarriers + 1024;  // + alignment slack
  static_assert(kSharedBytes <= 227 * 1024, "more shared memory than an sm_90 block may have");
  // dQ's product per consumer: 64 head-dim columns over all 128 keys (head dim 128), or all 64
  // columns over its own 64 keys (head dim 64); m64n64 either way.
  static constexpr bool kSplitColumns = kD == 128;
  static constexpr int kDqKeys = kSplitColumns ? kBlockN : 64;
  static_assert(kD == 64 || kD == 128, "the sm_90 backward takes head dim 64 or 128");
  // Per consumer thread: dK, dV (kD / 2 each), Sᵀ and dPᵀ (32 each); dQ reuses Sᵀ's.
  static_assert(kD + 64 <= 200, "too many accumulators for the consumers");
  // Whether a consumer holds its 64 keys of K and V in registers (the A fragments of Sᵀ and dPᵀ)
  // instead of reading them from shared memory for every query tile: a third of those products'
  // shared-memory traffic. Head dim 64 only: 2 · kD / 4 more registers a thread, which head dim 128
  // (dK and dV alone take 128) does not have.
#ifdef FLASHMLIR_KV_REGISTERS
  static constexpr bool kKvInRegisters = FLASHMLIR_KV_REGISTERS != 0;
#else
  static constexpr bool kKvInRegisters = kD == 64;
#endif
  static_assert(!kKvInRegisters || kD == 64, "K and V fit the consumers' registers at head dim 64 only");
  // Whether Pᵀ and dSᵀ of an item that needs no mask (most of them) are computed by a copy of the
  // loop without the mask's tests (ptxas predicates them onto every item otherwise: 64 compares and
  // 32 selects an item, 279 instructions where an unmasked item needs 158). On an H200 +1-5% in 11
  // of 12 rows, head dims 64 and 128 (benchmarks/results/h200-2026-12-01-sm90-backward-switches.md).
#ifdef FLASHMLIR_SPLIT_MASK
  static constexpr bool kSplitMask = FLASHMLIR_SPLIT_MASK != 0;
#else
  static constexpr bool kSplitMask = true;
#endif
  // Whether the dq kernel writes dQ through shared memory, whole rows a warp (attention_bwd_dq_sm90):
  // 115 -> 48 µs a call on an H200 (head dim 128, 16k tokens × 16 heads; cuDNN's conversion 56),
  // timed kernel by kernel (benchmarks/results/h200-2026-12-02-backward-kernels.md). Timed as a whole
  // backward it had looked like noise (-7% to +8%): dkdv alone, the same code in both builds, moves
  // ±6% from one timing to the next.
#ifdef FLASHMLIR_DQ_STAGED
  static constexpr bool kDqStaged = FLASHMLIR_DQ_STAGED != 0;
#else
  static constexpr bool kDqStaged = true;
#endif
};

// The bulk copy engine's reduction (sm_90): dst[i] += src[i] over `bytes` of fp32, read from shared
// memory asynchronously; a bulk group per issuing thread tracks it.
__device__ __forceinline__ void bulk_reduce_add(float* dst, uint32_t src, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst), "r"(src),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// The issuing thread's bulk groups have read their shared memory (it may be written again).
template <int kPending>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(kPending) : "memory");
}
__device__ __forceinline__ void bulk_wait() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }

// The dQ accumulator's layout: [B·Hq, query tile, D / 64 column blocks, 4096] fp32, each 64 × 64 block
// in the order a consumer's m64n64 accumulators sit in its registers, float4 j of thread t at
// 4 · (128 j + t) (conflict-free staging stores; the bulk reduction adds a block as one run of
// bytes): element r of it is row 16 · (t / 32) + (t % 32) / 4 + 8 · (r / 2), column
// 8 j + 2 · (t % 4) + r % 2 of the block.
constexpr int kDqBlock = 64 * 64;

// A 64 × N fp32 dQ share (m64nN accumulators) into a staging tile, in kDqBlock's order: float4 j of
// thread t at 16 · (128 j + t) bytes, conflict-free (a 32-column share fills half a 64 × 64 block).
template <int N>
__device__ __forceinline__ void stage_dq_share(uint32_t tile, int thread, const float (&acc)[N]) {
#pragma unroll
  for (int j = 0; j < N / 4; ++j)
    asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(tile + (128 * j + thread) * 16), "f"(acc[4 * j]),
                 "f"(acc[4 * j + 1]), "f"(acc[4 * j + 2]), "f"(acc[4 * j + 3])
                 : "memory");
}

// Rows a padded sequence has: whole query tiles (the prep kernel's statistics and the accumulator).
__device__ __forceinline__ int padded_rows(int seq_q) { return (seq_q + 63) / 64 * 64; }

// ---- prep: Δ, lse₂, zeroed dQ accumulator -----------------------------------------------------------
template <typename T, int kD>
__device__ __forceinline__ void attention_bwd_prep_sm90(const T* __restrict__ o, const T* __restrict__ d_o,
                                                        const float* __restrict__ lse, float* __restrict__ lse2,
                                                        float* __restrict__ delta, float* __restrict__ dq_accum,
                                                        int seq_q) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.y;
  const int padded = padded_rows(seq_q);
  for (int r = warp; r < 64; r += blockDim.x / 32) {
    const int row = blockIdx.x * 64 + r;
    const int64_t at = bh * seq_q + row, padded_at = bh * padded + row;
    const float sum = row < seq_q ? warp_row_delta<T, kD>(o, d_o, at * kD, lane) : 0.f;
    if (lane == 0) {  // a padded row: Δ 0, lse₂ +inf (P = 0)
      delta[padded_at] = sum;
      lse2[padded_at] = row < seq_q ? lse_log2(lse[at]) : -kNegInf;
    }
    for (int d = lane * 4; d < kD; d += 128)
      *reinterpret_cast<float4*>(dq_accum + padded_at * kD + d) = make_float4(0.f, 0.f, 0.f, 0.f);
  }
}

// ---- dq: dQ = s · accumulator, back from the accumulator's block order -------------------------------
// With kStaged (BwdSm90Config::kDqStaged, the default) a block's 64 rows go through shared memory:
// read as coalesced float4s, all in flight at once; written there in the accumulator's order (rows
// padded by 16 bytes: a warp's 8 rows × 4 words fall in 32 banks); written out a 16-byte chunk a
// thread, whole rows a warp: 4.2 TB/s of the H200's DRAM. Straight from the accumulator's order
// (kStaged false) a thread writes 4 bytes of a row at a time (a warp: 8 rows × 16 bytes), 2.4×
// slower.
template <typename T, int kD, int kThreads, bool kStaged>
__device__ __forceinline__ void attention_bwd_dq_sm90(const float* __restrict__ dq_accum, T* __restrict__ dq,
                                                      int seq_q, float scale) {
  const int64_t bh = blockIdx.y;
  const int tile = blockIdx.x, row0 = tile * 64;
  const float* src = dq_accum + (bh * (padded_rows(seq_q) / 64) + tile) * (kD / 64) * kDqBlock;
  if constexpr (!kStaged) {
    for (int f = threadIdx.x; f < kD / 64 * kDqBlock / 4; f += blockDim.x) {
      const int block = f / (kDqBlock / 4), j = (f / 128) % 8, t = f % 128;
      const int row = row0 + 16 * (t / 32) + (t % 32) / 4, col = 64 * block + 8 * j + 2 * (t % 4);
      const float4 x = *reinterpret_cast<const float4*>(src + 4 * f);
      if (row < seq_q)
        *reinterpret_cast<uint32_t*>(dq + (bh * seq_q + row) * kD + col) = Element<T>::pack(x.x * scale, x.y * scale);
      if (row + 8 < seq_q)
        *reinterpret_cast<uint32_t*>(dq + (bh * seq_q + row + 8) * kD + col) = Element<T>::pack(x.z * scale, x.w * scale);
    }
  } else {
    constexpr int kLoads = kD / 64 * kDqBlock / 4 / kThreads;  // float4s a thread
    constexpr int kPitch = kD / 2 + 4;                          // 32-bit words a staged row
    constexpr int kChunks = kD / 8;                             // 16-byte chunks a row
    static_assert(kD / 64 * kDqBlock / 4 % kThreads == 0 && 64 * kChunks % kThreads == 0, "uneven share");
    __shared__ __align__(16) uint32_t rows[64 * kPitch];
    float4 x[kLoads];
#pragma unroll
    for (int i = 0; i < kLoads; ++i) x[i] = reinterpret_cast<const float4*>(src)[threadIdx.x + kThreads * i];
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int f = threadIdx.x + kThreads * i;
      const int block = f / (kDqBlock / 4), j = (f / 128) % 8, t = f % 128;
      const int r = 16 * (t / 32) + (t % 32) / 4, word = 32 * block + 4 * j + t % 4;
      rows[r * kPitch + word] = Element<T>::pack(x[i].x * scale, x[i].y * scale);
      rows[(r + 8) * kPitch + word] = Element<T>::pack(x[i].z * scale, x[i].w * scale);
    }
    __syncthreads();
#pragma unroll
    for (int c = threadIdx.x; c < 64 * kChunks; c += kThreads) {
      const int r = c / kChunks, chunk = c % kChunks;
      if (row0 + r < seq_q)
        *reinterpret_cast<uint4*>(dq + (bh * seq_q + row0 + r) * kD + chunk * 8) =
            *reinterpret_cast<const uint4*>(&rows[r * kPitch + chunk * 4]);
    }
  }
}

// ---- dkdv: dK, dV of 128 keys, and their share of dQ ------------------------------------------------
// With kDropout the forward's mask Z (dropout.cuh) is regenerated: dV += (P ∘ Z)ᵀ·dO and
// dSᵀ = Pᵀ ∘ (dPᵀ ∘ Z − Δ), Z = kept / (1 − p), whose scale dV takes once at the end. Δ from the
// dropped O is right as it is (FlashAttention-2's rowsum(dO ∘ O)).
template <typename T, int kD, int kStages, bool kDropout = false>
__device__ __forceinline__ void attention_bwd_dkdv_sm90(const T* __restrict__ q, const T* __restrict__ k,
                                                        const T* __restrict__ v, const T* __restrict__ d_o,
                                                        const float* __restrict__ lse2,
                                                        const float* __restrict__ delta,
                                                        float* __restrict__ dq_accum, T* __restrict__ dk,
                                                        T* __restrict__ dv, uint8_t* __restrict__ maps, int group,
                                                        int seq_q, int seq_k, float scale, bool causal,
                                                        Dropout dropout = {}) {
  using Cfg = BwdSm90Config<T, kD, kStages>;
  using E = Element<T>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN;
  extern __shared__ unsigned char shared[];
  check_shared_size<Cfg::kSharedBytes>();

  const uint32_t raw = smem_address(shared);
  const uint32_t base = (raw + 1023) & ~1023u;
  const unsigned char* shared_base = shared + (base - raw);  // generic view of the aligned base
  const uint32_t tile_k = base, tile_v = base + Cfg::kOffsetV;
  auto tile_q = [&](int stage) { return base + Cfg::kOffsetQ + stage * Cfg::kTileBytesQ; };
  auto tile_do = [&](int stage) { return base + Cfg::kOffsetDo + stage * Cfg::kTileBytesQ; };
  auto tile_ds = [&](int buffer) { return base + Cfg::kOffsetDs + buffer * Cfg::kTileBytesDs; };
  auto stats = [&](int stage) {
    return reinterpret_cast<const float*>(shared_base + Cfg::kOffsetStats + stage * Cfg::kStatsBytes);
  };
  const uint32_t bar_kv = base + Cfg::kOffsetBarriers;
  auto full = [&](int stage) { return bar_kv + 8 * (1 + stage); };
  auto empty = [&](int stage) { return bar_kv + 8 * (1 + kStages + stage); };
  auto ds_full = [&](int buffer) { return bar_kv + 8 * (1 + 2 * kStages + buffer); };
  auto ds_empty = [&](int buffer) { return bar_kv + 8 * (3 + 2 * kStages + buffer); };
  constexpr uint32_t kDsStep = Cfg::kTileBytesDs >> 4;

  const int k0 = blockIdx.x * kBlockN;
  const int64_t bh_kv = blockIdx.y;
  const int padded = padded_rows(seq_q);
  // Work items: (query head of the group, query tile); causal: from the tile holding key k0 on.
  const int q_tiles = padded / kBlockM;
  const int first = causal ? min(q_tiles, k0 / kBlockM) : 0;
  const int per_head = q_tiles - first;
  const int items = group * per_head;

  const int warpgroup = warpgroup_index<false>();
  if (threadIdx.x == 0) {
    constexpr uint32_t kLoaders = kTma ? 1 : 128;  // arrivals a full stage waits for besides its bytes
    mbarrier_init(bar_kv, kLoaders);
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(full(s), kLoaders);  // every producer thread's copies, or the one TMA thread
      mbarrier_init(empty(s), 256);  // every consumer thread: each read lse₂, Δ itself
    }
    for (int b = 0; b < 2; ++b) {
      mbarrier_init(ds_full(b), 256);  // every consumer thread, after its own stores and proxy fence
      mbarrier_init(ds_empty(b), 128);  // every thread of warpgroup 0, its products that read the tile done
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warpgroup == 0) {
    // Producer: K and V once, then each item's Q, dO tiles and the rows' lse₂, Δ (16-byte copies of
    // the padded statistics: threads 0-15 lse₂, 16-31 Δ) into the item's stage.
    release_registers<Cfg::kProducerRegisters>();
    const int thread = threadIdx.x;
    // With TMA: the block's maps in the workspace, made by the four warps side by side; thread 0
    // issues every load, the statistics as two 256-byte bulk copies.
    uint8_t* const map_q =
        kTma ? block_tensor_maps(maps, static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x, Cfg::kMaps) : nullptr;
    uint8_t* const map_do = map_q + kTensorMapBytes;
    uint8_t* const map_k = map_q + 2 * kTensorMapBytes;
    uint8_t* const map_v = map_q + 3 * kTensorMapBytes;
    if constexpr (kTma) {
      const int maker = thread / 32;
      const uint32_t staging = base + Cfg::kOffsetMaps + maker * kTensorMapBytes;
      const int planes_q = static_cast<int>(gridDim.y) * group;
      if (maker == 0) make_tensor_map<kD, kBlockM>(map_q, staging, q, planes_q, seq_q);
      if (maker == 1) make_tensor_map<kD, kBlockM>(map_do, staging, d_o, planes_q, seq_q);
      if (maker == 2) make_tensor_map<kD, kBlockN>(map_k, staging, k, gridDim.y, seq_k);
      if (maker == 3) make_tensor_map<kD, kBlockN>(map_v, staging, v, gridDim.y, seq_k);
      named_barrier_sync(5, 128);  // (1-4 are the consumers' and the dQ warpgroup's)
      if (thread == 0) {
        for (const uint8_t* map : {map_q, map_do, map_k, map_v}) acquire_tensor_map(map);
        mbarrier_arrive_expect_bytes(bar_kv, 2 * Cfg::kTileBytesKV);
        tma_load_tile<kBlockN, kD>(tile_k, map_k, k0, static_cast<int>(bh_kv), bar_kv);
        tma_load_tile<kBlockN, kD>(tile_v, map_v, k0, static_cast<int>(bh_kv), bar_kv);
      }
    } else {
      load_tile<T, kBlockN, kD>(tile_k, k + bh_kv * seq_k * kD, k0, seq_k, thread);
      load_tile<T, kBlockN, kD>(tile_v, v + bh_kv * seq_k * kD, k0, seq_k, thread);
      mbarrier_arrive_on_copies(bar_kv);
    }
    auto load_item = [&](int t) {
      const int stage = t % kStages;
      const int64_t bh = bh_kv * group + t / per_head;
      const int row0 = (first + t % per_head) * kBlockM;
      const uint32_t stats_tile = base + Cfg::kOffsetStats + stage * Cfg::kStatsBytes;
      if constexpr (kTma) {
        if (thread == 0) {
          mbarrier_wait(empty(stage), ((t / kStages) & 1) ^ 1);
          mbarrier_arrive_expect_bytes(full(stage), 2 * Cfg::kTileBytesQ + Cfg::kStatsBytes);
          tma_load_tile<kBlockM, kD>(tile_q(stage), map_q, row0, static_cast<int>(bh), full(stage));
          tma_load_tile<kBlockM, kD>(tile_do(stage), map_do, row0, static_cast<int>(bh), full(stage));
          bulk_load(stats_tile, lse2 + bh * padded + row0, kBlockM * 4, full(stage));
          bulk_load(stats_tile + kBlockM * 4, delta + bh * padded + row0, kBlockM * 4, full(stage));
        }
        // The dQ warpgroup's wgmmas next are warp-collective: its warp 0 goes on together.
        __syncwarp();
        return;
      }
      mbarrier_wait(empty(stage), ((t / kStages) & 1) ^ 1);  // the first use finds every stage free
      load_tile<T, kBlockM, kD>(tile_q(stage), q + bh * seq_q * kD, row0, seq_q, thread);
      load_tile<T, kBlockM, kD>(tile_do(stage), d_o + bh * seq_q * kD, row0, seq_q, thread);
      if (thread < 32) {
        const float* src = (thread < 16 ? lse2 : delta) + bh * padded + row0 + (thread % 16) * 4;
        cp_async_16(stats_tile + thread * 16, src, 16);
      }
      mbarrier_arrive_on_copies(full(stage));
    };
    if constexpr (!Cfg::kDqWarpgroup) {
      if (kTma && thread != 0) return;
      for (int t = 0; t < items; ++t) load_item(t);
      if constexpr (!kTma) asm volatile("cp.async.wait_all;\n" ::: "memory");
      return;
    } else {
      // Item u's dQ = dS·K (64 queries × kD, over the block's 128 keys), kDqColumns at a time, staged
      // in the accumulator's block order (64-column blocks) and added by the copy engine; item u + 1's
      // loads go out first, so the consumers never wait on this. A: the dSᵀ tile read MN-major; B:
      // kDqColumns of K's panel (a 32-column product starts 64 bytes into the swizzled rows).
      const uint32_t ds_mn = operand_low(tile_ds(0), kBlockN * 128);
      auto staging = [&](int buffer, int half) {
        return base + Cfg::kOffsetDq + (2 * buffer + half) * Cfg::kTileBytesDq;
      };
      constexpr int kCols = Cfg::kDqColumns, kPerBlock = 64 / kCols;  // products per 64-column block
      float acc[kCols / 2];
      mbarrier_wait(bar_kv, 0);
      fence_proxy_async();  // K's copies (generic proxy), read next by wgmma
      for (int t = 0; t <= items; ++t) {
        if (t < items) load_item(t);
        if (t == 0) continue;
        const int u = t - 1, buffer = u & 1;
        mbarrier_wait(ds_full(buffer), (u >> 1) & 1);
        if (thread == 0) bulk_wait_read<1>();  // item u − 2's reductions have read the buffer's staging tiles
        named_barrier_sync(1, 128);
#pragma unroll
        for (int part = 0; part < kD / kCols; ++part) {
          const int block = part / kPerBlock, within = part % kPerBlock;  // 64-column block, and where in it
          const uint32_t k_mn = operand_low(tile_k + block * kBlockN * 128 + within * kCols * 2, kBlockN * 128);
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < kBlockN / 16; ++kk)
            Wgmma<T, kCols>::ss_mn(acc, operand(ds_mn + buffer * kDsStep + kk * (2048 >> 4)),
                                   operand(k_mn + kk * (2048 >> 4)), kk > 0);
          wgmma_commit();
          wgmma_wait<0>();
          fence_registers(acc);
          if (part == kD / kCols - 1) mbarrier_arrive(ds_empty(buffer));
          stage_dq_share(staging(buffer, block) + within * (kCols / 8) * 128 * 16, thread, acc);
        }
        fence_proxy_async();  // the staging stores, read next by the copy engine
        named_barrier_sync(1, 128);
        if (thread == 0) {
          const int64_t bh = bh_kv * group + u / per_head;
          const int tile = first + u % per_head;
#pragma unroll
          for (int half = 0; half < kD / 64; ++half)
            bulk_reduce_add(dq_accum + ((bh * q_tiles + tile) * (kD / 64) + half) * kDqBlock, staging(buffer, half),
                            Cfg::kTileBytesDq);
          bulk_commit();
        }
      }
      if (thread == 0) bulk_wait();
      return;
    }
  }

  // Consumers: 64 keys each.
  claim_registers<Cfg::kConsumerRegisters>();
  const int consumer = warpgroup - 1;
  const int thread = threadIdx.x % 128, warp = thread / 32, lane = thread % 32;
  const int key_base = k0 + consumer * 64;                   // this consumer's first key
  const int lane_key = key_base + warp * 16 + lane / 4;      // this thread's keys: lane_key, lane_key + 8
  const float scale_log2 = scale * kLog2e;
  const uint32_t dropout_seed = kDropout ? static_cast<uint32_t>(*dropout.seed) : 0u;
  const uint32_t query_step = static_cast<uint32_t>(seq_k) * kDropoutGolden;  // the next query's x, same key

  float acc_dk[kD / 2], acc_dv[kD / 2];
#pragma unroll
  for (int i = 0; i < kD / 2; ++i) acc_dk[i] = acc_dv[i] = 0.f;
  float s[32], dp[32];  // Sᵀ and dPᵀ: 64 keys × 64 queries; s then holds dQ's share
  using Fragments = uint32_t[4][4];  // m64k16 A fragments over the 64 queries
  Fragments p_frag, ds_frag;

  // Operand descriptors (low words; see fwd_sm90_wgmma.cuh `operand_low`). K-major: this consumer's
  // 64 rows of K and V (A of Sᵀ, dPᵀ), the stage's Q and dO (B of Sᵀ, dPᵀ); k16 steps are 32 bytes
  // along a 64-element panel, panels rows · 128 bytes apart. MN-major: Q and dO as the B of
  // dK, dV, K as the B of dQ, and dS as its A (k16 steps: 16 rows, 2048 bytes).
  const uint32_t k_rows = operand_low(tile_k + consumer * 64 * 128, 16);
  const uint32_t v_rows = operand_low(tile_v + consumer * 64 * 128, 16);
  constexpr uint32_t kQStageStep = Cfg::kTileBytesQ >> 4;
  const uint32_t q_rows = operand_low(tile_q(0), 16), do_rows = operand_low(tile_do(0), 16);
  const uint32_t q_mn = operand_low(tile_q(0), kBlockM * 128), do_mn = operand_low(tile_do(0), kBlockM * 128);
  // dQ's B: K's panel `consumer` over all keys (head dim 128), or K's one panel from this
  // consumer's keys on (head dim 64); A: the dS tile from the same key row.
  const uint32_t dq_key_row = Cfg::kSplitColumns ? 0 : consumer * 64;
  const uint32_t k_mn = operand_low(tile_k + (Cfg::kSplitColumns ? consumer * kBlockN * 128 : 0) + dq_key_row * 128,
                                    kBlockN * 128);
  const uint32_t ds_mn = operand_low(tile_ds(0) + dq_key_row * 128, kBlockN * 128);
  const int dq_col0 = Cfg::kSplitColumns ? consumer * 64 : 0;
  auto dq_stage = [&](int t) { return base + Cfg::kOffsetDq + (2 * consumer + (t & 1)) * Cfg::kTileBytesDq; };
  // Item t's staged dQ share into the accumulator: issued under item t + 1's Sᵀ and dPᵀ, so that the
  // fence and the barrier the copy engine needs are off the item's path.
  auto reduce_dq = [&](int t) {
    fence_proxy_async();  // the staging stores, read next by the copy engine
    named_barrier_sync(3 + consumer, 128);
    if (thread == 0) {
      const int64_t bh = bh_kv * group + t / per_head;
      const int tile = first + t % per_head;
      bulk_reduce_add(dq_accum + ((bh * q_tiles + tile) * (kD / 64) + dq_col0 / 64) * kDqBlock, dq_stage(t),
                      Cfg::kTileBytesDq);
      bulk_commit();
    }
  };

  // K's and V's rows of this consumer as m64k16 A fragments, when held in registers: word r of step
  // kk is key consumer·64 + 16·warp + lane / 4 + 8·(r % 2), head-dim columns 16·kk + 8·(r / 2) +
  // 2·(lane % 4) + {0, 1} (the accumulator order `pack` gives P too).
  constexpr bool kKvRegs = Cfg::kKvInRegisters;
  uint32_t k_frag[kKvRegs ? kD / 16 : 1][4], v_frag[kKvRegs ? kD / 16 : 1][4];
  // acc = A·Bᵀ over the head dim: A this consumer's 64 key rows (of K or V: `a_rows` in shared
  // memory, or `a_frag` in registers), B a query tile (Q or dO).
  auto issue_keys_by_queries = [&](float (&acc)[32], uint32_t a_rows, const uint32_t (&a_frag)[kKvRegs ? kD / 16 : 1][4],
                                   uint32_t b_rows) {
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const uint32_t column = ((kk % 4) * 32) >> 4;
      const uint32_t a_panel = ((kk / 4) * kBlockN * 128) >> 4, b_panel = ((kk / 4) * kBlockM * 128) >> 4;
      if constexpr (kKvRegs) {
        Wgmma<T, 64>::rs_k(acc, a_frag[kk], operand(b_rows + b_panel + column), kk > 0);
      } else {
        Wgmma<T, 64>::ss(acc, operand(a_rows + a_panel + column), operand(b_rows + b_panel + column), kk > 0);
      }
    }
  };

  mbarrier_wait(bar_kv, 0);
  if constexpr (kKvRegs) {
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int row = consumer * 64 + warp * 16 + lane / 4 + 8 * (r & 1);
        const int col = 16 * kk + 8 * (r >> 1) + 2 * (lane % 4);
        const uint32_t at = (col / 64) * kBlockN * 128 + row * 128 + ((((col % 64) / 8) ^ (row & 7)) << 4) + (col % 8) * 2;
        asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(k_frag[kk][r]) : "r"(tile_k + at));
        asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v_frag[kk][r]) : "r"(tile_v + at));
      }
  }
  for (int t = 0; t < items; ++t) {
    const int stage = t % kStages, buffer = t & 1;
    const int row0 = (first + t % per_head) * kBlockM;
    mbarrier_wait(full(stage), (t / kStages) & 1);
    fence_proxy_async();

    // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ.
    wgmma_fence();
    issue_keys_by_queries(s, k_rows, k_frag, q_rows + stage * kQStageStep);
    issue_keys_by_queries(dp, v_rows, v_frag, do_rows + stage * kQStageStep);
    wgmma_commit();
    if constexpr (!Cfg::kDqWarpgroup) {
      if (t > 0) reduce_dq(t - 1);
    }
    wgmma_wait<0>();
    fence_registers(s);
    fence_registers(dp);

    // Pᵀ and dSᵀ; accumulator i holds key lane_key + 8·((i / 2) % 2), query row0 + col(i).
    // Dropout (dropout.cuh): accumulators i and i + 4, i % 8 < 4, are queries c and c + 8 of a
    // 16-row group, same key: one hash (over the first's index ((bh·Sq + c)·Sk + key)) for both.
    uint32_t dropout_x = 0;
    if constexpr (kDropout) {
      const uint32_t bh = static_cast<uint32_t>(bh_kv * group + t / per_head);
      dropout_x = dropout_start((bh * seq_q + row0 + (lane % 4) * 2) * static_cast<uint32_t>(seq_k) + lane_key,
                                dropout_seed);
    }
    // Z's mask applied to Pᵀ (kept for dV, its scale later) and to dPᵀ (scaled now), before dSᵀ.
    // The pair's hash is written for both of its elements; ptxas computes it once (same operands).
    auto drop = [&](int i, float p, float& dpi) {
      if constexpr (kDropout) {
        const int first_of_pair = i & ~4;
        const uint32_t step = static_cast<uint32_t>((first_of_pair / 8) * 16 + (first_of_pair & 1)) * query_step +
                              ((first_of_pair / 2) & 1) * 8 * kDropoutGolden;
        const uint32_t m = dropout_mix(dropout_x + step);
        const bool kept = (i & 4) == 0 ? dropout_keeps_low(m, dropout.threshold) : dropout_keeps_high(m, dropout.threshold);
        dpi = kept ? dpi * dropout.scale : 0.f;
        return kept ? p : 0.f;
      }
      return p;
    };
    const float* lse2_tile = stats(stage);
    const float* delta_tile = lse2_tile + kBlockM;
    const bool masked = (causal && key_base + 63 > row0) || key_base + 64 > seq_k;
    // ptxas predicates the mask's tests rather than branch around them, so they run on every item;
    // with kSplitMask an item that needs none takes a copy of the loop without them.
    if (!Cfg::kSplitMask || masked) {
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        const int col = (i / 4) * 8 + (lane % 4) * 2 + (i & 1);
        float p = fast_exp2(fmaf(s[i], scale_log2, -lse2_tile[col]));
        if (masked) {
          const int key = lane_key + 8 * ((i / 2) & 1);
          if (key >= seq_k || (causal && key > row0 + col)) p = 0.f;
        }
        s[i] = drop(i, p, dp[i]);
        dp[i] = p * (dp[i] - delta_tile[col]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        const int col = (i / 4) * 8 + (lane % 4) * 2 + (i & 1);
        const float p = fast_exp2(fmaf(s[i], scale_log2, -lse2_tile[col]));
        s[i] = drop(i, p, dp[i]);
        dp[i] = p * (dp[i] - delta_tile[col]);
      }
    }
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        p_frag[kk][r] = E::pack(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
        ds_frag[kk][r] = E::pack(dp[8 * kk + 2 * r], dp[8 * kk + 2 * r + 1]);
      }

    // dV += Pᵀ·dO, dK += dSᵀ·Q.
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      Wgmma<T, kD>::rs(acc_dv, p_frag[kk], operand(do_mn + stage * kQStageStep + kk * (2048 >> 4)));
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      Wgmma<T, kD>::rs(acc_dk, ds_frag[kk], operand(q_mn + stage * kQStageStep + kk * (2048 >> 4)));
    wgmma_commit();

    // dSᵀ into the buffer's tile (key rows, 64 query columns: one 128-byte swizzled row a key): the
    // fragment word [kk][r] holds key lane_key + 8·(r % 2), queries 16·kk + 8·(r / 2) + 2·(lane % 4) + {0, 1}.
    if constexpr (Cfg::kDqWarpgroup) mbarrier_wait(ds_empty(buffer), ((t >> 1) & 1) ^ 1);  // item t − 2's dQ read it
    {
      const uint32_t tile = tile_ds(buffer);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int row = consumer * 64 + warp * 16 + lane / 4 + 8 * (r & 1);
          const int chunk = 2 * kk + (r >> 1);
          const uint32_t at = tile + row * 128 + ((chunk ^ (row & 7)) << 4) + (lane % 4) * 4;
          asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(at), "r"(ds_frag[kk][r]) : "memory");
        }
    }
    if constexpr (Cfg::kDqWarpgroup) {
      fence_proxy_async();  // generic stores, read next by warpgroup 0's wgmma
      mbarrier_arrive(ds_full(buffer));
      wgmma_wait<0>();
      fence_registers(acc_dk);
      fence_registers(acc_dv);
      mbarrier_arrive(empty(stage));  // Q, dO and the statistics are read (every thread: its lse₂, Δ loads)
      continue;
    }
    if (thread == 0) bulk_wait_read<1>();  // item t − 2's reduction has read the staging tile item t takes
    fence_proxy_async();                    // generic stores, read next by wgmma
    if constexpr (Cfg::kSplitColumns) {
      named_barrier_sync(1, 256);  // both consumers' dSᵀ are in the tile
    } else {
      named_barrier_sync(1 + consumer, 128);  // this consumer's
    }

    // This consumer's share of dQ (64 queries × 64 columns), into s.
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < Cfg::kDqKeys / 16; ++kk)
      Wgmma<T, 64>::ss_mn(s, operand(ds_mn + buffer * kDsStep + kk * (2048 >> 4)),
                          operand(k_mn + kk * (2048 >> 4)), kk > 0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_registers(s);
    fence_registers(acc_dk);
    fence_registers(acc_dv);
    // Q, dO and the statistics are read. Every thread arrives (releasing its own loads of lse₂ and Δ
    // before the producer's next copies into the stage; a warp's lane 0 alone would not order them).
    mbarrier_arrive(empty(stage));

    // Staged in the accumulator's block order (added by the copy engine, one 16 KB run, next item).
    stage_dq_share(dq_stage(t), thread, s);
  }
  if constexpr (!Cfg::kDqWarpgroup) {
    if (items > 0) reduce_dq(items - 1);
    if (thread == 0) bulk_wait();
  }

  // dK = s · Σ dSᵀ·Q, dV = Σ Pᵀ·dO, for the keys that exist.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int key = lane_key + 8 * h;
    if (key >= seq_k) continue;
    T* dk_row = dk + (bh_kv * seq_k + key) * kD + (lane % 4) * 2;
    T* dv_row = dv + (bh_kv * seq_k + key) * kD + (lane % 4) * 2;
#pragma unroll
    for (int c = 0; c < kD / 8; ++c) {
      *reinterpret_cast<uint32_t*>(dk_row + c * 8) = E::pack(acc_dk[4 * c + 2 * h] * scale, acc_dk[4 * c + 2 * h + 1] * scale);
      const float dv_scale = kDropout ? dropout.scale : 1.f;
      *reinterpret_cast<uint32_t*>(dv_row + c * 8) =
          E::pack(acc_dv[4 * c + 2 * h] * dv_scale, acc_dv[4 * c + 2 * h + 1] * dv_scale);
    }
  }
}

}  // namespace sm90
}  // namespace flashmlir
