// One-hot categorical latents (MATH.md §12), fused: forward, backward and plans.
// This file: the plans and the launchers; the kernels are in categorical_kernels.cuh.
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

#include "categorical_kernels.cuh"

namespace silent_kernels {
namespace cuda {

namespace {

constexpr bool valid_head(int h) {
  return h == int(Head::kFixed) || h == int(Head::kTaylor) || h == int(Head::kLogVar);
}
constexpr int head_planes(int h) { return h == int(Head::kFixed) ? 2 : (h == int(Head::kLogVar) ? 4 : 10); }

// ----------------------------------------------------------------- host side
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
  return tile_grid(ceil_div(B, kPairWarps), ceil_div(k, 32), blocks);
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
  ScratchLayout scratch;
  p.off_prob = scratch.take(B * d);
  p.off_partial = p.off_planes = scratch.take(p.planes ? p.nplanes * B * k : 0);
  p.off_colsum = scratch.take(p.ncolsums * p.row_tiles * k);
  p.off_logits = scratch.take(p.need_logits ? p.l_split * B * d : 0);
  p.off_w = scratch.take(p.nwout > 0 ? p.w_split * p.nwout * k * d : 0);
  p.workspace = scratch.end;
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
    SK_CUDA_TRY(zero_async(out.weight, k * d, stream));
    SK_CUDA_TRY(zero_async(out.second_weight, k * d, stream));
    SK_CUDA_TRY(zero_async(out.bias, k, stream));
    SK_CUDA_TRY(zero_async(out.second_bias, k, stream));
    return zero_async(out.sigma2, k, stream);
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
      dim3 grid;
      SK_CUDA_TRY(split_grid(ceil_div(B * a.G, kGroupThreads), plan.l_split, grid));
      Acc* part = ws + plan.off_logits;
      categorical_dlogits_kernel<HD, T><<<grid, kGroupThreads, 0, stream>>>(a, prob, planes, plan.l_chunk, part);
      SK_CUDA_TRY(last_error());
      SK_CUDA_TRY((launch_sum_rows<Acc, T>(part, plan.l_split, B * d, B * d, nullptr, out.logits, stream)));
    }
    if (plan.nwout > 0 && k > 0 && d > 0) {
      dim3 grid;
      SK_CUDA_TRY(split_grid(ceil_div(k * a.G, kGroupThreads), plan.w_split, grid));
      Acc* part = ws + plan.off_w;
      categorical_dweight_kernel<HD, T><<<grid, kGroupThreads, 0, stream>>>(
          a, prob, planes, plan.need_a, plan.need_c, plan.w_chunk, part);
      SK_CUDA_TRY(last_error());
      SK_CUDA_TRY(finish_weight_splits<T>(part, plan.w_split, plan.need_a, plan.need_c, k * d,
                                          out.weight, out.second_weight, stream));
    }
    const int64_t rt = plan.row_tiles;
    T* second_out = HD == Head::kFixed ? out.sigma2 : out.second_bias;
    SK_CUDA_TRY(finish_colsum(colpart, plan.colsums.slot[kCatColBias], rt, k, out.bias, stream));
    return finish_colsum(colpart, plan.colsums.slot[kCatColSecond], rt, k, second_out, stream);
  });
}

#define SK_INSTANTIATE(T)                                                                        \
  template cudaError_t categorical_forward<T>(const CategoricalArgs<T>&, const CategoricalPlan&,  \
                                              acc_t<T>*, T*, cudaStream_t);                      \
  template cudaError_t categorical_backward<T>(const CategoricalArgs<T>&, const CategoricalPlan&, \
                                               acc_t<T>*, const CategoricalGrads<T>&, cudaStream_t);
SK_CUDA_FOR_EACH_TYPE(SK_INSTANTIATE)
#undef SK_INSTANTIATE

}  // namespace cuda
}  // namespace silent_kernels
