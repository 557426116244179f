// Backward, stage 1: the per-(sample, pixel) coefficients g_j = grad[n] * d(pixel loss)/d(c_j)
// of MATH.md §5. The contractions are recomputed with the forward's tiling (contract.cuh)
// rather than saved by the forward (which would cost a B x k x 10 tensor there); the
// derivatives come from epilogue.h. The planes the later stages need are written as
// (nplanes, B, k) in acc_t, plus dx = -g_ubar directly in T.
#include "contract.cuh"

namespace silent_kernels {
namespace cuda {

namespace {

template <class Tl, typename T>
__global__ void __launch_bounds__(Tl::THREADS, Tl::MINB)
    fixed_coef_kernel(const FixedArgs<T> a, int64_t pixel_tiles, const PlaneSlots slots,
                      acc_t<T>* __restrict__ planes, const ColSumSlots colsums,
                      acc_t<T>* __restrict__ colpart, T* __restrict__ dx) {
  using Acc = acc_t<T>;
  using Ctr = FixedContractor<Tl, T>;
  const BlockTile bt = block_tile<Tl>(pixel_tiles);
  typename Ctr::Accum acc;
  Ctr::run(a, bt, acc);

  const int s_ubar = slots.slot[kUbar];
  struct PixelConsts {
    Acc inv_s2, bu;
  };
  write_tile_coefs<Tl>(
      bt, a.grad, a.B, a.k, colsums, colpart,
      [&](int64_t p) { return PixelConsts{Acc(1) / load_acc(a.sigma2, p), ld_or0(a.bias, p)}; },
      [&](int i, int j, int64_t n, int64_t p, const PixelConsts& c, Acc gn) {
        const int64_t off = offset2d(n, p, a.k);
        const Acc resid = load_acc(a.x, off) - (acc[Ctr::Set::UB][i][j] + c.bu);
        // d/d ubar of fixed_pixel_nll = -resid / sigma2 (the only resid-dependent term is
        // 0.5 resid^2 / sigma2); d/dx is its negative.
        const Acc g_ubar = -resid * c.inv_s2 * gn;
        if (s_ubar >= 0) planes[offset3d(s_ubar, n, p, a.B, a.k)] = g_ubar;
        if (dx != nullptr) dx[off] = Cvt<T>::store(-g_ubar);
        // Column sums kColUbar, kColDSigma2. The Saa part of d/d sigma2 is linear in Saa and
        // added per pixel in O(kd) later (launch_sigma2_finish), so Saa is never formed here.
        return PixelPair<Acc>{g_ubar, gn * fixed_pixel_dsigma2<Acc>(resid, Acc(0), c.inv_s2)};
      });
}

// H: the per-pixel epilogue (epilogue.h Head); kExactLog and kLogVar only with K3 = K4 = false.
template <class Tl, Head H, bool K3, bool K4, typename T>
__global__ void __launch_bounds__(Tl::THREADS, Tl::MINB)
    precision_coef_kernel(const PrecisionArgs<T> a, int64_t pixel_tiles, const PlaneSlots slots,
                          acc_t<T>* __restrict__ planes, const ColSumSlots colsums,
                          acc_t<T>* __restrict__ colpart, T* __restrict__ dx) {
  using Acc = acc_t<T>;
  using Ctr = PrecisionContractor<Tl, K3, K4, T>;
  using Set = typename Ctr::Set;
  static_assert(H == Head::kTaylor || (!K3 && !K4), "exact heads need Gaussian latents");
  const BlockTile bt = block_tile<Tl>(pixel_tiles);
  typename Ctr::Accum acc;
  Ctr::run(a, bt, acc);

  write_tile_coefs<Tl>(
      bt, a.grad, a.B, a.k, colsums, colpart,
      [&](int64_t p) { return load_pixel_pair(a.bias, a.pbias, p); },
      [&](int i, int j, int64_t n, int64_t p, const PixelPair<Acc>& b, Acc gn) {
        const int64_t off = offset2d(n, p, a.k);
        const PixelTerms<Acc> t = Ctr::terms(acc, i, j, b.first, b.second);
        const PixelTerms<Acc> g = head_pixel_grad<H, Acc>(load_acc(a.x, off), t);
        const Acc gv[kNumPlanes] = {g.ubar, g.vbar, g.Saa, g.Scc, g.Sac,
                                    g.Tacc, g.Taac, g.C3,  g.Q,   g.C4};
#pragma unroll
        for (int q = 0; q < kNumPlanes; ++q) {
          const bool present = q < kTacc || (q < kQ ? Set::kK3 : Set::kK4);
          const int s = slots.slot[q];
          if (present && s >= 0) planes[offset3d(s, n, p, a.B, a.k)] = gn * gv[q];
        }
        // d/dx = d/de = -d/d ubar
        if (dx != nullptr) dx[off] = Cvt<T>::store(-gn * g.ubar);
        return PixelPair<Acc>{gn * g.ubar, gn * g.vbar};  // column sums kColUbar, kColVbar
      });
}

template <class Tl, typename T>
cudaError_t fixed_coef_tiles(const FixedArgs<T>& a, const PlaneSlots& slots, acc_t<T>* planes,
                             const ColSumSlots& colsums, acc_t<T>* colpart, T* dx,
                             cudaStream_t stream) {
  const int64_t pixel_tiles = ceil_div(a.k, Tl::BN);
  const int64_t blocks = ceil_div(a.B, Tl::BM) * pixel_tiles;
  if (blocks == 0) return cudaSuccess;
  if (!grid_fits(blocks)) return cudaErrorInvalidConfiguration;
  fixed_coef_kernel<Tl, T><<<static_cast<unsigned>(blocks), Tl::THREADS, 0, stream>>>(
      a, pixel_tiles, slots, planes, colsums, colpart, dx);
  return last_error();
}

template <class Tl, typename T>
cudaError_t precision_coef_tiles(const PrecisionArgs<T>& a, const PlaneSlots& slots,
                                 acc_t<T>* planes, const ColSumSlots& colsums, acc_t<T>* colpart,
                                 T* dx, cudaStream_t stream) {
  const int64_t pixel_tiles = ceil_div(a.k, Tl::BN);
  const int64_t blocks = ceil_div(a.B, Tl::BM) * pixel_tiles;
  if (blocks == 0) return cudaSuccess;
  if (!grid_fits(blocks)) return cudaErrorInvalidConfiguration;
  const unsigned g = static_cast<unsigned>(blocks);
  dispatch_precision(a, [&](auto head, auto with_k3, auto with_k4) {
    precision_coef_kernel<Tl, decltype(head)::value, decltype(with_k3)::value,
                          decltype(with_k4)::value, T><<<g, Tl::THREADS, 0, stream>>>(
        a, pixel_tiles, slots, planes, colsums, colpart, dx);
  });
  return last_error();
}

}  // namespace

template <typename T>
cudaError_t launch_fixed_coef(const FixedArgs<T>& a, int cfg, const PlaneSlots& slots,
                              acc_t<T>* planes, const ColSumSlots& colsums, acc_t<T>* colpart,
                              T* dx, cudaStream_t stream) {
  using Tl = Tiles<acc_t<T>>;
  return cfg == 0 ? fixed_coef_tiles<typename Tl::FixedLarge, T>(a, slots, planes, colsums, colpart, dx, stream)
                  : fixed_coef_tiles<typename Tl::FixedSmall, T>(a, slots, planes, colsums, colpart, dx, stream);
}

template <typename T>
cudaError_t launch_precision_coef(const PrecisionArgs<T>& a, int cfg, const PlaneSlots& slots,
                                  acc_t<T>* planes, const ColSumSlots& colsums,
                                  acc_t<T>* colpart, T* dx, cudaStream_t stream) {
  using Tl = Tiles<acc_t<T>>;
  return cfg == 0 ? precision_coef_tiles<typename Tl::PrecLarge, T>(a, slots, planes, colsums, colpart, dx, stream)
                  : precision_coef_tiles<typename Tl::PrecSmall, T>(a, slots, planes, colsums, colpart, dx, stream);
}

namespace {
template <typename Acc>
int64_t coef_row_tiles_impl(bool precision, int cfg, int64_t B) {
  using Tl = Tiles<Acc>;
  const int bm = precision ? (cfg == 0 ? Tl::PrecLarge::BM : Tl::PrecSmall::BM)
                           : (cfg == 0 ? Tl::FixedLarge::BM : Tl::FixedSmall::BM);
  return ceil_div(B, bm);
}
}  // namespace

int64_t coef_row_tiles(bool precision, bool is_double, int cfg, int64_t B) {
  return is_double ? coef_row_tiles_impl<double>(precision, cfg, B)
                   : coef_row_tiles_impl<float>(precision, cfg, B);
}

#define SK_INSTANTIATE(T)                                                                      \
  template cudaError_t launch_fixed_coef<T>(const FixedArgs<T>&, int, const PlaneSlots&,       \
                                            acc_t<T>*, const ColSumSlots&, acc_t<T>*, T*,      \
                                            cudaStream_t);                                     \
  template cudaError_t launch_precision_coef<T>(const PrecisionArgs<T>&, int, const PlaneSlots&, \
                                                acc_t<T>*, const ColSumSlots&, acc_t<T>*, T*,  \
                                                cudaStream_t);
SK_CUDA_FOR_EACH_TYPE(SK_INSTANTIATE)
#undef SK_INSTANTIATE

}  // namespace cuda
}  // namespace silent_kernels
