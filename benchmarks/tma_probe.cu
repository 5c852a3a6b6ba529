// Can a TMA tensor map be made on the device, and does a TMA load then land a tile in the layout the
// sm_90 kernels read (128-byte swizzle)? benchmarks/tma_probe.py builds this for sm_90a and drives it.
//
// IREE launches our kernels with buffer pointers and 32-bit constants, so a tensor map holding the
// operands' addresses cannot come from the host (issue 8's hazard). Two ways to make one on the device:
//   from scratch: every field of a zeroed 128-byte map set with tensormap.replace;
//   from a template: a map the host encoded once (cuTensorMapEncodeTiled, any address and lengths),
//     with only the address and the lengths replaced.
// make_map writes either to global memory (tensormap.cp_fenceproxy: the copy and the release fence the
// tensormap proxy needs); tma_load uses a map from global memory (acquire fence first), loads one box
// into shared memory and copies the bytes out as they landed. Nothing waits forever: a load whose
// mbarrier does not complete within a bound reports it instead of hanging the GPU.
#include <stdint.h>

// The library's field setters (tensormap.replace) and its publishing copy; the probe sets the rank
// field to a value of its own to find PTX's encoding of it.
#include "../runtime/microkernels/attention/tma_sm90.cuh"

using namespace flashmlir::sm90::tma_detail;

namespace {

__device__ __forceinline__ uint32_t smem(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Waits for phase 0 of the mbarrier at `bar`, at most ~4 M tries: 1 when it completed, 0 when not
// (a load that never lands reports instead of hanging the GPU).
__device__ __forceinline__ uint32_t wait_bounded(uint32_t bar) {
  uint32_t done = 0;
  for (int spin = 0; spin < (1 << 22) && !done; ++spin)
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0;\nselp.u32 %0, 1, 0, p;\n}"
                 : "=r"(done)
                 : "r"(bar)
                 : "memory");
  return done;
}
// The cluster's shape as block `blockIdx.x` sees it: its rank at ranks[2b], the cluster's size at
// ranks[2b + 1]; returns the rank.
__device__ __forceinline__ uint32_t record_cluster_shape(uint32_t* ranks) {
  uint32_t rank, size;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(size));
  if (threadIdx.x == 0) {
    ranks[2 * blockIdx.x] = rank;
    ranks[2 * blockIdx.x + 1] = size;
  }
  return rank;
}

}  // namespace

// A rank-3 map of a [planes, rows, cols] fp16 tensor (planes = B·H, rows = S, cols = D), boxes of
// box_cols × box_rows × 1 with the 128-byte swizzle; into out (128 bytes, 128-aligned). template_map
// null: from scratch, with `rank_value` as the rank field (the probe tries rank and rank - 1, PTX's
// encoding of it being what this finds out); else from that template, replacing the address and
// lengths only. One warp.
extern "C" __global__ void probe_make_map(uint8_t* out, const uint8_t* template_map, const void* base, uint32_t cols,
                                          uint32_t rows, uint32_t planes, uint32_t box_cols, uint32_t box_rows,
                                          uint32_t rank_value) {
  __shared__ __align__(128) uint8_t map[128];
  const int lane = threadIdx.x;
  for (int i = lane; i < 128; i += 32) map[i] = template_map != nullptr ? template_map[i] : 0;
  __syncwarp();
  if (lane == 0) {
    const uint32_t m = smem(map);
    set_address(m, base);
    set_shape(m, cols, rows, planes);
    if (template_map == nullptr) {
      set_rank_field(m, rank_value);
      set_box(m, box_cols, box_rows);
      set_modes(m);  // f16 (CU_TENSOR_MAP_DATA_TYPE_FLOAT16), the 128-byte swizzle, zero fill
    }
  }
  __syncwarp();
  publish(out, smem(map));
}

// One box at (col0, row0, plane0) through `map` (global memory) into shared memory; its bytes as they
// landed go to out (box_bytes of them), and status[0] = 1 when the load completed (0: it did not
// within the bound). One block of 128 threads; box_bytes ≤ 32 KB.
extern "C" __global__ void probe_tma_load(const uint8_t* map, uint8_t* out, uint32_t* status, uint32_t col0,
                                          uint32_t row0, uint32_t plane0, uint32_t box_bytes) {
  extern __shared__ __align__(1024) uint8_t tile[];
  __shared__ __align__(8) uint64_t bar;
  __shared__ uint32_t landed;
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem(&bar)) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;" ::"l"(map) : "memory");
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem(&bar)), "r"(box_bytes)
                 : "memory");
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];" ::
            "r"(smem(tile)),
        "l"(map), "r"(col0), "r"(row0), "r"(plane0), "r"(smem(&bar))
        : "memory");
    const uint32_t done = wait_bounded(smem(&bar));
    landed = done;
    status[0] = done;
  }
  __syncthreads();
  if (!landed) return;
  for (uint32_t i = threadIdx.x; i < box_bytes; i += blockDim.x) out[i] = tile[i];
}

// Only the cluster's shape as the blocks see it (no cluster barrier, no load): whether a plain
// cuLaunchKernel of a kernel with compiled-in cluster dims makes clusters at all. ranks as below.
extern "C" __global__ void __cluster_dims__(2, 1, 1) probe_cluster_ranks(uint32_t* ranks) {
  record_cluster_shape(ranks);
}

// The same box multicast to both blocks of a two-block cluster (cluster dims compiled in, so that a
// plain cuLaunchKernel, IREE's launch, makes clusters): block rank 0 issues one load that lands in
// both blocks' shared memory and completes on each block's own mbarrier. Block b writes its rank and
// the cluster's size to ranks[2b], ranks[2b + 1], status[b] = 1 when its copy landed, and its bytes
// to out + b·box_bytes. Grid (2), 128 threads; shares the tensor map with probe_tma_load.
extern "C" __global__ void __cluster_dims__(2, 1, 1)
    probe_tma_multicast(const uint8_t* map, uint8_t* out, uint32_t* status, uint32_t* ranks, uint32_t col0,
                        uint32_t row0, uint32_t plane0, uint32_t box_bytes) {
  extern __shared__ __align__(1024) uint8_t tile[];
  __shared__ __align__(8) uint64_t bar;
  __shared__ uint32_t landed;
  const uint32_t rank = record_cluster_shape(ranks);
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem(&bar)) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  // Both blocks' barriers exist before either load can complete on them.
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem(&bar)), "r"(box_bytes)
                 : "memory");
    if (rank == 0) {
      asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;" ::"l"(map) : "memory");
      const uint16_t both = 0b11;
      asm volatile(
          "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
          " [%0], [%1, {%2, %3, %4}], [%5], %6;" ::"r"(smem(tile)),
          "l"(map), "r"(col0), "r"(row0), "r"(plane0), "r"(smem(&bar)), "h"(both)
          : "memory");
    }
    const uint32_t done = wait_bounded(smem(&bar));
    landed = done;
    status[blockIdx.x] = done;
  }
  __syncthreads();
  if (landed)
    for (uint32_t i = threadIdx.x; i < box_bytes; i += blockDim.x) out[blockIdx.x * box_bytes + i] = tile[i];
  // Neither block leaves while the other's copy may still be on its way.
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
