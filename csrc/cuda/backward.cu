// Backward plans and launchers of the fixed and precision-family heads (MATH.md §5): which stages run, how their
// reductions are split, and where their partial results live in the scratch buffer.
//
//   1. coefficient kernel (coef.cu): g_j planes (B, k), dx, per-sample-tile column sums
//   2. moment gradients (moment_grad.cu): (split, kinds, B, d) partials -> summed in order
//   3. weight gradients (weight_grad.cu): (split, outputs, k, d) partials -> summed in order
//   4. bias / precision-bias / sigma2 gradients from the column sums (small_kernels.cu)
// Fixed head extras: dvar = 0.5 grad_n w_i with w the O(kd) column weights; the Saa parts
// of dA and dsigma2 through r = sum_n grad_n var_n (O(Bd)).
// Each stage is launched only when one of its outputs is needed.
#include <algorithm>

#include "common.cuh"

namespace silent_kernels {
namespace cuda {

// Split a reduction of length red (in steps of bk) over enough chunks that tiles * split
// blocks fill the device twice, keeping at least four steps per chunk.
Split choose_split(int64_t tiles, int64_t red, int bk) {
  if (tiles <= 0 || red <= 0) return {1, std::max<int64_t>(bk, ceil_div(red, bk) * bk)};
  const int64_t target = 2 * static_cast<int64_t>(current_sm_count());
  int64_t s = tiles >= target ? 1 : ceil_div(target, tiles);
  s = std::min<int64_t>(s, std::max<int64_t>(1, red / (4 * bk)));
  s = std::min<int64_t>(s, kMaxSplit);
  const int64_t chunk = ceil_div(ceil_div(red, s), bk) * bk;
  return {ceil_div(red, chunk), chunk};
}

namespace {

void clear_slots(BackwardPlan& p) {
  for (int q = 0; q < kNumPlanes; ++q) p.slots.slot[q] = -1;
  for (int q = 0; q < kNumColSums; ++q) p.colsums.slot[q] = -1;
  for (int q = 0; q < 4; ++q) p.kinds[q] = -1;
}

// Scratch layout, once the counts are known.
void layout(BackwardPlan& p, int64_t B, int64_t k, int64_t d) {
  ScratchLayout scratch;
  p.off_planes = scratch.take(p.nplanes * B * k);
  p.off_colsum = scratch.take(p.ncolsums * p.coef_row_tiles * k);
  p.off_mom = scratch.take(p.nkinds > 0 ? p.mom_split * p.nkinds * B * d : 0);
  p.off_w = scratch.take(p.nwout > 0 ? p.w_split * p.nwout * k * d : 0);
  p.off_colw = scratch.take(p.need_colw ? d : 0);
  p.off_r = scratch.take(p.need_r ? d : 0);
  p.off_tmp = scratch.take(k);
  p.workspace = scratch.end;
}

template <typename Acc>
BackwardPlan plan_fixed_impl(int64_t B, int64_t k, int64_t d, const FixedNeeds& n) {
  using Tl = Tiles<Acc>;
  BackwardPlan p{};
  clear_slots(p);
  p.run_coef = n.x || n.mean || n.weight || n.bias || n.sigma2;
  p.coef_cfg = choose_cfg<typename Tl::FixedLarge, typename Tl::FixedSmall>(B, k);
  p.coef_row_tiles = coef_row_tiles(false, sizeof(Acc) == 8, p.coef_cfg, B);
  if (n.mean || n.weight) p.slots.slot[kUbar] = p.nplanes++;
  if (n.bias) p.colsums.slot[kColUbar] = p.ncolsums++;
  if (n.sigma2) p.colsums.slot[kColDSigma2] = p.ncolsums++;
  if (n.mean) p.kinds[p.nkinds++] = 0;
  using MG = typename Tl::MomentGrad;
  const Split ms = choose_split(ceil_div(B, MG::BM) * ceil_div(d, MG::BN) * p.nkinds, k, MG::BK);
  p.mom_split = ms.split;
  p.mom_chunk = ms.chunk;
  p.need_a = n.weight;
  p.need_c = false;
  p.nwout = int(p.need_a);
  using WG = typename Tl::WeightGrad;
  const Split ws = choose_split(ceil_div(k, WG::BM) * ceil_div(d, WG::BN), B, WG::BK);
  p.w_split = ws.split;
  p.w_chunk = ws.chunk;
  p.need_colw = n.var;
  p.need_r = n.weight || n.sigma2;
  layout(p, B, k, d);
  return p;
}

template <typename Acc>
BackwardPlan plan_precision_impl(int64_t B, int64_t k, int64_t d, bool has_k3, bool has_k4,
                                 const PrecisionNeeds& n) {
  using Tl = Tiles<Acc>;
  BackwardPlan p{};
  clear_slots(p);
  const bool any_w = n.weight || n.pweight;
  const bool k3 = has_k3 && n.k3, k4 = has_k4 && n.k4;
  p.run_coef = n.x || n.mean || n.var || k3 || k4 || any_w || n.bias || n.pbias;
  p.coef_cfg = choose_cfg<typename Tl::PrecLarge, typename Tl::PrecSmall>(B, k);
  p.coef_row_tiles = coef_row_tiles(true, sizeof(Acc) == 8, p.coef_cfg, B);
  // planes: the weight gradients read every present one; a moment gradient its own kind's
  bool want[kNumPlanes] = {};
  want[kUbar] = want[kVbar] = n.mean || any_w;
  want[kSaa] = want[kScc] = want[kSac] = n.var || any_w;
  want[kTacc] = want[kTaac] = want[kC3] = has_k3 && (k3 || any_w);
  want[kQ] = want[kC4] = has_k4 && (k4 || any_w);
  for (int q = 0; q < kNumPlanes; ++q)
    if (want[q]) p.slots.slot[q] = p.nplanes++;
  if (n.bias) p.colsums.slot[kColUbar] = p.ncolsums++;
  if (n.pbias) p.colsums.slot[kColVbar] = p.ncolsums++;
  if (n.mean) p.kinds[p.nkinds++] = 0;
  if (n.var) p.kinds[p.nkinds++] = 1;
  if (k3) p.kinds[p.nkinds++] = 2;
  if (k4) p.kinds[p.nkinds++] = 3;
  using MG = typename Tl::MomentGrad;
  const Split ms = choose_split(ceil_div(B, MG::BM) * ceil_div(d, MG::BN) * p.nkinds, k, MG::BK);
  p.mom_split = ms.split;
  p.mom_chunk = ms.chunk;
  p.need_a = n.weight;
  p.need_c = n.pweight;
  p.nwout = int(p.need_a) + int(p.need_c);
  using WG = typename Tl::WeightGrad;
  const Split ws = choose_split(ceil_div(k, WG::BM) * ceil_div(d, WG::BN), B, WG::BK);
  p.w_split = ws.split;
  p.w_chunk = ws.chunk;
  p.need_colw = p.need_r = false;
  layout(p, B, k, d);
  return p;
}

}  // namespace

BackwardPlan plan_fixed_backward(int64_t B, int64_t k, int64_t d, bool is_double,
                                 const FixedNeeds& needs) {
  return is_double ? plan_fixed_impl<double>(B, k, d, needs) : plan_fixed_impl<float>(B, k, d, needs);
}

BackwardPlan plan_precision_backward(int64_t B, int64_t k, int64_t d, bool is_double, bool has_k3,
                                     bool has_k4, const PrecisionNeeds& needs) {
  return is_double ? plan_precision_impl<double>(B, k, d, has_k3, has_k4, needs)
                   : plan_precision_impl<float>(B, k, d, has_k3, has_k4, needs);
}

template <typename T>
cudaError_t fixed_backward(const FixedArgs<T>& a, const BackwardPlan& plan, acc_t<T>* ws,
                           const FixedGrads<T>& out, cudaStream_t stream) {
  using Acc = acc_t<T>;
  const int64_t B = a.B, k = a.k, d = a.d;
  if (B == 0) {  // an empty batch: the loss is 0, so are the decoder gradients
    SK_CUDA_TRY(zero_async(out.weight, k * d, stream));
    SK_CUDA_TRY(zero_async(out.bias, k, stream));
    return zero_async(out.sigma2, k, stream);
  }
  Acc* planes = ws + plan.off_planes;
  Acc* colpart = ws + plan.off_colsum;
  Acc* colw = ws + plan.off_colw;
  Acc* r = ws + plan.off_r;
  const int64_t rt = plan.coef_row_tiles;

  if (plan.run_coef)
    SK_CUDA_TRY(launch_fixed_coef<T>(a, plan.coef_cfg, plan.slots, planes, plan.colsums, colpart,
                                     out.x, stream));
  if (out.var != nullptr) {  // dvar[n, i] = 0.5 grad_n sum_p A_pi^2 / sigma2_p
    SK_CUDA_TRY(launch_colweight<T>(a.weight, a.sigma2, k, d, colw, stream));
    SK_CUDA_TRY(launch_outer<T>(a.grad, colw, B, d, 0.5, out.var, stream));
  }
  if (plan.need_r)  // r_i = sum_n grad_n var[n, i]
    SK_CUDA_TRY((launch_sum_rows<T, Acc>(a.var, B, d, d, a.grad, r, stream)));
  if (out.mean != nullptr && plan.nkinds > 0) {
    Acc* mom = ws + plan.off_mom;
    SK_CUDA_TRY(launch_moment_grad<T>(false, false, false, planes, plan.slots, a.weight, nullptr,
                                      B, k, d, plan.kinds, plan.nkinds, plan.mom_split,
                                      plan.mom_chunk, mom, stream));
    SK_CUDA_TRY(finish_split<T>(mom, plan.mom_split, plan.nkinds, 0, B * d, out.mean, stream));
  }
  if (out.weight != nullptr && plan.need_a) {
    Acc* wp = ws + plan.off_w;
    SK_CUDA_TRY(launch_weight_grad<T>(false, false, false, planes, plan.slots, a.mean, a.var,
                                      nullptr, nullptr, a.weight, nullptr, a.sigma2, r, B, k, d,
                                      true, false, plan.w_split, plan.w_chunk, wp, stream));
    SK_CUDA_TRY(finish_split<T>(wp, plan.w_split, plan.nwout, 0, k * d, out.weight, stream));
  }
  SK_CUDA_TRY(finish_colsum(colpart, plan.colsums.slot[kColUbar], rt, k, out.bias, stream));
  if (out.sigma2 != nullptr && plan.colsums.slot[kColDSigma2] >= 0) {
    Acc* tmp = ws + plan.off_tmp;
    SK_CUDA_TRY(finish_colsum(colpart, plan.colsums.slot[kColDSigma2], rt, k, tmp, stream));
    SK_CUDA_TRY(launch_sigma2_finish<T>(a.weight, a.sigma2, r, tmp, k, d, out.sigma2, stream));
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t precision_backward(const PrecisionArgs<T>& a, const BackwardPlan& plan, acc_t<T>* ws,
                               const PrecisionGrads<T>& out, cudaStream_t stream) {
  using Acc = acc_t<T>;
  if (!precision_head_valid(a)) return cudaErrorInvalidValue;
  const int64_t B = a.B, k = a.k, d = a.d;
  if (B == 0) {
    SK_CUDA_TRY(zero_async(out.weight, k * d, stream));
    SK_CUDA_TRY(zero_async(out.pweight, k * d, stream));
    SK_CUDA_TRY(zero_async(out.bias, k, stream));
    return zero_async(out.pbias, k, stream);
  }
  const bool has_k3 = a.k3 != nullptr, has_k4 = a.k4 != nullptr;
  Acc* planes = ws + plan.off_planes;
  Acc* colpart = ws + plan.off_colsum;
  const int64_t rt = plan.coef_row_tiles;

  if (plan.run_coef)
    SK_CUDA_TRY(launch_precision_coef<T>(a, plan.coef_cfg, plan.slots, planes, plan.colsums,
                                         colpart, out.x, stream));
  if (plan.nkinds > 0) {
    Acc* mom = ws + plan.off_mom;
    SK_CUDA_TRY(launch_moment_grad<T>(true, has_k3, has_k4, planes, plan.slots, a.weight,
                                      a.pweight, B, k, d, plan.kinds, plan.nkinds,
                                      plan.mom_split, plan.mom_chunk, mom, stream));
    T* dst[4] = {out.mean, out.var, out.k3, out.k4};
    for (int q = 0; q < plan.nkinds; ++q)
      SK_CUDA_TRY(finish_split<T>(mom, plan.mom_split, plan.nkinds, q, B * d, dst[plan.kinds[q]],
                                  stream));
  }
  if (plan.nwout > 0) {
    Acc* wp = ws + plan.off_w;
    SK_CUDA_TRY(launch_weight_grad<T>(true, has_k3, has_k4, planes, plan.slots, a.mean, a.var,
                                      a.k3, a.k4, a.weight, a.pweight, nullptr, nullptr, B, k, d,
                                      plan.need_a, plan.need_c, plan.w_split, plan.w_chunk, wp,
                                      stream));
    SK_CUDA_TRY(finish_weight_splits<T>(wp, plan.w_split, plan.need_a, plan.need_c, k * d,
                                        out.weight, out.pweight, stream));
  }
  SK_CUDA_TRY(finish_colsum(colpart, plan.colsums.slot[kColUbar], rt, k, out.bias, stream));
  return finish_colsum(colpart, plan.colsums.slot[kColVbar], rt, k, out.pbias, stream);
}

#define SK_INSTANTIATE(T)                                                                       \
  template cudaError_t fixed_backward<T>(const FixedArgs<T>&, const BackwardPlan&, acc_t<T>*,    \
                                         const FixedGrads<T>&, cudaStream_t);                    \
  template cudaError_t precision_backward<T>(const PrecisionArgs<T>&, const BackwardPlan&,        \
                                             acc_t<T>*, const PrecisionGrads<T>&, cudaStream_t);
SK_CUDA_FOR_EACH_TYPE(SK_INSTANTIATE)
#undef SK_INSTANTIATE

}  // namespace cuda
}  // namespace silent_kernels
