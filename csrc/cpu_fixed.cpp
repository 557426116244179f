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
#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu_common.h"
#include "cpu_kernels.h"
#include "epilogue.h"

namespace silent_kernels::cpu {
namespace {

// Every loop below is a function of its own taking restrict pointers by value: inside a
// parallel_for lambda a pointer captured by reference is re-read after every store (the store
// might have changed it), which keeps GCC from vectorising the loop. Everything but the GEMMs is
// raw loops in one parallel region per pass: on this kind of machine a kernel that streams more
// than the L2 cache leaves every following ATen call (dispatch, allocation) several times slower
// than when warm, so each small op saved is worth more than its warm cost suggests.

// Pixels [0, n) of one sample row: returns the loss at Saa = 0 and overwrites r (ubar without
// the bias on entry) with the coefficients (x - ubar - b) / sigma2. b may be null.
template <typename scalar_t, typename acc_t>
acc_t forward_segment(const scalar_t* SK_RESTRICT x, acc_t* SK_RESTRICT r, const acc_t* SK_RESTRICT b,
                      const acc_t* SK_RESTRICT inv_s2, const acc_t* SK_RESTRICT log_s2, int64_t n) {
  acc_t sum = 0;
  if (b != nullptr) {
#pragma omp simd reduction(+ : sum)
    for (int64_t p = 0; p < n; ++p) {
      const acc_t resid = static_cast<acc_t>(x[p]) - r[p] - b[p];
      sum += fixed_pixel_nll<acc_t>(resid, acc_t(0), inv_s2[p], log_s2[p]);
      r[p] = resid * inv_s2[p];
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t p = 0; p < n; ++p) {
      const acc_t resid = static_cast<acc_t>(x[p]) - r[p];
      sum += fixed_pixel_nll<acc_t>(resid, acc_t(0), inv_s2[p], log_s2[p]);
      r[p] = resid * inv_s2[p];
    }
  }
  return sum;
}

// w += s a^2, elementwise over n
template <typename acc_t>
void add_scaled_squares(acc_t* SK_RESTRICT w, const acc_t* SK_RESTRICT a, acc_t s, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) w[i] += a[i] * a[i] * s;
}

// o += s a g, elementwise over n
template <typename acc_t>
void add_scaled_product(acc_t* SK_RESTRICT o, const acc_t* SK_RESTRICT a, acc_t s, const acc_t* SK_RESTRICT g,
                        int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) o[i] += a[i] * s * g[i];
}

// sum_i a_i^2 g_i
template <typename acc_t>
acc_t weighted_squares(const acc_t* SK_RESTRICT a, const acc_t* SK_RESTRICT g, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * a[i] * g[i];
  return sum;
}

// sum_i a_i b_i
template <typename acc_t>
acc_t dot(const acc_t* SK_RESTRICT a, const acc_t* SK_RESTRICT b, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// o += s a, elementwise over n
template <typename acc_t>
void add_scaled(acc_t* SK_RESTRICT o, const acc_t* SK_RESTRICT a, acc_t s, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) o[i] += a[i] * s;
}

// Over the pixels [0, n) of one sample row of the coefficients r, weighted by the row's g:
// db -= g r, ds += g d(pixel nll)/d(sigma2) at Saa = 0, dx = g r (each skipped when null).
template <typename scalar_t, typename acc_t>
void residual_gradients(acc_t* SK_RESTRICT db, acc_t* SK_RESTRICT ds, scalar_t* SK_RESTRICT dx, acc_t g,
                        const acc_t* SK_RESTRICT r, const acc_t* SK_RESTRICT s2, const acc_t* SK_RESTRICT inv_s2,
                        int64_t n) {
  if (db != nullptr) {
#pragma omp simd
    for (int64_t p = 0; p < n; ++p) db[p] -= g * r[p];
  }
  if (ds != nullptr) {
#pragma omp simd
    for (int64_t p = 0; p < n; ++p) ds[p] += g * fixed_pixel_dsigma2<acc_t>(r[p] * s2[p], acc_t(0), inv_s2[p]);
  }
  if (dx != nullptr) {
#pragma omp simd
    for (int64_t p = 0; p < n; ++p) dx[p] = static_cast<scalar_t>(g * r[p]);
  }
}

// The inputs in the accumulation dtype (x keeps its own: it is read once).
struct Inputs {
  at::Tensor x, A, mean, var, bias;   // bias undefined when absent
  at::Tensor per_pixel;               // (3, k): sigma2, 1 / sigma2, log sigma2
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
    B = mean.size(0);
    k = A.size(0);
    d = A.size(1);
    per_pixel = at::empty({3, k}, A.options());
    per_pixel.select(0, 0).copy_(sigma2);   // sigma2 may be a stride-0 (expanded) view
    AT_DISPATCH_FLOATING_TYPES(acc, "fixed_per_pixel", [&] {
      scalar_t* s = per_pixel.data_ptr<scalar_t>();
      for (int64_t p = 0; p < k; ++p) {
        s[k + p] = scalar_t(1) / s[p];
        s[2 * k + p] = std::log(s[p]);
      }
    });
  }

  template <typename acc_t> const acc_t* s2() const { return per_pixel.template data_ptr<acc_t>(); }
  template <typename acc_t> const acc_t* inv_s2() const { return s2<acc_t>() + k; }
  template <typename acc_t> const acc_t* log_s2() const { return s2<acc_t>() + 2 * k; }

  // Over the rows p of A in [p0, p1), each output skipped when null: adds the variance part of
  // dA, A_p * (1/sigma2_p) * gv, to dA_p; saa_p = sum_i A_pi^2 gv_i (sum_n grad_n Saa_np, for
  // dsigma2); adds sum_p A_pi^2 / sigma2_p to the column weights' partial sums w (d).
  template <typename acc_t>
  void weight_rows(int64_t p0, int64_t p1, const acc_t* gv, acc_t* dA, acc_t* saa, acc_t* w) const {
    const acc_t* Ap = A.template data_ptr<acc_t>();
    const acc_t* I = inv_s2<acc_t>();
    for (int64_t p = p0; p < p1; ++p) {
      const acc_t* a = Ap + linear_offset(p, 0, d);
      if (dA != nullptr) add_scaled_product<acc_t>(dA + linear_offset(p, 0, d), a, I[p], gv, d);
      if (saa != nullptr) saa[p] = weighted_squares<acc_t>(a, gv, d);
      if (w != nullptr) add_scaled_squares<acc_t>(w, a, I[p], d);
    }
  }
};

// Adds the per-part partials of parts 1 .. nparts-1 (rows of `others`, (nparts - 1, n); by
// default the rows following `first`) into part 0's row `first` (n).
template <typename acc_t>
void reduce_parts(acc_t* first, int64_t nparts, int64_t n, const acc_t* others = nullptr) {
  if (others == nullptr) others = first + n;
  for (int64_t q = 1; q < nparts; ++q) add_scaled<acc_t>(first, others + linear_offset(q - 1, 0, n), acc_t(1), n);
}

// The pixels are cut into tiles (cpu_common.h: TilePlan) spread over one parallel part per
// thread. Per tile the GEMMs run single-threaded on views of the tile's rows of A and columns of
// R, and the per-pixel work follows while those are still in the L2 cache: A is read from memory
// once per pass instead of once per GEMM and once per elementwise loop. `row_floats` is what one
// pixel of a tile holds: its row of A (d), of R (B), and in the backward of dA (d).
inline TilePlan pixel_tiles(int64_t B, int64_t k, int64_t row_floats) { return make_plan(B, k, row_floats, 1, 1); }

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> forward_impl(const Inputs& in) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = in.B, k = in.k, d = in.d;
  const TilePlan plan = pixel_tiles(B, k, d + B);
  // R: ubar = mean @ A^T tile by tile, overwritten with the coefficients (x - ubar) / sigma2.
  at::Tensor R = at::empty({B, k}, in.A.options());
  // per part: the loss partials of its pixels (B), then its column-weight partials (d)
  at::Tensor parts = at::zeros({plan.nparts, B + d}, R.options());
  const scalar_t* X = in.x.template data_ptr<scalar_t>();
  const acc_t* Ap = in.A.template data_ptr<acc_t>();
  acc_t* Rp = R.template data_ptr<acc_t>();
  acc_t* P = parts.template data_ptr<acc_t>();
  const acc_t* bias = in.bias.defined() ? in.bias.template data_ptr<acc_t>() : nullptr;
  const acc_t* I = in.inv_s2<acc_t>();
  const acc_t* logs = in.log_s2<acc_t>();
  at::parallel_for(0, plan.nparts, 1, [&](int64_t q0, int64_t q1) {
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t q = q0; q < q1; ++q) {
      acc_t* L = P + linear_offset(q, 0, B + d);
      for (int64_t t = plan.tile_begin(q); t < plan.tile_begin(q + 1); ++t) {
        const int64_t p0 = plan.pixel_begin(t), np = plan.pixel_count(t);
        if (B > 0) {   // (an empty batch has no R to point into)
          at::Tensor ubar = mat(Rp + p0, B, np, k);
          gemm(ubar, in.mean, mat(Ap + linear_offset(p0, 0, d), np, d, d).t(), /*accumulate=*/false);
        }
        in.weight_rows<acc_t>(p0, p0 + np, nullptr, nullptr, nullptr, L + B);
        for (int64_t n = 0; n < B; ++n)
          L[n] += forward_segment<scalar_t, acc_t>(X + linear_offset(n, p0, k), Rp + linear_offset(n, p0, k),
                                                   bias == nullptr ? nullptr : bias + p0, I + p0, logs + p0, np);
      }
    }
  });
  reduce_parts<acc_t>(P, plan.nparts, B + d);
  at::Tensor loss = at::empty({B}, R.options());
  acc_t* out = loss.template data_ptr<acc_t>();
  const acc_t* V = in.var.template data_ptr<acc_t>();
  for (int64_t n = 0; n < B; ++n)   // + sum_p Saa_p / (2 sigma2_p) = var_n . w / 2
    out[n] = P[n] + acc_t(0.5) * dot<acc_t>(V + linear_offset(n, 0, d), P + B, d);
  return {loss.to(in.dtype), R};
}

enum Need { kX = 0, kMean, kVar, kA, kBias, kSigma2, kNumInputs };

// The gradients from the saved R = (x - ubar) / sigma2. With G = -diag(grad) R the mean and
// weight gradients are G @ A = -diag(grad) (R @ A) and G^T @ mean = R^T @ (-diag(grad) mean):
// the (B, k) matrix G is never formed. Per pixel tile: the tile's rows of dA (GEMM, then the
// variance part added), its share of R @ A, and the per-pixel outputs (dbias, dsigma2, dx, the
// column weights for dvar).
template <typename scalar_t>
std::array<at::Tensor, kNumInputs> backward_impl(const at::Tensor& grad_in, const at::Tensor& R,
                                                 const Inputs& in, const std::array<bool, kNumInputs>& need) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = in.B, k = in.k, d = in.d;
  const TilePlan plan = pixel_tiles(B, k, 2 * d + B);
  const int64_t nparts = plan.nparts;
  const at::Tensor grad = as_acc(grad_in, in.acc);
  const acc_t* g = grad.template data_ptr<acc_t>();
  const acc_t* Rp = R.template data_ptr<acc_t>();
  const acc_t* Ap = in.A.template data_ptr<acc_t>();
  const acc_t* s2 = in.s2<acc_t>();
  const acc_t* I = in.inv_s2<acc_t>();
  const at::TensorOptions acc_options = R.options();
  std::array<at::Tensor, kNumInputs> out;

  // gv_i = (var^T grad)_i: the variance part of dA and dsigma2
  std::vector<acc_t> gv(need[kA] || need[kSigma2] ? d : 0, acc_t(0));
  const acc_t* V = in.var.template data_ptr<acc_t>();
  if (!gv.empty())
    for (int64_t n = 0; n < B; ++n) add_scaled<acc_t>(gv.data(), V + linear_offset(n, 0, d), g[n], d);
  at::Tensor scaled_mean;   // -grad_n mean_n (B, d), the right factor of dA's GEMM
  if (need[kA]) {
    scaled_mean = at::empty({B, d}, acc_options);
    acc_t* M = scaled_mean.template data_ptr<acc_t>();
    const acc_t* mean = in.mean.template data_ptr<acc_t>();
    for (int64_t n = 0; n < B; ++n)
      for (int64_t i = 0; i < d; ++i) M[linear_offset(n, i, d)] = -g[n] * mean[linear_offset(n, i, d)];
  }
  // R @ A: part 0 accumulates into dmean, the other parts into rows of their own
  at::Tensor dmean = need[kMean] ? at::empty({B, d}, acc_options) : at::Tensor();
  at::Tensor dmean_parts = need[kMean] && nparts > 1 ? at::empty({nparts - 1, B, d}, acc_options) : at::Tensor();
  at::Tensor dA = need[kA] ? at::empty({k, d}, acc_options) : at::Tensor();
  at::Tensor dbias = need[kBias] ? at::empty({k}, acc_options) : at::Tensor();
  at::Tensor dsigma2 = need[kSigma2] ? at::empty({k}, acc_options) : at::Tensor();
  at::Tensor dx = need[kX] ? at::empty({B, k}, acc_options.dtype(in.dtype)) : at::Tensor();
  std::vector<acc_t> saa(need[kSigma2] ? k : 0);
  std::vector<acc_t> w_parts(need[kVar] ? nparts * d : 0, acc_t(0));
  acc_t* dAp = dA.defined() ? dA.template data_ptr<acc_t>() : nullptr;
  acc_t* db = dbias.defined() ? dbias.template data_ptr<acc_t>() : nullptr;
  acc_t* ds = dsigma2.defined() ? dsigma2.template data_ptr<acc_t>() : nullptr;
  scalar_t* dxp = dx.defined() ? dx.template data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, nparts, 1, [&](int64_t q0, int64_t q1) {
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t q = q0; q < q1; ++q) {
      at::Tensor dmean_q;
      if (need[kMean]) dmean_q = q == 0 ? dmean : dmean_parts.select(0, q - 1);
      for (int64_t t = plan.tile_begin(q); t < plan.tile_begin(q + 1); ++t) {
        const int64_t p0 = plan.pixel_begin(t), np = plan.pixel_count(t), p1 = p0 + np;
        if (B > 0) {   // an empty batch has no R to point into: dmean is empty, dA's GEMM part 0
          const at::Tensor R_tile = mat(Rp + p0, B, np, k);
          const at::Tensor A_tile = mat(Ap + linear_offset(p0, 0, d), np, d, d);
          if (need[kMean]) gemm(dmean_q, R_tile, A_tile, /*accumulate=*/t != plan.tile_begin(q));
          if (dAp != nullptr) {
            at::Tensor dA_tile = mat(dAp + linear_offset(p0, 0, d), np, d, d);
            gemm(dA_tile, R_tile.t(), scaled_mean, /*accumulate=*/false);
          }
        } else if (dAp != nullptr) {
          std::fill(dAp + linear_offset(p0, 0, d), dAp + linear_offset(p1, 0, d), acc_t(0));
        }
        in.weight_rows<acc_t>(p0, p1, gv.empty() ? nullptr : gv.data(), dAp, saa.empty() ? nullptr : saa.data(),
                              w_parts.empty() ? nullptr : w_parts.data() + linear_offset(q, 0, d));
        if (db != nullptr) std::fill(db + p0, db + p1, acc_t(0));
        if (ds != nullptr) std::fill(ds + p0, ds + p1, acc_t(0));
        if (db != nullptr || ds != nullptr || dxp != nullptr)
          for (int64_t n = 0; n < B; ++n)
            residual_gradients<scalar_t, acc_t>(db == nullptr ? nullptr : db + p0, ds == nullptr ? nullptr : ds + p0,
                                                dxp == nullptr ? nullptr : dxp + linear_offset(n, p0, k), g[n],
                                                Rp + linear_offset(n, p0, k), s2 + p0, I + p0, np);
        if (ds != nullptr)
          for (int64_t p = p0; p < p1; ++p) ds[p] -= acc_t(0.5) * saa[p] * I[p] * I[p];
      }
    }
  });
  if (need[kMean]) {   // dmean = -diag(grad) (R @ A)
    acc_t* M = dmean.template data_ptr<acc_t>();
    if (plan.ntiles == 0) std::fill(M, M + B * d, acc_t(0));
    if (nparts > 1) reduce_parts<acc_t>(M, nparts, B * d, dmean_parts.template data_ptr<acc_t>());
    for (int64_t n = 0; n < B; ++n)
      for (int64_t i = 0; i < d; ++i) M[linear_offset(n, i, d)] *= -g[n];
    out[kMean] = dmean.to(in.dtype);
  }
  if (need[kA]) out[kA] = dA.to(in.dtype);
  if (need[kVar]) {   // dvar_ni = grad_n w_i / 2
    reduce_parts<acc_t>(w_parts.data(), nparts, d);
    at::Tensor dvar = at::empty({B, d}, acc_options);
    acc_t* Vg = dvar.template data_ptr<acc_t>();
    for (int64_t n = 0; n < B; ++n)
      for (int64_t i = 0; i < d; ++i) Vg[linear_offset(n, i, d)] = acc_t(0.5) * g[n] * w_parts[i];
    out[kVar] = dvar.to(in.dtype);
  }
  if (need[kBias]) out[kBias] = dbias.to(in.dtype);
  if (need[kSigma2]) out[kSigma2] = dsigma2.to(in.dtype);
  if (need[kX]) out[kX] = dx;
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
