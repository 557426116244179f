// Backward of the learnable-precision and Gaussian log-variance heads from the saved coefficients.
#include <ATen/Dispatch.h>

#include <array>
#include <tuple>
#include <vector>

#include "cpu_common.h"
#include "cpu_kernels.h"
#include "cpu_meanfield.h"
#include "cpu_precision.h"

namespace silent_kernels::cpu {
namespace {

using namespace meanfield;

enum Need { kX = 0, kMean, kVar, kK3, kK4, kA, kBias, kC, kPBias, kNumInputs };

template <typename scalar_t, bool H3, bool H4>
std::array<at::Tensor, kNumInputs> backward_saved_impl(
    const at::Tensor& grad_in, const at::Tensor& coef_in, const std::array<at::Tensor, kGroups>& mom,
    const at::Tensor& A_in, const at::Tensor& C_in, std::array<bool, kNumInputs> need) {
  using acc_t = at::opmath_type<scalar_t>;
  const Groups gr(H3, H4);
  const at::Tensor A = A_in.contiguous(), C = C_in.contiguous();
  const int64_t B = mom[0].size(0), k = A.size(0), d = A.size(1);
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const auto acc_opts = A.options().dtype(acc);
  const auto out_opts = A.options();
  const bool need_a = need[kA], need_c = need[kC], need_w = need_a || need_c;
  const std::array<bool, kGroups> need_mom = {need[kMean], need[kVar], need[kK3], need[kK4]};

  std::array<at::Tensor, kNumInputs> out;
  if (need[kX]) out[kX] = at::empty({B, k}, out_opts);
  if (need[kA]) out[kA] = at::empty({k, d}, out_opts);
  if (need[kC]) out[kC] = at::empty({k, d}, out_opts);
  if (need[kBias]) out[kBias] = at::empty({k}, out_opts);
  if (need[kPBias]) out[kPBias] = at::empty({k}, out_opts);
  if (B == 0) {
    for (auto& t : out) if (t.defined()) t.zero_();
    for (int g = 0; g < kGroups; ++g)
      if (need_mom[g]) out[kMean + g] = at::zeros({0, d}, out_opts);
    return out;
  }

  const at::Tensor grad = as_acc(grad_in, acc);
  const at::Tensor coef = coef_in.contiguous();
  const TilePlan plan = make_saved_plan(B, k, d, gr.total);
  const auto roff = group_row_offsets(gr);
  std::array<at::Tensor, kGroups> dmom_parts;
  bool need_products = false;
  for (int g = 0; g < kGroups; ++g)
    if (gr.on[g] && need_mom[g]) {
      dmom_parts[g] = at::zeros({plan.nparts, B, d}, acc_opts);
      need_products = true;
    }
  const bool need_qcol = H4 && need_mom[3];
  at::Tensor qcol_parts = at::zeros({plan.nparts, need_qcol ? d : 0}, acc_opts);
  at::Tensor qh = (H4 && need_w) ? at::mv(mom[3].t(), grad).mul_(0.5) : at::Tensor();

  std::array<int64_t, kGroups> h_lo{}, h_hi{};
  h_lo = {need_a ? 0 : 1, need_a ? 0 : 1, 0, 0};
  h_hi = {need_c ? 2 : 1, need_c ? 3 : 2, need_c ? 3 : 2, need_c ? 1 : 0};
  // diag(grad) . moment_g: the right-hand sides of the weight-partial GEMMs.
  std::array<at::Tensor, kGroups> smom;
  for (int g = 0; g < kGroups; ++g)
    if (gr.on[g] && need_w && h_hi[g] > h_lo[g]) smom[g] = (mom[g] * grad.unsqueeze(1)).contiguous();

  const scalar_t* Ap = A.template data_ptr<scalar_t>();
  const scalar_t* Cp = C.template data_ptr<scalar_t>();
  const acc_t* Gr = grad.template data_ptr<acc_t>();
  const acc_t* coef_ptr = coef.template data_ptr<acc_t>();
  scalar_t* dX = need[kX] ? out[kX].template data_ptr<scalar_t>() : nullptr;
  const bool need_bias_sums = need[kBias] || need[kPBias];

  at::parallel_for(0, plan.nparts, 1, [&](int64_t q_begin, int64_t q_end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Workspace<acc_t> ws(gr, plan, d, need_w);
    for (int64_t q = q_begin; q < q_end; ++q) {
      acc_t* qcol = need_qcol ? qcol_parts.template data_ptr<acc_t>() + linear_offset(q, 0, d) : nullptr;
      for (int64_t t = plan.tile_begin(q); t < plan.tile_begin(q + 1); ++t) {
        const int64_t p0 = plan.pixel_begin(t), np = plan.pixel_count(t);
        if (need_products || need_qcol)
          form_products<scalar_t, acc_t, H3, H4>(Ap, Cp, p0, np, d, ws.P, qcol);
        const acc_t* tile_base = coef_ptr + B * gr.total * p0;
        std::array<const acc_t*, kGroups> Gg{};
        for (int g = 0; g < kGroups; ++g) Gg[g] = tile_base + B * roff[g] * np;

        // Bias gradients (column sums of grad * g_ubar, grad * g_vbar) and dx = -grad * g_ubar.
        if (need_bias_sums || dX != nullptr) {
          acc_t* SK_RESTRICT db = ws.dbias;
          acc_t* SK_RESTRICT dpb = ws.dpbias;
          for (int64_t p = 0; p < np; ++p) db[p] = dpb[p] = acc_t(0);
          for (int64_t n = 0; n < B; ++n) {
            const acc_t gn = Gr[n];
            const acc_t* SK_RESTRICT y0 = Gg[0] + linear_offset(n, 0, 2 * np);
            if (need_bias_sums) {
#pragma omp simd
              for (int64_t p = 0; p < np; ++p) {
                db[p] += gn * y0[p];
                dpb[p] += gn * y0[np + p];
              }
            }
            if (dX != nullptr) {
              scalar_t* dxr = dX + linear_offset(n, p0, k);
              for (int64_t p = 0; p < np; ++p) dxr[p] = static_cast<scalar_t>(-(gn * y0[p]));
            }
          }
          if (need[kBias]) {
            scalar_t* o = out[kBias].template data_ptr<scalar_t>() + p0;
            for (int64_t p = 0; p < np; ++p) o[p] = static_cast<scalar_t>(db[p]);
          }
          if (need[kPBias]) {
            scalar_t* o = out[kPBias].template data_ptr<scalar_t>() + p0;
            for (int64_t p = 0; p < np; ++p) o[p] = static_cast<scalar_t>(dpb[p]);
          }
        }

        for (int g = 0; g < kGroups; ++g) {
          if (!gr.on[g]) continue;
          const int64_t cols = gr.rows[g] * np;
          if (need_mom[g]) {  // (unscaled) d(moment_g) += G_g @ P_g
            at::Tensor dm = mat(dmom_parts[g].template data_ptr<acc_t>() + linear_offset(q * B, 0, d), B, d, d);
            gemm(dm, mat(Gg[g], B, cols, cols), mat(ws.P[g], cols, d, d), /*accumulate=*/true);
          }
          if (need_w && h_hi[g] > h_lo[g]) {  // H_g = G_g^T @ (diag(grad) moment_g)
            const int64_t lo = h_lo[g] * np, rows = (h_hi[g] - h_lo[g]) * np;
            at::Tensor h = mat(ws.H[g] + linear_offset(lo, 0, d), rows, d, d);
            gemm(h, mat(Gg[g] + lo, B, rows, cols).t(), smom[g], /*accumulate=*/false);
          }
        }
        if (!need_w) continue;
        fold_weight_grads<scalar_t, acc_t, H3, H4>(
            Ap, Cp, p0, np, d, ws.H, H4 ? qh.template data_ptr<acc_t>() : nullptr,
            need_a ? out[kA].template data_ptr<scalar_t>() : nullptr,
            need_c ? out[kC].template data_ptr<scalar_t>() : nullptr);
      }
    }
  });

  for (int g = 0; g < kGroups; ++g) {
    if (!need_mom[g] || !gr.on[g]) continue;
    at::Tensor dm = sum_parts(dmom_parts[g]).mul_(grad.unsqueeze(1));
    if (g == 3) dm.addr_(grad, sum_parts(qcol_parts), /*beta=*/1, /*alpha=*/0.5);  // Q's rank-one part
    out[kMean + g] = dm.to(A.scalar_type());
  }
  return out;
}

template <typename scalar_t>
std::array<at::Tensor, kGroups> acc_moments(const at::Tensor& mean, const at::Tensor& var,
                                            const c10::optional<at::Tensor>& k3,
                                            const c10::optional<at::Tensor>& k4) {
  const auto acc = c10::CppTypeToScalarType<at::opmath_type<scalar_t>>::value;
  std::array<at::Tensor, kGroups> mom;
  mom[0] = as_acc(mean, acc);
  mom[1] = as_acc(var, acc);
  if (given(k3)) mom[2] = as_acc(*k3, acc);
  if (given(k4)) mom[3] = as_acc(*k4, acc);
  return mom;
}

std::array<bool, kNumInputs> needed(const std::vector<bool>& needs, const c10::optional<at::Tensor>& k3,
                                    const c10::optional<at::Tensor>& k4, bool any_bias, bool* any) {
  const std::array<bool, kNumInputs> present = {true, true, true, given(k3), given(k4), true,
                                                any_bias, true, any_bias};
  return needed_gradients(needs, present, any);
}

template <typename scalar_t>
std::array<at::Tensor, kNumInputs> saved_backward(const at::Tensor& grad, const at::Tensor& coefficients,
                                                  const at::Tensor& mean, const at::Tensor& var,
                                                  const c10::optional<at::Tensor>& k3,
                                                  const c10::optional<at::Tensor>& k4,
                                                  const at::Tensor& weight, const at::Tensor& precision_weight,
                                                  const std::array<bool, kNumInputs>& need) {
  const auto mom = acc_moments<scalar_t>(mean, var, k3, k4);
  // The saved coefficients already carry the head: the backward GEMMs are head-independent.
  return dispatch_stage(given(k3), given(k4), 0, [&](auto h3, auto h4, auto) {
    return backward_saved_impl<scalar_t, decltype(h3)::value, decltype(h4)::value>(
        grad, coefficients, mom, weight, precision_weight, need);
  });
}

using Grads9 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                          at::Tensor, at::Tensor, at::Tensor>;

Grads9 as_tuple(std::array<at::Tensor, kNumInputs>& out, const at::Tensor& like) {
  for (auto& t : out)
    if (!t.defined()) t = empty_grad(like);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7], out[8]};
}

}  // namespace

Grads9 precision_nll_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                              const at::Tensor& var, const c10::optional<at::Tensor>& k3,
                              const c10::optional<at::Tensor>& k4, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, const at::Tensor& precision_weight,
                              const c10::optional<at::Tensor>& precision_bias,
                              const std::vector<bool>& needs, int64_t head) {
  bool any = false;
  auto need = needed(needs, k3, k4, true, &any);
  need[kBias] = need[kBias] && given(bias);
  need[kPBias] = need[kPBias] && given(precision_bias);
  std::array<at::Tensor, kNumInputs> out;
  if (any) {
    // One CPU implementation per head: the training forward's coefficients, then its backward.
    const at::Tensor coefficients =
        std::get<1>(precision_nll_train(x, mean, var, k3, k4, weight, bias, precision_weight,
                                        precision_bias, head));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "precision_nll_backward_cpu", [&] {
      out = saved_backward<scalar_t>(grad, coefficients, mean, var, k3, k4, weight, precision_weight, need);
    });
  }
  return as_tuple(out, x);
}

Grads9 precision_nll_train_backward(const at::Tensor& grad, const at::Tensor& coefficients,
                                    const at::Tensor& mean, const at::Tensor& var,
                                    const c10::optional<at::Tensor>& k3,
                                    const c10::optional<at::Tensor>& k4, const at::Tensor& weight,
                                    const at::Tensor& precision_weight, const std::vector<bool>& needs) {
  bool any = false;
  const auto need = needed(needs, k3, k4, true, &any);
  std::array<at::Tensor, kNumInputs> out;
  if (any) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "precision_nll_train_backward_cpu", [&] {
      out = saved_backward<scalar_t>(grad, coefficients, mean, var, k3, k4, weight, precision_weight, need);
    });
  }
  return as_tuple(out, weight);
}

}  // namespace silent_kernels::cpu
