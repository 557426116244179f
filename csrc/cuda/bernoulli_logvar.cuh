// Code shared by bernoulli_logvar*.cu: tile shapes, latent helpers, the tilted contraction and its grid size.
#pragma once

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
    rl.for_each([&](int m, int kk, Acc l) {
      sm.l[kk][m] = l;
      sm.lp[kk][m] = log_sigmoid<Acc>(l);
      sm.lq[kk][m] = log_sigmoid<Acc>(-l);
      sm.sg[kk][m] = untilted<Acc>(l).mean;
    });
    ca.store(sm.a);
    ch.store(sm.h);
  }

  // The sums of this block's tile bt. Outside the matrices every staged value is 0 (logit 0,
  // a = h = 0): such a latent adds exactly 0 to each sum (K = log q + log1p(1) = -log 2 + log 2,
  // the same two roundings).
  static __device__ __forceinline__ void run(const BernoulliLogvarArgs<T>& a, const BlockTile& bt,
                                             Accum& acc) {
    __shared__ Smem sm;
    const int64_t n0 = bt.row0, p0 = bt.col0;
    const int lane = threadIdx.x & 31, wy = threadIdx.x >> 5;
    zero_fill(acc.hm);
    zero_fill(acc.S);
    zero_fill(acc.T1);
    zero_fill(acc.T2);

    RowLoader rl;
    ColLoader ca, ch;
    single_buffered_steps<BK>(
        0, ceil_div(a.d, BK),
        [&](int64_t c0) {
          rl.load(a.logits, a.d, n0, a.B, c0, a.d);
          ca.load(a.weight, a.d, p0, a.k, c0, a.d);
          ch.load(a.lweight, a.d, p0, a.k, c0, a.d);
        },
        [&](int64_t) { stage(sm, rl, ca, ch); },
        [&] {
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
        });
  }

  static __device__ __forceinline__ TiltedSums<Acc> sums(const Accum& acc, int i, int j) {
    return TiltedSums<Acc>{acc.hm[i][j], acc.S[i][j], acc.T1[i][j], acc.T2[i][j]};
  }
};

}  // namespace

}  // namespace cuda
}  // namespace silent_kernels
