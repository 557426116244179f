// C++ CPU kernel of the fixed-variance head on one-hot categorical latents (MATH.md §12).
//
// The fixed head needs only ubar and Saa. ubar = P A^T + b is the mean-field mean (the fixed
// kernel of cpu_fixed.cpp runs it, with zero variance). For Saa, group g contributes the variance
// of a_p.z_g, which for a categorical law is half the probability-weighted squared distance between
// the group's weight entries:  Var_g = 1/2 sum_jl pi_j pi_l (A_pj - A_pl)^2.  Summed over pixels
// with the weights 1/sigma2_p, the variance part of a sample's loss is
//     1/4 sum_g pi_g^T D_g pi_g,        D_g[j, l] = sum_p (A_pj - A_pl)^2 / sigma2_p,
// so the per-(sample, pixel, group) moments collapse into G matrices of K x K built once per call
// (O(k G K^2)) and a quadratic form per sample (O(B G K^2)). Every term is a sum of non-negative
// squares: no cancellation at saturated logits. The backward needs S_g = sum_n grad_n pi_ng pi_ng^T:
//     dA_pj += (1/sigma2_p) sum_l S_jl (A_pj - A_pl),
//     d(1/sigma2_p) += 1/4 sum_g sum_jl S_jl (A_pj - A_pl)^2,
//     dpi_ng += grad_n / 2 D_g pi_ng,
// then the softmax projection to the logits.
#include <ATen/Parallel.h>

#include <vector>

#include "cpu_common.h"
#include "cpu_kernels.h"

namespace silent_kernels::cpu {
namespace {

struct FixedCategorical {
  at::Tensor x, A, prob, zero_var, inv_s2;  // accumulation dtype; prob (B, G K)
  c10::optional<at::Tensor> bias;
  at::Tensor sigma2;
  int64_t B, k, G, K;

  FixedCategorical(const at::Tensor& x_, const at::Tensor& logits, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias_, const at::Tensor& sigma2_) {
    const auto acc = x_.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    B = x_.size(0);
    k = x_.size(1);
    G = logits.size(1);
    K = logits.size(2);
    x = x_.to(acc);
    A = weight.to(acc).contiguous();
    prob = at::softmax(logits.to(acc), -1).reshape({B, G * K}).contiguous();
    zero_var = at::zeros_like(prob);
    if (bias_.has_value() && bias_->defined()) bias = bias_->to(acc);
    sigma2 = sigma2_.to(acc);
    inv_s2 = sigma2.reciprocal().contiguous();
  }
};

// D (G, K, K): D_g[j, l] = sum_p (A_pj - A_pl)^2 / sigma2_p.
template <typename T>
at::Tensor distances(const FixedCategorical& in) {
  const int64_t G = in.G, K = in.K, k = in.k, d = G * K;
  at::Tensor D = at::zeros({G, K, K}, in.A.options());
  const T* A = in.A.data_ptr<T>();
  const T* inv = in.inv_s2.data_ptr<T>();
  T* out = D.data_ptr<T>();
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      T* Dg = out + g * K * K;
      for (int64_t p = 0; p < k; ++p) {
        const T* a = A + linear_offset(p, g * K, d);
        for (int64_t j = 1; j < K; ++j)
          for (int64_t l = 0; l < j; ++l) {
            const T diff = a[j] - a[l];
            Dg[j * K + l] += inv[p] * diff * diff;
          }
      }
      for (int64_t j = 1; j < K; ++j)
        for (int64_t l = 0; l < j; ++l) Dg[l * K + j] = Dg[j * K + l];
    }
  });
  return D;
}

// The (A, 1/sigma2) gradients of 1/4 sum_n grad_n sum_g pi^T D_g pi, given S (G, K, K):
// adds into dA (k, G K) and writes d/d(1/sigma2) into dinv (k,).
template <typename T>
void distance_grads(const FixedCategorical& in, const at::Tensor& S, at::Tensor& dA, at::Tensor& dinv) {
  const int64_t G = in.G, K = in.K, k = in.k, d = G * K;
  const T* A = in.A.data_ptr<T>();
  const T* inv = in.inv_s2.data_ptr<T>();
  const T* s = S.data_ptr<T>();
  T* da = dA.defined() ? dA.data_ptr<T>() : nullptr;
  T* di = dinv.data_ptr<T>();
  at::parallel_for(0, k, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      T quad = 0;
      for (int64_t g = 0; g < G; ++g) {
        const T* a = A + linear_offset(p, g * K, d);
        const T* Sg = s + g * K * K;
        for (int64_t j = 0; j < K; ++j) {
          T lin = 0;
          for (int64_t l = 0; l < K; ++l) {
            const T diff = a[j] - a[l];
            lin += Sg[j * K + l] * diff;
            quad += Sg[j * K + l] * diff * diff;
          }
          if (da != nullptr) da[linear_offset(p, g * K + j, d)] += inv[p] * lin;
        }
      }
      di[p] = T(0.25) * quad;
    }
  });
}

at::ScalarType acc_of(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

at::Tensor categorical_fixed_nll(const at::Tensor& x, const at::Tensor& logits, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, const at::Tensor& sigma2) {
  const FixedCategorical in(x, logits, weight, bias, sigma2);
  const at::Tensor fit = fixed_nll(in.x, in.prob, in.zero_var, in.A, in.bias, in.sigma2);
  at::Tensor D;
  AT_DISPATCH_FLOATING_TYPES(acc_of(x), "categorical_fixed_distances", [&] { D = distances<scalar_t>(in); });
  const at::Tensor P = in.prob.view({in.B, in.G, in.K});
  const at::Tensor spread = at::einsum("gjl,ngl->ngj", {D, P}).mul_(P).sum({1, 2}).mul_(0.25);
  return fit.add(spread).to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
categorical_fixed_nll_backward(const at::Tensor& grad_in, const at::Tensor& x, const at::Tensor& logits,
                               const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               const at::Tensor& sigma2, const std::vector<bool>& needs) {
  // needs: x, logits, weight, bias, sigma2
  const FixedCategorical in(x, logits, weight, bias, sigma2);
  const at::Tensor grad = grad_in.to(in.prob.scalar_type());
  const auto fit = fixed_nll_backward(grad, in.x, in.prob, in.zero_var, in.A, in.bias, in.sigma2,
                                      {needs[0], needs[1], false, needs[2], needs[3], needs[4]});
  const auto dtype = x.scalar_type();
  at::Tensor dx, dlogits, dA, dbias, dsigma2;
  if (needs[0]) dx = std::get<0>(fit).to(dtype);
  if (needs[3]) dbias = std::get<4>(fit).to(dtype);
  const at::Tensor P = in.prob.view({in.B, in.G, in.K});
  if (needs[1]) {
    at::Tensor D;
    AT_DISPATCH_FLOATING_TYPES(acc_of(x), "categorical_fixed_distances", [&] { D = distances<scalar_t>(in); });
    at::Tensor dP = at::einsum("gjl,ngl->ngj", {D, P}).mul_(grad.view({in.B, 1, 1}) * 0.5);
    dP.add_(std::get<1>(fit).view({in.B, in.G, in.K}));
    dlogits = (P * (dP - (P * dP).sum(-1, true))).to(dtype);
  }
  if (needs[2] || needs[4]) {
    const at::Tensor S = at::einsum("n,ngj,ngl->gjl", {grad, P, P});
    at::Tensor dA_acc = needs[2] ? std::get<3>(fit).to(in.A.scalar_type()).contiguous() : at::Tensor();
    at::Tensor dinv = at::empty({in.k}, in.A.options());
    AT_DISPATCH_FLOATING_TYPES(acc_of(x), "categorical_fixed_distance_grads",
                               [&] { distance_grads<scalar_t>(in, S, dA_acc, dinv); });
    if (needs[2]) dA = dA_acc.to(dtype);
    if (needs[4]) dsigma2 = std::get<5>(fit).to(in.A.scalar_type()).sub_(dinv * in.inv_s2.square()).to(dtype);
  }
  return {dx, dlogits, dA, dbias, dsigma2};
}

}  // namespace silent_kernels::cpu
