// mma.sync-era building blocks the CUDA attention kernels share (sm_80 and newer): shared-memory
// addresses, cp.async copies into XOR-swizzled row-major tiles, ldmatrix, the m16n8k16 MMA per
// element type, and exp2 on the SFU.
//
// Shared-memory tiles are row-major with 16-byte chunks XOR-swizzled by (row % 8), so the eight
// rows an ldmatrix reads hit eight different bank groups.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace flashmlir {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; `bytes` 0 zero-fills (rows past the end of a sequence).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// 2^x on the SFU, flushing denormal results to 0 (they are below fp16/bf16 precision of P anyway).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T>
struct Element;

template <>
struct Element<half> {
  __device__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  // c += a · b over m16n8k16, fp16 operands, fp32 accumulators.
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Element<__nv_bfloat16> {
  __device__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// Byte offset of (row, 16-byte chunk) in a swizzled row-major tile with kChunks chunks per row.
template <int kChunks>
__device__ __forceinline__ uint32_t tile_offset(int row, int chunk) {
  return static_cast<uint32_t>(row * kChunks * 16 + ((chunk ^ (row & 7)) * 16));
}

// Copy rows [row0, row0 + kRows) of a [rows, D] matrix into a swizzled tile (zero past `rows`),
// by all kThreads threads. Each thread owns one 16-byte column chunk and rows kRowStep apart, so a
// whole tile is one copy per chunk at constant offsets from two per-thread addresses (the generic
// index loop cost ~20 integer instructions per copy, a quarter of the main loop's instructions at
// head dim 128); only a sequence's ragged last tile checks rows.
template <typename T, int kRows, int kD, int kThreads>
__device__ __forceinline__ void load_tile(uint32_t tile, const T* base, int row0, int rows) {
  constexpr int kChunks = kD / 8, kRowStep = kThreads / kChunks;
  static_assert(kThreads % kChunks == 0 && kRows % kRowStep == 0, "tile rows must be a multiple of the row step");
  const int chunk = threadIdx.x % kChunks, first = threadIdx.x / kChunks;
  const T* src = base + static_cast<int64_t>(row0 + first) * kD + chunk * 8;
  if (row0 + kRows <= rows) {
    if constexpr (kRowStep % 8 == 0) {  // the swizzle phase of this thread's rows never changes
      const uint32_t dst = tile + tile_offset<kChunks>(first, chunk);
#pragma unroll
      for (int it = 0; it < kRows / kRowStep; ++it)
        cp_async_16(dst + it * kRowStep * kChunks * 16, src + it * kRowStep * kD, 16);
    } else {
#pragma unroll
      for (int it = 0; it < kRows / kRowStep; ++it)
        cp_async_16(tile + tile_offset<kChunks>(first + it * kRowStep, chunk), src + it * kRowStep * kD, 16);
    }
    return;
  }
#pragma unroll
  for (int it = 0; it < kRows / kRowStep; ++it) {
    const int r = first + it * kRowStep;
    const bool valid = row0 + r < rows;
    cp_async_16(tile + tile_offset<kChunks>(r, chunk), valid ? src + it * kRowStep * kD : base, valid ? 16 : 0);
  }
}

}  // namespace flashmlir
