// Forward kernels of the fixed and precision-family heads (MATH.md §3-4, §10-11) and their
// host launchers.
//
// One block per (sample tile, pixel tile): contractions accumulated in registers by the
// Contractor (contract.cuh), the per-pixel loss from epilogue.h, a warp-shuffle reduction
// over the tile's pixels, and one partial loss per (pixel tile, sample) written to the
// scratch buffer; launch_sum_rows adds the partials in a fixed order (no atomics).
// Fixed variance: the tile kernel computes only ubar (one GEMM-shaped pass) and the
// per-pixel (x - ubar)^2 / (2 sigma2) + 0.5 log(2 pi sigma2); the variance part
// sum_p Saa_p / (2 sigma2_p) = 0.5 * var . w with w_i = sum_p A_pi^2 / sigma2_p is one
// O(kd) column reduction plus one O(Bd) row reduction, written as an extra partial row.
// Precision-family heads (PrecisionArgs::head): the same ten contractions feed the Taylor
// epilogue, the exact log term (Gaussian latents) or the Gaussian log-variance head (C = H);
// the kernel is instantiated per head (head_pixel_nll<H>).
#include <atomic>

#include "contract.cuh"

namespace silent_kernels {
namespace cuda {

// ------------------------------------------------------------------------------ kernels
template <class Tl, typename T>
__global__ void __launch_bounds__(Tl::THREADS, Tl::MINB)
    fixed_forward_kernel(const FixedArgs<T> a, int64_t pixel_tiles, acc_t<T>* __restrict__ partial) {
  using Acc = acc_t<T>;
  using Ctr = FixedContractor<Tl, T>;
  const BlockTile bt = block_tile<Tl>(pixel_tiles);
  typename Ctr::Accum acc;
  Ctr::run(a, bt, acc);

  struct PixelConsts {
    Acc inv_s2, log_s2, bu;
  };
  write_tile_losses<Tl, Acc>(
      bt, a.B, a.k,
      [&](int64_t p) {
        const Acc s2 = load_acc(a.sigma2, p);
        return PixelConsts{Acc(1) / s2, log(s2), ld_or0(a.bias, p)};
      },
      [&](int i, int j, int64_t n, int64_t p, const PixelConsts& c) {
        const Acc resid = load_acc(a.x, offset2d(n, p, a.k)) - (acc[Ctr::Set::UB][i][j] + c.bu);
        return fixed_pixel_nll<Acc>(resid, Acc(0), c.inv_s2, c.log_s2);
      },
      partial);
}

// H: the per-pixel epilogue (epilogue.h Head); kExactLog and kLogVar only with K3 = K4 = false.
template <class Tl, Head H, bool K3, bool K4, typename T>
__global__ void __launch_bounds__(Tl::THREADS, Tl::MINB)
    precision_forward_kernel(const PrecisionArgs<T> a, int64_t pixel_tiles,
                             acc_t<T>* __restrict__ partial) {
  using Acc = acc_t<T>;
  using Ctr = PrecisionContractor<Tl, K3, K4, T>;
  static_assert(H == Head::kTaylor || (!K3 && !K4), "exact heads need Gaussian latents");
  const BlockTile bt = block_tile<Tl>(pixel_tiles);
  typename Ctr::Accum acc;
  Ctr::run(a, bt, acc);

  write_tile_losses<Tl, Acc>(
      bt, a.B, a.k, [&](int64_t p) { return load_pixel_pair(a.bias, a.pbias, p); },
      [&](int i, int j, int64_t n, int64_t p, const PixelPair<Acc>& b) {
        const PixelTerms<Acc> t = Ctr::terms(acc, i, j, b.first, b.second);
        return head_pixel_nll<H, Acc>(load_acc(a.x, offset2d(n, p, a.k)), t);
      },
      partial);
}

// ------------------------------------------------------------------------------ plans
int current_sm_count() {
  static std::atomic<int> cache[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return 1;
  }
  if (dev >= 0 && dev < 64) {
    const int c = cache[dev].load(std::memory_order_relaxed);
    if (c > 0) return c;
  }
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
    cudaGetLastError();
    return 1;
  }
  if (dev >= 0 && dev < 64) cache[dev].store(n, std::memory_order_relaxed);
  return n;
}

namespace {

template <class Large, class Small>
int64_t pixel_tiles_of(int cfg, int64_t k) {
  return ceil_div(k, cfg == 0 ? Large::BN : Small::BN);
}

template <typename Acc>
ForwardPlan plan_fixed_forward_impl(int64_t B, int64_t k, int64_t d) {
  using L = typename Tiles<Acc>::FixedLarge;
  using S = typename Tiles<Acc>::FixedSmall;
  ForwardPlan p{};
  p.cfg = choose_cfg<L, S>(B, k);
  p.pixel_tiles = pixel_tiles_of<L, S>(p.cfg, k);
  p.partial_rows = p.pixel_tiles + 1;
  p.off_colw = p.partial_rows * B;
  p.workspace = p.off_colw + d;
  return p;
}

template <typename Acc>
ForwardPlan plan_precision_forward_impl(int64_t B, int64_t k) {
  using L = typename Tiles<Acc>::PrecLarge;
  using S = typename Tiles<Acc>::PrecSmall;
  ForwardPlan p{};
  p.cfg = choose_cfg<L, S>(B, k);
  p.pixel_tiles = pixel_tiles_of<L, S>(p.cfg, k);
  p.partial_rows = p.pixel_tiles;
  p.off_colw = 0;
  p.workspace = p.partial_rows * B;
  return p;
}

}  // namespace

ForwardPlan plan_fixed_forward(int64_t B, int64_t k, int64_t d, bool is_double) {
  return is_double ? plan_fixed_forward_impl<double>(B, k, d)
                   : plan_fixed_forward_impl<float>(B, k, d);
}

ForwardPlan plan_precision_forward(int64_t B, int64_t k, int64_t d, bool is_double) {
  (void)d;
  return is_double ? plan_precision_forward_impl<double>(B, k)
                   : plan_precision_forward_impl<float>(B, k);
}

// ------------------------------------------------------------------------------ launchers
namespace {

template <class Tl, typename T>
cudaError_t launch_fixed_tiles(const FixedArgs<T>& a, int64_t pixel_tiles, acc_t<T>* partial,
                               cudaStream_t stream) {
  const int64_t blocks = ceil_div(a.B, Tl::BM) * pixel_tiles;
  if (!grid_fits(blocks)) return cudaErrorInvalidConfiguration;
  fixed_forward_kernel<Tl, T><<<static_cast<unsigned>(blocks), Tl::THREADS, 0, stream>>>(
      a, pixel_tiles, partial);
  return last_error();
}

template <class Tl, typename T>
cudaError_t launch_precision_tiles(const PrecisionArgs<T>& a, int64_t pixel_tiles,
                                   acc_t<T>* partial, cudaStream_t stream) {
  const int64_t blocks = ceil_div(a.B, Tl::BM) * pixel_tiles;
  if (!grid_fits(blocks)) return cudaErrorInvalidConfiguration;
  const unsigned g = static_cast<unsigned>(blocks);
  dispatch_precision(a, [&](auto head, auto with_k3, auto with_k4) {
    precision_forward_kernel<Tl, decltype(head)::value, decltype(with_k3)::value,
                             decltype(with_k4)::value, T><<<g, Tl::THREADS, 0, stream>>>(
        a, pixel_tiles, partial);
  });
  return last_error();
}

}  // namespace

template <typename T>
cudaError_t fixed_forward(const FixedArgs<T>& a, const ForwardPlan& plan, acc_t<T>* workspace,
                          T* loss, cudaStream_t stream) {
  using Acc = acc_t<T>;
  if (a.B == 0) return cudaSuccess;
  Acc* partial = workspace;
  if (plan.pixel_tiles > 0) {
    if (plan.cfg == 0)
      SK_CUDA_TRY((launch_fixed_tiles<typename Tiles<Acc>::FixedLarge, T>(a, plan.pixel_tiles, partial, stream)));
    else
      SK_CUDA_TRY((launch_fixed_tiles<typename Tiles<Acc>::FixedSmall, T>(a, plan.pixel_tiles, partial, stream)));
  }
  // variance row: 0.5 * var . w, w = sum_p A_pi^2 / sigma2_p
  Acc* colw = workspace + plan.off_colw;
  if (a.d > 0) SK_CUDA_TRY(launch_colweight<T>(a.weight, a.sigma2, a.k, a.d, colw, stream));
  SK_CUDA_TRY(launch_rowdot<T>(a.var, colw, a.B, a.d, 0.5, partial + plan.pixel_tiles * a.B, stream));
  return launch_sum_rows<Acc, T>(partial, plan.partial_rows, a.B, a.B, nullptr, loss, stream);
}

template <typename T>
cudaError_t precision_forward(const PrecisionArgs<T>& a, const ForwardPlan& plan,
                              acc_t<T>* workspace, T* loss, cudaStream_t stream) {
  using Acc = acc_t<T>;
  if (!precision_head_valid(a)) return cudaErrorInvalidValue;
  if (a.B == 0) return cudaSuccess;
  if (plan.pixel_tiles > 0) {
    if (plan.cfg == 0)
      SK_CUDA_TRY((launch_precision_tiles<typename Tiles<Acc>::PrecLarge, T>(a, plan.pixel_tiles, workspace, stream)));
    else
      SK_CUDA_TRY((launch_precision_tiles<typename Tiles<Acc>::PrecSmall, T>(a, plan.pixel_tiles, workspace, stream)));
  }
  return launch_sum_rows<Acc, T>(workspace, plan.partial_rows, a.B, a.B, nullptr, loss, stream);
}

#define SK_INSTANTIATE(T)                                                                      \
  template cudaError_t fixed_forward<T>(const FixedArgs<T>&, const ForwardPlan&, acc_t<T>*, T*, \
                                        cudaStream_t);                                         \
  template cudaError_t precision_forward<T>(const PrecisionArgs<T>&, const ForwardPlan&,        \
                                            acc_t<T>*, T*, cudaStream_t);
SK_CUDA_FOR_EACH_TYPE(SK_INSTANTIATE)
#undef SK_INSTANTIATE

}  // namespace cuda
}  // namespace silent_kernels
