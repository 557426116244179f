// The log-variance head on Bernoulli latents (MATH.md §11), fused: forward, backward and plans.
// This file: the forward kernel, the plans and the forward launcher; the backward stages are in
// bernoulli_logvar_backward.cu, the tile shapes and the tilted contraction in bernoulli_logvar.cuh.
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

#include "bernoulli_logvar.cuh"

namespace silent_kernels {
namespace cuda {

namespace {

// ----------------------------------------------------------------- forward
template <class Tl, typename T>
__global__ void __launch_bounds__(Tl::THREADS, Tl::MINB)
    bernoulli_logvar_forward_kernel(const BernoulliLogvarArgs<T> a, int64_t pixel_tiles,
                                    acc_t<T>* __restrict__ partial) {
  using Acc = acc_t<T>;
  using TC = TiltedContraction<Tl, T>;
  const BlockTile bt = block_tile<Tl>(pixel_tiles);
  typename TC::Accum acc;
  TC::run(a, bt, acc);

  write_tile_losses<Tl, Acc>(
      bt, a.B, a.k, [&](int64_t p) { return load_pixel_pair(a.bias, a.lbias, p); },
      [&](int i, int j, int64_t n, int64_t p, const PixelPair<Acc>& b) {
        return tilted_logvar_pixel_nll<Acc>(load_acc(a.x, offset2d(n, p, a.k)), b.first, b.second,
                                            TC::sums(acc, i, j));
      },
      partial);
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
  ScratchLayout scratch;
  p.off_planes = scratch.take(p.planes ? kNumBernoulliPlanes * B * k : 0);
  p.off_colsum = scratch.take(p.ncolsums * p.coef_row_tiles * k);
  p.off_logits = scratch.take(p.need_logits ? p.l_split * B * d : 0);
  p.off_w = scratch.take(p.nwout > 0 ? p.w_split * p.nwout * k * d : 0);
  p.workspace = scratch.end;
  return p;
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
  SK_CUDA_TRY(tile_grid(ceil_div(a.B, Tl::BM), ceil_div(a.k, Tl::BN), blocks));
  if (blocks > 0) {
    bernoulli_logvar_forward_kernel<Tl, T><<<blocks, Tl::THREADS, 0, stream>>>(a, plan.pixel_tiles, workspace);
    SK_CUDA_TRY(last_error());
  }
  return launch_sum_rows<Acc, T>(workspace, plan.pixel_tiles, a.B, a.B, nullptr, loss, stream);
}

#define SK_INSTANTIATE(T)                                                                       \
  template cudaError_t bernoulli_logvar_forward<T>(const BernoulliLogvarArgs<T>&,                \
                                                   const BernoulliLogvarPlan&, acc_t<T>*, T*,    \
                                                   cudaStream_t);
SK_CUDA_FOR_EACH_TYPE(SK_INSTANTIATE)
#undef SK_INSTANTIATE

}  // namespace cuda
}  // namespace silent_kernels
