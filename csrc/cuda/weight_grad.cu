// Backward, stage 3: gradients of the decoder weights (MATH.md §5), k x d outputs looping
// over the batch. With S_j = g_j^T . (moment of contraction j) (k x d, one GEMM-shaped
// accumulation per present contraction), the chain rule through the weight products is
// applied per output element in the epilogue, where a = A[p, i] and c = C[p, i] are fixed:
//   dA = S_ubar + 2a S_Saa + c S_Sac + c^2 S_Tacc + 2ac S_Taac + 2ac^2 S_Q
//   dC = S_vbar + 2c S_Scc + a S_Sac + 2ac S_Tacc + a^2 S_Taac + 3c^2 S_C3 + 2a^2c S_Q + 4c^3 S_C4
// Fixed head: dA = S_ubar + a / sigma2_p * r_i with r = sum_n grad_n var_n (the Saa term).
// One block per (pixel tile, latent tile, sample chunk); the batch reduction is split into
// chunks when the (k, d) tiling alone would leave the device idle (the epilogue is linear
// in the S_j, so chunk partials of dA, dC are summed afterwards, in order).
#include "contract.cuh"

namespace silent_kernels {
namespace cuda {

namespace {

template <class Tl, bool PREC, bool K3, bool K4, typename T>
struct WeightGrad {
  using Acc = acc_t<T>;
  using Set = ContractSet<PREC, K3, K4>;  // contraction and moment-kind indices
  static constexpr int BK = Tl::BK, BM = Tl::BM, BN = Tl::BN;
  static constexpr int NS = Set::NACC, NK = Set::NK;
  static_assert((BM * sizeof(Acc)) % 16 == 0, "rows of the g tile must stay 16-byte aligned");

  struct __align__(16) Smem {
    Acc g[2][NS][BK][BM];  // g planes, [sample][pixel]
    Acc m[2][NK][BK][BN];  // moments, [sample][latent]
  };

  // Plane (PixelTerms index) and moment kind of accumulator q.
  static __host__ __device__ constexpr int plane_of(int q) {
    return q < 5 ? q : (Set::kK3 ? q : q + 3);
  }
  static __host__ __device__ constexpr int kind_of(int q) {
    return q < 2 ? 0 : q < 5 ? 1 : (Set::kK3 && q < 8) ? Set::KI_K3 : Set::KI_K4;
  }
};

template <class Tl, bool PREC, bool K3, bool K4, typename T>
__global__ void __launch_bounds__(Tl::THREADS, Tl::MINB)
    weight_grad_kernel(const acc_t<T>* __restrict__ planes, const PlaneSlots slots,
                       const T* __restrict__ mean, const T* __restrict__ var,
                       const T* __restrict__ k3, const T* __restrict__ k4,
                       const T* __restrict__ A, const T* __restrict__ C,
                       const T* __restrict__ sigma2, const acc_t<T>* __restrict__ r, int64_t B,
                       int64_t k, int64_t d, bool need_a, bool need_c, int64_t latent_tiles,
                       int64_t chunk, acc_t<T>* __restrict__ partial) {
  using WG = WeightGrad<Tl, PREC, K3, K4, T>;
  using Set = typename WG::Set;
  using Acc = acc_t<T>;
  constexpr int TM = Tl::TM, TN = Tl::TN, BK = Tl::BK, NS = WG::NS, NK = WG::NK;
  using GLoader = TileLoader<Acc, Acc, Tl::BM, BK, Tl::THREADS, false>;
  using MLoader = TileLoader<T, Acc, Tl::BN, BK, Tl::THREADS, false>;
  __shared__ typename WG::Smem sm;

  const BlockTile bt = block_tile<Tl>(latent_tiles);
  const int64_t p0 = bt.row0, i0 = bt.col0;
  const ChunkRange samples = chunk_range(chunk, B);
  const int64_t split = samples.split;
  const int lane = threadIdx.x & 31, wy = threadIdx.x >> 5;

  const Acc* g_src[NS];
#pragma unroll
  for (int q = 0; q < NS; ++q) {
    const int s = slots.slot[WG::plane_of(q)];
    g_src[q] = s >= 0 ? planes + static_cast<int64_t>(s) * B * k : nullptr;
  }
  const T* m_src[NK];
  m_src[0] = mean;
  if constexpr (PREC) m_src[1] = var;
  if constexpr (Set::kK3) m_src[Set::KI_K3] = k3;
  if constexpr (Set::kK4) m_src[Set::KI_K4] = k4;  // null for k3-only moments: zeros

  Acc acc[NS][TM][TN];
  zero_fill(acc);
  TileGroup<GLoader, NS> gt;
  TileGroup<MLoader, NK> mt;
  double_buffered_steps<BK>(
      samples.begin, samples.steps(BK),
      [&](int64_t c0) {
        gt.load(g_src, k, p0, k, c0, samples.end);
        mt.load(m_src, d, i0, d, c0, samples.end);
      },
      [&](int buf) {
        gt.store(sm.g[buf]);
        mt.store(sm.m[buf]);
      },
      [&](int buf) {
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
          Acc mv[NK][TN];
#pragma unroll
          for (int q = 0; q < NK; ++q)
#pragma unroll
            for (int j = 0; j < TN; ++j) mv[q][j] = sm.m[buf][q][kk][lane + 32 * j];
#pragma unroll
          for (int q = 0; q < NS; ++q) {
            Acc g[TM];
            lds_vec<Acc, TM>(&sm.g[buf][q][kk][wy * TM], g);
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
              for (int j = 0; j < TN; ++j) acc[q][i][j] += g[i] * mv[WG::kind_of(q)][j];
          }
        }
      });

  // epilogue: chain rule through the weight products
  const int nwout = int(need_a) + int(need_c);
  Acc* out_a = need_a ? partial + offset3d(split * nwout, 0, 0, k, d) : nullptr;
  Acc* out_c = need_c ? partial + offset3d(split * nwout + int(need_a), 0, 0, k, d) : nullptr;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t p = p0 + wy * TM + i;
    if (p >= k) continue;
    Acc inv_s2 = Acc(0);
    if constexpr (!PREC) inv_s2 = split == 0 ? Acc(1) / load_acc(sigma2, p) : Acc(0);
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t col = i0 + lane + 32 * j;
      if (col >= d) continue;
      const int64_t off = offset2d(p, col, d);
      const Acc a = load_acc(A, off);
      if constexpr (!PREC) {
        out_a[off] = acc[Set::UB][i][j] + a * inv_s2 * (split == 0 ? r[col] : Acc(0));
      } else {
        const Acc c = load_acc(C, off);
        Acc da = acc[Set::UB][i][j] + Acc(2) * a * acc[Set::SAA][i][j] + c * acc[Set::SAC][i][j];
        Acc dc = acc[Set::VB][i][j] + Acc(2) * c * acc[Set::SCC][i][j] + a * acc[Set::SAC][i][j];
        if constexpr (Set::kK3) {
          const Acc tacc = acc[Set::TACC][i][j], taac = acc[Set::TAAC][i][j];
          da += c * c * tacc + Acc(2) * a * c * taac;
          dc += Acc(2) * a * c * tacc + a * a * taac + Acc(3) * c * c * acc[Set::C3][i][j];
        }
        if constexpr (Set::kK4) {
          const Acc sq = acc[Set::Q][i][j];
          da += Acc(2) * a * c * c * sq;
          dc += Acc(2) * a * a * c * sq + Acc(4) * c * c * c * acc[Set::C4][i][j];
        }
        if (out_a != nullptr) out_a[off] = da;
        if (out_c != nullptr) out_c[off] = dc;
      }
    }
  }
}

}  // namespace

template <typename T>
cudaError_t launch_weight_grad(bool precision, bool has_k3, bool has_k4, const acc_t<T>* planes,
                               const PlaneSlots& slots, const T* mean, const T* var, const T* k3,
                               const T* k4, const T* A, const T* C, const T* sigma2,
                               const acc_t<T>* r, int64_t B, int64_t k, int64_t d, bool need_a,
                               bool need_c, int64_t split, int64_t chunk, acc_t<T>* partial,
                               cudaStream_t stream) {
  using Tl = typename Tiles<acc_t<T>>::WeightGrad;
  const int64_t latent_tiles = ceil_div(d, Tl::BN);
  const int64_t blocks = ceil_div(k, Tl::BM) * latent_tiles;
  if (blocks == 0 || !(need_a || need_c)) return cudaSuccess;
  dim3 grid;
  SK_CUDA_TRY(split_grid(blocks, split, grid));
  dispatch_latents(precision, has_k3, has_k4, [&](auto prec, auto with_k3, auto with_k4) {
    weight_grad_kernel<Tl, decltype(prec)::value, decltype(with_k3)::value,
                       decltype(with_k4)::value, T><<<grid, Tl::THREADS, 0, stream>>>(
        planes, slots, mean, var, k3, k4, A, C, sigma2, r, B, k, d, need_a, need_c, latent_tiles,
        chunk, partial);
  });
  return last_error();
}

#define SK_INSTANTIATE(T)                                                                       \
  template cudaError_t launch_weight_grad<T>(bool, bool, bool, const acc_t<T>*,                 \
                                             const PlaneSlots&, const T*, const T*, const T*,    \
                                             const T*, const T*, const T*, const T*,              \
                                             const acc_t<T>*, int64_t, int64_t, int64_t, bool,    \
                                             bool, int64_t, int64_t, acc_t<T>*, cudaStream_t);
SK_CUDA_FOR_EACH_TYPE(SK_INSTANTIATE)
#undef SK_INSTANTIATE

}  // namespace cuda
}  // namespace silent_kernels
