// The log-variance head on Bernoulli latents (MATH.md §11), fused: forward, backward and plans.
//
// Latents z_i ~ Bernoulli(sigmoid(l_i)) per sample; decoder mean a_p.z + b_p, log-variance
// h_p.z + h0_p. Every (sample n, pixel p, latent i) triple tilts latent i by -h_pi
// (epilogue.h bernoulli_tilt: one exp, one log1p, one reciprocal) and the tile kernels reduce
// the tilted quantities over i in registers, so no (B, k, d) tensor is ever stored:
//   hm = sum_i h_i sigmoid(l_i), S = sum_i K_i(-h_i), T1 = sum_i a_i mu'_i, T2 = sum_i a_i^2 v'_i
// then the per-pixel loss / derivatives come from tilted_logvar_pixel_nll / _grad.
//
// Forward: one block per (sample tile, pixel tile); per-sample partial losses per pixel tile,
//   summed in a fixed order (launch_sum_rows).
// Backward (the tilt is recomputed in each O(Bkd) stage rather than stored):
//   1. coefficient kernel (same tiling as the forward): planes gS, gT1, gT2 (times grad[n]),
//      dx = -gT1, per-sample-tile column sums of gT1 (bias) and 0.5 grad[n] - gS (h0);
//   2. dlogits[n, i] = sum_p [w - gS p_i + 0.5 grad[n] h_pi p_i (1 - p_i)] with
//      w = gS mu' + gT1 a v' + gT2 a^2 v' (1 - 2 mu'), p_i = sigmoid(l_i): output tiles
//      (samples x latents) reducing over pixel chunks, (split, B, d) partials;
//   3. dA[p, i] = sum_n [gT1 mu' + 2 gT2 a v'], dH[p, i] = sum_n [0.5 grad[n] p_i - w]: output
//      tiles (pixels x latents) reducing over sample chunks, (split, outputs, k, d) partials;
//   4. bias / h0 gradients from the column sums.
// All partial sums are reduced in a fixed order (deterministic, no atomics); offsets int64;
// accumulation in acc_t (fp32, fp64 for double inputs).
#include <algorithm>

#include "common.cuh"

namespace silent_kernels {
namespace cuda {

namespace {

// Tile shapes (Tile<warps, rows per warp, columns per lane / 32, reduction step, min blocks>).
// The work per triple is a few transcendentals, not an FMA: small register tiles suffice.
template <typename Acc>
struct BernoulliTiles;
template <>
struct BernoulliTiles<float> {
  using Sums = Tile<8, 2, 2, 16, 2>;     // 16 samples x 64 pixels, 16 latents a step
  using Logits = Tile<8, 4, 1, 16, 2>;   // 32 samples x 32 latents, 16 pixels a step
  using Weights = Tile<8, 4, 1, 16, 2>;  // 32 pixels  x 32 latents, 16 samples a step
};
template <>
struct BernoulliTiles<double> {
  using Sums = Tile<8, 2, 1, 8, 2>;      // 16 samples x 32 pixels, 8 latents a step
  using Logits = Tile<8, 2, 1, 8, 2>;
  using Weights = Tile<8, 2, 1, 8, 2>;
};

// Mean sigmoid(l) and variance sigmoid(l) sigmoid(-l) of an untilted latent (its log-MGF part
// is dead code and eliminated).
template <typename Acc>
__device__ __forceinline__ LatentTilt<Acc> untilted(Acc l) {
  return bernoulli_tilt<Acc>(l, Acc(0), Acc(0), Acc(0));
}

// Tilted mean and variance only (the backward stages): the log-MGF part is eliminated.
template <typename Acc>
__device__ __forceinline__ LatentTilt<Acc> tilted_moments(Acc l, Acc h) {
  return bernoulli_tilt<Acc>(l, Acc(0), Acc(0), h);
}

// log sigmoid(l) = min(l, 0) - log1p(exp(-|l|)), exact at saturated and infinite logits.
template <typename Acc>
__device__ __forceinline__ Acc log_sigmoid(Acc l) {
  return (l < Acc(0) ? l : Acc(0)) - log1p(exp(-fabs(l)));
}

// ----------------------------------------------------------------- tilted contraction
// For a BM x BN tile of (sample, pixel): the TiltedSums of each output, accumulated over the
// latents in steps of BK. Logits are staged with log p, log q (p = sigmoid(l), q = 1 - p) and
// p (computed once per (sample, latent) per block), A and H as [latent][pixel].
template <class Tl, typename T>
struct TiltedContraction {
  using Acc = acc_t<T>;
  static constexpr int TM = Tl::TM, TN = Tl::TN, BK = Tl::BK, BM = Tl::BM, BN = Tl::BN;
  using RowLoader = TileLoader<T, Acc, BM, BK, Tl::THREADS, true>;  // logits (B, d)
  using ColLoader = TileLoader<T, Acc, BN, BK, Tl::THREADS, true>;  // A, H (k, d)

  struct Smem {
    Acc l[BK][BM], lp[BK][BM], lq[BK][BM], sg[BK][BM];  // l, log p, log q, p: [latent][sample]
    Acc a[BK][BN + 1], h[BK][BN + 1];        // [latent][pixel]
  };
  struct Accum {
    Acc hm[TM][TN], S[TM][TN], T1[TM][TN], T2[TM][TN];
  };

  static __device__ __forceinline__ void stage(Smem& sm, const RowLoader& rl, const ColLoader& ca,
                                               const ColLoader& ch) {
#pragma unroll
    for (int t = 0; t < RowLoader::PER; ++t) {
      const int e = static_cast<int>(threadIdx.x) + t * Tl::THREADS;
      if (RowLoader::N % Tl::THREADS == 0 || e < RowLoader::N) {
        const int m = e / BK, kk = e % BK;  // RowLoader's (RED_CONTIG) element mapping
        const Acc l = rl.reg[t];
        sm.l[kk][m] = l;
        sm.lp[kk][m] = log_sigmoid<Acc>(l);
        sm.lq[kk][m] = log_sigmoid<Acc>(-l);
        sm.sg[kk][m] = untilted<Acc>(l).mean;
      }
    }
    ca.store(sm.a);
    ch.store(sm.h);
  }

  // Outside the matrices every staged value is 0 (logit 0, a = h = 0): such a latent adds
  // exactly 0 to each sum (K = log q + log1p(1) = -log 2 + log 2, the same two roundings).
  static __device__ __forceinline__ void run(Smem& sm, const BernoulliLogvarArgs<T>& a,
                                             int64_t n0, int64_t p0, Accum& acc) {
    const int lane = threadIdx.x & 31, wy = threadIdx.x >> 5;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc.hm[i][j] = acc.S[i][j] = acc.T1[i][j] = acc.T2[i][j] = Acc(0);

    RowLoader rl;
    ColLoader ca, ch;
    const int64_t steps = ceil_div(a.d, BK);
    if (steps > 0) {
      rl.load(a.logits, a.d, n0, a.B, 0, a.d);
      ca.load(a.weight, a.d, p0, a.k, 0, a.d);
      ch.load(a.lweight, a.d, p0, a.k, 0, a.d);
    }
    for (int64_t s = 0; s < steps; ++s) {
      stage(sm, rl, ca, ch);
      __syncthreads();
      if (s + 1 < steps) {  // next step's loads in flight during this step's arithmetic
        const int64_t c0 = (s + 1) * BK;
        rl.load(a.logits, a.d, n0, a.B, c0, a.d);
        ca.load(a.weight, a.d, p0, a.k, c0, a.d);
        ch.load(a.lweight, a.d, p0, a.k, c0, a.d);
      }
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        Acc av[TN], hv[TN];
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          av[j] = sm.a[kk][lane + 32 * j];
          hv[j] = sm.h[kk][lane + 32 * j];
        }
#pragma unroll
        for (int i = 0; i < TM; ++i) {
          const int r = wy * TM + i;
          const Acc l = sm.l[kk][r], lp = sm.lp[kk][r], lq = sm.lq[kk][r], sg = sm.sg[kk][r];
#pragma unroll
          for (int j = 0; j < TN; ++j) {
            const LatentTilt<Acc> t = bernoulli_tilt<Acc>(l, lp, lq, hv[j]);
            acc.hm[i][j] += hv[j] * sg;
            acc.S[i][j] += t.log_mgf;
            acc.T1[i][j] += av[j] * t.mean;
            acc.T2[i][j] += av[j] * av[j] * t.var;
          }
        }
      }
      __syncthreads();  // the next stage() overwrites the tiles
    }
  }

  static __device__ __forceinline__ TiltedSums<Acc> sums(const Accum& acc, int i, int j) {
    return TiltedSums<Acc>{acc.hm[i][j], acc.S[i][j], acc.T1[i][j], acc.T2[i][j]};
  }
};

// ----------------------------------------------------------------- forward
template <class Tl, typename T>
__global__ void __launch_bounds__(Tl::THREADS, Tl::MINB)
    bernoulli_logvar_forward_kernel(const BernoulliLogvarArgs<T> a, int64_t pixel_tiles,
                                    acc_t<T>* __restrict__ partial) {
  using Acc = acc_t<T>;
  using TC = TiltedContraction<Tl, T>;
  __shared__ typename TC::Smem sm;

  const TileCoord tc = tile_coord(blockIdx.x, pixel_tiles);
  const int64_t n0 = tc.row_tile * Tl::BM, p0 = tc.col_tile * Tl::BN;
  typename TC::Accum acc;
  TC::run(sm, a, n0, p0, acc);

  const int lane = threadIdx.x & 31, wy = threadIdx.x >> 5;
  Acc rowsum[Tl::TM];
#pragma unroll
  for (int i = 0; i < Tl::TM; ++i) rowsum[i] = Acc(0);
#pragma unroll
  for (int j = 0; j < Tl::TN; ++j) {
    const int64_t p = p0 + lane + 32 * j;
    if (p >= a.k) continue;
    const Acc b = ld_or0(a.bias, p), h0 = ld_or0(a.lbias, p);
#pragma unroll
    for (int i = 0; i < Tl::TM; ++i) {
      const int64_t n = n0 + wy * Tl::TM + i;
      if (n < a.B)
        rowsum[i] += tilted_logvar_pixel_nll<Acc>(load_acc(a.x, offset2d(n, p, a.k)), b, h0,
                                                  TC::sums(acc, i, j));
    }
  }
#pragma unroll
  for (int i = 0; i < Tl::TM; ++i) {
    const Acc s = warp_sum(rowsum[i]);
    const int64_t n = n0 + wy * Tl::TM + i;
    if (lane == 0 && n < a.B) partial[offset2d(tc.col_tile, n, a.B)] = s;
  }
}

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

template <typename Acc>
BernoulliLogvarPlan plan_forward_impl(int64_t B, int64_t k) {
  using Tl = typename BernoulliTiles<Acc>::Sums;
  BernoulliLogvarPlan p{};
  p.colsums.slot[0] = p.colsums.slot[1] = -1;
  p.coef_row_tiles = ceil_div(B, Tl::BM);
  p.pixel_tiles = ceil_div(k, Tl::BN);
  p.l_split = p.w_split = 1;
  p.workspace = p.pixel_tiles * B;
  return p;
}

template <typename Acc>
BernoulliLogvarPlan plan_backward_impl(int64_t B, int64_t k, int64_t d,
                                       const BernoulliLogvarNeeds& n) {
  using Tls = BernoulliTiles<Acc>;
  using LG = typename Tls::Logits;
  using WG = typename Tls::Weights;
  BernoulliLogvarPlan p = plan_forward_impl<Acc>(B, k);
  p.run_coef = n.x || n.logits || n.weight || n.bias || n.lweight || n.lbias;
  p.planes = n.logits || n.weight || n.lweight;
  if (n.bias) p.colsums.slot[kColBias] = p.ncolsums++;
  if (n.lbias) p.colsums.slot[kColLbias] = p.ncolsums++;
  p.need_logits = n.logits;
  const Split ls = choose_split(ceil_div(B, LG::BM) * ceil_div(d, LG::BN), k, LG::BK);
  p.l_split = ls.split;
  p.l_chunk = ls.chunk;
  p.need_a = n.weight;
  p.need_h = n.lweight;
  p.nwout = int(p.need_a) + int(p.need_h);
  const Split ws = choose_split(ceil_div(k, WG::BM) * ceil_div(d, WG::BN), B, WG::BK);
  p.w_split = ws.split;
  p.w_chunk = ws.chunk;
  int64_t off = 0;
  p.off_planes = off;
  off += p.planes ? kNumBernoulliPlanes * B * k : 0;
  p.off_colsum = off;
  off += p.ncolsums * p.coef_row_tiles * k;
  p.off_logits = off;
  off += p.need_logits ? p.l_split * B * d : 0;
  p.off_w = off;
  off += p.nwout > 0 ? p.w_split * p.nwout * k * d : 0;
  p.workspace = off;
  return p;
}

template <class Tl, typename T>
cudaError_t sums_grid(const BernoulliLogvarArgs<T>& a, unsigned& blocks) {
  const int64_t n = ceil_div(a.B, Tl::BM) * ceil_div(a.k, Tl::BN);
  if (n > 0 && !grid_fits(n)) return cudaErrorInvalidConfiguration;
  blocks = static_cast<unsigned>(n);
  return cudaSuccess;
}

}  // namespace

BernoulliLogvarPlan plan_bernoulli_logvar_forward(int64_t B, int64_t k, int64_t d, bool is_double) {
  (void)d;
  return is_double ? plan_forward_impl<double>(B, k) : plan_forward_impl<float>(B, k);
}

BernoulliLogvarPlan plan_bernoulli_logvar_backward(int64_t B, int64_t k, int64_t d, bool is_double,
                                                   const BernoulliLogvarNeeds& needs) {
  return is_double ? plan_backward_impl<double>(B, k, d, needs)
                   : plan_backward_impl<float>(B, k, d, needs);
}

template <typename T>
cudaError_t bernoulli_logvar_forward(const BernoulliLogvarArgs<T>& a, const BernoulliLogvarPlan& plan,
                                     acc_t<T>* workspace, T* loss, cudaStream_t stream) {
  using Acc = acc_t<T>;
  using Tl = typename BernoulliTiles<Acc>::Sums;
  if (a.B == 0) return cudaSuccess;
  unsigned blocks = 0;
  SK_CUDA_TRY((sums_grid<Tl, T>(a, blocks)));
  if (blocks > 0) {
    bernoulli_logvar_forward_kernel<Tl, T><<<blocks, Tl::THREADS, 0, stream>>>(a, plan.pixel_tiles, workspace);
    SK_CUDA_TRY(last_error());
  }
  return launch_sum_rows<Acc, T>(workspace, plan.pixel_tiles, a.B, a.B, nullptr, loss, stream);
}

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
  template cudaError_t bernoulli_logvar_forward<T>(const BernoulliLogvarArgs<T>&,                \
                                                   const BernoulliLogvarPlan&, acc_t<T>*, T*,    \
                                                   cudaStream_t);                               \
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
