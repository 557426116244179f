// Backward, stage 2: gradients of the moments (MATH.md §5), B x d outputs looping over k:
//   dmean = g_ubar . A + g_vbar . C
//   dvar  = g_Saa . A^2 + g_Scc . C^2 + g_Sac . (A*C)
//   dk3   = g_Tacc . (A*C^2) + g_Taac . (A^2*C) + g_C3 . C^3
//   dk4   = g_Q . (A^2*C^2) + g_C4 . C^4
// One block per (sample tile, latent tile, moment kind, pixel chunk): tiles of the g planes
// and of A, C are staged in shared memory (double-buffered), the weight products formed
// in registers per step. The pixel reduction is split into chunks when the (B, d) tiling
// alone would leave the device idle; chunk partials are summed afterwards in order.
#include "common.cuh"

namespace silent_kernels {
namespace cuda {

namespace {

template <class Tl, bool PREC, bool K3, bool K4, typename T>
struct MomentGrad {
  using Acc = acc_t<T>;
  static constexpr int TM = Tl::TM, TN = Tl::TN, BK = Tl::BK, BM = Tl::BM, BN = Tl::BN;
  static constexpr int MAXP = PREC ? 3 : 1;  // planes per kind, at most
  static constexpr int NW = PREC ? 2 : 1;

  struct __align__(16) Smem {
    Acc g[2][MAXP][BK][BM + pad16<Acc>()];  // g planes, [pixel][sample]
    Acc w[2][NW][BK][BN];                   // A, C, [pixel][latent]
  };
  static_assert(((BM + pad16<Acc>()) * sizeof(Acc)) % 16 == 0, "g rows not 16-byte aligned");

  // KIND: 0 mean, 1 var, 2 k3, 3 k4.
  template <int KIND>
  static __device__ __forceinline__ void run(Smem& sm, const Acc* planes, const PlaneSlots& slots,
                                             const T* A, const T* C, int64_t B, int64_t k,
                                             int64_t d, const BlockTile& bt,
                                             const ChunkRange& pixels, Acc* __restrict__ out) {
    constexpr int NP = KIND == 0 ? (PREC ? 2 : 1) : (KIND == 3 ? 2 : 3);
    constexpr int FIRST = KIND == 0 ? kUbar : KIND == 1 ? kSaa : KIND == 2 ? kTacc : kQ;
    using GLoader = TileLoader<Acc, Acc, BM, BK, Tl::THREADS, true>;
    using WLoader = TileLoader<T, Acc, BN, BK, Tl::THREADS, false>;
    const int lane = threadIdx.x & 31, wy = threadIdx.x >> 5;

    const Acc* g_src[NP];
#pragma unroll
    for (int q = 0; q < NP; ++q) {
      const int s = slots.slot[FIRST + q];
      g_src[q] = s >= 0 ? planes + static_cast<int64_t>(s) * B * k : nullptr;
    }
    const T* w_src[NW];
    w_src[0] = A;
    if constexpr (PREC) w_src[1] = C;

    Acc acc[TM][TN];
    zero_fill(acc);
    TileGroup<GLoader, NP> gt;
    TileGroup<WLoader, NW> wt;
    double_buffered_steps<BK>(
        pixels.begin, pixels.steps(BK),
        [&](int64_t c0) {
          gt.load(g_src, k, bt.row0, B, c0, pixels.end);
          wt.load(w_src, d, bt.col0, d, c0, pixels.end);
        },
        [&](int buf) {
          gt.store(sm.g[buf]);
          wt.store(sm.w[buf]);
        },
        [&](int buf) {
#pragma unroll
          for (int kk = 0; kk < BK; ++kk) {
            Acc wp[NP][TN];
#pragma unroll
            for (int j = 0; j < TN; ++j) {
              const Acc a = sm.w[buf][0][kk][lane + 32 * j];
              const Acc c = PREC ? sm.w[buf][NW - 1][kk][lane + 32 * j] : Acc(0);
              if constexpr (KIND == 0) {
                wp[0][j] = a;
                if constexpr (PREC) wp[NP - 1][j] = c;
              } else if constexpr (KIND == 1) {
                wp[0][j] = a * a;
                wp[1][j] = c * c;
                wp[NP - 1][j] = a * c;
              } else if constexpr (KIND == 2) {
                const Acc c2 = c * c;
                wp[0][j] = a * c2;
                wp[1][j] = a * a * c;
                wp[NP - 1][j] = c2 * c;
              } else {
                const Acc c2 = c * c;
                wp[0][j] = a * a * c2;
                wp[NP - 1][j] = c2 * c2;
              }
            }
#pragma unroll
            for (int q = 0; q < NP; ++q) {
              Acc g[TM];
              lds_vec<Acc, TM>(&sm.g[buf][q][kk][wy * TM], g);
#pragma unroll
              for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] += g[i] * wp[q][j];
            }
          }
        });

    for_each_register<Tl>(bt, [&](int i, int j, int64_t n, int64_t col) {
      if (n < B && col < d) out[offset2d(n, col, d)] = acc[i][j];
    });
  }
};

template <class Tl, bool PREC, bool K3, bool K4, typename T>
__global__ void __launch_bounds__(Tl::THREADS, Tl::MINB)
    moment_grad_kernel(const acc_t<T>* __restrict__ planes, const PlaneSlots slots,
                       const T* __restrict__ A, const T* __restrict__ C, int64_t B, int64_t k,
                       int64_t d, unsigned kinds, int nkinds, int64_t latent_tiles,
                       int64_t chunk, acc_t<T>* __restrict__ partial) {
  using MG = MomentGrad<Tl, PREC, K3, K4, T>;
  __shared__ typename MG::Smem sm;
  const BlockTile bt = block_tile<Tl>(latent_tiles);
  const ChunkRange pixels = chunk_range(chunk, k);
  const int ks = blockIdx.y;
  acc_t<T>* out = partial + offset3d(pixels.split * nkinds + ks, 0, 0, B, d);
  switch ((kinds >> (4 * ks)) & 0xFu) {  // block-uniform; kinds packed 4 bits each
    case 0:
      MG::template run<0>(sm, planes, slots, A, C, B, k, d, bt, pixels, out);
      break;
    case 1:
      if constexpr (PREC) MG::template run<1>(sm, planes, slots, A, C, B, k, d, bt, pixels, out);
      break;
    case 2:
      if constexpr (PREC && K3) MG::template run<2>(sm, planes, slots, A, C, B, k, d, bt, pixels, out);
      break;
    case 3:
      if constexpr (PREC && K4) MG::template run<3>(sm, planes, slots, A, C, B, k, d, bt, pixels, out);
      break;
    default:
      break;
  }
}

}  // namespace

template <typename T>
cudaError_t launch_moment_grad(bool precision, bool has_k3, bool has_k4, const acc_t<T>* planes,
                               const PlaneSlots& slots, const T* A, const T* C, int64_t B,
                               int64_t k, int64_t d, const int* kinds, int nkinds, int64_t split,
                               int64_t chunk, acc_t<T>* partial, cudaStream_t stream) {
  using Tl = typename Tiles<acc_t<T>>::MomentGrad;
  const int64_t latent_tiles = ceil_div(d, Tl::BN);
  const int64_t blocks = ceil_div(B, Tl::BM) * latent_tiles;
  if (blocks == 0 || nkinds == 0) return cudaSuccess;
  if (nkinds > 4) return cudaErrorInvalidConfiguration;
  dim3 grid;
  SK_CUDA_TRY(split_grid(blocks, split, grid, static_cast<unsigned>(nkinds)));
  unsigned kl = 0;  // kind of grid.y slot q in bits [4q, 4q + 4)
  for (int q = 0; q < nkinds; ++q) {
    if (kinds[q] < 0 || kinds[q] > 3) return cudaErrorInvalidValue;
    kl |= static_cast<unsigned>(kinds[q]) << (4 * q);
  }
  dispatch_latents(precision, has_k3, has_k4, [&](auto prec, auto with_k3, auto with_k4) {
    moment_grad_kernel<Tl, decltype(prec)::value, decltype(with_k3)::value,
                       decltype(with_k4)::value, T><<<grid, Tl::THREADS, 0, stream>>>(
        planes, slots, A, C, B, k, d, kl, nkinds, latent_tiles, chunk, partial);
  });
  return last_error();
}

#define SK_INSTANTIATE(T)                                                                       \
  template cudaError_t launch_moment_grad<T>(bool, bool, bool, const acc_t<T>*,                 \
                                             const PlaneSlots&, const T*, const T*, int64_t,     \
                                             int64_t, int64_t, const int*, int, int64_t, int64_t, \
                                             acc_t<T>*, cudaStream_t);
SK_CUDA_FOR_EACH_TYPE(SK_INSTANTIATE)
#undef SK_INSTANTIATE

}  // namespace cuda
}  // namespace silent_kernels
