// Flash-attention forward for Volta (sm_70) on its tensor cores, through WMMA 16x16x16 (fp16 in,
// fp32 accumulate), in IREE's CUDA ABI like the sm_80 kernel:
//
//   NVRTC (CUDA 12) --gpu-architecture=compute_70 -DFLASHMLIR_HEAD_DIM=128 ...   (tools/nvrtc_ptx.py)
//
// exports  flashmlir_attention_fwd_sm70_f16_d<D>      (q, k, v, o, constants)
//          flashmlir_attention_fwd_sm70_f16_d<D>_lse  (q, k, v, o, lse, constants)
// constants group (Hq / Hkv), seq_q, seq_k, scale (f32 bits), causal (0 or 1), batch_heads
//           (B·Hq: every CUDA kernel takes it; the persistent sm_90 one reads it, its grid has no heads)
//
//   grid  (ceil(Sq / kBlockM), B * Hq); block kWarps warps, each owning 16 query rows
//   loop  over kBlockN-key tiles of K and V in shared memory; causal tiles right of the diagonal
//         are skipped (top-left causal: row i sees keys 0..i)
//
// Volta's layout problem (what FastAttention redesigns): its HMMA fragments are not the m16n8k16
// ones FlashAttention-2 converts in registers, and WMMA leaves the accumulator's element → (row,
// column) map unspecified, so P cannot go from S's accumulator to the next product's A operand in
// registers. Here each warp spills S to its own fp32 tile in shared memory, computes the online
// softmax there row by row (two lanes per row, one shuffle per reduction) and writes P as fp16
// for the PV product's A operand. O stays in accumulator fragments across the loop: the warp
// learns the accumulator's row map once (by loading a tile whose every element is its row index)
// and rescales O in registers with it. Everything fits Volta's 96 KB of shared memory.
#include <cuda_fp16.h>
#include <mma.h>
#ifdef __CUDACC_RTC__  // NVRTC has no C library headers
typedef unsigned int uint32_t;
typedef long long int64_t;
#else
#include <stdint.h>
#endif

#ifndef FLASHMLIR_HEAD_DIM
#define FLASHMLIR_HEAD_DIM 128
#endif
#ifndef FLASHMLIR_BLOCK_M
#define FLASHMLIR_BLOCK_M 64
#endif
#ifndef FLASHMLIR_BLOCK_N
#define FLASHMLIR_BLOCK_N 64
#endif
#ifndef FLASHMLIR_WARPS
#define FLASHMLIR_WARPS 4
#endif

#define FLASHMLIR_CAT_(a, b) a##b
#define FLASHMLIR_CAT(a, b) FLASHMLIR_CAT_(a, b)
#define FLASHMLIR_KERNEL FLASHMLIR_CAT(flashmlir_attention_fwd_sm70_f16_d, FLASHMLIR_HEAD_DIM)
#define FLASHMLIR_KERNEL_LSE FLASHMLIR_CAT(FLASHMLIR_KERNEL, _lse)

namespace {
namespace wmma = nvcuda::wmma;

constexpr int kHeadDim = FLASHMLIR_HEAD_DIM;
constexpr int kBlockM = FLASHMLIR_BLOCK_M;
constexpr int kBlockN = FLASHMLIR_BLOCK_N;
constexpr int kWarps = FLASHMLIR_WARPS;
constexpr int kThreads = 32 * kWarps;
static_assert(kBlockM == 16 * kWarps, "each warp owns 16 query rows");
static_assert(kHeadDim % 16 == 0 && kBlockN % 32 == 0, "WMMA tiles are 16 wide; two lanes split a row of S");

// Leading dimensions, padded so that consecutive rows start in different banks (and stay
// multiples of 16 bytes, as WMMA's loads require).
constexpr int kLdQkv = kHeadDim + 8;  // halves
constexpr int kLdS = kBlockN + 4;     // floats
constexpr int kLdP = kBlockN + 8;     // halves
constexpr int kDimTiles = kHeadDim / 16;
constexpr int kKeyTiles = kBlockN / 16;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -1.f / 0.f;  // -inf (NVRTC has no __builtin_huge_valf)

using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major>;
using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major>;
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::row_major>;
using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

struct Shared {
  half q[kBlockM * kLdQkv];
  half k[kBlockN * kLdQkv];
  half v[kBlockN * kLdQkv];
  float s[kWarps][16 * kLdS];  // a warp's S tile; also its staging tile for the row map and O
  half p[kWarps][16 * kLdP];
  float alpha[kWarps][16];     // per-row rescale of this tile, then 1 / row sum at the end
};

// rows × kHeadDim halves from global (row stride kHeadDim) into shared (row stride kLdQkv), 16
// bytes per thread and step; rows at or past `valid` are zero.
__device__ __forceinline__ void load_tile(half* dst, const half* __restrict__ src, int rows, int valid) {
  constexpr int kChunks = kHeadDim / 8;
  for (int i = threadIdx.x; i < rows * kChunks; i += kThreads) {
    const int r = i / kChunks, c = (i % kChunks) * 8;
    uint4 value = make_uint4(0, 0, 0, 0);
    if (r < valid) value = *reinterpret_cast<const uint4*>(src + static_cast<int64_t>(r) * kHeadDim + c);
    *reinterpret_cast<uint4*>(dst + r * kLdQkv + c) = value;
  }
}

__device__ __forceinline__ void attention_fwd_sm70(const half* __restrict__ q, const half* __restrict__ k,
                                                   const half* __restrict__ v, half* __restrict__ o,
                                                   float* __restrict__ lse, int group, int seq_q, int seq_k,
                                                   float scale, bool causal) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  Shared& sh = *reinterpret_cast<Shared*>(shared_bytes);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int q_block = causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;  // longest first
  const int q0 = q_block * kBlockM;
  const int64_t bh = blockIdx.y, bh_kv = bh / group;
  const half* kb = k + bh_kv * seq_k * kHeadDim;
  const half* vb = v + bh_kv * seq_k * kHeadDim;

  load_tile(sh.q, q + (bh * seq_q + q0) * kHeadDim, kBlockM, seq_q - q0);

  // The accumulator's row map: load a tile whose elements are their row indices.
  float* s = sh.s[warp];
  for (int i = lane; i < 16 * 16; i += 32) s[(i / 16) * kLdS + i % 16] = static_cast<float>(i / 16);
  __syncwarp();
  FragAcc row_of;
  wmma::load_matrix_sync(row_of, s, kLdS, wmma::mem_row_major);

  FragAcc acc_o[kDimTiles];
  for (int t = 0; t < kDimTiles; ++t) wmma::fill_fragment(acc_o[t], 0.f);

  // Lanes 2r and 2r+1 own row r of this warp's 16: columns [half · kBlockN/2, (half+1) · kBlockN/2).
  const int row = lane / 2, part = lane % 2;
  const int q_row = q0 + warp * 16 + row;
  float row_max = kNegInf, row_sum = 0.f;  // exp2 domain: scores are scaled by scale · log2 e
  const float scale_log2 = scale * kLog2e;
  const int key_end = causal ? min(seq_k, q0 + kBlockM) : seq_k;

  const half* q_warp = sh.q + warp * 16 * kLdQkv;
  half* p = sh.p[warp];
  for (int k0 = 0; k0 < key_end; k0 += kBlockN) {
    __syncthreads();  // every warp is done with the previous K and V tiles
    load_tile(sh.k, kb + static_cast<int64_t>(k0) * kHeadDim, kBlockN, seq_k - k0);
    load_tile(sh.v, vb + static_cast<int64_t>(k0) * kHeadDim, kBlockN, seq_k - k0);
    __syncthreads();

    // S = Q_warp · Kᵀ (16 × kBlockN), to this warp's tile.
    for (int n = 0; n < kKeyTiles; ++n) {
      FragAcc acc_s;
      wmma::fill_fragment(acc_s, 0.f);
      for (int d = 0; d < kDimTiles; ++d) {
        FragA a;
        FragBCol b;
        wmma::load_matrix_sync(a, q_warp + d * 16, kLdQkv);
        wmma::load_matrix_sync(b, sh.k + n * 16 * kLdQkv + d * 16, kLdQkv);
        wmma::mma_sync(acc_s, a, b, acc_s);
      }
      wmma::store_matrix_sync(s + n * 16, acc_s, kLdS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax of this lane's half row; keys past seq_k, and causal keys after the row, are -inf.
    constexpr int kCols = kBlockN / 2;
    const int c0 = part * kCols;
    float x[kCols];
    float tile_max = kNegInf;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int key = k0 + c0 + c;
      const bool masked = key >= seq_k || (causal && key > q_row);
      x[c] = masked ? kNegInf : s[row * kLdS + c0 + c] * scale_log2;
      tile_max = fmaxf(tile_max, x[c]);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float new_max = fmaxf(row_max, tile_max);
    const float base = new_max == kNegInf ? 0.f : new_max;  // a row with nothing seen yet stays at 0
    const float alpha = exp2f(row_max - base);
    float tile_sum = 0.f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const float e = exp2f(x[c] - base);
      tile_sum += e;
      p[row * kLdP + c0 + c] = __float2half(e);
    }
    tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, 1);
    row_sum = row_sum * alpha + tile_sum;
    row_max = new_max;
    if (part == 0) sh.alpha[warp][row] = alpha;
    __syncwarp();

    // O = α · O + P · V.
    for (int t = 0; t < kDimTiles; ++t) {
      for (int i = 0; i < acc_o[t].num_elements; ++i)
        acc_o[t].x[i] *= sh.alpha[warp][static_cast<int>(row_of.x[i])];
      for (int n = 0; n < kKeyTiles; ++n) {
        FragA a;
        FragBRow b;
        wmma::load_matrix_sync(a, p + n * 16, kLdP);
        wmma::load_matrix_sync(b, sh.v + n * 16 * kLdQkv + t * 16, kLdQkv);
        wmma::mma_sync(acc_o[t], a, b, acc_o[t]);
      }
    }
    __syncwarp();
  }

  // O / l (0 for a row that saw no key), through the warp's staging tile to global memory as fp16.
  if (part == 0) sh.alpha[warp][row] = row_sum == 0.f ? 0.f : 1.f / row_sum;
  if (lse != nullptr && part == 0 && q_row < seq_q)
    lse[bh * seq_q + q_row] = row_sum == 0.f ? kNegInf : (row_max + __log2f(row_sum)) * kLn2;
  __syncwarp();
  for (int t = 0; t < kDimTiles; ++t) {
    for (int i = 0; i < acc_o[t].num_elements; ++i)
      acc_o[t].x[i] *= sh.alpha[warp][static_cast<int>(row_of.x[i])];
    wmma::store_matrix_sync(s, acc_o[t], kLdS, wmma::mem_row_major);
    __syncwarp();
    if (q_row < seq_q) {
      half* dst = o + (bh * seq_q + q_row) * kHeadDim + t * 16 + part * 8;
#pragma unroll
      for (int c = 0; c < 8; c += 2)
        *reinterpret_cast<__half2*>(dst + c) =
            __floats2half2_rn(s[row * kLdS + part * 8 + c], s[row * kLdS + part * 8 + c + 1]);
    }
    __syncwarp();
  }
}
}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads)
    FLASHMLIR_KERNEL(const half* __restrict__ q, const half* __restrict__ k, const half* __restrict__ v,
                     half* __restrict__ o, uint32_t group, uint32_t seq_q, uint32_t seq_k, uint32_t scale_bits,
                     uint32_t causal, uint32_t batch_heads) {
  attention_fwd_sm70(q, k, v, o, nullptr, group, seq_q, seq_k, __uint_as_float(scale_bits), causal != 0);
}

extern "C" __global__ void __launch_bounds__(kThreads)
    FLASHMLIR_KERNEL_LSE(const half* __restrict__ q, const half* __restrict__ k, const half* __restrict__ v,
                         half* __restrict__ o, float* __restrict__ lse, uint32_t group, uint32_t seq_q,
                         uint32_t seq_k, uint32_t scale_bits, uint32_t causal, uint32_t batch_heads) {
  attention_fwd_sm70(q, k, v, o, lse, group, seq_q, seq_k, __uint_as_float(scale_bits), causal != 0);
}
