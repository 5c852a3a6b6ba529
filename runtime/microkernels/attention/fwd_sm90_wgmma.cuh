// Flash-attention forward for sm_90a (Hopper): warp-specialized, WGMMA, mbarrier pipelines.
//
//   grid  (workgroups, 1, 1) over the B·Hq·⌈Sq / kBlockM⌉ (head, query block) tiles: one block
//         per tile, or (below head dim 256) fewer, each taking its share one after another
//         (scheduled_tile); with GQA, `group` = Hq / Hkv consecutive query heads read one K/V head
//   block a producer warpgroup and one to three consumers (kConsumers; kBlockM = 64 · kConsumers).
//         Warpgroup 0 is the producer: it loads each query block's Q and its K, V tiles into a
//         kStages-deep ring of shared-memory stages (the next query block's while the consumers
//         finish the last) and gives most of its registers away (setmaxnreg). The others are
//         consumers of 64 query rows each: S = Q·Kᵀ is wgmma with both operands in shared memory,
//         O += P·V takes P from registers. Three consumers (head dim 64, long sequences: the
//         catalog's `min_seq` entry) keep the tensor cores busier through the softmax's latency
//         than two, at 160 registers a thread (benchmarks/results/h200-2026-12-01-sm90-d64-three-consumers.md).
//         One consumer (head dim 64, shorter sequences) runs two workgroups an SM, which keep the
//         tensor cores busy through each other's query-block prologues and epilogues, where the
//         consumers of one workgroup move in step (h200-2026-12-02-sm90-d64-single-consumer.md).
//   sync  per stage, a "full" mbarrier (the producer's copies landed) and an "empty" one (every
//         consumer's products that read the stage completed), for K and V separately; Q's pair
//         likewise, per query block.
//
// Within a consumer the softmax of tile j overlaps the tensor cores: S(j) = Q·K(j)ᵀ and
// O += P(j-1)·V(j-1) are issued together; the softmax of S(j) runs while the second product is
// in flight, and O is rescaled once it has landed. With FLASHMLIR_PINGPONG the consumers also
// take turns at the tensor cores (named barriers), so one's softmax hides under the others'
// products. A consumer whose rows all lie past the sequence's end issues nothing.
//
// Tiles land in the layout wgmma reads with the 128-byte swizzle: a tile is D/64 column panels of
// 64 elements; in a panel row r is 128 bytes at r·128, its 16-byte chunk c at chunk c ^ (r % 8).
// K's panels are K-major operands (keys × head dim) of Q·Kᵀ; V's, the same bytes, are the MN-major
// operand of P·V. With kTma (the catalog's choice at every head dim) the copy engine puts them
// there, one box a panel, through tensor maps the workgroup makes on the device (tma_sm90.cuh;
// IREE passes pointers, not maps); otherwise the producer's 128 threads copy 16 bytes each with
// cp.async.
//
// Causal masking is top-left (key > row is masked), as in the sm_80 kernel; only diagonal and
// ragged-tail tiles are masked, tiles right of the diagonal are never loaded.
#pragma once

#include "dropout.cuh"
#include "mma_sm80.cuh"  // kLog2e, fast_exp2, cp_async_16, smem_address, Element<T>::pack
#include "online_softmax.cuh"  // tree_reduce, advance_shift
#include "tma_sm90.cuh"
#include "wgmma_sm90.cuh"

namespace flashmlir {
namespace sm90 {

// ---- mbarriers, proxies, warpgroup MMA bookkeeping ----------------------------------------------

__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Arrives once every cp.async this thread issued so far has landed (counted in the init count).
__device__ __forceinline__ void mbarrier_arrive_on_copies(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nLAB_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra LAB_WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// Shared memory written through the generic proxy (cp.async), read next by wgmma (async proxy).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Keeps the compiler from moving reads or writes of `r` across the asynchronous wgmma boundaries.
template <int N>
__device__ __forceinline__ void fence_registers(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// ptxas schedules within a basic block and moves a wgmma wait up freely there (it sees no cost in
// waiting early): it pulled the wait for P·V ahead of the softmax that was meant to run under it.
// A branch it cannot fold ends the block. `x` is an exponential, never negative; were it, a
// nanosleep of 0 would change nothing.
__device__ __forceinline__ void schedule_barrier(float x) {
  if (x < 0.f) __nanosleep(0);
}

template <int kRegisters>
__device__ __forceinline__ void release_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void claim_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

// Stops the kernel (a launch error, not a silent overrun) when the launch gave less dynamic shared
// memory than the layout needs: the size is computed again on the host (compiler/microkernels.py,
// IREE's export declarations), and a mismatch would otherwise corrupt memory.
template <int kBytes>
__device__ __forceinline__ void check_shared_size() {
  uint32_t size;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(size));
  if (size < kBytes) __trap();
}

// The calling thread's warpgroup, broadcast from lane 0 (kUniform): ptxas then sees it is the same
// across the warp and keeps what derives from it (the wgmma descriptors) in uniform registers, so
// the key loops lose their R2UR moves before each wgmma (forward head dim 128: 96 of 1,472
// instructions a two-tile iteration, 1,375 after; sass_report.py). On an H200 the forward gained
// 1-5% at head dims 64 and 128 (benchmarks/results/h200-2026-12-01-sm90-uniform-warpgroup.md) and
// lost 4-6% at 256 (its spills grow from 8 to 12 bytes); the backward, where it cut dkdv's loop
// from 801 to 741 instructions, lost 1-6% in 11 of 12 rows. Those two take the plain index.
// FLASHMLIR_UNIFORM_WARPGROUP=0/1 overrides both for an A/B.
template <bool kUniform>
__device__ __forceinline__ int warpgroup_index() {
#ifdef FLASHMLIR_UNIFORM_WARPGROUP
  constexpr bool uniform = FLASHMLIR_UNIFORM_WARPGROUP != 0;
#else
  constexpr bool uniform = kUniform;
#endif
  return uniform ? __shfl_sync(0xffffffff, threadIdx.x / 128, 0) : threadIdx.x / 128;
}

// Whether the producer loads through TMA (tensor maps each block makes on the device, in a global
// workspace the launch passes: tma_sm90.cuh) instead of cp.async: one thread issues a tile's
// kD / 64 box loads instead of 128 threads' 16-byte copies, which share the schedulers with the
// consumers. On an H200 +3-6% at 1k-4k tokens, +2-10% at 8k-16k with the grid persistent there
// too (benchmarks/results/h200-2026-12-02-sm90-tma.md); nothing at 512, where O's stores are what
// costs. At head dim 256, whose 32 KB tiles the producer's 24 registers kept only 4 copies a
// thread in flight for, +9-23% from 2k tokens (h200-2026-12-02-sm90-d256-tma.md). Catalog `tma`;
// the entry points then take the workspace.
#ifndef FLASHMLIR_TMA
#define FLASHMLIR_TMA 0
#endif
constexpr bool kTma = FLASHMLIR_TMA != 0;
// With TMA, whether O leaves through it too (FlashAttention-3's epilogue): each consumer writes its
// 64 rows into a swizzled shared tile of its own and one of its threads hands the tile to the copy
// engine, which writes it out while the consumer goes on with its next query block. A fourth map,
// made by the fourth producer warp. Catalog `tma_store`: head dim 128 below 16k tokens (with
// ping-pong, h200-2026-12-02-sm90-pingpong-tma-store.md) and head dim 256 (Sm90Config::kOInQ).
#ifndef FLASHMLIR_TMA_STORE
#define FLASHMLIR_TMA_STORE 0
#endif
constexpr bool kTmaStore = kTma && FLASHMLIR_TMA_STORE != 0;
constexpr int kMaps = kTmaStore ? 4 : 3;  // tensor maps a workgroup makes: Q, K, V (and O)

// Named barrier `id` over `threads` threads (ids 0.. are free: __syncthreads is not used after setup).
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// A wgmma shared-memory operand with the 128-byte swizzle, as its descriptor's two words. The high
// word (8-row groups 1024 bytes apart, the swizzle mode) is the same for every operand here; the
// low one holds the start address and the leading offset in 16-byte units, so stepping an operand
// through a tile is a 32-bit add. K-major operands ignore `leading`; MN-major ones step 64-element
// panels by it.
constexpr uint32_t kOperandHigh = (1024 >> 4) | (1u << 30);  // stride 1024 B; mode 1: 128-byte swizzle
__device__ __forceinline__ uint32_t operand_low(uint32_t address, uint32_t leading) {
  return ((address & 0x3ffff) >> 4) | ((leading >> 4) << 16);
}
__device__ __forceinline__ uint64_t operand(uint32_t low) {
  return (static_cast<uint64_t>(kOperandHigh) << 32) | low;
}

// ---- configuration --------------------------------------------------------------------------------

template <typename T, int kD, int kBlockN, int kStages, int kConsumers = 2>
struct Sm90Config {
  static constexpr int kBlockM = 64 * kConsumers;       // one wgmma M of query rows a consumer
  static constexpr int kThreads = 128 * (kConsumers + 1);  // producer + consumers
  // Registers per thread after setmaxnreg: 128 · producer + 128 · consumers · consumer ≤ 64 K. With
  // two consumers, the least that spills neither role (ptxas -v): head dim 256 consumers need 240 (O
  // alone is 128). Three consumers (head dim 64, FlashAttention-3's arrangement there) get 160, and
  // the producer 32 (with 24 it spilled 8-12 bytes taking the persistent grid's tiles).
#ifdef FLASHMLIR_PRODUCER_REGISTERS
  static constexpr int kProducerRegisters = FLASHMLIR_PRODUCER_REGISTERS;
#else
  static constexpr int kProducerRegisters = kD == 128 || kConsumers == 3 ? 32 : 24;
#endif
  // Workgroups an SM holds at once: one, or with a single consumer (block_m 64) two, whose phases
  // run independently (one's softmax under the other's products, one's prologue and epilogue
  // under the other's loop) where two or three consumers of one workgroup move in step.
  static constexpr int kBlocksPerSm = kConsumers == 1 ? 2 : 1;
  static constexpr int kConsumerRegisters = kConsumers == 3   ? 160
                                            : kConsumers == 1 ? 256 - kProducerRegisters
                                            : kProducerRegisters <= 24 ? 240
                                            : kProducerRegisters <= 40 ? 232
                                                                       : 224;
  static_assert(kConsumers >= 1 && kConsumers <= 3, "one to three consumer warpgroups");
  // setmaxnreg moves registers within what the launch gave the block (kThreads × the per-thread
  // count __launch_bounds__ leaves): a consumer's setmaxnreg.inc past that waits forever.
  static_assert(kProducerRegisters + kConsumers * kConsumerRegisters <=
                    (kConsumers + 1) * (64 * 1024 / (kThreads * kBlocksPerSm) / 8 * 8),
                "setmaxnreg would ask for more registers than the launch gives the block");
  static constexpr int kPanelRowBytes = 128;    // 64 elements of 16 bits: one swizzle row
  static constexpr int kTileBytesQ = kBlockM * kD * 2;
  static constexpr int kTileBytesKV = kBlockN * kD * 2;
  static constexpr int kOffsetK = kTileBytesQ;
  static constexpr int kOffsetV = kOffsetK + kStages * kTileBytesKV;
  // Whether a block takes several query blocks (scheduled_tile). At head dim 256 the
  // consumers have no registers left for the loop's state: ptxas spilled inside the key loop
  // (~100 bytes against 8 with cp.async, 170 against none with TMA) and the long sequences lost
  // 10%, so there a block takes one.
#ifdef FLASHMLIR_PERSISTENT  // an A/B (microkernel_sweep.py `:PERSISTENT=1`)
  static constexpr bool kPersistent = FLASHMLIR_PERSISTENT != 0;
#else
  static constexpr bool kPersistent = kD < 256;
#endif
  // With TMA, where three producer warps make the Q, K and V tensor maps before they go to global memory.
  // With kTmaStore, each consumer's 64 rows of O, swizzled as the operands (1024-aligned), in a
  // tile of its own; or, where a block takes one query block (Q is loaded once), in that
  // consumer's 64 rows of the Q tile, which its last S = Q·Kᵀ leaves dead: head dim 256 has no
  // room for two more tiles (193 KB + 64 KB).
  static constexpr bool kOInQ = kTmaStore && !kPersistent;
  static constexpr int kTileBytesO = 64 * kD * 2;
  static constexpr int kOffsetO = kOffsetV + kStages * kTileBytesKV;
  static constexpr int kOffsetMaps = kOffsetO + (kTmaStore && !kOInQ ? kConsumers * kTileBytesO : 0);
  static constexpr int kOffsetBarriers = kOffsetMaps + (kTma ? kMaps * kTensorMapBytes : 0);
  // Q full and empty; K, V full and empty per stage
  static constexpr int kBarriers = 2 + 4 * kStages;
  // The tiles start on a 1024-byte boundary (the swizzle's period): slack to align the base.
  static constexpr int kSharedBytes = kOffsetBarriers + 8 * kBarriers + 1024;
  static_assert(kD % 64 == 0 && kBlockN % 16 == 0 && kTileBytesKV % 1024 == 0, "unsupported tile shape");
  // Per consumer thread: O (kD / 2), S (kBlockN / 2) and two sets of P (kBlockN / 4 each).
  static_assert(kD / 2 + kBlockN / 2 + kBlockN / 2 <= kConsumerRegisters - 32, "too many accumulators for the consumers");
};

// Copy rows [row0, row0 + kRows) of a [rows, kD] matrix into a swizzled tile (zero past `rows`),
// by the 128 producer threads. Each thread owns one 16-byte column chunk; its rows step by
// 128 / (kD / 8). The producer shares the schedulers with the consumers, so its instructions are
// counted: a whole tile is one pointer step and one copy per chunk; only a sequence's ragged last
// tile checks rows.
template <typename T, int kRows, int kD>
__device__ __forceinline__ void load_tile(uint32_t tile, const T* base, int row0, int rows, int thread) {
  constexpr int kChunks = kD / 8, kRowStep = 128 / kChunks;
  static_assert(kRows % kRowStep == 0, "tile rows must be a multiple of the producer's row step");
  const int chunk = thread % kChunks, panel = chunk / 8, c = chunk % 8;
  const int first = thread / kChunks;
  auto shared_offset = [&](int r) { return tile + panel * kRows * 128 + r * 128 + ((c ^ (r & 7)) << 4); };
  const T* src = base + static_cast<int64_t>(row0 + first) * kD + chunk * 8;
  constexpr int kUnroll = kD >= 256 ? 4 : 8;  // copies in flight per thread that fit the producer's 24 registers
  if (row0 + kRows <= rows) {
    if constexpr (kRowStep % 8 == 0) {  // the swizzle phase of this thread's rows never changes
      const uint32_t dst = shared_offset(first);
#pragma unroll kUnroll
      for (int it = 0; it < kRows / kRowStep; ++it) cp_async_16(dst + it * kRowStep * 128, src + it * kRowStep * kD, 16);
    } else {
#pragma unroll kUnroll
      for (int it = 0; it < kRows / kRowStep; ++it)
        cp_async_16(shared_offset(first + it * kRowStep), src + it * kRowStep * kD, 16);
    }
    return;
  }
#pragma unroll 4
  for (int it = 0; it < kRows / kRowStep; ++it) {
    const int r = first + it * kRowStep;
    const bool valid = row0 + r < rows;
    cp_async_16(shared_offset(r), valid ? src + it * kRowStep * kD : base, valid ? 16 : 0);
  }
}

// ---- the kernel body ----------------------------------------------------------------------------------

// The n-th (head, query block) tile of the grid's block x, as (bh, qb); bh = -1 after its last. The
// work list runs head after head, so the blocks that run together share heads, and K and V in L2.
// A grid of one block per tile leaves the balance to the hardware: causal query blocks (qb + 1 key
// tiles each) come longest first. A narrower grid is persistent (compiler/microkernels.py picks it
// for short sequences): block x takes list positions x, x + gridDim.x, ..., and causal query
// blocks come longest, shortest, second longest, ... within a head and go out in neighbouring
// pairs, each costing about q_blocks + 1 key tiles, so that the blocks' shares even out without
// dynamic scheduling.
__device__ __forceinline__ int2 scheduled_tile(int n, int q_blocks, int tiles, bool causal) {
  const bool paired = causal && static_cast<int>(gridDim.x) < tiles;
  const int per = paired ? 2 : 1;
  const int position = ((n / per) * gridDim.x + blockIdx.x) * per + n % per;
  if (position >= tiles) return make_int2(-1, -1);
  const int j = position % q_blocks;
  int qb = j;
  if (causal) qb = !paired ? q_blocks - 1 - j : j % 2 == 0 ? q_blocks - 1 - j / 2 : j / 2;
  return make_int2(position / q_blocks, qb);
}

// With kDropout, P is dropped (dropout.cuh) after the row statistics took it in and before P·V;
// O gets the kept values' scale with 1 / ℓ.
template <typename T, int kD, int kBlockN, int kStages, bool kPingPong, int kConsumers = 2, bool kDropout = false>
__device__ __forceinline__ void attention_fwd_sm90(const T* __restrict__ q, const T* __restrict__ k,
                                                   const T* __restrict__ v, T* __restrict__ o,
                                                   float* __restrict__ lse, uint8_t* __restrict__ maps,
                                                   int group, int batch_heads, int seq_q, int seq_k, float scale,
                                                   bool causal, Dropout dropout = {}) {
  using Cfg = Sm90Config<T, kD, kBlockN, kStages, kConsumers>;
  static_assert(!kPingPong || kConsumers > 1, "ping-pong takes two or three consumers");
  using E = Element<T>;
  constexpr int kBlockM = Cfg::kBlockM;
  constexpr int kSRegs = kBlockN / 2;   // S accumulators per thread (m64 × kBlockN over 128 threads)
  constexpr int kORegs = kD / 2;
  // Two workgroups an SM leave ptxas 128 registers a thread at launch, too few for one m64n256
  // wgmma (128 accumulators and its operands; setmaxnreg raises what the consumers get, not that):
  // head dim 256 then adds P·V in two m64n128 halves of O.
  constexpr bool kSplitPv = kD > 128 && Cfg::kBlocksPerSm > 1;
  constexpr int kPSteps = kBlockN / 16;  // 16-key steps of P·V
  extern __shared__ unsigned char shared[];
  check_shared_size<Cfg::kSharedBytes>();

  const uint32_t base = (smem_address(shared) + 1023) & ~1023u;
  const uint32_t tile_q = base;
  auto tile_k = [&](int stage) { return base + Cfg::kOffsetK + stage * Cfg::kTileBytesKV; };
  auto tile_v = [&](int stage) { return base + Cfg::kOffsetV + stage * Cfg::kTileBytesKV; };
  const uint32_t bar_q = base + Cfg::kOffsetBarriers;
  auto full_k = [&](int stage) { return bar_q + 8 * (1 + stage); };
  auto full_v = [&](int stage) { return bar_q + 8 * (1 + kStages + stage); };
  auto empty_k = [&](int stage) { return bar_q + 8 * (1 + 2 * kStages + stage); };
  auto empty_v = [&](int stage) { return bar_q + 8 * (1 + 3 * kStages + stage); };
  const uint32_t empty_q = bar_q + 8 * (1 + 4 * kStages);

  const int q_blocks = (seq_q + kBlockM - 1) / kBlockM, tiles = q_blocks * batch_heads;
  // A block takes its tiles n = 0, 1, ... (one where the kernel is not persistent).
  constexpr bool kPersistent = Cfg::kPersistent;
  auto tile_at = [&](int n) { return scheduled_tile(n, q_blocks, tiles, causal); };
  const int kv_tiles = (seq_k + kBlockN - 1) / kBlockN;
  // Key tiles query block `qb` visits: causal ones stop at the diagonal.
  auto key_tiles = [&](int qb) { return causal ? min(kv_tiles, (qb * kBlockM + kBlockM + kBlockN - 1) / kBlockN) : kv_tiles; };

  // A grid too narrow for a kernel that takes one query block per block would leave rows unwritten.
  if (!kPersistent && gridDim.x < tiles) __trap();

  const int warpgroup = warpgroup_index<(kD < 256)>();
  // With TMA, this block's tensor maps in the workspace: Q, K, V (and O).
  uint8_t* const block_maps = kTma ? block_tensor_maps(maps, blockIdx.x, kMaps) : nullptr;
  // Named barriers: 1 + c, consumer c's turn (ping-pong); the producer warps' maps made; consumer
  // c's O tile written or free (TMA stores).
  constexpr int kMapsMade = 1 + kConsumers;
  auto o_tile_barrier = [&](int c) { return 2 + kConsumers + c; };
  if (threadIdx.x == 0) {
    constexpr uint32_t kLoaders = kTma ? 1 : 128;  // arrivals a full stage waits for besides its bytes
    mbarrier_init(bar_q, kLoaders);
    mbarrier_init(empty_q, 4 * kConsumers);
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(full_k(s), kLoaders);  // every producer thread's copies, or the one TMA thread
      mbarrier_init(full_v(s), kLoaders);
      mbarrier_init(empty_k(s), 4 * kConsumers);  // one arrival per consumer warp
      mbarrier_init(empty_v(s), 4 * kConsumers);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  // The K/V ring runs on across query blocks: `first` counts the key tiles of the block's earlier
  // query blocks; key tile j of this one sits in stage (first + j) % kStages, in that stage's
  // ((first + j) / kStages)-th use.
  if (warpgroup == 0) {
    // Producer: per query block Q (once the consumers are done with the last one), then K(j) and
    // V(j) into their stages once both consumers let them go.
    release_registers<Cfg::kProducerRegisters>();
    if constexpr (kTma) {
      // Warps 0, 1, 2 (and 3) make the block's Q, K and V (and O) maps side by side (a block per
      // query block pays this at its start); thread 0 then issues every load, the rest leave.
      const int maker = threadIdx.x / 32;
      if (maker >= kMaps) return;
      uint8_t* map_q = block_maps;
      uint8_t* map_k = map_q + kTensorMapBytes;
      uint8_t* map_v = map_k + kTensorMapBytes;
      const uint32_t staging = base + Cfg::kOffsetMaps + maker * kTensorMapBytes;
      if (maker == 0) make_tensor_map<kD, kBlockM>(map_q, staging, q, batch_heads, seq_q);
      if (maker == 1) make_tensor_map<kD, kBlockN>(map_k, staging, k, batch_heads / group, seq_k);
      if (maker == 2) make_tensor_map<kD, kBlockN>(map_v, staging, v, batch_heads / group, seq_k);
      if constexpr (kTmaStore) {
        // O's: the consumers acquire it before their first store, which follows Q's first load.
        if (maker == 3) make_tensor_map<kD, 64>(map_v + kTensorMapBytes, staging, o, batch_heads, seq_q);
      }
      if (maker > 0) {
        named_barrier_arrive(kMapsMade, 32 * kMaps);
        return;
      }
      named_barrier_sync(kMapsMade, 32 * kMaps);
      if (threadIdx.x != 0) return;
      acquire_tensor_map(map_q);
      acquire_tensor_map(map_k);
      acquire_tensor_map(map_v);
      int first = 0;
      for (int n = 0; n < (kPersistent ? tiles : 1); ++n) {
        const int2 tile = tile_at(n);
        if (tile.x < 0) break;
        const int bh = tile.x, bh_kv = bh / group, qb = tile.y;
        if (n > 0) mbarrier_wait(empty_q, (n - 1) & 1);
        mbarrier_arrive_expect_bytes(bar_q, Cfg::kTileBytesQ);
        tma_load_tile<kBlockM, kD>(tile_q, map_q, qb * kBlockM, bh, bar_q);
        const int end = key_tiles(qb);
        for (int j = 0; j < end; ++j) {
          const int stage = (first + j) % kStages;
          const uint32_t free_parity = (((first + j) / kStages) & 1) ^ 1;
          mbarrier_wait(empty_k(stage), free_parity);
          mbarrier_arrive_expect_bytes(full_k(stage), Cfg::kTileBytesKV);
          tma_load_tile<kBlockN, kD>(tile_k(stage), map_k, j * kBlockN, bh_kv, full_k(stage));
          mbarrier_wait(empty_v(stage), free_parity);
          mbarrier_arrive_expect_bytes(full_v(stage), Cfg::kTileBytesKV);
          tma_load_tile<kBlockN, kD>(tile_v(stage), map_v, j * kBlockN, bh_kv, full_v(stage));
        }
        first += end;
      }
      return;
    }
    const int thread = threadIdx.x;
    int first = 0;
    for (int n = 0; n < (kPersistent ? tiles : 1); ++n) {
      const int2 tile = tile_at(n);
      if (tile.x < 0) break;
      const int64_t bh = tile.x, bh_kv = bh / group;
      const int qb = tile.y;
      const T* kb = k + bh_kv * seq_k * kD;
      const T* vb = v + bh_kv * seq_k * kD;
      if (n > 0) mbarrier_wait(empty_q, (n - 1) & 1);
      load_tile<T, kBlockM, kD>(tile_q, q + bh * seq_q * kD, qb * kBlockM, seq_q, thread);
      mbarrier_arrive_on_copies(bar_q);
      const int end = key_tiles(qb);
      for (int j = 0; j < end; ++j) {
        const int stage = (first + j) % kStages;
        const uint32_t free_parity = (((first + j) / kStages) & 1) ^ 1;  // the first use finds every stage free
        mbarrier_wait(empty_k(stage), free_parity);
        load_tile<T, kBlockN, kD>(tile_k(stage), kb, j * kBlockN, seq_k, thread);
        mbarrier_arrive_on_copies(full_k(stage));
        mbarrier_wait(empty_v(stage), free_parity);
        load_tile<T, kBlockN, kD>(tile_v(stage), vb, j * kBlockN, seq_k, thread);
        mbarrier_arrive_on_copies(full_v(stage));
      }
      first += end;
    }
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    return;
  }

  // Consumers.
  claim_registers<Cfg::kConsumerRegisters>();
  const int consumer = warpgroup - 1;
  const int thread = threadIdx.x % 128, warp = thread / 32, lane = thread % 32;
  const float scale_log2 = scale * kLog2e;
  // Ping-pong: consumer c issues its products after barrier 1 + c, then lets the next one go (the
  // last lets consumer 0 go); per query block consumer 0 goes first and the last consumer passes no
  // turn after its last, so every arrival on a barrier meets a sync within the query block.
  auto take_turn = [&] {
    if constexpr (kPingPong) named_barrier_sync(1 + consumer, 256);
  };
  auto pass_turn = [&](bool last) {
    if constexpr (kPingPong) {
      if (!(last && consumer == kConsumers - 1)) named_barrier_arrive(1 + (consumer + 1) % kConsumers, 256);
    }
  };

  float row_max[2], row_sum[2];
  float acc[kORegs];
  float s[kSRegs];
#pragma unroll
  for (int i = 0; i < kSRegs; ++i) s[i] = 0.f;
  using Fragments = uint32_t[kPSteps][4];
  Fragments p_even, p_odd;  // P of even and odd key tiles: one is read by a product in flight while the other is written

  // Operands: this consumer's 64 rows of Q, and the stages of K and V (k16 steps: 32 bytes along a
  // panel, panels kRows · 128 bytes apart; P·V steps 16 keys, 2048 bytes).
  const uint32_t q_low = operand_low(tile_q + consumer * 64 * Cfg::kPanelRowBytes, 16);
  const uint32_t k_low = operand_low(tile_k(0), 16);
  const uint32_t v_low = operand_low(tile_v(0), kBlockN * 128);
  constexpr uint32_t kStageStep = Cfg::kTileBytesKV >> 4;
  auto issue_qk = [&](int stage) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const uint32_t column = ((kk % 4) * 32) >> 4;  // 16 elements of the 64-element panel
      const uint64_t a = operand(q_low + (((kk / 4) * kBlockM * 128) >> 4) + column);
      const uint64_t b = operand(k_low + stage * kStageStep + (((kk / 4) * kBlockN * 128) >> 4) + column);
      Wgmma<T, kBlockN>::ss(s, a, b, kk > 0);
    }
    wgmma_commit();
  };
  auto issue_pv = [&](int stage, const Fragments& p) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kPSteps; ++kk) {
      const uint64_t b = operand(v_low + stage * kStageStep + kk * (2048 >> 4));
      if constexpr (kSplitPv) {  // columns 0-127, then 128-255 (V's panels 2 and 3)
        Wgmma<T, kD / 2>::rs(*reinterpret_cast<float(*)[kORegs / 2]>(&acc[0]), p[kk], b);
        Wgmma<T, kD / 2>::rs(*reinterpret_cast<float(*)[kORegs / 2]>(&acc[kORegs / 2]), p[kk],
                             b + ((2 * kBlockN * 128) >> 4));
      } else {
        Wgmma<T, kD>::rs(acc, p[kk], b);
      }
    }
    wgmma_commit();
  };
  // Online softmax of S (key tile j of the query block at row q0), in place: S becomes
  // exp2(S·scale·log2 e − shift) in fp32, the row statistics advance, and `rescale` is what O must
  // be multiplied by before P(j)·V(j) adds on.
  auto softmax = [&](int q0, int j, float (&rescale)[2]) {
    const int key0 = j * kBlockN;
    const bool tail = key0 + kBlockN > seq_k;
    const bool diagonal = causal && key0 + kBlockN - 1 > q0 + consumer * 64 + warp * 16;
    if (tail || diagonal) {
      const int row0 = q0 + consumer * 64 + warp * 16 + lane / 4;
#pragma unroll
      for (int i = 0; i < kSRegs; ++i) {
        const int key = key0 + (i / 4) * 8 + (lane % 4) * 2 + (i & 1);
        const int row = row0 + ((i / 2) & 1) * 8;
        if (key >= seq_k || (causal && key > row)) s[i] = kNegInf;
      }
    }
    // Row maxima and sums as trees, not chains: more independent instructions in flight.
    float mx[2], shift[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float m[kBlockN / 8];
#pragma unroll
      for (int n = 0; n < kBlockN / 8; ++n) m[n] = fmaxf(s[4 * n + 2 * h], s[4 * n + 2 * h + 1]);
      mx[h] = tree_reduce(m, [](float a, float b) { return fmaxf(a, b); });
    }
#pragma unroll
    for (int lane_mask = 1; lane_mask <= 2; lane_mask *= 2)
#pragma unroll
      for (int h = 0; h < 2; ++h) mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffff, mx[h], lane_mask));
#pragma unroll
    for (int h = 0; h < 2; ++h) advance_shift(row_max[h], mx[h] * scale_log2, shift[h], rescale[h]);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float sum[kBlockN / 8];
#pragma unroll
      for (int n = 0; n < kBlockN / 8; ++n) {
        s[4 * n + 2 * h] = fast_exp2(fmaf(s[4 * n + 2 * h], scale_log2, -shift[h]));
        s[4 * n + 2 * h + 1] = fast_exp2(fmaf(s[4 * n + 2 * h + 1], scale_log2, -shift[h]));
        sum[n] = s[4 * n + 2 * h] + s[4 * n + 2 * h + 1];
      }
      row_sum[h] = fmaf(row_sum[h], rescale[h], tree_reduce(sum, [](float a, float b) { return a + b; }));
    }
  };
  // Dropout of P (key tile j) for rows `row_index` and row_index + 8 of the [B·Hq, Sq] rows (a pair
  // of dropout.cuh, row_index % 16 < 8): accumulators 4n + e (the first row) and 4n + 2 + e (the
  // second) are key j·kBlockN + 8n + 2·(lane % 4) + e, one hash for both.
  const uint32_t dropout_seed = kDropout ? static_cast<uint32_t>(*dropout.seed) : 0u;
  auto drop = [&](int j, uint32_t row_index) {
    if constexpr (kDropout) {
      const uint32_t key = j * kBlockN + (lane % 4) * 2;
      const uint32_t start = dropout_start(row_index * static_cast<uint32_t>(seq_k) + key, dropout_seed);
#pragma unroll
      for (int n = 0; n < kBlockN / 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const uint32_t mixed = dropout_mix(start + static_cast<uint32_t>(8 * n + e) * kDropoutGolden);
          if (!dropout_keeps_low(mixed, dropout.threshold)) s[4 * n + e] = 0.f;
          if (!dropout_keeps_high(mixed, dropout.threshold)) s[4 * n + 2 + e] = 0.f;
        }
    }
  };
  // P as the A fragments of P·V: S's accumulators of key columns [16 kk, 16 kk + 16) are the
  // m64k16 register fragment of step kk.
  auto convert_p = [&](Fragments& p) {
#pragma unroll
    for (int kk = 0; kk < kPSteps; ++kk)
#pragma unroll
      for (int r = 0; r < 4; ++r) p[kk][r] = E::pack(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
  };
  auto rescale_acc = [&](const float (&factor)[2]) {
#pragma unroll
    for (int i = 0; i < kORegs; ++i) acc[i] *= factor[(i / 2) & 1];
  };
  auto release = [&](uint32_t bar) {
    if (lane == 0) mbarrier_arrive(bar);
  };

  int first = 0;
  bool o_map_acquired = false;  // kTmaStore: by this consumer's thread 0, before its first store
  for (int n = 0; n < (kPersistent ? tiles : 1); ++n) {
    const int2 tile = tile_at(n);
    if (tile.x < 0) break;
    const int64_t bh = tile.x;
    const int qb = tile.y, q0 = qb * kBlockM, end = key_tiles(qb);
    const int row_base = q0 + consumer * 64 + warp * 16 + lane / 4;  // rows row_base and row_base + 8
    const uint32_t row_index = static_cast<uint32_t>(bh * seq_q + row_base);  // the first's, for dropout
    if constexpr (kPingPong) {
      if (consumer == kConsumers - 1) named_barrier_arrive(1, 256);  // consumer 0 goes first
    }
    row_max[0] = row_max[1] = kNegInf;
    row_sum[0] = row_sum[1] = 0.f;
#pragma unroll
    for (int i = 0; i < kORegs; ++i) acc[i] = 0.f;

    // The loop, FlashAttention-3's intra-warpgroup overlap: S(j) = Q·K(j)ᵀ and O += P(j-1)·V(j-1)
    // go to the tensor cores together; the softmax of S(j) runs while the second is in flight. P(j)
    // goes to the other of two register sets than P(j-1), so that packing it need not wait for that
    // product: with one set, ptxas pulls the wait up to the first pack, ahead of the softmax. Q is
    // let go as soon as the query block's last S has landed.
    float rescale[2] = {1.f, 1.f};
    // Key tile j: issue both products, then the softmax of S(j) into p_next while P(j-1)·V(j-1) runs.
    auto step = [&](int j, const Fragments& p_prev, Fragments& p_next) {
      const int at = first + j;
      const int stage = at % kStages, prev = (at - 1) % kStages;
      mbarrier_wait(full_k(stage), (at / kStages) & 1);
      mbarrier_wait(full_v(prev), ((at - 1) / kStages) & 1);
      fence_proxy_async();
      take_turn();
      issue_qk(stage);
      // Once the shifts settle the factors are exactly 1: skip the multiplies.
      if (__any_sync(0xffffffff, rescale[0] != 1.f || rescale[1] != 1.f)) rescale_acc(rescale);
      issue_pv(prev, p_prev);
      pass_turn(false);
      wgmma_wait<1>();  // S(j) has landed; P(j-1)·V(j-1) may still run
      fence_registers(s);
      release(empty_k(stage));
      if (j == end - 1) release(empty_q);
      softmax(q0, j, rescale);
      drop(j, row_index);
      convert_p(p_next);
      schedule_barrier(rescale[0]);
      wgmma_wait<0>();
      fence_registers(acc);
      release(empty_v(prev));
    };

    mbarrier_wait(bar_q, n & 1);
    if (q0 + consumer * 64 >= seq_q) {
      // Rows past the sequence's end (a ragged last query block): no products, only this consumer's
      // part in the barriers, so that the others get the tensor cores to themselves. A stage is let go
      // after its copies landed, so the arrival counts toward that use of it; the turns are as many as
      // the products would have taken (one per key tile and the last P·V, or one).
      for (int j = 0; j < end; ++j) {
        const int at = first + j, stage = at % kStages;
        mbarrier_wait(full_k(stage), (at / kStages) & 1);
        release(empty_k(stage));
        mbarrier_wait(full_v(stage), (at / kStages) & 1);
        release(empty_v(stage));
        take_turn();
        pass_turn(false);
      }
      take_turn();
      pass_turn(true);
      release(empty_q);
      first += end;
      continue;
    }
    if (end > 0) {
      const int stage = first % kStages;
      mbarrier_wait(full_k(stage), (first / kStages) & 1);
      fence_proxy_async();
      take_turn();
      issue_qk(stage);
      pass_turn(false);
      wgmma_wait<0>();
      fence_registers(s);
      release(empty_k(stage));
      if (end == 1) release(empty_q);
      softmax(q0, 0, rescale);
      drop(0, row_index);
      convert_p(p_even);

      // The last product, O += P(end-1)·V(end-1), with the register set P(end-1) is in.
      auto finish = [&](const Fragments& p_last) {
        const int at = first + end - 1;
        mbarrier_wait(full_v(at % kStages), (at / kStages) & 1);
        fence_proxy_async();
        take_turn();
        rescale_acc(rescale);
        issue_pv(at % kStages, p_last);
        pass_turn(true);
        wgmma_wait<0>();
        fence_registers(acc);
        release(empty_v(at % kStages));
      };
      for (int j = 1;; j += 2) {
        if (j >= end) {
          finish(p_even);
          break;
        }
        step(j, p_even, p_odd);
        if (j + 1 >= end) {
          finish(p_odd);
          break;
        }
        step(j + 1, p_odd, p_even);
      }
    } else {
      release(empty_q);
      if constexpr (kPingPong) {
        take_turn();
        pass_turn(true);
      }
    }
    first += end;

    // O = acc / row sum (0 for a row with every key masked); lse = ln Σ exp(scale · s), -inf there.
    // With kTmaStore, O goes into this consumer's shared tile (once the copy engine has read the
    // last query block's out of it) and the copy engine writes it; rows past seq_q it leaves out.
    // Panel p (64 columns) of this consumer's O tile: 64 rows of 128 bytes, 1024-aligned.
    auto o_panel = [&](int p) -> uint32_t {
      if constexpr (Cfg::kOInQ) return tile_q + p * kBlockM * 128 + consumer * 64 * 128;
      return base + Cfg::kOffsetO + consumer * Cfg::kTileBytesO + p * 64 * 128;
    };
    if constexpr (kTmaStore) {
      if constexpr (Cfg::kOInQ) {
        fence_proxy_async();  // the tensor cores' reads of these Q rows (waited for) before our writes
      } else if (thread == 0) {
        wait_bulk_stores<true>();
      }
      named_barrier_sync(o_tile_barrier(consumer), 128);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float sum = row_sum[h];
      sum += __shfl_xor_sync(0xffffffff, sum, 1);
      sum += __shfl_xor_sync(0xffffffff, sum, 2);
      const float inv = sum == 0.f ? 0.f : (kDropout ? dropout.scale : 1.f) / sum;
      const int row = row_base + h * 8;
      if constexpr (kTmaStore) {
        // Row r of the tile, its 16-byte chunk c of panel p at o_panel(p) + r · 128 + (c ^ r % 8) · 16.
        const int r = warp * 16 + lane / 4 + 8 * h;
#pragma unroll
        for (int c = 0; c < kD / 8; ++c)
          asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(o_panel(c / 8) + r * 128 +
                                                           (((c % 8) ^ (r % 8)) << 4) + (lane % 4) * 4),
                       "r"(E::pack(acc[4 * c + 2 * h] * inv, acc[4 * c + 2 * h + 1] * inv))
                       : "memory");
        if (row < seq_q && lse != nullptr && lane % 4 == 0)
          lse[bh * seq_q + row] = sum == 0.f ? kNegInf : (row_max[h] + __log2f(sum)) * kLn2;
        continue;
      }
      if (row >= seq_q) continue;
      if (lse != nullptr && lane % 4 == 0)
        lse[bh * seq_q + row] = sum == 0.f ? kNegInf : (row_max[h] + __log2f(sum)) * kLn2;
      T* out = o + (bh * seq_q + row) * kD + (lane % 4) * 2;
#pragma unroll
      for (int c = 0; c < kD / 8; ++c)
        *reinterpret_cast<uint32_t*>(out + c * 8) = E::pack(acc[4 * c + 2 * h] * inv, acc[4 * c + 2 * h + 1] * inv);
    }
    if constexpr (kTmaStore) {
      fence_proxy_async();  // the tile's generic stores, read next by the copy engine
      named_barrier_sync(o_tile_barrier(consumer), 128);
      if (thread == 0) {
        const uint8_t* map_o = block_maps + 3 * kTensorMapBytes;
        if (!o_map_acquired) {
          acquire_tensor_map(map_o);
          o_map_acquired = true;
        }
#pragma unroll
        for (int p = 0; p < kD / 64; ++p)
          tma_store_box(map_o, p * 64, q0 + consumer * 64, static_cast<int>(bh), o_panel(p));
        commit_bulk_stores();
      }
    }
  }
  // The copy engine reads a tile until its store is done: the block's shared memory must outlive it.
  if constexpr (kTmaStore) {
    if (thread == 0) wait_bulk_stores<false>();
  }
}

}  // namespace sm90
}  // namespace flashmlir
