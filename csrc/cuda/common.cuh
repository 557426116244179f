// Device-side building blocks shared by the .cu files: element conversions, tile shapes,
// global -> register -> shared-memory tile staging, warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "epilogue.h"
#include "index.h"
#include "kernels.h"
#include "stages.h"

namespace silent_kernels {
namespace cuda {

// ----------------------------------------------------------------------- conversions
template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <>
struct Cvt<double> {
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double v) { return v; }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
__device__ __forceinline__ acc_t<T> load_acc(const T* p, int64_t off) {
  return Cvt<T>::load(p[off]);
}
// Optional input: zero when absent.
template <typename T>
__device__ __forceinline__ acc_t<T> ld_or0(const T* p, int64_t off) {
  return p != nullptr ? Cvt<T>::load(p[off]) : acc_t<T>(0);
}

// ----------------------------------------------------------------------- tile shapes
// A block of WARPS warps computes a BM x BN output tile; warp w owns rows
// [w*TM, (w+1)*TM) (warp-uniform, so their shared-memory reads are broadcasts) and lane l
// owns columns l, l+32, ..., l+32*(TN-1) (consecutive lanes, conflict-free reads).
// BK is the depth of one step of the reduction loop; MINB the blocks per multiprocessor
// asked of ptxas (__launch_bounds__): without it ptxas caps the small 128-thread tiles at
// 64 registers and spills.
template <int WARPS_, int TM_, int TN_, int BK_, int MINB_ = 1>
struct Tile {
  static constexpr int WARPS = WARPS_, TM = TM_, TN = TN_, BK = BK_, MINB = MINB_;
  static constexpr int THREADS = 32 * WARPS;
  static constexpr int BM = WARPS * TM;
  static constexpr int BN = 32 * TN;
};

// Tile configurations per accumulation type (they bound shared memory to < 48 KiB static
// and registers to what ptxas fits without spills; see tests/test_cuda_compile.py).
template <typename Acc>
struct Tiles;
template <>
struct Tiles<float> {
  using FixedLarge = Tile<8, 4, 4, 16>;  // 32 samples x 128 pixels
  using FixedSmall = Tile<4, 2, 1, 16, 4>;  //  8 samples x  32 pixels
  using PrecLarge = Tile<8, 4, 2, 16>;   // 32 samples x  64 pixels
  using PrecSmall = Tile<4, 2, 1, 16, 4>;   //  8 samples x  32 pixels
  using MomentGrad = Tile<8, 4, 2, 16, 2>; // 32 samples x  64 latents, 16 pixels a step
  using WeightGrad = Tile<8, 4, 2, 8>;   // 32 pixels  x  64 latents,  8 samples a step
};
template <>
struct Tiles<double> {
  using FixedLarge = Tile<8, 4, 2, 8>;
  using FixedSmall = Tile<4, 2, 1, 8, 4>;
  using PrecLarge = Tile<8, 2, 2, 8>;
  using PrecSmall = Tile<4, 2, 1, 8, 4>;
  using MomentGrad = Tile<8, 2, 2, 8, 2>;
  using WeightGrad = Tile<8, 2, 1, 8>;
};

// ----------------------------------------------------------------------- shared memory
// Reads N consecutive accumulators from shared memory as 16/8-byte vectors where the
// layout guarantees alignment (rows padded to 16 bytes, N * sizeof(Acc) a power of two).
template <typename Acc, int N>
__device__ __forceinline__ void lds_vec(const Acc* p, Acc (&out)[N]) {
  constexpr int BYTES = N * static_cast<int>(sizeof(Acc));
  if constexpr (BYTES == 16 && sizeof(Acc) == 4) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
  } else if constexpr (BYTES == 16 && sizeof(Acc) == 8) {
    const double2 v = *reinterpret_cast<const double2*>(p);
    out[0] = v.x; out[1] = v.y;
  } else if constexpr (BYTES == 8 && sizeof(Acc) == 4) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    out[0] = v.x; out[1] = v.y;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = p[i];
  }
}

// Padding (in elements) that keeps rows 16-byte aligned and spreads transposed stores.
template <typename Acc>
constexpr int pad16() { return 16 / static_cast<int>(sizeof(Acc)); }

// Stages an (M x BK) tile of a row-major matrix in registers, then in shared memory as
// dst[kk][m] (kk: index along the reduction, m: index along the output dimension).
//   RED_CONTIG: element (m, kk) is src[(m0 + m) * ld + kk0 + kk] (reduction dim contiguous)
//   otherwise : element (m, kk) is src[(kk0 + kk) * ld + m0 + m]
// Consecutive threads read consecutive addresses. Elements outside [0, m_lim) x [0, kk_lim),
// and every element of a null src, read as zero (ragged edges, absent cumulants).
template <typename Src, typename Acc, int M, int BK, int THREADS, bool RED_CONTIG>
struct TileLoader {
  static constexpr int N = M * BK;
  static constexpr int PER = (N + THREADS - 1) / THREADS;
  Acc reg[PER];

  __device__ __forceinline__ void load(const Src* __restrict__ src, int64_t ld, int64_t m0,
                                       int64_t m_lim, int64_t kk0, int64_t kk_lim) {
#pragma unroll
    for (int t = 0; t < PER; ++t) {
      const int e = static_cast<int>(threadIdx.x) + t * THREADS;
      const int m = RED_CONTIG ? e / BK : e % M;
      const int kk = RED_CONTIG ? e % BK : e / M;
      const int64_t gm = m0 + m, gk = kk0 + kk;
      Acc v = Acc(0);
      if ((N % THREADS == 0 || e < N) && src != nullptr && gm < m_lim && gk < kk_lim)
        v = Cvt<Src>::load(src[RED_CONTIG ? offset2d(gm, gk, ld) : offset2d(gk, gm, ld)]);
      reg[t] = v;
    }
  }

  template <int LDM>
  __device__ __forceinline__ void store(Acc (*dst)[LDM]) const {
#pragma unroll
    for (int t = 0; t < PER; ++t) {
      const int e = static_cast<int>(threadIdx.x) + t * THREADS;
      if (N % THREADS == 0 || e < N) {
        const int m = RED_CONTIG ? e / BK : e % M;
        const int kk = RED_CONTIG ? e % BK : e / M;
        dst[kk][m] = reg[t];
      }
    }
  }
};

// ----------------------------------------------------------------------- reductions
template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sums cs (each thread: its TM samples of its TN pixels) over the block's samples and writes
// one row (this sample tile) of each requested column sum. Block-uniform call.
template <class Tl, typename Acc>
__device__ __forceinline__ void write_colsums(const Acc (&cs)[kNumColSums][Tl::TN],
                                              const ColSumSlots& colsums, int64_t row_tile,
                                              int64_t row_tiles, int64_t p0, int64_t k,
                                              Acc* __restrict__ colpart) {
  __shared__ Acc red[kNumColSums][Tl::WARPS][Tl::BN];
  const int lane = threadIdx.x & 31, wy = threadIdx.x >> 5;
#pragma unroll
  for (int q = 0; q < kNumColSums; ++q)
#pragma unroll
    for (int j = 0; j < Tl::TN; ++j) red[q][wy][lane + 32 * j] = cs[q][j];
  __syncthreads();
  for (int t = threadIdx.x; t < kNumColSums * Tl::BN; t += Tl::THREADS) {
    const int q = t / Tl::BN, col = t % Tl::BN;
    const int s = q == 0 ? colsums.slot[0] : colsums.slot[1];  // no dynamic param indexing
    const int64_t p = p0 + col;
    if (s < 0 || p >= k) continue;
    Acc v = Acc(0);
#pragma unroll
    for (int w = 0; w < Tl::WARPS; ++w) v += red[q][w][col];  // fixed order
    colpart[offset3d(s, row_tile, p, row_tiles, k)] = v;
  }
}

// ----------------------------------------------------------------------- launch helpers
// Host side: the latent configuration a precision call runs with. k3 without k4 runs the
// (k3, k4) kernels with k4 read as zero, which keeps the number of instantiations down.
enum LatentCfg : int { kGaussian = 0, kK4Only = 1, kK3K4 = 2 };
inline LatentCfg latent_cfg(bool has_k3, bool has_k4) {
  return has_k3 ? kK3K4 : (has_k4 ? kK4Only : kGaussian);
}

// Blocks of a 1-D grid (flattened tiles): must fit gridDim.x.
inline bool grid_fits(int64_t blocks) { return blocks > 0 && blocks <= static_cast<int64_t>(INT_MAX); }

inline cudaError_t last_error() { return cudaGetLastError(); }

#define SK_CUDA_TRY(expr)                  \
  do {                                     \
    const cudaError_t sk_err_ = (expr);    \
    if (sk_err_ != cudaSuccess) return sk_err_; \
  } while (0)

}  // namespace cuda
}  // namespace silent_kernels
