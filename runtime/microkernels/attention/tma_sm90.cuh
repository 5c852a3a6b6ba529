// TMA (the copy engine's tensor loads) for sm_90a kernels launched the way IREE launches them.
//
// IREE passes a kernel its buffers as device pointers and its constants as 32-bit words, so a TMA
// tensor map, which holds the tensor's address, cannot come from the host: each block makes its
// own on the device. One warp zeroes 128 bytes of shared memory, lane 0 sets every field with
// `tensormap.replace`, and the warp copies the map to its slot of a global workspace with
// `tensormap.cp_fenceproxy` (the copy and the release fence the tensormap proxy needs); the thread
// that loads through it then acquires it (`fence.proxy.tensormap`). benchmarks/tma_probe.py checks
// such a map against cuTensorMapEncodeTiled's, and a load through it against the layout below.
//
// The maps here are of [planes, rows, kD] 16-bit tensors (planes = batch · heads), boxes of
// 64 columns × kBoxRows rows × 1 plane with the 128-byte swizzle: a box lands as one panel of the
// layout the wgmma operands read (row r at r · 128 bytes, its 16-byte chunk c at chunk c ^ (r % 8)),
// rows past the tensor's end as zeros. The element type is given as f16 for bf16 too: the copy
// engine moves 2-byte elements and converts nothing, and zero fill is the same bits in both.
#pragma once

#include <stdint.h>

namespace flashmlir {
namespace sm90 {

// The rank field's value for a rank-3 map: the rank less one (benchmarks/tma_probe.py: with the
// rank itself the load faults).
#ifndef FLASHMLIR_TMA_RANK_FIELD
#define FLASHMLIR_TMA_RANK_FIELD 2
#endif

constexpr int kTensorMapBytes = 128;

// Field setters on a map in shared memory (`tensormap.replace`). Ordinals, the element type and
// the modes are immediates in PTX, hence the templates; the 32-bit per-dimension fields differ in
// name only.
namespace tma_detail {
#define FLASHMLIR_TMA_DIMENSION_SETTER(function, field)                                              \
  template <int kOrd>                                                                                \
  __device__ __forceinline__ void function(uint32_t map, uint32_t value) {                           \
    asm volatile("tensormap.replace.tile." field ".shared::cta.b1024.b32 [%0], %1, %2;" ::"r"(map), \
                 "n"(kOrd), "r"(value)                                                               \
                 : "memory");                                                                        \
  }
FLASHMLIR_TMA_DIMENSION_SETTER(set_box_dim, "box_dim")
FLASHMLIR_TMA_DIMENSION_SETTER(set_global_dim, "global_dim")
FLASHMLIR_TMA_DIMENSION_SETTER(set_element_stride, "element_stride")
#undef FLASHMLIR_TMA_DIMENSION_SETTER
template <int kOrd>
__device__ __forceinline__ void set_global_stride(uint32_t map, uint64_t bytes) {
  asm volatile("tensormap.replace.tile.global_stride.shared::cta.b1024.b64 [%0], %1, %2;" ::"r"(map), "n"(kOrd),
               "l"(bytes)
               : "memory");
}
__device__ __forceinline__ void set_address(uint32_t map, const void* base) {
  asm volatile("tensormap.replace.tile.global_address.shared::cta.b1024.b64 [%0], %1;" ::"r"(map), "l"(base)
               : "memory");
}
__device__ __forceinline__ void set_rank_field(uint32_t map, uint32_t value) {
  asm volatile("tensormap.replace.tile.rank.shared::cta.b1024.b32 [%0], %1;" ::"r"(map), "r"(value) : "memory");
}
// The modes the kernels use: 16-bit elements (given as f16), no interleave, the 128-byte swizzle,
// zeros past the tensor's end.
__device__ __forceinline__ void set_modes(uint32_t map) {
  asm volatile("tensormap.replace.tile.elemtype.shared::cta.b1024.b32 [%0], 6;" ::"r"(map) : "memory");
  asm volatile("tensormap.replace.tile.interleave_layout.shared::cta.b1024.b32 [%0], 0;" ::"r"(map) : "memory");
  asm volatile("tensormap.replace.tile.swizzle_mode.shared::cta.b1024.b32 [%0], 3;" ::"r"(map) : "memory");
  asm volatile("tensormap.replace.tile.fill_mode.shared::cta.b1024.b32 [%0], 0;" ::"r"(map) : "memory");
}
// The shape of a [planes, rows, cols] 16-bit tensor, densely laid out.
__device__ __forceinline__ void set_shape(uint32_t map, uint32_t cols, uint32_t rows, uint32_t planes) {
  set_global_dim<0>(map, cols);
  set_global_dim<1>(map, rows);
  set_global_dim<2>(map, planes);
  set_global_stride<0>(map, static_cast<uint64_t>(cols) * 2);         // row to row, bytes
  set_global_stride<1>(map, static_cast<uint64_t>(cols) * 2 * rows);  // plane to plane
}
// The box: box_cols × box_rows × 1 elements, every element.
__device__ __forceinline__ void set_box(uint32_t map, uint32_t box_cols, uint32_t box_rows) {
  set_box_dim<0>(map, box_cols);
  set_box_dim<1>(map, box_rows);
  set_box_dim<2>(map, 1);
  set_element_stride<0>(map, 1);
  set_element_stride<1>(map, 1);
  set_element_stride<2>(map, 1);
}
// The warp's copy of the map at `staging` to `global`, with the release fence the tensormap proxy
// needs (every lane).
__device__ __forceinline__ void publish(void* global, uint32_t staging) {
  asm volatile(
      "tensormap.cp_fenceproxy.global.shared::cta.tensormap::generic.release.gpu.sync.aligned [%0], [%1], 128;" ::"l"(
          global),
      "r"(staging)
      : "memory");
}
}  // namespace tma_detail

// Makes the map of a [planes, rows, kD] tensor at `base` in `global` (128 bytes, 128-aligned), using
// `staging` (128 bytes of shared memory, 128-aligned). Every lane of one warp calls it.
template <int kD, int kBoxRows>
__device__ __forceinline__ void make_tensor_map(void* global, uint32_t staging, const void* base, uint32_t planes,
                                                uint32_t rows) {
  using namespace tma_detail;
  const int lane = threadIdx.x % 32;
  asm volatile("st.shared.u32 [%0], 0;" ::"r"(staging + 4 * lane) : "memory");
  __syncwarp();
  if (lane == 0) {
    set_address(staging, base);
    set_rank_field(staging, FLASHMLIR_TMA_RANK_FIELD);
    set_shape(staging, kD, rows, planes);
    set_box(staging, 64, kBoxRows);
    set_modes(staging);
  }
  __syncwarp();
  publish(global, staging);
}

// Block `block`'s `count` maps in a workspace binding: 128-aligned whatever the binding's offset (the
// launch gives the workspace 128 bytes of slack for it; compiler/microkernels.py
// tma_workspace_bytes), then `count` maps a block.
__device__ __forceinline__ uint8_t* block_tensor_maps(uint8_t* workspace, int64_t block, int count) {
  return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(workspace) + 127) & ~uintptr_t{127}) +
         block * count * kTensorMapBytes;
}

// Before the first load through a map this thread (or its warp) made: the acquire half.
__device__ __forceinline__ void acquire_tensor_map(const void* global) {
  asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;" ::"l"(global) : "memory");
}

// One arrival on `bar` that also expects `bytes` more of copies to complete on it.
__device__ __forceinline__ void mbarrier_arrive_expect_bytes(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

// The box at (column, row, plane) through `map` into `tile`, completing `bytes` on `bar`.
__device__ __forceinline__ void tma_load_box(uint32_t tile, const void* map, int column, int row, int plane,
                                             uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];" ::
          "r"(tile),
      "l"(map), "r"(column), "r"(row), "r"(plane), "r"(bar)
      : "memory");
}

// The box at `tile` (shared memory, this layout) to (column, row, plane) through `map`: rows past the
// tensor's end are not written. Joins the calling thread's bulk group (commit_bulk_stores).
__device__ __forceinline__ void tma_store_box(const void* map, int column, int row, int plane, uint32_t tile) {
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%1, %2, %3}], [%4];" ::"l"(map),
               "r"(column), "r"(row), "r"(plane), "r"(tile)
               : "memory");
}
__device__ __forceinline__ void commit_bulk_stores() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// Until the calling thread's committed stores have read their shared memory (kRead), or are done.
template <bool kRead>
__device__ __forceinline__ void wait_bulk_stores() {
  if constexpr (kRead)
    asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
  else
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

// `bytes` (a multiple of 16) from `src` (16-aligned) to `dst` in shared memory, completing on `bar`.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}

// Rows [row, row + kRows) of plane `plane` as the kD / 64 panels of a tile at `tile`, on `bar`.
template <int kRows, int kD>
__device__ __forceinline__ void tma_load_tile(uint32_t tile, const void* map, int row, int plane, uint32_t bar) {
#pragma unroll
  for (int panel = 0; panel < kD / 64; ++panel) tma_load_box(tile + panel * kRows * 128, map, panel * 64, row, plane, bar);
}

}  // namespace sm90
}  // namespace flashmlir
