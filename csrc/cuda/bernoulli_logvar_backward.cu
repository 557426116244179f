// Backward of the Bernoulli log-variance head (stages 1-4 in bernoulli_logvar.cu): kernels and launcher.
#include "bernoulli_logvar.cuh"

namespace silent_kernels {
namespace cuda {

namespace {

// ----------------------------------------------------------------- backward 1: coefficients
template <class Tl, typename T>
__global__ void __launch_bounds__(Tl::THREADS, Tl::MINB)
    bernoulli_logvar_coef_kernel(const BernoulliLogvarArgs<T> a, int64_t pixel_tiles,
                                 bool write_planes, acc_t<T>* __restrict__ planes,
                                 const ColSumSlots colsums, acc_t<T>* __restrict__ colpart,
                                 T* __restrict__ dx) {
  using Acc = acc_t<T>;
  using TC = TiltedContraction<Tl, T>;
  __shared__ typename TC::Smem sm;

  const TileCoord tc = tile_coord(blockIdx.x, pixel_tiles);
  const int64_t n0 = tc.row_tile * Tl::BM, p0 = tc.col_tile * Tl::BN;
  typename TC::Accum acc;
  TC::run(sm, a, n0, p0, acc);

  const int lane = threadIdx.x & 31, wy = threadIdx.x >> 5;
  const bool want_cs = colsums.slot[0] >= 0 || colsums.slot[1] >= 0;
  Acc cs[kNumColSums][Tl::TN];
#pragma unroll
  for (int j = 0; j < Tl::TN; ++j) cs[kColBias][j] = cs[kColLbias][j] = Acc(0);
  Acc gs[Tl::TM];
#pragma unroll
  for (int i = 0; i < Tl::TM; ++i) {
    const int64_t n = n0 + wy * Tl::TM + i;
    gs[i] = n < a.B ? load_acc(a.grad, n) : Acc(0);
  }
#pragma unroll
  for (int j = 0; j < Tl::TN; ++j) {
    const int64_t p = p0 + lane + 32 * j;
    if (p >= a.k) continue;
    const Acc b = ld_or0(a.bias, p), h0 = ld_or0(a.lbias, p);
#pragma unroll
    for (int i = 0; i < Tl::TM; ++i) {
      const int64_t n = n0 + wy * Tl::TM + i;
      if (n >= a.B) continue;
      const int64_t off = offset2d(n, p, a.k);
      const TiltedSums<Acc> g =
          tilted_logvar_pixel_grad<Acc>(load_acc(a.x, off), b, h0, TC::sums(acc, i, j));
      const Acc gS = gs[i] * g.S, gT1 = gs[i] * g.T1, gT2 = gs[i] * g.T2;
      if (write_planes) {
        planes[offset3d(kGS, n, p, a.B, a.k)] = gS;
        planes[offset3d(kGT1, n, p, a.B, a.k)] = gT1;
        planes[offset3d(kGT2, n, p, a.B, a.k)] = gT2;
      }
      if (dx != nullptr) dx[off] = Cvt<T>::store(-gT1);  // d/dx = -d/dT1
      cs[kColBias][j] += gT1;                           // d/db = d/dT1
      cs[kColLbias][j] += gs[i] * g.hm - gS;            // d/dh0 = 1/2 - d/dS
    }
  }
  if (want_cs) write_colsums<Tl>(cs, colsums, tc.row_tile, ceil_div(a.B, Tl::BM), p0, a.k, colpart);
}

// Tilted mean and variance only (the backward stages): the log-MGF part is eliminated.
template <typename Acc>
__device__ __forceinline__ LatentTilt<Acc> tilted_moments(Acc l, Acc h) {
  return bernoulli_tilt<Acc>(l, Acc(0), Acc(0), h);
}

// Contribution of one (sample, pixel, latent) triple through the tilted sums T1, T2:
// d/dl of [gT1 a mu' + gT2 a^2 v'] (d mu'/dl = v', d v'/dl = v' (1 - 2 mu')); d/dh is its negative.
template <typename Acc>
__device__ __forceinline__ Acc tilt_t_weight(const LatentTilt<Acc>& t, Acc a, Acc gT1, Acc gT2) {
  return (gT1 * a + gT2 * a * a * (Acc(1) - Acc(2) * t.mean)) * t.var;
}

// Below this |h| the dlogits kernel forms mu' - p = sigmoid(l - h) - sigmoid(l) as
// -mu' q expm1(h) (q = 1 - p): the plain difference cancels for small tilts; above it the plain
// difference is accurate and expm1(h) could overflow.
constexpr double kTiltDiffSwitch = 1.0;

// ----------------------------------------------------------------- backward 2: dlogits
// Block: BM samples x BN latents; reduces pixels [split * chunk, +chunk) in steps of BK.
// Per triple: gS (mu' - p) + d/dl [gT1 a mu' + gT2 a^2 v'] (S = sum_i K_i, dK/dl = mu' - p).
template <class Tl, typename T>
__global__ void __launch_bounds__(Tl::THREADS, Tl::MINB)
    bernoulli_logvar_dlogits_kernel(const BernoulliLogvarArgs<T> a,
                                    const acc_t<T>* __restrict__ planes, int64_t latent_tiles,
                                    int64_t chunk, acc_t<T>* __restrict__ partial) {
  using Acc = acc_t<T>;
  constexpr int TM = Tl::TM, TN = Tl::TN, BK = Tl::BK, BM = Tl::BM, BN = Tl::BN;
  using GLoader = TileLoader<Acc, Acc, BM, BK, Tl::THREADS, true>;  // planes (B, k)
  using WLoader = TileLoader<T, Acc, BN, BK, Tl::THREADS, false>;   // A, H (k, d) as [p][i]
  struct Smem {
    Acc g[kNumBernoulliPlanes][BK][BM + 1];  // [pixel][sample]
    Acc a[BK][BN], h[BK][BN], em[BK][BN];    // a, h, expm1(h) (0 where |h| is large): [pixel][latent]
  };
  __shared__ Smem sm;

  const TileCoord tc = tile_coord(blockIdx.x, latent_tiles);
  const int64_t n0 = tc.row_tile * BM, i0 = tc.col_tile * BN;
  const int64_t split = blockIdx.z;
  const int64_t p_begin = split * chunk;
  const int64_t p_end = p_begin + chunk < a.k ? p_begin + chunk : a.k;
  const int lane = threadIdx.x & 31, wy = threadIdx.x >> 5;

  Acc lv[TM][TN], sg[TM][TN], sq[TM][TN], sv[TM][TN], acc[TM][TN], ghm[TM], hsum[TN];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t n = n0 + wy * TM + i;
    ghm[i] = n < a.B ? Acc(0.5) * load_acc(a.grad, n) : Acc(0);
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t c = i0 + lane + 32 * j;
      lv[i][j] = n < a.B && c < a.d ? load_acc(a.logits, offset2d(n, c, a.d)) : Acc(0);
      const LatentTilt<Acc> u = untilted<Acc>(lv[i][j]);
      sg[i][j] = u.mean;
      sq[i][j] = untilted<Acc>(-lv[i][j]).mean;  // 1 - p without cancellation
      sv[i][j] = u.var;
      acc[i][j] = Acc(0);
    }
  }
#pragma unroll
  for (int j = 0; j < TN; ++j) hsum[j] = Acc(0);

  const int64_t plane = a.B * a.k;
  GLoader gl[kNumBernoulliPlanes];
  WLoader wa, wh;
  const int64_t steps = p_end > p_begin ? ceil_div(p_end - p_begin, BK) : 0;
  if (steps > 0) {
#pragma unroll
    for (int q = 0; q < kNumBernoulliPlanes; ++q)
      gl[q].load(planes + q * plane, a.k, n0, a.B, p_begin, p_end);
    wa.load(a.weight, a.d, i0, a.d, p_begin, p_end);
    wh.load(a.lweight, a.d, i0, a.d, p_begin, p_end);
  }
  for (int64_t s = 0; s < steps; ++s) {
#pragma unroll
    for (int q = 0; q < kNumBernoulliPlanes; ++q) gl[q].store(sm.g[q]);
    wa.store(sm.a);
    wh.store(sm.h);
#pragma unroll
    for (int t = 0; t < WLoader::PER; ++t) {
      const int e = static_cast<int>(threadIdx.x) + t * Tl::THREADS;
      if (WLoader::N % Tl::THREADS == 0 || e < WLoader::N) {
        const int m = e % BN, kk = e / BN;  // WLoader's (reduction-major) element mapping
        const Acc h = wh.reg[t];
        sm.em[kk][m] = fabs(h) < Acc(kTiltDiffSwitch) ? expm1(h) : Acc(0);
      }
    }
    __syncthreads();
    if (s + 1 < steps) {
      const int64_t c0 = p_begin + (s + 1) * BK;
#pragma unroll
      for (int q = 0; q < kNumBernoulliPlanes; ++q)
        gl[q].load(planes + q * plane, a.k, n0, a.B, c0, p_end);
      wa.load(a.weight, a.d, i0, a.d, c0, p_end);
      wh.load(a.lweight, a.d, i0, a.d, c0, p_end);
    }
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      Acc av[TN], hv[TN], ev[TN];
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        av[j] = sm.a[kk][lane + 32 * j];
        hv[j] = sm.h[kk][lane + 32 * j];
        ev[j] = sm.em[kk][lane + 32 * j];
        hsum[j] += hv[j];
      }
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const int r = wy * TM + i;
        const Acc gS = sm.g[kGS][kk][r], gT1 = sm.g[kGT1][kk][r], gT2 = sm.g[kGT2][kk][r];
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          const LatentTilt<Acc> t = tilted_moments<Acc>(lv[i][j], hv[j]);
          const Acc dmean = fabs(hv[j]) < Acc(kTiltDiffSwitch) ? -t.mean * sq[i][j] * ev[j]
                                                               : t.mean - sg[i][j];  // mu' - p
          acc[i][j] += gS * dmean + tilt_t_weight<Acc>(t, av[j], gT1, gT2);
        }
      }
    }
    __syncthreads();
  }
  // + sum_p 0.5 grad[n] h_pi p_i (1 - p_i)   (hm = sum_i h_i sigmoid(l_i))
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t n = n0 + wy * TM + i;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t c = i0 + lane + 32 * j;
      if (n < a.B && c < a.d)
        partial[offset3d(split, n, c, a.B, a.d)] = acc[i][j] + ghm[i] * sv[i][j] * hsum[j];
    }
  }
}

// ----------------------------------------------------------------- backward 3: dA, dH
// Block: BM pixels x BN latents; reduces samples [split * chunk, +chunk) in steps of BK.
template <class Tl, typename T>
__global__ void __launch_bounds__(Tl::THREADS, Tl::MINB)
    bernoulli_logvar_dweight_kernel(const BernoulliLogvarArgs<T> a,
                                    const acc_t<T>* __restrict__ planes, bool need_a,
                                    bool need_h, int64_t latent_tiles, int64_t chunk,
                                    acc_t<T>* __restrict__ partial) {
  using Acc = acc_t<T>;
  constexpr int TM = Tl::TM, TN = Tl::TN, BK = Tl::BK, BM = Tl::BM, BN = Tl::BN;
  using GLoader = TileLoader<Acc, Acc, BM, BK, Tl::THREADS, false>;  // planes (B, k) as [n][p]
  using LLoader = TileLoader<T, Acc, BN, BK, Tl::THREADS, false>;    // logits (B, d) as [n][i]
  struct Smem {
    Acc g[kNumBernoulliPlanes][BK][BM];  // [sample][pixel]
    Acc l[BK][BN], gsg[BK][BN];          // logit, 0.5 grad[n] sigmoid(logit): [sample][latent]
  };
  __shared__ Smem sm;

  const TileCoord tc = tile_coord(blockIdx.x, latent_tiles);
  const int64_t p0 = tc.row_tile * BM, i0 = tc.col_tile * BN;
  const int64_t split = blockIdx.z;
  const int64_t n_begin = split * chunk;
  const int64_t n_end = n_begin + chunk < a.B ? n_begin + chunk : a.B;
  const int lane = threadIdx.x & 31, wy = threadIdx.x >> 5;

  Acc av[TM][TN], hv[TM][TN], da[TM][TN], dh[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t p = p0 + wy * TM + i;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t c = i0 + lane + 32 * j;
      const bool in = p < a.k && c < a.d;
      av[i][j] = in ? load_acc(a.weight, offset2d(p, c, a.d)) : Acc(0);
      hv[i][j] = in ? load_acc(a.lweight, offset2d(p, c, a.d)) : Acc(0);
      da[i][j] = dh[i][j] = Acc(0);
    }
  }

  const int64_t plane = a.B * a.k;
  GLoader gl[kNumBernoulliPlanes];
  LLoader ll;
  const int64_t steps = n_end > n_begin ? ceil_div(n_end - n_begin, BK) : 0;
  if (steps > 0) {
#pragma unroll
    for (int q = 0; q < kNumBernoulliPlanes; ++q)
      gl[q].load(planes + q * plane, a.k, p0, a.k, n_begin, n_end);
    ll.load(a.logits, a.d, i0, a.d, n_begin, n_end);
  }
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t c0 = n_begin + s * BK;
#pragma unroll
    for (int q = 0; q < kNumBernoulliPlanes; ++q) gl[q].store(sm.g[q]);
#pragma unroll
    for (int t = 0; t < LLoader::PER; ++t) {
      const int e = static_cast<int>(threadIdx.x) + t * Tl::THREADS;
      if (LLoader::N % Tl::THREADS == 0 || e < LLoader::N) {
        const int m = e % BN, kk = e / BN;  // LLoader's (reduction-major) element mapping
        const int64_t n = c0 + kk;
        const Acc l = ll.reg[t];
        sm.l[kk][m] = l;
        sm.gsg[kk][m] = n < n_end ? Acc(0.5) * load_acc(a.grad, n) * untilted<Acc>(l).mean : Acc(0);
      }
    }
    __syncthreads();
    if (s + 1 < steps) {
#pragma unroll
      for (int q = 0; q < kNumBernoulliPlanes; ++q)
        gl[q].load(planes + q * plane, a.k, p0, a.k, c0 + BK, n_end);
      ll.load(a.logits, a.d, i0, a.d, c0 + BK, n_end);
    }
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      Acc lj[TN], gj[TN];
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        lj[j] = sm.l[kk][lane + 32 * j];
        gj[j] = sm.gsg[kk][lane + 32 * j];
      }
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const int r = wy * TM + i;
        const Acc gS = sm.g[kGS][kk][r], gT1 = sm.g[kGT1][kk][r], gT2 = sm.g[kGT2][kk][r];
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          const LatentTilt<Acc> t = tilted_moments<Acc>(lj[j], hv[i][j]);
          da[i][j] += gT1 * t.mean + Acc(2) * gT2 * av[i][j] * t.var;
          dh[i][j] += gj[j] - gS * t.mean - tilt_t_weight<Acc>(t, av[i][j], gT1, gT2);
        }
      }
    }
    __syncthreads();
  }
  const int nwout = int(need_a) + int(need_h);
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t p = p0 + wy * TM + i;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t c = i0 + lane + 32 * j;
      if (p >= a.k || c >= a.d) continue;
      if (need_a) partial[offset3d(split * nwout, p, c, a.k, a.d)] = da[i][j];
      if (need_h) partial[offset3d(split * nwout + int(need_a), p, c, a.k, a.d)] = dh[i][j];
    }
  }
}

template <typename T>
cudaError_t zero_out(T* p, int64_t n, cudaStream_t stream) {
  if (p == nullptr || n == 0) return cudaSuccess;
  return cudaMemsetAsync(p, 0, static_cast<size_t>(n) * sizeof(T), stream);  // 0.0 in every T
}

}  // namespace

template <typename T>
cudaError_t bernoulli_logvar_backward(const BernoulliLogvarArgs<T>& a,
                                      const BernoulliLogvarPlan& plan, acc_t<T>* ws,
                                      const BernoulliLogvarGrads<T>& out, cudaStream_t stream) {
  using Acc = acc_t<T>;
  using Tls = BernoulliTiles<Acc>;
  using TS = typename Tls::Sums;
  using LG = typename Tls::Logits;
  using WG = typename Tls::Weights;
  const int64_t B = a.B, k = a.k, d = a.d;
  if (B == 0) {  // an empty batch: the loss is 0, so are the decoder gradients
    SK_CUDA_TRY(zero_out(out.weight, k * d, stream));
    SK_CUDA_TRY(zero_out(out.lweight, k * d, stream));
    SK_CUDA_TRY(zero_out(out.bias, k, stream));
    return zero_out(out.lbias, k, stream);
  }
  Acc* planes = ws + plan.off_planes;
  Acc* colpart = ws + plan.off_colsum;
  const int64_t rt = plan.coef_row_tiles;

  if (plan.run_coef) {
    unsigned blocks = 0;
    SK_CUDA_TRY((sums_grid<TS, T>(a, blocks)));
    if (blocks > 0) {
      bernoulli_logvar_coef_kernel<TS, T><<<blocks, TS::THREADS, 0, stream>>>(
          a, plan.pixel_tiles, plan.planes, planes, plan.colsums, colpart, out.x);
      SK_CUDA_TRY(last_error());
    }
  }
  if (plan.need_logits && out.logits != nullptr && d > 0) {
    const int64_t latent_tiles = ceil_div(d, LG::BN);
    const int64_t tiles = ceil_div(B, LG::BM) * latent_tiles;
    if (!grid_fits(tiles) || plan.l_split < 1 || plan.l_split > 65535)
      return cudaErrorInvalidConfiguration;
    Acc* part = ws + plan.off_logits;
    const dim3 grid(static_cast<unsigned>(tiles), 1u, static_cast<unsigned>(plan.l_split));
    bernoulli_logvar_dlogits_kernel<LG, T><<<grid, LG::THREADS, 0, stream>>>(
        a, planes, latent_tiles, plan.l_chunk, part);
    SK_CUDA_TRY(last_error());
    SK_CUDA_TRY((launch_sum_rows<Acc, T>(part, plan.l_split, B * d, B * d, nullptr, out.logits, stream)));
  }
  if (plan.nwout > 0 && k > 0 && d > 0) {
    const int64_t latent_tiles = ceil_div(d, WG::BN);
    const int64_t tiles = ceil_div(k, WG::BM) * latent_tiles;
    if (!grid_fits(tiles) || plan.w_split < 1 || plan.w_split > 65535)
      return cudaErrorInvalidConfiguration;
    Acc* part = ws + plan.off_w;
    const dim3 grid(static_cast<unsigned>(tiles), 1u, static_cast<unsigned>(plan.w_split));
    bernoulli_logvar_dweight_kernel<WG, T><<<grid, WG::THREADS, 0, stream>>>(
        a, planes, plan.need_a, plan.need_h, latent_tiles, plan.w_chunk, part);
    SK_CUDA_TRY(last_error());
    const int64_t per = k * d, ld = plan.nwout * per;
    int o = 0;
    if (plan.need_a) {
      if (out.weight != nullptr)
        SK_CUDA_TRY((launch_sum_rows<Acc, T>(part, plan.w_split, per, ld, nullptr, out.weight, stream)));
      ++o;
    }
    if (plan.need_h && out.lweight != nullptr)
      SK_CUDA_TRY((launch_sum_rows<Acc, T>(part + o * per, plan.w_split, per, ld, nullptr, out.lweight, stream)));
  }
  if (out.bias != nullptr && plan.colsums.slot[kColBias] >= 0)
    SK_CUDA_TRY((launch_sum_rows<Acc, T>(colpart + plan.colsums.slot[kColBias] * rt * k, rt, k, k,
                                         nullptr, out.bias, stream)));
  if (out.lbias != nullptr && plan.colsums.slot[kColLbias] >= 0)
    SK_CUDA_TRY((launch_sum_rows<Acc, T>(colpart + plan.colsums.slot[kColLbias] * rt * k, rt, k, k,
                                         nullptr, out.lbias, stream)));
  return cudaSuccess;
}

#define SK_INSTANTIATE(T)                                                                       \
  template cudaError_t bernoulli_logvar_backward<T>(const BernoulliLogvarArgs<T>&,               \
                                                    const BernoulliLogvarPlan&, acc_t<T>*,       \
                                                    const BernoulliLogvarGrads<T>&, cudaStream_t);
SK_INSTANTIATE(float)
SK_INSTANTIATE(double)
SK_INSTANTIATE(__half)
SK_INSTANTIATE(__nv_bfloat16)
#undef SK_INSTANTIATE

}  // namespace cuda
}  // namespace silent_kernels
