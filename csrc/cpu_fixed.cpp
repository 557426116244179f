// C++ CPU kernels of the fixed-variance head (MATH.md §3, §5): forward and backward.
//
// Per pixel: ((x - ubar)^2 + Saa) / (2 sigma2) + 0.5 log(2 pi sigma2). The forward is one GEMM,
// ubar = mean @ A^T (+ b), and the per-pixel epilogue. The variance part is linear in Saa, so
// its sum over pixels collapses to var . w / 2 with the column weights
// w_i = sum_p A_pi^2 / sigma2_p: O(kd) + O(Bd), no GEMM. The training forward keeps the
// residual coefficients R = (x - ubar) / sigma2 (B x k, the size of x: cheaper to keep than
// to recompute with a fourth GEMM), and the backward is the two GEMMs the gradients need:
//   G = -grad * R,  dmean = G @ A,  dA = G^T @ mean + A * (1/sigma2_p) * (var^T grad)_i,
//   dx = -G,  dbias = sum_n G_n,  dvar = grad w^T / 2,  dsigma2 from the epilogue's derivative.
#include <ATen/Dispatch.h>

#include <algorithm>
#include <array>
#include <tuple>

#include "cpu_common.h"
#include "cpu_kernels.h"
#include "epilogue.h"

namespace silent_kernels::cpu {
namespace {

// Rows per parallel chunk of the per-pixel loops (each row is k pixels long).
constexpr int64_t kRowGrain = 8;
constexpr int64_t kPixelGrain = 256;

// The per-pixel loops are functions of their own taking restrict pointers by value: inside a
// parallel_for lambda a pointer captured by reference is re-read after every store (the store
// might have changed it), which keeps GCC from vectorising the loop.

// One row of the forward epilogue: returns the row's loss at Saa = 0 and overwrites r (ubar on
// entry) with the coefficients (x - ubar) / sigma2.
template <typename scalar_t, typename acc_t>
acc_t forward_row(const scalar_t* SK_RESTRICT x, acc_t* SK_RESTRICT r, const acc_t* SK_RESTRICT inv_s2,
                  const acc_t* SK_RESTRICT log_s2, int64_t k) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t p = 0; p < k; ++p) {
    const acc_t resid = static_cast<acc_t>(x[p]) - r[p];
    sum += fixed_pixel_nll<acc_t>(resid, acc_t(0), inv_s2[p], log_s2[p]);
    r[p] = resid * inv_s2[p];
  }
  return sum;
}

// w += s a^2, elementwise over n
template <typename acc_t>
void add_scaled_squares(acc_t* SK_RESTRICT w, const acc_t* SK_RESTRICT a, acc_t s, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) w[i] += a[i] * a[i] * s;
}

// o = s a g, elementwise over n
template <typename acc_t>
void scaled_product(acc_t* SK_RESTRICT o, const acc_t* SK_RESTRICT a, acc_t s, const acc_t* SK_RESTRICT g, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) o[i] = a[i] * s * g[i];
}

// sum_i a_i^2 g_i
template <typename acc_t>
acc_t weighted_squares(const acc_t* SK_RESTRICT a, const acc_t* SK_RESTRICT g, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * a[i] * g[i];
  return sum;
}

// o_p += g d(pixel nll)/d(sigma2_p) at Saa = 0 over pixels [p0, p1), from the coefficients r.
template <typename acc_t>
void add_residual_dsigma2(acc_t* SK_RESTRICT o, acc_t g, const acc_t* SK_RESTRICT r, const acc_t* SK_RESTRICT s2,
                          const acc_t* SK_RESTRICT inv_s2, int64_t p0, int64_t p1) {
#pragma omp simd
  for (int64_t p = p0; p < p1; ++p) o[p] += g * fixed_pixel_dsigma2<acc_t>(r[p] * s2[p], acc_t(0), inv_s2[p]);
}

// The inputs in the accumulation dtype (x keeps its own: it is read once).
struct Inputs {
  at::Tensor x, A, mean, var, bias;   // bias undefined when absent
  at::Tensor s2, inv_s2, log_s2;      // (k,)
  at::ScalarType dtype, acc;
  int64_t B, k, d;

  Inputs(const at::Tensor* x_, const at::Tensor& mean_, const at::Tensor& var_, const at::Tensor& weight,
         const c10::optional<at::Tensor>& bias_, const at::Tensor& sigma2) {
    dtype = weight.scalar_type();
    acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
    if (x_ != nullptr) x = x_->contiguous();
    A = as_acc(weight, acc);
    mean = as_acc(mean_, acc);
    var = as_acc(var_, acc);
    if (bias_.has_value() && bias_->defined()) bias = as_acc(*bias_, acc);
    s2 = sigma2.to(acc).contiguous();  // a stride-0 (expanded) view is read through at::
    inv_s2 = s2.reciprocal();
    log_s2 = s2.log();
    B = mean.size(0);
    k = A.size(0);
    d = A.size(1);
  }

  // The pixels are cut into this many parts (one per thread) for the passes over the rows of A.
  int64_t pixel_parts() const {
    return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), k / kPixelGrain));
  }

  // One pass over the rows of A, each output skipped when null: the variance part of dA,
  // dA_p = A_p * (1/sigma2_p) * gv; saa_p = sum_i A_pi^2 gv_i (sum_n grad_n Saa_np, for dsigma2);
  // and per part the column weights' partial sums w_i = sum_p A_pi^2 / sigma2_p into
  // w_parts (pixel_parts() rows of d, zeroed by the caller).
  template <typename acc_t>
  void row_pass(const acc_t* gv, acc_t* dA, acc_t* saa, acc_t* w_parts) const {
    const int64_t nparts = pixel_parts();
    const acc_t* Ap = A.template data_ptr<acc_t>();
    const acc_t* I = inv_s2.template data_ptr<acc_t>();
    at::parallel_for(0, nparts, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        acc_t* w = w_parts != nullptr ? w_parts + linear_offset(q, 0, d) : nullptr;
        for (int64_t p = q * k / nparts; p < (q + 1) * k / nparts; ++p) {
          const acc_t* a = Ap + linear_offset(p, 0, d);
          if (dA != nullptr) scaled_product<acc_t>(dA + linear_offset(p, 0, d), a, I[p], gv, d);
          if (saa != nullptr) saa[p] = weighted_squares<acc_t>(a, gv, d);
          if (w != nullptr) add_scaled_squares<acc_t>(w, a, I[p], d);
        }
      }
    });
  }

  at::Tensor column_weight_parts() const { return at::zeros({pixel_parts(), d}, A.options()); }

  // w_i = sum_p A_pi^2 / sigma2_p  (d,), without a (k, d) temporary
  template <typename acc_t>
  at::Tensor column_weights() const {
    at::Tensor parts = column_weight_parts();
    row_pass<acc_t>(nullptr, nullptr, nullptr, parts.template data_ptr<acc_t>());
    return sum_parts(parts);
  }
};

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> forward_impl(const Inputs& in) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = in.k;
  // R starts as ubar and is overwritten row by row with the coefficients (x - ubar) / sigma2.
  at::Tensor R = in.bias.defined() ? at::addmm(in.bias, in.mean, in.A.t()) : at::mm(in.mean, in.A.t());
  R = R.contiguous();
  at::Tensor loss = at::empty({in.B}, R.options());
  const scalar_t* X = in.x.template data_ptr<scalar_t>();
  acc_t* Rp = R.template data_ptr<acc_t>();
  acc_t* L = loss.template data_ptr<acc_t>();
  const acc_t* ip = in.inv_s2.template data_ptr<acc_t>();
  const acc_t* lp = in.log_s2.template data_ptr<acc_t>();
  at::parallel_for(0, in.B, kRowGrain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      L[n] = forward_row<scalar_t, acc_t>(X + linear_offset(n, 0, k), Rp + linear_offset(n, 0, k), ip, lp, k);
  });
  loss.add_(at::mv(in.var, in.template column_weights<acc_t>()), 0.5);  // + sum_p Saa_p / (2 sigma2_p)
  return {loss.to(in.dtype), R};
}

enum Need { kX = 0, kMean, kVar, kA, kBias, kSigma2, kNumInputs };

// sum_n grad_n d(pixel nll)/d(sigma2_p) at Saa = 0; the Saa part is added by the caller.
template <typename acc_t>
at::Tensor residual_dsigma2(const at::Tensor& grad, const at::Tensor& R, const Inputs& in) {
  const int64_t B = in.B, k = in.k;
  at::Tensor out = at::empty({k}, R.options());
  const acc_t* G = grad.template data_ptr<acc_t>();
  const acc_t* Rp = R.template data_ptr<acc_t>();
  const acc_t* S = in.s2.template data_ptr<acc_t>();
  const acc_t* I = in.inv_s2.template data_ptr<acc_t>();
  acc_t* O = out.template data_ptr<acc_t>();
  at::parallel_for(0, k, kPixelGrain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) O[p] = acc_t(0);
    for (int64_t n = 0; n < B; ++n) add_residual_dsigma2<acc_t>(O, G[n], Rp + linear_offset(n, 0, k), S, I, p0, p1);
  });
  return out;
}

// The gradients from the saved R = (x - ubar) / sigma2. With G = -diag(grad) R the mean and
// weight gradients are G @ A = -diag(grad) (R @ A) and G^T @ mean = R^T @ (-diag(grad) mean):
// the (B, k) matrix G is never formed.
template <typename scalar_t>
std::array<at::Tensor, kNumInputs> backward_impl(const at::Tensor& grad_in, const at::Tensor& R,
                                                 const Inputs& in, const std::array<bool, kNumInputs>& need) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor grad = as_acc(grad_in, in.acc);
  const at::Tensor neg_grad = grad.neg().unsqueeze(1);
  std::array<at::Tensor, kNumInputs> out;
  // (var^T grad)_i: the variance part of dA and dsigma2
  const at::Tensor gv = (need[kA] || need[kSigma2]) ? at::mv(in.var.t(), grad) : at::Tensor();
  if (need[kX]) out[kX] = (R * grad.unsqueeze(1)).to(in.dtype);
  if (need[kMean]) out[kMean] = at::mm(R, in.A).mul_(neg_grad).to(in.dtype);
  // the variance parts of dA, dsigma2 and dvar in one pass over A
  at::Tensor dA = need[kA] ? at::empty({in.k, in.d}, R.options()) : at::Tensor();
  at::Tensor saa = need[kSigma2] ? at::empty({in.k}, R.options()) : at::Tensor();
  at::Tensor w_parts = need[kVar] ? in.column_weight_parts() : at::Tensor();
  if (need[kA] || need[kSigma2] || need[kVar])
    in.template row_pass<acc_t>(gv.defined() ? gv.template data_ptr<acc_t>() : nullptr,
                                need[kA] ? dA.template data_ptr<acc_t>() : nullptr,
                                need[kSigma2] ? saa.template data_ptr<acc_t>() : nullptr,
                                need[kVar] ? w_parts.template data_ptr<acc_t>() : nullptr);
  if (need[kA]) out[kA] = dA.addmm_(R.t(), in.mean * neg_grad).to(in.dtype);
  if (need[kBias]) out[kBias] = at::mv(R.t(), grad).neg_().to(in.dtype);
  if (need[kVar]) out[kVar] = at::outer(grad, sum_parts(w_parts)).mul_(0.5).to(in.dtype);
  if (need[kSigma2])
    out[kSigma2] = residual_dsigma2<acc_t>(grad, R, in).sub_(saa.mul_(in.inv_s2.square()), 0.5).to(in.dtype);
  return out;
}

std::array<bool, kNumInputs> needed(const std::vector<bool>& needs, bool has_bias, bool* any) {
  std::array<bool, kNumInputs> need{};
  *any = false;
  for (int i = 0; i < kNumInputs; ++i) {
    need[i] = needs[i] && (i != kBias || has_bias);
    *any = *any || need[i];
  }
  return need;
}

using Grads6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads6 as_tuple(std::array<at::Tensor, kNumInputs>& out, const at::Tensor& like) {
  for (auto& t : out)
    if (!t.defined()) t = empty_grad(like);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fixed_nll_train(const at::Tensor& x, const at::Tensor& mean,
                                                   const at::Tensor& var, const at::Tensor& weight,
                                                   const c10::optional<at::Tensor>& bias,
                                                   const at::Tensor& sigma2) {
  const Inputs in(&x, mean, var, weight, bias, sigma2);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fixed_nll_cpu",
                                  [&] { out = forward_impl<scalar_t>(in); });
  return out;
}

at::Tensor fixed_nll(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                     const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                     const at::Tensor& sigma2) {
  return std::get<0>(fixed_nll_train(x, mean, var, weight, bias, sigma2));
}

Grads6 fixed_nll_train_backward(const at::Tensor& grad, const at::Tensor& coefficients, const at::Tensor& mean,
                                const at::Tensor& var, const at::Tensor& weight, const at::Tensor& sigma2,
                                const std::vector<bool>& needs) {
  bool any = false;
  const auto need = needed(needs, true, &any);
  std::array<at::Tensor, kNumInputs> out;
  if (any) {
    const Inputs in(nullptr, mean, var, weight, c10::nullopt, sigma2);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "fixed_nll_backward_cpu",
                                    [&] { out = backward_impl<scalar_t>(grad, coefficients.view({in.B, in.k}), in, need); });
  }
  return as_tuple(out, weight);
}

Grads6 fixed_nll_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                          const at::Tensor& var, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, const at::Tensor& sigma2,
                          const std::vector<bool>& needs) {
  bool any = false;
  const auto need = needed(needs, bias.has_value() && bias->defined(), &any);
  if (!any) {
    std::array<at::Tensor, kNumInputs> none;
    return as_tuple(none, x);
  }
  // One CPU implementation: the training forward's coefficients, then its backward.
  const at::Tensor coefficients = std::get<1>(fixed_nll_train(x, mean, var, weight, bias, sigma2));
  std::vector<bool> want(need.begin(), need.end());
  return fixed_nll_train_backward(grad, coefficients, mean, var, weight, sigma2, want);
}

}  // namespace silent_kernels::cpu
