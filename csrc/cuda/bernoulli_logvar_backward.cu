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
  const BlockTile bt = block_tile<Tl>(pixel_tiles);
  typename TC::Accum acc;
  TC::run(a, bt, acc);

  write_tile_coefs<Tl>(
      bt, a.grad, a.B, a.k, colsums, colpart,
      [&](int64_t p) { return load_pixel_pair(a.bias, a.lbias, p); },
      [&](int i, int j, int64_t n, int64_t p, const PixelPair<Acc>& b, Acc gn) {
        const int64_t off = offset2d(n, p, a.k);
        const TiltedSums<Acc> g =
            tilted_logvar_pixel_grad<Acc>(load_acc(a.x, off), b.first, b.second, TC::sums(acc, i, j));
        const Acc gS = gn * g.S, gT1 = gn * g.T1, gT2 = gn * g.T2;
        if (write_planes) {
          planes[offset3d(kGS, n, p, a.B, a.k)] = gS;
          planes[offset3d(kGT1, n, p, a.B, a.k)] = gT1;
          planes[offset3d(kGT2, n, p, a.B, a.k)] = gT2;
        }
        if (dx != nullptr) dx[off] = Cvt<T>::store(-gT1);  // d/dx = -d/dT1
        // column sums kColBias (d/db = d/dT1) and kColLbias (d/dh0 = 1/2 - d/dS)
        return PixelPair<Acc>{gT1, gn * g.hm - gS};
      });
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

// Pointers to the kNumBernoulliPlanes coefficient planes of a (3, B, k) block.
template <typename Acc>
struct PlanePointers {
  const Acc* src[kNumBernoulliPlanes];
};
template <typename Acc>
__device__ __forceinline__ PlanePointers<Acc> plane_pointers(const Acc* planes, int64_t plane) {
  return PlanePointers<Acc>{{planes + kGS * plane, planes + kGT1 * plane, planes + kGT2 * plane}};
}

// The (gS, gT1, gT2) coefficients staged in shared memory as g[plane][kk][r].
template <typename Acc>
struct TiltCoefs {
  Acc gS, gT1, gT2;
};
template <typename Acc, int BK, int LD>
__device__ __forceinline__ TiltCoefs<Acc> staged_coefs(const Acc (&g)[kNumBernoulliPlanes][BK][LD],
                                                       int kk, int r) {
  return TiltCoefs<Acc>{g[kGS][kk][r], g[kGT1][kk][r], g[kGT2][kk][r]};
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

  const BlockTile bt = block_tile<Tl>(latent_tiles);
  const int64_t n0 = bt.row0, i0 = bt.col0;
  const ChunkRange pr = chunk_range(chunk, a.k);
  const int lane = threadIdx.x & 31, wy = threadIdx.x >> 5;

  Acc lv[TM][TN], sg[TM][TN], sq[TM][TN], sv[TM][TN], acc[TM][TN], gs[TM], hsum[TN];
  load_row_grads<Tl>(a.grad, bt, a.B, gs);
  for_each_register<Tl>(bt, [&](int i, int j, int64_t n, int64_t c) {
    lv[i][j] = n < a.B && c < a.d ? load_acc(a.logits, offset2d(n, c, a.d)) : Acc(0);
    const LatentTilt<Acc> u = untilted<Acc>(lv[i][j]);
    sg[i][j] = u.mean;
    sq[i][j] = untilted<Acc>(-lv[i][j]).mean;  // 1 - p without cancellation
    sv[i][j] = u.var;
    acc[i][j] = Acc(0);
  });
  zero_fill(hsum);

  TileGroup<GLoader, kNumBernoulliPlanes> gt;
  WLoader wa, wh;
  single_buffered_steps<BK>(
      pr.begin, pr.steps(BK),
      [&](int64_t c0) {
        gt.load(plane_pointers(planes, a.B * a.k).src, a.k, n0, a.B, c0, pr.end);
        wa.load(a.weight, a.d, i0, a.d, c0, pr.end);
        wh.load(a.lweight, a.d, i0, a.d, c0, pr.end);
      },
      [&](int64_t) {
        gt.store(sm.g);
        wa.store(sm.a);
        wh.store(sm.h);
        wh.for_each([&](int m, int kk, Acc h) {
          sm.em[kk][m] = fabs(h) < Acc(kTiltDiffSwitch) ? expm1(h) : Acc(0);
        });
      },
      [&] {
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
            const TiltCoefs<Acc> g = staged_coefs(sm.g, kk, wy * TM + i);
#pragma unroll
            for (int j = 0; j < TN; ++j) {
              const LatentTilt<Acc> t = tilted_moments<Acc>(lv[i][j], hv[j]);
              const Acc dmean = fabs(hv[j]) < Acc(kTiltDiffSwitch) ? -t.mean * sq[i][j] * ev[j]
                                                                   : t.mean - sg[i][j];  // mu' - p
              acc[i][j] += g.gS * dmean + tilt_t_weight<Acc>(t, av[j], g.gT1, g.gT2);
            }
          }
        }
      });
  // + sum_p 0.5 grad[n] h_pi p_i (1 - p_i)   (hm = sum_i h_i sigmoid(l_i))
  for_each_register<Tl>(bt, [&](int i, int j, int64_t n, int64_t c) {
    if (n < a.B && c < a.d)
      partial[offset3d(pr.split, n, c, a.B, a.d)] = acc[i][j] + Acc(0.5) * gs[i] * sv[i][j] * hsum[j];
  });
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

  const BlockTile bt = block_tile<Tl>(latent_tiles);
  const int64_t p0 = bt.row0, i0 = bt.col0;
  const ChunkRange nr = chunk_range(chunk, a.B);
  const int lane = threadIdx.x & 31, wy = threadIdx.x >> 5;

  Acc av[TM][TN], hv[TM][TN], da[TM][TN], dh[TM][TN];
  for_each_register<Tl>(bt, [&](int i, int j, int64_t p, int64_t c) {
    const bool in = p < a.k && c < a.d;
    av[i][j] = in ? load_acc(a.weight, offset2d(p, c, a.d)) : Acc(0);
    hv[i][j] = in ? load_acc(a.lweight, offset2d(p, c, a.d)) : Acc(0);
    da[i][j] = dh[i][j] = Acc(0);
  });

  TileGroup<GLoader, kNumBernoulliPlanes> gt;
  LLoader ll;
  single_buffered_steps<BK>(
      nr.begin, nr.steps(BK),
      [&](int64_t c0) {
        gt.load(plane_pointers(planes, a.B * a.k).src, a.k, p0, a.k, c0, nr.end);
        ll.load(a.logits, a.d, i0, a.d, c0, nr.end);
      },
      [&](int64_t c0) {
        gt.store(sm.g);
        ll.for_each([&](int m, int kk, Acc l) {
          const int64_t n = c0 + kk;
          sm.l[kk][m] = l;
          sm.gsg[kk][m] = n < nr.end ? Acc(0.5) * load_acc(a.grad, n) * untilted<Acc>(l).mean : Acc(0);
        });
      },
      [&] {
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
            const TiltCoefs<Acc> g = staged_coefs(sm.g, kk, wy * TM + i);
#pragma unroll
            for (int j = 0; j < TN; ++j) {
              const LatentTilt<Acc> t = tilted_moments<Acc>(lj[j], hv[i][j]);
              da[i][j] += g.gT1 * t.mean + Acc(2) * g.gT2 * av[i][j] * t.var;
              dh[i][j] += gj[j] - g.gS * t.mean - tilt_t_weight<Acc>(t, av[i][j], g.gT1, g.gT2);
            }
          }
        }
      });
  const int nwout = int(need_a) + int(need_h);
  for_each_register<Tl>(bt, [&](int i, int j, int64_t p, int64_t c) {
    if (p >= a.k || c >= a.d) return;
    if (need_a) partial[offset3d(nr.split * nwout, p, c, a.k, a.d)] = da[i][j];
    if (need_h) partial[offset3d(nr.split * nwout + int(need_a), p, c, a.k, a.d)] = dh[i][j];
  });
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
    SK_CUDA_TRY(zero_async(out.weight, k * d, stream));
    SK_CUDA_TRY(zero_async(out.lweight, k * d, stream));
    SK_CUDA_TRY(zero_async(out.bias, k, stream));
    return zero_async(out.lbias, k, stream);
  }
  Acc* planes = ws + plan.off_planes;
  Acc* colpart = ws + plan.off_colsum;
  const int64_t rt = plan.coef_row_tiles;

  if (plan.run_coef) {
    unsigned blocks = 0;
    SK_CUDA_TRY(tile_grid(ceil_div(B, TS::BM), ceil_div(k, TS::BN), blocks));
    if (blocks > 0) {
      bernoulli_logvar_coef_kernel<TS, T><<<blocks, TS::THREADS, 0, stream>>>(
          a, plan.pixel_tiles, plan.planes, planes, plan.colsums, colpart, out.x);
      SK_CUDA_TRY(last_error());
    }
  }
  if (plan.need_logits && out.logits != nullptr && d > 0) {
    const int64_t latent_tiles = ceil_div(d, LG::BN);
    dim3 grid;
    SK_CUDA_TRY(split_grid(ceil_div(B, LG::BM) * latent_tiles, plan.l_split, grid));
    Acc* part = ws + plan.off_logits;
    bernoulli_logvar_dlogits_kernel<LG, T><<<grid, LG::THREADS, 0, stream>>>(
        a, planes, latent_tiles, plan.l_chunk, part);
    SK_CUDA_TRY(last_error());
    SK_CUDA_TRY((launch_sum_rows<Acc, T>(part, plan.l_split, B * d, B * d, nullptr, out.logits, stream)));
  }
  if (plan.nwout > 0 && k > 0 && d > 0) {
    const int64_t latent_tiles = ceil_div(d, WG::BN);
    dim3 grid;
    SK_CUDA_TRY(split_grid(ceil_div(k, WG::BM) * latent_tiles, plan.w_split, grid));
    Acc* part = ws + plan.off_w;
    bernoulli_logvar_dweight_kernel<WG, T><<<grid, WG::THREADS, 0, stream>>>(
        a, planes, plan.need_a, plan.need_h, latent_tiles, plan.w_chunk, part);
    SK_CUDA_TRY(last_error());
    SK_CUDA_TRY(finish_weight_splits<T>(part, plan.w_split, plan.need_a, plan.need_h, k * d,
                                        out.weight, out.lweight, stream));
  }
  SK_CUDA_TRY(finish_colsum(colpart, plan.colsums.slot[kColBias], rt, k, out.bias, stream));
  return finish_colsum(colpart, plan.colsums.slot[kColLbias], rt, k, out.lbias, stream);
}

#define SK_INSTANTIATE(T)                                                                       \
  template cudaError_t bernoulli_logvar_backward<T>(const BernoulliLogvarArgs<T>&,               \
                                                    const BernoulliLogvarPlan&, acc_t<T>*,       \
                                                    const BernoulliLogvarGrads<T>&, cudaStream_t);
SK_CUDA_FOR_EACH_TYPE(SK_INSTANTIATE)
#undef SK_INSTANTIATE

}  // namespace cuda
}  // namespace silent_kernels
