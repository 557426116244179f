// Device-side building blocks shared by the .cu files: element conversions, tile shapes,
// global -> register -> shared-memory tile staging, warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <type_traits>

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

// ----------------------------------------------------------------------- block positions
// This block's output tile of a (row tiles x col tiles) grid of Tl tiles, blockIdx.x flat with
// col tiles fastest: the tile indices and its first row and column.
struct BlockTile {
  int64_t row_tile, col_tile, row0, col0;
};
template <class Tl>
__device__ __forceinline__ BlockTile block_tile(int64_t col_tiles) {
  const TileCoord tc = tile_coord(blockIdx.x, col_tiles);
  return BlockTile{tc.row_tile, tc.col_tile, tc.row_tile * Tl::BM, tc.col_tile * Tl::BN};
}

// This block's chunk (blockIdx.z) of a reduction over [0, total) split into chunks of `chunk`.
struct ChunkRange {
  int64_t split, begin, end;
  // Reduction steps of bk over the chunk.
  __device__ __forceinline__ int64_t steps(int bk) const {
    return end > begin ? ceil_div(end - begin, bk) : 0;
  }
};
__device__ __forceinline__ ChunkRange chunk_range(int64_t chunk, int64_t total) {
  const int64_t split = blockIdx.z;
  const int64_t begin = split * chunk;
  return ChunkRange{split, begin, begin + chunk < total ? begin + chunk : total};
}

// fn(i, j, row, col) for each of the thread's TM x TN register outputs of the block tile bt:
// rows row0 + wy * TM + i, columns col0 + lane + 32 * j (the caller checks the bounds).
template <class Tl, class Fn>
__device__ __forceinline__ void for_each_register(const BlockTile& bt, Fn&& fn) {
  const int lane = threadIdx.x & 31, wy = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < Tl::TM; ++i)
#pragma unroll
    for (int j = 0; j < Tl::TN; ++j) fn(i, j, bt.row0 + wy * Tl::TM + i, bt.col0 + lane + 32 * j);
}

template <typename Acc, int N>
__device__ __forceinline__ void zero_fill(Acc (&v)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = Acc(0);
}
template <typename Acc, int M, int N>
__device__ __forceinline__ void zero_fill(Acc (&v)[M][N]) {
#pragma unroll
  for (int i = 0; i < M; ++i) zero_fill(v[i]);
}
template <typename Acc, int L, int M, int N>
__device__ __forceinline__ void zero_fill(Acc (&v)[L][M][N]) {
#pragma unroll
  for (int i = 0; i < L; ++i) zero_fill(v[i]);
}

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
  using Source = Src;
  using Value = Acc;
  static constexpr int DEPTH = BK;
  static constexpr int N = M * BK;
  static constexpr int PER = (N + THREADS - 1) / THREADS;
  Acc reg[PER];

  // Element t of this thread: flat index e, its m (output dimension) and kk (reduction) indices.
  static __device__ __forceinline__ int element(int t) {
    return static_cast<int>(threadIdx.x) + t * THREADS;
  }
  static __device__ __forceinline__ bool in_tile(int e) { return N % THREADS == 0 || e < N; }
  static __device__ __forceinline__ int m_of(int e) { return RED_CONTIG ? e / BK : e % M; }
  static __device__ __forceinline__ int kk_of(int e) { return RED_CONTIG ? e % BK : e / M; }

  __device__ __forceinline__ void load(const Src* __restrict__ src, int64_t ld, int64_t m0,
                                       int64_t m_lim, int64_t kk0, int64_t kk_lim) {
#pragma unroll
    for (int t = 0; t < PER; ++t) {
      const int e = element(t);
      const int64_t gm = m0 + m_of(e), gk = kk0 + kk_of(e);
      Acc v = Acc(0);
      if (in_tile(e) && src != nullptr && gm < m_lim && gk < kk_lim)
        v = Cvt<Src>::load(src[RED_CONTIG ? offset2d(gm, gk, ld) : offset2d(gk, gm, ld)]);
      reg[t] = v;
    }
  }

  // fn(m, kk, v) for each element this thread holds (the elements store() writes to dst[kk][m]).
  template <class Fn>
  __device__ __forceinline__ void for_each(Fn&& fn) const {
#pragma unroll
    for (int t = 0; t < PER; ++t) {
      const int e = element(t);
      if (in_tile(e)) fn(m_of(e), kk_of(e), reg[t]);
    }
  }

  template <int LDM>
  __device__ __forceinline__ void store(Acc (*dst)[LDM]) const {
    for_each([&](int m, int kk, Acc v) { dst[kk][m] = v; });
  }
};

// N tiles of one shape from N sources (a null source reads as zeros), loaded and stored together:
// tile q to dst[q].
template <class Loader, int N>
struct TileGroup {
  Loader tile[N];

  __device__ __forceinline__ void load(const typename Loader::Source* const (&src)[N], int64_t ld,
                                       int64_t m0, int64_t m_lim, int64_t kk0, int64_t kk_lim) {
#pragma unroll
    for (int q = 0; q < N; ++q) tile[q].load(src[q], ld, m0, m_lim, kk0, kk_lim);
  }

  template <int LDM>
  __device__ __forceinline__ void store(typename Loader::Value (*dst)[Loader::DEPTH][LDM]) const {
#pragma unroll
    for (int q = 0; q < N; ++q) tile[q].store(dst[q]);
  }
};

// Runs `steps` reduction steps of BK starting at `begin` with the shared-memory tiles double
// buffered: load(c0) brings step c0's tiles into registers, store(buf) writes them to buffer
// buf, compute(buf) does one step's arithmetic. The next step's loads are in flight during the
// current step's arithmetic; one barrier a step.
template <int BK, class Load, class Store, class Compute>
__device__ __forceinline__ void double_buffered_steps(int64_t begin, int64_t steps, Load&& load,
                                                      Store&& store, Compute&& compute) {
  if (steps > 0) {
    load(begin);
    store(0);
  }
  __syncthreads();
  for (int64_t s = 0; s < steps; ++s) {
    const int buf = static_cast<int>(s & 1);
    const bool more = s + 1 < steps;
    if (more) load(begin + (s + 1) * BK);
    compute(buf);
    if (more) store(buf ^ 1);
    __syncthreads();
  }
}

// The same with one buffer: stage(c0) writes the tiles of the step starting at c0 (loaded by
// load(c0)), compute() does its arithmetic while the next step's loads are in flight.
template <int BK, class Load, class Stage, class Compute>
__device__ __forceinline__ void single_buffered_steps(int64_t begin, int64_t steps, Load&& load,
                                                      Stage&& stage, Compute&& compute) {
  if (steps > 0) load(begin);
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t c0 = begin + s * BK;
    stage(c0);
    __syncthreads();
    if (s + 1 < steps) load(c0 + BK);
    compute();
    __syncthreads();  // the next stage() overwrites the tiles
  }
}

// ----------------------------------------------------------------------- reductions
template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sums cs (each thread: its TM samples of its TN pixels) over the block's samples and writes
// one row (this sample tile) of each requested column sum (nothing when none is). Block-uniform call.
template <class Tl, typename Acc>
__device__ __forceinline__ void write_colsums(const Acc (&cs)[kNumColSums][Tl::TN],
                                              const ColSumSlots& colsums, int64_t row_tile,
                                              int64_t row_tiles, int64_t p0, int64_t k,
                                              Acc* __restrict__ colpart) {
  __shared__ Acc red[kNumColSums][Tl::WARPS][Tl::BN];
  if (colsums.slot[0] < 0 && colsums.slot[1] < 0) return;
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

// ----------------------------------------------------------------------- (sample, pixel) tiles
// The thread's outputs of a BM x BN (sample, pixel) tile of Tl inside B x k: for each pixel p
// (column j) at_pixel(p) gives the per-pixel values c (loaded once), then at_output(i, j, n, p, c)
// runs for each sample n (row i).
template <class Tl, class AtPixel, class AtOutput>
__device__ __forceinline__ void for_each_tile_output(const BlockTile& bt, int64_t B, int64_t k,
                                                     AtPixel&& at_pixel, AtOutput&& at_output) {
  const int lane = threadIdx.x & 31, wy = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < Tl::TN; ++j) {
    const int64_t p = bt.col0 + lane + 32 * j;
    if (p >= k) continue;
    const auto c = at_pixel(p);
#pragma unroll
    for (int i = 0; i < Tl::TM; ++i) {
      const int64_t n = bt.row0 + wy * Tl::TM + i;
      if (n < B) at_output(i, j, n, p, c);
    }
  }
}

// Forward epilogue: each sample's loss(i, j, n, p, c) summed over the tile's pixels (as
// for_each_tile_output), written to partial[col_tile, n] (one row of partial losses a pixel tile).
template <class Tl, typename Acc, class AtPixel, class Loss>
__device__ __forceinline__ void write_tile_losses(const BlockTile& bt, int64_t B, int64_t k,
                                                  AtPixel&& at_pixel, Loss&& loss,
                                                  Acc* __restrict__ partial) {
  Acc rowsum[Tl::TM];
  zero_fill(rowsum);
  for_each_tile_output<Tl>(bt, B, k, at_pixel, [&](int i, int j, int64_t n, int64_t p, const auto& c) {
    rowsum[i] += loss(i, j, n, p, c);
  });
  const int lane = threadIdx.x & 31, wy = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < Tl::TM; ++i) {
    const Acc s = warp_sum(rowsum[i]);
    const int64_t n = bt.row0 + wy * Tl::TM + i;
    if (lane == 0 && n < B) partial[offset2d(bt.col_tile, n, B)] = s;
  }
}

// grad[n] of the thread's TM samples of the tile (0 past B).
template <class Tl, typename T>
__device__ __forceinline__ void load_row_grads(const T* grad, const BlockTile& bt, int64_t B,
                                               acc_t<T> (&gs)[Tl::TM]) {
  const int wy = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < Tl::TM; ++i) {
    const int64_t n = bt.row0 + wy * Tl::TM + i;
    gs[i] = n < B ? load_acc(grad, n) : acc_t<T>(0);
  }
}

// Two per-pixel inputs (biases) read once per pixel; 0 where absent.
template <typename Acc>
struct PixelPair {
  Acc first, second;
};
template <typename T>
__device__ __forceinline__ PixelPair<acc_t<T>> load_pixel_pair(const T* first, const T* second,
                                                               int64_t p) {
  return PixelPair<acc_t<T>>{ld_or0(first, p), ld_or0(second, p)};
}

// Coefficient epilogue: at_output(i, j, n, p, c, gn) (gn = grad[n]; the rest as
// for_each_tile_output) writes the coefficients of (n, p) and returns its contributions to the two
// column sums, which are summed over the tile's samples and written by write_colsums.
template <class Tl, typename T, class AtPixel, class AtOutput>
__device__ __forceinline__ void write_tile_coefs(const BlockTile& bt, const T* grad, int64_t B,
                                                 int64_t k, const ColSumSlots& colsums,
                                                 acc_t<T>* __restrict__ colpart,
                                                 AtPixel&& at_pixel, AtOutput&& at_output) {
  using Acc = acc_t<T>;
  Acc cs[kNumColSums][Tl::TN], gs[Tl::TM];
  zero_fill(cs);
  load_row_grads<Tl>(grad, bt, B, gs);
  for_each_tile_output<Tl>(bt, B, k, at_pixel, [&](int i, int j, int64_t n, int64_t p, const auto& c) {
    const auto col = at_output(i, j, n, p, c, gs[i]);
    cs[0][j] += col.first;
    cs[1][j] += col.second;
  });
  write_colsums<Tl>(cs, colsums, bt.row_tile, ceil_div(B, Tl::BM), bt.col0, k, colpart);
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

// The blocks of a (row tiles x col tiles) grid; none is a valid grid (nothing to launch).
inline cudaError_t tile_grid(int64_t row_tiles, int64_t col_tiles, unsigned& blocks) {
  const int64_t n = row_tiles * col_tiles;
  if (n > 0 && !grid_fits(n)) return cudaErrorInvalidConfiguration;
  blocks = static_cast<unsigned>(n);
  return cudaSuccess;
}

// Large tiles unless they leave the device under-filled (fewer than two blocks per
// multiprocessor), then small tiles: the reduction over d cannot be split (the epilogue
// is non-linear), so parallelism has to come from the (B, k) tiling.
template <class Large, class Small>
int choose_cfg(int64_t B, int64_t k) {
  const int64_t large = ceil_div(B, Large::BM) * ceil_div(k, Large::BN);
  return large >= 2 * static_cast<int64_t>(current_sm_count()) ? 0 : 1;
}

// The grid of a split reduction: x the output tiles, y `ny`, z the chunks (at most gridDim.z).
inline cudaError_t split_grid(int64_t tiles, int64_t split, dim3& grid, unsigned ny = 1u) {
  if (!grid_fits(tiles) || split < 1 || split > kMaxSplit) return cudaErrorInvalidConfiguration;
  grid = dim3(static_cast<unsigned>(tiles), ny, static_cast<unsigned>(split));
  return cudaSuccess;
}

// fn(prec, k3, k4) with the moment set of a call as std::bool_constant arguments (see latent_cfg).
template <class Fn>
void dispatch_latents(bool precision, bool has_k3, bool has_k4, Fn&& fn) {
  using F = std::false_type;
  using Tr = std::true_type;
  if (!precision) return fn(F{}, F{}, F{});
  switch (latent_cfg(has_k3, has_k4)) {
    case kGaussian: return fn(Tr{}, F{}, F{});
    case kK4Only: return fn(Tr{}, F{}, Tr{});
    default: return fn(Tr{}, Tr{}, Tr{});
  }
}

// fn(head, k3, k4) with a precision call's epilogue (std::integral_constant<Head, ...>) and
// moments: the exact log term and the log-variance head run with Gaussian latents only.
template <typename T, class Fn>
void dispatch_precision(const PrecisionArgs<T>& a, Fn&& fn) {
  using F = std::false_type;
  if (a.head == int(Head::kExactLog)) return fn(std::integral_constant<Head, Head::kExactLog>{}, F{}, F{});
  if (a.head == int(Head::kLogVar)) return fn(std::integral_constant<Head, Head::kLogVar>{}, F{}, F{});
  dispatch_latents(true, a.k3 != nullptr, a.k4 != nullptr, [&](auto, auto with_k3, auto with_k4) {
    fn(std::integral_constant<Head, Head::kTaylor>{}, with_k3, with_k4);
  });
}

inline cudaError_t last_error() { return cudaGetLastError(); }

#define SK_CUDA_TRY(expr)                  \
  do {                                     \
    const cudaError_t sk_err_ = (expr);    \
    if (sk_err_ != cudaSuccess) return sk_err_; \
  } while (0)

}  // namespace cuda
}  // namespace silent_kernels
