// The device side of the categorical backend: launch shapes and the softmax, forward and gradient kernels.
#pragma once

#include "categorical.h"
#include "common.cuh"

namespace silent_kernels {
namespace cuda {

namespace {

constexpr int kPairWarps = 8;                  // (sample, pixel) kernels: 8 samples x 32 pixels
constexpr int kPairThreads = 32 * kPairWarps;
using PairTile = Tile<kPairWarps, 1, 1, 1>;    // the layout write_colsums expects (BM 8, BN 32)
constexpr int kGroupThreads = 128;             // per-group gradient kernels: (row, group) pairs
constexpr int kRowThreads = 256;               // softmax kernel: (sample, group) rows
constexpr int kSplitStep = 8;                  // granularity of the split reductions

// The per-group gradient kernels accumulate a thread's K values in shared memory (one padded row
// per thread: conflict-free) when K is at most this, else directly in its slice of the partials.
template <typename Acc>
struct SmemCats {
  static constexpr int value = sizeof(Acc) == 8 ? 16 : 32;
};

// ----------------------------------------------------------------- stage 0: per-group softmax
// out[n, g K + j] = log_softmax(logits[n, g, :])_j (LOG) or its exp, in acc_t.
template <typename T, bool LOG>
__global__ void __launch_bounds__(kRowThreads)
    categorical_softmax_kernel(const T* __restrict__ logits, int64_t rows, int64_t K,
                               acc_t<T>* __restrict__ out) {
  using Acc = acc_t<T>;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x;
  if (r >= rows) return;
  const int64_t base = offset2d(r, 0, K);
  Acc mx = load_acc(logits, base);
  for (int64_t j = 1; j < K; ++j) {
    const Acc v = load_acc(logits, base + j);
    mx = v > mx ? v : mx;
  }
  Acc s = Acc(0);
  for (int64_t j = 0; j < K; ++j) s += exp(load_acc(logits, base + j) - mx);
  const Acc log_s = log(s);
  for (int64_t j = 0; j < K; ++j) {
    const Acc v = (load_acc(logits, base + j) - mx) - log_s;
    out[base + j] = LOG ? v : exp(v);
  }
}

// ----------------------------------------------------------------- per (sample, pixel) sums
template <Head HD, typename T>
struct PixelSums {
  using Acc = acc_t<T>;

  // The contractions of (n, p) over the groups (biases included); prob: row n of the
  // probabilities. Fixed head: only ubar and Saa.
  static __device__ __forceinline__ PixelTerms<Acc> terms(const CategoricalArgs<T>& a,
                                                          const Acc* __restrict__ prob, int64_t p,
                                                          Acc b, Acc b2) {
    const int64_t d = a.G * a.K;
    const int K = static_cast<int>(a.K);
    const T* arow = a.weight + offset2d(p, 0, d);
    const T* crow = HD == Head::kFixed ? nullptr : a.second_weight + offset2d(p, 0, d);
    PixelTerms<Acc> t{b, b2, Acc(0), Acc(0), Acc(0), Acc(0), Acc(0), Acc(0), Acc(0), Acc(0)};
    for (int64_t g = 0; g < a.G; ++g) {
      const int64_t c0 = g * a.K;
      add_group(t, group_stats<Acc, T>(arow + c0, crow == nullptr ? nullptr : crow + c0, prob + c0, K,
                                       HD != Head::kFixed));
    }
    return t;
  }

  // Log-variance head: the tilted sums of (n, p); lp: row n of the log-probabilities.
  static __device__ __forceinline__ TiltedSums<Acc> tilted(const CategoricalArgs<T>& a,
                                                           const Acc* __restrict__ lp, int64_t p) {
    const int64_t d = a.G * a.K;
    const int K = static_cast<int>(a.K);
    const T* arow = a.weight + offset2d(p, 0, d);
    const T* hrow = a.second_weight + offset2d(p, 0, d);
    TiltedSums<Acc> s{Acc(0), Acc(0), Acc(0), Acc(0)};
    for (int64_t c0 = 0; c0 < d; c0 += a.K) {  // (a loop over offsets: no spills around divisions)
      const TiltedGroup<Acc> t = tilt_group<Acc, T>(arow + c0, hrow + c0, lp + c0, K);
      s.hm += t.hm;
      s.S += t.log_mgf;
      s.T1 += t.mean;
      s.T2 += t.var;
    }
    return s;
  }

  static __device__ __forceinline__ Acc loss(const CategoricalArgs<T>& a, const Acc* __restrict__ prob,
                                             int64_t n, int64_t p) {
    if constexpr (HD == Head::kLogVar) {
      const TiltedSums<Acc> s = tilted(a, prob, p);  // first: few registers live in the loop
      return tilted_logvar_pixel_nll<Acc>(load_acc(a.x, offset2d(n, p, a.k)), ld_or0(a.bias, p),
                                          ld_or0(a.second_bias, p), s);
    }
    const Acc x = load_acc(a.x, offset2d(n, p, a.k));
    const Acc b = ld_or0(a.bias, p), b2 = ld_or0(a.second_bias, p);
    if constexpr (HD == Head::kFixed) {
      // 1 / sigma2 before the loop over the groups: few registers live across the division
      const Acc s2 = load_acc(a.sigma2, p), inv = Acc(1) / s2, log_s2 = log(s2);
      const PixelTerms<Acc> t = terms(a, prob, p, b, Acc(0));
      return fixed_pixel_nll<Acc>(x - t.ubar, t.Saa, inv, log_s2);
    } else {
      return precision_pixel_nll<Acc>(x, terms(a, prob, p, b, b2));
    }
  }
};

// ----------------------------------------------------------------- stage 1: forward
template <Head HD, typename T>
__global__ void __launch_bounds__(kPairThreads)
    categorical_forward_kernel(const CategoricalArgs<T> a, const acc_t<T>* __restrict__ prob,
                               int64_t pixel_tiles, acc_t<T>* __restrict__ partial) {
  using Acc = acc_t<T>;
  const TileCoord tc = tile_coord(blockIdx.x, pixel_tiles);
  const int lane = threadIdx.x & 31, wy = threadIdx.x >> 5;
  const int64_t n = tc.row_tile * kPairWarps + wy, p = tc.col_tile * 32 + lane;
  Acc v = Acc(0);
  if (n < a.B && p < a.k) v = PixelSums<HD, T>::loss(a, prob + offset2d(n, 0, a.G * a.K), n, p);
  v = warp_sum(v);  // every lane takes part
  if (lane == 0 && n < a.B) partial[offset2d(tc.col_tile, n, a.B)] = v;
}

// ----------------------------------------------------------------- stage 2: coefficients
// Plane order: fixed (g_ubar, g_Saa); Taylor: PixelTerms order; log-variance (hm, S, T1, T2).
template <Head HD, typename T>
__global__ void __launch_bounds__(kPairThreads)
    categorical_coef_kernel(const CategoricalArgs<T> a, const acc_t<T>* __restrict__ prob,
                            int64_t pixel_tiles, bool write_planes, acc_t<T>* __restrict__ planes,
                            const ColSumSlots colsums, acc_t<T>* __restrict__ colpart,
                            T* __restrict__ dx) {
  using Acc = acc_t<T>;
  using PS = PixelSums<HD, T>;
  const TileCoord tc = tile_coord(blockIdx.x, pixel_tiles);
  const int lane = threadIdx.x & 31, wy = threadIdx.x >> 5;
  const int64_t n = tc.row_tile * kPairWarps + wy, p0 = tc.col_tile * 32, p = p0 + lane;
  Acc cs[kNumColSums][1] = {{Acc(0)}, {Acc(0)}};
  if (n < a.B && p < a.k) {
    const int64_t off = offset2d(n, p, a.k), plane = a.B * a.k;
    const Acc* row = prob + offset2d(n, 0, a.G * a.K);
    TiltedSums<Acc> ts{};
    if constexpr (HD == Head::kLogVar) ts = PS::tilted(a, row, p);  // first: few registers live
    const Acc x = load_acc(a.x, off), gn = load_acc(a.grad, n);
    const Acc b = ld_or0(a.bias, p), b2 = ld_or0(a.second_bias, p);
    Acc dxv;
    if constexpr (HD == Head::kLogVar) {
      const TiltedSums<Acc> g = tilted_logvar_pixel_grad<Acc>(x, b, b2, ts);
      const Acc v[4] = {gn * g.hm, gn * g.S, gn * g.T1, gn * g.T2};
      if (write_planes)
#pragma unroll
        for (int q = 0; q < 4; ++q) planes[q * plane + off] = v[q];
      dxv = -v[2];
      cs[kCatColBias][0] = v[2];            // d/db = d/dT1
      cs[kCatColSecond][0] = v[0] - v[1];   // d/dh0 = 1/2 - d/dS
    } else if constexpr (HD == Head::kFixed) {
      const Acc inv = Acc(1) / load_acc(a.sigma2, p);  // before the loop over the groups
      const PixelTerms<Acc> t = PS::terms(a, row, p, b, Acc(0));
      const Acc resid = x - t.ubar;
      const Acc gu = -resid * inv * gn, gs = Acc(0.5) * inv * gn;
      if (write_planes) {
        planes[off] = gu;
        planes[plane + off] = gs;
      }
      dxv = -gu;
      cs[kCatColBias][0] = gu;
      cs[kCatColSecond][0] = gn * fixed_pixel_dsigma2<Acc>(resid, t.Saa, inv);
    } else {
      const PixelTerms<Acc> g = scaled(precision_pixel_grad<Acc>(x, PS::terms(a, row, p, b, b2)), gn);
      if (write_planes) {
        const Acc v[10] = {g.ubar, g.vbar, g.Saa, g.Scc, g.Sac, g.Tacc, g.Taac, g.C3, g.Q, g.C4};
#pragma unroll
        for (int q = 0; q < 10; ++q) planes[q * plane + off] = v[q];
      }
      dxv = -g.ubar;
      cs[kCatColBias][0] = g.ubar;
      cs[kCatColSecond][0] = g.vbar;
    }
    if (dx != nullptr) dx[off] = Cvt<T>::store(dxv);
  }
  write_colsums<PairTile>(cs, colsums, tc.row_tile, ceil_div(a.B, kPairWarps), p0, a.k, colpart);
}

// The coefficients of (n, p) from the planes.
template <typename Acc>
__device__ __forceinline__ PixelTerms<Acc> load_terms(Head hd, const Acc* __restrict__ planes,
                                                      int64_t plane, int64_t off) {
  if (hd == Head::kFixed)
    return PixelTerms<Acc>{planes[off], Acc(0), planes[plane + off], Acc(0), Acc(0),
                           Acc(0),      Acc(0), Acc(0),              Acc(0), Acc(0)};
  Acc v[10];
#pragma unroll
  for (int q = 0; q < 10; ++q) v[q] = planes[q * plane + off];
  return PixelTerms<Acc>{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9]};
}
template <typename Acc>
__device__ __forceinline__ TiltedSums<Acc> load_tilted(const Acc* __restrict__ planes, int64_t plane,
                                                       int64_t off) {
  return TiltedSums<Acc>{planes[off], planes[plane + off], planes[2 * plane + off],
                         planes[3 * plane + off]};
}

// The gradient of sum_j g_j contraction_j of one (sample, pixel, group) triple: into dlogit
// (K values) or into da / dc (K values each); any may be null.
template <Head HD, typename T>
__device__ __forceinline__ void triple_grad(const CategoricalArgs<T>& a, const acc_t<T>* __restrict__ prob_g,
                                            const acc_t<T>* __restrict__ planes, int64_t n, int64_t p,
                                            int64_t g, acc_t<T>* dlogit, acc_t<T>* da, acc_t<T>* dc) {
  using Acc = acc_t<T>;
  const int64_t d = a.G * a.K, c0 = offset2d(p, g * a.K, d);
  const int K = static_cast<int>(a.K);
  const int64_t plane = a.B * a.k, off = offset2d(n, p, a.k);
  const T* av = a.weight + c0;
  if constexpr (HD == Head::kLogVar) {
    const T* hv = a.second_weight + c0;
    const TiltedGroup<Acc> t = tilt_group<Acc, T>(av, hv, prob_g, K);
    tilt_group_grad<Acc, T>(av, hv, prob_g, K, t, load_tilted(planes, plane, off), dlogit, da, dc);
  } else {
    const T* cv = HD == Head::kFixed ? nullptr : a.second_weight + c0;
    const GroupStats<Acc> s = group_stats<Acc, T>(av, cv, prob_g, K, HD != Head::kFixed);
    group_grad<Acc, T>(av, cv, prob_g, K, s, load_terms(HD, planes, plane, off), dlogit, da, dc);
  }
}

// ----------------------------------------------------------------- stage 3: dlogits
// Thread (n, g) sums over the pixels [split * chunk, +chunk) into partial[split, n, gK:(g+1)K].
template <Head HD, typename T>
__global__ void __launch_bounds__(kGroupThreads)
    categorical_dlogits_kernel(const CategoricalArgs<T> a, const acc_t<T>* __restrict__ prob,
                               const acc_t<T>* __restrict__ planes, int64_t chunk,
                               acc_t<T>* __restrict__ partial) {
  using Acc = acc_t<T>;
  constexpr int SC = SmemCats<Acc>::value;
  __shared__ Acc acc_s[kGroupThreads][SC + 1];
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kGroupThreads + threadIdx.x;
  if (q >= a.B * a.G) return;  // no block-wide synchronisation below
  const int64_t n = q / a.G, g = q % a.G, d = a.G * a.K;
  const ChunkRange pixels = chunk_range(chunk, a.k);
  Acc* dst = partial + offset3d(pixels.split, n, g * a.K, a.B, d);
  const bool in_smem = a.K <= SC;
  Acc* out = in_smem ? &acc_s[threadIdx.x][0] : dst;
  for (int64_t j = 0; j < a.K; ++j) out[j] = Acc(0);
  const Acc* prob_g = prob + offset2d(n, g * a.K, d);
  for (int64_t p = pixels.begin; p < pixels.end; ++p)
    triple_grad<HD, T>(a, prob_g, planes, n, p, g, out, nullptr, nullptr);
  if (in_smem)
    for (int64_t j = 0; j < a.K; ++j) dst[j] = out[j];
}

// ----------------------------------------------------------------- stage 4: dA, dC / dH
// Thread (p, g) sums over the samples [split * chunk, +chunk) into
// partial[split, o, p, gK:(g+1)K] (o: weight, then second weight, as needed).
template <Head HD, typename T>
__global__ void __launch_bounds__(kGroupThreads)
    categorical_dweight_kernel(const CategoricalArgs<T> a, const acc_t<T>* __restrict__ prob,
                               const acc_t<T>* __restrict__ planes, bool need_a, bool need_c,
                               int64_t chunk, acc_t<T>* __restrict__ partial) {
  using Acc = acc_t<T>;
  constexpr int SC = SmemCats<Acc>::value;
  __shared__ Acc acc_s[2][kGroupThreads][SC + 1];
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kGroupThreads + threadIdx.x;
  if (q >= a.k * a.G) return;  // no block-wide synchronisation below
  const int64_t p = q / a.G, g = q % a.G, d = a.G * a.K;
  const ChunkRange samples = chunk_range(chunk, a.B);
  const int nwout = int(need_a) + int(need_c);
  Acc* dst_a = need_a ? partial + offset3d(samples.split * nwout, p, g * a.K, a.k, d) : nullptr;
  Acc* dst_c = need_c ? partial + offset3d(samples.split * nwout + int(need_a), p, g * a.K, a.k, d) : nullptr;
  const bool in_smem = a.K <= SC;
  Acc* da = in_smem && need_a ? &acc_s[0][threadIdx.x][0] : dst_a;
  Acc* dc = in_smem && need_c ? &acc_s[1][threadIdx.x][0] : dst_c;
  for (int64_t j = 0; j < a.K; ++j) {
    if (da != nullptr) da[j] = Acc(0);
    if (dc != nullptr) dc[j] = Acc(0);
  }
  for (int64_t n = samples.begin; n < samples.end; ++n)
    triple_grad<HD, T>(a, prob + offset2d(n, g * a.K, d), planes, n, p, g, nullptr, da, dc);
  if (in_smem)
    for (int64_t j = 0; j < a.K; ++j) {
      if (da != nullptr) dst_a[j] = da[j];
      if (dc != nullptr) dst_c[j] = dc[j];
    }
}

}  // namespace

}  // namespace cuda
}  // namespace silent_kernels
