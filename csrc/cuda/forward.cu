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
  using Set = ContractSet<false, false, false>;
  using Ctr = Contractor<Tl, Set, T>;
  __shared__ typename Ctr::Smem sm;

  const TileCoord tc = tile_coord(blockIdx.x, pixel_tiles);
  const int64_t n0 = tc.row_tile * Tl::BM, p0 = tc.col_tile * Tl::BN;
  const T* mom[1] = {a.mean};
  const T* w[1] = {a.weight};
  typename Ctr::Accum acc;
  Ctr::run(sm, mom, w, a.B, a.k, a.d, n0, p0, acc);

  const int lane = threadIdx.x & 31, wy = threadIdx.x >> 5;
  Acc rowsum[Tl::TM];
#pragma unroll
  for (int i = 0; i < Tl::TM; ++i) rowsum[i] = Acc(0);
#pragma unroll
  for (int j = 0; j < Tl::TN; ++j) {
    const int64_t p = p0 + lane + 32 * j;
    if (p >= a.k) continue;
    const Acc s2 = load_acc(a.sigma2, p);
    const Acc inv_s2 = Acc(1) / s2, log_s2 = log(s2);
    const Acc bu = ld_or0(a.bias, p);
#pragma unroll
    for (int i = 0; i < Tl::TM; ++i) {
      const int64_t n = n0 + wy * Tl::TM + i;
      if (n < a.B) {
        const Acc resid = load_acc(a.x, offset2d(n, p, a.k)) - (acc[Set::UB][i][j] + bu);
        rowsum[i] += fixed_pixel_nll<Acc>(resid, Acc(0), inv_s2, log_s2);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < Tl::TM; ++i) {
    const Acc s = warp_sum(rowsum[i]);
    const int64_t n = n0 + wy * Tl::TM + i;
    if (lane == 0 && n < a.B) partial[offset2d(tc.col_tile, n, a.B)] = s;
  }
}

// H: the per-pixel epilogue (epilogue.h Head); kExactLog and kLogVar only with K3 = K4 = false.
template <class Tl, Head H, bool K3, bool K4, typename T>
__global__ void __launch_bounds__(Tl::THREADS, Tl::MINB)
    precision_forward_kernel(const PrecisionArgs<T> a, int64_t pixel_tiles,
                             acc_t<T>* __restrict__ partial) {
  using Acc = acc_t<T>;
  using Set = ContractSet<true, K3, K4>;
  using Ctr = Contractor<Tl, Set, T>;
  static_assert(H == Head::kTaylor || (!K3 && !K4), "exact heads need Gaussian latents");
  __shared__ typename Ctr::Smem sm;

  const TileCoord tc = tile_coord(blockIdx.x, pixel_tiles);
  const int64_t n0 = tc.row_tile * Tl::BM, p0 = tc.col_tile * Tl::BN;
  const T* mom[Set::NK];
  precision_moments<Set>(a, mom);
  const T* w[2] = {a.weight, a.pweight};
  typename Ctr::Accum acc;
  Ctr::run(sm, mom, w, a.B, a.k, a.d, n0, p0, acc);

  const int lane = threadIdx.x & 31, wy = threadIdx.x >> 5;
  Acc rowsum[Tl::TM];
#pragma unroll
  for (int i = 0; i < Tl::TM; ++i) rowsum[i] = Acc(0);
#pragma unroll
  for (int j = 0; j < Tl::TN; ++j) {
    const int64_t p = p0 + lane + 32 * j;
    if (p >= a.k) continue;
    const Acc bu = ld_or0(a.bias, p), bv = ld_or0(a.pbias, p);
#pragma unroll
    for (int i = 0; i < Tl::TM; ++i) {
      const int64_t n = n0 + wy * Tl::TM + i;
      if (n < a.B) {
        const PixelTerms<Acc> t = Ctr::terms(acc, i, j, bu, bv);
        rowsum[i] += head_pixel_nll<H, Acc>(load_acc(a.x, offset2d(n, p, a.k)), t);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < Tl::TM; ++i) {
    const Acc s = warp_sum(rowsum[i]);
    const int64_t n = n0 + wy * Tl::TM + i;
    if (lane == 0 && n < a.B) partial[offset2d(tc.col_tile, n, a.B)] = s;
  }
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

// Large tiles unless they leave the device under-filled (fewer than two blocks per
// multiprocessor), then small tiles: the reduction over d cannot be split (the epilogue
// is non-linear), so parallelism has to come from the (B, k) tiling.
template <class Large, class Small>
int choose_cfg(int64_t B, int64_t k) {
  const int64_t large = ceil_div(B, Large::BM) * ceil_div(k, Large::BN);
  return large >= 2 * static_cast<int64_t>(current_sm_count()) ? 0 : 1;
}

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
  if (a.head == int(Head::kExactLog)) {
    precision_forward_kernel<Tl, Head::kExactLog, false, false, T><<<g, Tl::THREADS, 0, stream>>>(a, pixel_tiles, partial);
    return last_error();
  }
  if (a.head == int(Head::kLogVar)) {
    precision_forward_kernel<Tl, Head::kLogVar, false, false, T><<<g, Tl::THREADS, 0, stream>>>(a, pixel_tiles, partial);
    return last_error();
  }
  switch (latent_cfg(a.k3 != nullptr, a.k4 != nullptr)) {
    case kGaussian:
      precision_forward_kernel<Tl, Head::kTaylor, false, false, T><<<g, Tl::THREADS, 0, stream>>>(a, pixel_tiles, partial);
      break;
    case kK4Only:
      precision_forward_kernel<Tl, Head::kTaylor, false, true, T><<<g, Tl::THREADS, 0, stream>>>(a, pixel_tiles, partial);
      break;
    default:
      precision_forward_kernel<Tl, Head::kTaylor, true, true, T><<<g, Tl::THREADS, 0, stream>>>(a, pixel_tiles, partial);
      break;
  }
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
SK_INSTANTIATE(float)
SK_INSTANTIATE(double)
SK_INSTANTIATE(__half)
SK_INSTANTIATE(__nv_bfloat16)
#undef SK_INSTANTIATE

}  // namespace cuda
}  // namespace silent_kernels
