// One-hot categorical latents (MATH.md §12), fused: forward, backward and plans.
//
// z is G independent one-hot groups of K categories, flattened group-major (column g*K + j of
// the weights is group g, category j). Per (sample n, pixel p, group g) the pair
// (a_p.z_g, c_p.z_g) is a discrete 2-D variable; its central moments (categorical.h
// group_stats), summed over the groups, are the ten contractions of the mean-field stage and the
// per-pixel epilogues of epilogue.h follow unchanged (fixed head: ubar and Saa only). The
// log-variance head tilts each group instead (categorical.h tilt_group: hm, S, T1, T2).
// The per-group math is the very code the C++ CPU kernels run (csrc/cpu_categorical.cpp).
//
// Stages (no (B, k, G) or (B, k, G K) tensor is ever stored):
//   0. softmax kernel: per (sample, group) the normalised probabilities (log-probabilities for
//      the log-variance head) in acc_t, (B, G K) in the scratch buffer;
//   1. forward: one thread per (sample, pixel) walks the groups, applies the head's epilogue;
//      a warp (32 pixels of one sample) sums its losses, one partial per (pixel tile, sample),
//      summed over the pixel tiles in a fixed order;
//   backward:
//   2. coefficient kernel (same tiling): d loss / d(contraction) times grad[n] into
//      (nplanes, B, k) planes, dx, and per-sample-tile column sums (bias; second bias or sigma2);
//   3. dlogits: one thread per (sample, group) walks a chunk of pixels, recomputes the group's
//      moments and accumulates categorical.h group_grad / tilt_group_grad (in a padded
//      shared-memory row of its own when K <= SmemCats, else in place) into its own slice of
//      (l_split, B, G K) partials; the chunks are summed in a fixed order;
//   4. dweight / dsecond_weight: one thread per (pixel, group) walks a chunk of samples likewise,
//      (w_split, nwout, k, G K) partials;
//   5. bias / second bias / sigma2 gradients from the column sums.
// Deterministic (fixed-order partial sums, no atomics), int64 offsets, acc_t accumulation
// (fp32; fp64 for fp64 inputs).
#include <algorithm>
#include <type_traits>

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

constexpr bool valid_head(int h) {
  return h == int(Head::kFixed) || h == int(Head::kTaylor) || h == int(Head::kLogVar);
}
constexpr int head_planes(int h) { return h == int(Head::kFixed) ? 2 : (h == int(Head::kLogVar) ? 4 : 10); }

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
  if (colsums.slot[0] >= 0 || colsums.slot[1] >= 0)  // block-uniform
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
  const int64_t split = blockIdx.z;
  const int64_t p_begin = split * chunk, p_end = p_begin + chunk < a.k ? p_begin + chunk : a.k;
  Acc* dst = partial + offset3d(split, n, g * a.K, a.B, d);
  const bool in_smem = a.K <= SC;
  Acc* out = in_smem ? &acc_s[threadIdx.x][0] : dst;
  for (int64_t j = 0; j < a.K; ++j) out[j] = Acc(0);
  const Acc* prob_g = prob + offset2d(n, g * a.K, d);
  for (int64_t p = p_begin; p < p_end; ++p)
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
  const int64_t split = blockIdx.z;
  const int64_t n_begin = split * chunk, n_end = n_begin + chunk < a.B ? n_begin + chunk : a.B;
  const int nwout = int(need_a) + int(need_c);
  Acc* dst_a = need_a ? partial + offset3d(split * nwout, p, g * a.K, a.k, d) : nullptr;
  Acc* dst_c = need_c ? partial + offset3d(split * nwout + int(need_a), p, g * a.K, a.k, d) : nullptr;
  const bool in_smem = a.K <= SC;
  Acc* da = in_smem && need_a ? &acc_s[0][threadIdx.x][0] : dst_a;
  Acc* dc = in_smem && need_c ? &acc_s[1][threadIdx.x][0] : dst_c;
  for (int64_t j = 0; j < a.K; ++j) {
    if (da != nullptr) da[j] = Acc(0);
    if (dc != nullptr) dc[j] = Acc(0);
  }
  for (int64_t n = n_begin; n < n_end; ++n)
    triple_grad<HD, T>(a, prob + offset2d(n, g * a.K, d), planes, n, p, g, nullptr, da, dc);
  if (in_smem)
    for (int64_t j = 0; j < a.K; ++j) {
      if (da != nullptr) dst_a[j] = da[j];
      if (dc != nullptr) dst_c[j] = dc[j];
    }
}

// ----------------------------------------------------------------- host side
template <typename T>
cudaError_t zero_out(T* p, int64_t n, cudaStream_t stream) {
  if (p == nullptr || n == 0) return cudaSuccess;
  return cudaMemsetAsync(p, 0, static_cast<size_t>(n) * sizeof(T), stream);  // 0.0 in every T
}

template <typename T>
bool args_valid(const CategoricalArgs<T>& a) {
  if (!valid_head(a.head) || a.B < 0 || a.k < 0 || a.G < 0 || a.K < 0 || a.K > INT_MAX) return false;
  // (an empty tensor may have a null data pointer: only pointers that are read must be set)
  const bool fixed = a.head == int(Head::kFixed);
  return fixed ? ((a.sigma2 != nullptr || a.k == 0) && a.second_weight == nullptr)
               : ((a.second_weight != nullptr || a.k * a.G * a.K == 0) && a.sigma2 == nullptr);
}

// Groups without categories contribute nothing: the kernels see G = 0 then.
template <typename T>
CategoricalArgs<T> normalised(CategoricalArgs<T> a) {
  if (a.K == 0) a.G = 0;
  return a;
}

CategoricalPlan plan_common(int64_t B, int64_t k, int64_t G, int64_t K, int head) {
  CategoricalPlan p{};
  p.head = head;
  p.nplanes = head_planes(head);
  p.colsums.slot[0] = p.colsums.slot[1] = -1;
  p.pixel_tiles = ceil_div(k, 32);
  p.row_tiles = ceil_div(B, kPairWarps);
  p.l_split = p.w_split = 1;
  p.l_chunk = p.w_chunk = kSplitStep;
  (void)G;
  (void)K;
  return p;
}

template <typename Fn>
cudaError_t dispatch_head(int head, Fn&& fn) {
  if (head == int(Head::kFixed)) return fn(std::integral_constant<Head, Head::kFixed>{});
  if (head == int(Head::kLogVar)) return fn(std::integral_constant<Head, Head::kLogVar>{});
  return fn(std::integral_constant<Head, Head::kTaylor>{});
}

template <typename T>
cudaError_t launch_softmax(const CategoricalArgs<T>& a, acc_t<T>* out, cudaStream_t stream) {
  const int64_t rows = a.B * a.G;
  if (rows == 0 || a.K == 0) return cudaSuccess;
  const int64_t blocks = ceil_div(rows, kRowThreads);
  if (!grid_fits(blocks)) return cudaErrorInvalidConfiguration;
  if (a.head == int(Head::kLogVar))
    categorical_softmax_kernel<T, true><<<static_cast<unsigned>(blocks), kRowThreads, 0, stream>>>(a.logits, rows, a.K, out);
  else
    categorical_softmax_kernel<T, false><<<static_cast<unsigned>(blocks), kRowThreads, 0, stream>>>(a.logits, rows, a.K, out);
  return last_error();
}

cudaError_t pair_grid(int64_t B, int64_t k, unsigned& blocks) {
  const int64_t n = ceil_div(B, kPairWarps) * ceil_div(k, 32);
  if (n > 0 && !grid_fits(n)) return cudaErrorInvalidConfiguration;
  blocks = static_cast<unsigned>(n);
  return cudaSuccess;
}

}  // namespace

CategoricalPlan plan_categorical_forward(int64_t B, int64_t k, int64_t G, int64_t K, int head,
                                         bool is_double) {
  (void)is_double;
  CategoricalPlan p = plan_common(B, k, G, K, head);
  p.off_prob = 0;
  p.off_partial = B * G * K;
  p.workspace = p.off_partial + p.pixel_tiles * B;
  return p;
}

CategoricalPlan plan_categorical_backward(int64_t B, int64_t k, int64_t G, int64_t K, int head,
                                          bool is_double, const CategoricalNeeds& n) {
  (void)is_double;
  CategoricalPlan p = plan_common(B, k, G, K, head);
  const int64_t d = G * K;
  const bool fixed = head == int(Head::kFixed);
  const bool second = fixed ? n.sigma2 : n.second_bias;
  p.run_coef = n.x || n.logits || n.weight || n.bias || n.second_weight || second;
  p.need_logits = n.logits;
  p.need_a = n.weight;
  p.need_c = n.second_weight && !fixed;
  p.nwout = int(p.need_a) + int(p.need_c);
  p.planes = p.need_logits || p.nwout > 0;
  if (n.bias) p.colsums.slot[kCatColBias] = p.ncolsums++;
  if (second) p.colsums.slot[kCatColSecond] = p.ncolsums++;
  const Split ls = choose_split(ceil_div(B * G, kGroupThreads), k, kSplitStep);
  p.l_split = ls.split;
  p.l_chunk = ls.chunk;
  const Split ws = choose_split(ceil_div(k * G, kGroupThreads), B, kSplitStep);
  p.w_split = ws.split;
  p.w_chunk = ws.chunk;
  int64_t off = 0;
  p.off_prob = off;
  off += B * d;
  p.off_partial = off;
  p.off_planes = off;
  off += p.planes ? p.nplanes * B * k : 0;
  p.off_colsum = off;
  off += p.ncolsums * p.row_tiles * k;
  p.off_logits = off;
  off += p.need_logits ? p.l_split * B * d : 0;
  p.off_w = off;
  off += p.nwout > 0 ? p.w_split * p.nwout * k * d : 0;
  p.workspace = off;
  return p;
}

template <typename T>
cudaError_t categorical_forward(const CategoricalArgs<T>& args, const CategoricalPlan& plan,
                                acc_t<T>* ws, T* loss, cudaStream_t stream) {
  using Acc = acc_t<T>;
  if (!args_valid(args) || plan.head != args.head) return cudaErrorInvalidValue;
  const CategoricalArgs<T> a = normalised(args);
  if (a.B == 0) return cudaSuccess;
  Acc* prob = ws + plan.off_prob;
  Acc* partial = ws + plan.off_partial;
  SK_CUDA_TRY(launch_softmax(a, prob, stream));
  unsigned blocks = 0;
  SK_CUDA_TRY(pair_grid(a.B, a.k, blocks));
  if (blocks > 0) {
    SK_CUDA_TRY(dispatch_head(a.head, [&](auto hd) {
      categorical_forward_kernel<decltype(hd)::value, T><<<blocks, kPairThreads, 0, stream>>>(
          a, prob, plan.pixel_tiles, partial);
      return last_error();
    }));
  }
  return launch_sum_rows<Acc, T>(partial, plan.pixel_tiles, a.B, a.B, nullptr, loss, stream);
}

template <typename T>
cudaError_t categorical_backward(const CategoricalArgs<T>& args, const CategoricalPlan& plan,
                                 acc_t<T>* ws, const CategoricalGrads<T>& out, cudaStream_t stream) {
  using Acc = acc_t<T>;
  if (!args_valid(args) || plan.head != args.head) return cudaErrorInvalidValue;
  const CategoricalArgs<T> a = normalised(args);
  const int64_t B = a.B, k = a.k, d = args.G * args.K;
  if (B == 0) {  // an empty batch: the loss is 0, so are the decoder gradients
    SK_CUDA_TRY(zero_out(out.weight, k * d, stream));
    SK_CUDA_TRY(zero_out(out.second_weight, k * d, stream));
    SK_CUDA_TRY(zero_out(out.bias, k, stream));
    SK_CUDA_TRY(zero_out(out.second_bias, k, stream));
    return zero_out(out.sigma2, k, stream);
  }
  if (!plan.run_coef && !plan.need_logits) return cudaSuccess;
  Acc* prob = ws + plan.off_prob;
  Acc* planes = ws + plan.off_planes;
  Acc* colpart = ws + plan.off_colsum;
  SK_CUDA_TRY(launch_softmax(a, prob, stream));
  return dispatch_head(a.head, [&](auto hd) -> cudaError_t {
    constexpr Head HD = decltype(hd)::value;
    if (plan.run_coef) {
      unsigned blocks = 0;
      SK_CUDA_TRY(pair_grid(B, k, blocks));
      if (blocks > 0) {
        categorical_coef_kernel<HD, T><<<blocks, kPairThreads, 0, stream>>>(
            a, prob, plan.pixel_tiles, plan.planes, planes, plan.colsums, colpart, out.x);
        SK_CUDA_TRY(last_error());
      }
    }
    if (plan.need_logits && out.logits != nullptr && d > 0) {
      const int64_t blocks = ceil_div(B * a.G, kGroupThreads);
      if (!grid_fits(blocks) || plan.l_split < 1 || plan.l_split > 65535)
        return cudaErrorInvalidConfiguration;
      Acc* part = ws + plan.off_logits;
      const dim3 grid(static_cast<unsigned>(blocks), 1u, static_cast<unsigned>(plan.l_split));
      categorical_dlogits_kernel<HD, T><<<grid, kGroupThreads, 0, stream>>>(a, prob, planes, plan.l_chunk, part);
      SK_CUDA_TRY(last_error());
      SK_CUDA_TRY((launch_sum_rows<Acc, T>(part, plan.l_split, B * d, B * d, nullptr, out.logits, stream)));
    }
    if (plan.nwout > 0 && k > 0 && d > 0) {
      const int64_t blocks = ceil_div(k * a.G, kGroupThreads);
      if (!grid_fits(blocks) || plan.w_split < 1 || plan.w_split > 65535)
        return cudaErrorInvalidConfiguration;
      Acc* part = ws + plan.off_w;
      const dim3 grid(static_cast<unsigned>(blocks), 1u, static_cast<unsigned>(plan.w_split));
      categorical_dweight_kernel<HD, T><<<grid, kGroupThreads, 0, stream>>>(
          a, prob, planes, plan.need_a, plan.need_c, plan.w_chunk, part);
      SK_CUDA_TRY(last_error());
      const int64_t per = k * d, ld = plan.nwout * per;
      if (plan.need_a && out.weight != nullptr)
        SK_CUDA_TRY((launch_sum_rows<Acc, T>(part, plan.w_split, per, ld, nullptr, out.weight, stream)));
      if (plan.need_c && out.second_weight != nullptr)
        SK_CUDA_TRY((launch_sum_rows<Acc, T>(part + int(plan.need_a) * per, plan.w_split, per, ld, nullptr,
                                             out.second_weight, stream)));
    }
    const int64_t rt = plan.row_tiles;
    T* second_out = HD == Head::kFixed ? out.sigma2 : out.second_bias;
    if (out.bias != nullptr && plan.colsums.slot[kCatColBias] >= 0)
      SK_CUDA_TRY((launch_sum_rows<Acc, T>(colpart + plan.colsums.slot[kCatColBias] * rt * k, rt, k, k,
                                           nullptr, out.bias, stream)));
    if (second_out != nullptr && plan.colsums.slot[kCatColSecond] >= 0)
      SK_CUDA_TRY((launch_sum_rows<Acc, T>(colpart + plan.colsums.slot[kCatColSecond] * rt * k, rt, k, k,
                                           nullptr, second_out, stream)));
    return cudaSuccess;
  });
}

#define SK_INSTANTIATE(T)                                                                        \
  template cudaError_t categorical_forward<T>(const CategoricalArgs<T>&, const CategoricalPlan&,  \
                                              acc_t<T>*, T*, cudaStream_t);                      \
  template cudaError_t categorical_backward<T>(const CategoricalArgs<T>&, const CategoricalPlan&, \
                                               acc_t<T>*, const CategoricalGrads<T>&, cudaStream_t);
SK_INSTANTIATE(float)
SK_INSTANTIATE(double)
SK_INSTANTIATE(__half)
SK_INSTANTIATE(__nv_bfloat16)
#undef SK_INSTANTIATE

}  // namespace cuda
}  // namespace silent_kernels
