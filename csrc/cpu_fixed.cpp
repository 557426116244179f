// C++ CPU kernels of the fixed-variance head (MATH.md §3, §5): forward and backward.
//
// Per pixel: ((x - ubar)^2 + Saa) / (2 sigma2) + 0.5 log(2 pi sigma2). The only GEMM-shaped
// work is ubar = mean @ A^T (+ b), done per pixel tile (cpu_common.h). The variance part is
// linear in Saa, so its sum over pixels collapses to var . w with the column weights
// w_i = sum_p A_pi^2 / sigma2_p: O(kd) + O(Bd), no GEMM. Backward recomputes ubar per
// tile, forms the residual coefficients G = -grad * (x - ubar) / sigma2 in place, and
// uses two GEMMs per (chunk, tile) only for the gradients that are asked for:
//   dmean += G @ A_tile,   H = G^T @ mean  ->  dA = H + A * (1/sigma2_p) * (var^T grad)_i.
// The variance gradient is rank one: dvar = grad w^T / 2.
#include <ATen/Dispatch.h>

#include <array>
#include <cmath>
#include <type_traits>

#include "cpu_common.h"
#include "cpu_kernels.h"
#include "epilogue.h"

namespace silent_kernels::cpu {
namespace {

// One GEMM per (chunk, tile) and little per-pixel work: larger tiles than the precision
// head's (one tile per thread at the benchmark size) keep the GEMMs efficient.
constexpr int64_t kFixedTileBudget = 1 << 20;

template <typename scalar_t>
struct Inputs {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor x, A;             // scalar_t, contiguous
  at::Tensor mean, var;        // acc_t, contiguous
  at::Tensor bias;             // acc_t, zeros when absent
  at::Tensor inv_s2, log_s2;   // acc_t (k,)
  int64_t B, k, d;

  Inputs(const at::Tensor& x_, const at::Tensor& mean_, const at::Tensor& var_,
         const at::Tensor& weight, const c10::optional<at::Tensor>& bias_,
         const at::Tensor& sigma2) {
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    x = x_.contiguous();
    A = weight.contiguous();
    B = x.size(0);
    k = x.size(1);
    d = mean_.size(1);
    mean = as_acc(mean_, acc);
    var = as_acc(var_, acc);
    const auto opts = x.options().dtype(acc);
    bias = (bias_.has_value() && bias_->defined()) ? as_acc(*bias_, acc) : at::zeros({k}, opts);
    const at::Tensor s2 = sigma2.to(acc);  // a stride-0 (expanded) view is read through at::
    inv_s2 = s2.reciprocal().contiguous();
    log_s2 = s2.log().contiguous();
  }
};

// Rows [p0, p0 + np) of A in the accumulation dtype: the rows themselves when the dtypes
// agree, else converted into `buf`. Adds sum_p A_pi^2 / sigma2_p into w when w is given.
template <typename scalar_t, typename acc_t>
const acc_t* tile_rows(const scalar_t* A, int64_t p0, int64_t np, int64_t d, acc_t* buf,
                       const acc_t* inv_s2, acc_t* w) {
  const acc_t* rows;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    rows = A + linear_offset(p0, 0, d);
  } else {
    for (int64_t p = 0; p < np; ++p) {
      const scalar_t* a = A + linear_offset(p0 + p, 0, d);
      acc_t* o = buf + linear_offset(p, 0, d);
      for (int64_t i = 0; i < d; ++i) o[i] = static_cast<acc_t>(a[i]);
    }
    rows = buf;
  }
  if (w != nullptr) {
    for (int64_t p = 0; p < np; ++p) {
      const acc_t* a = rows + linear_offset(p, 0, d);
      const acc_t s = inv_s2[p0 + p];
      acc_t* SK_RESTRICT wv = w;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) wv[i] += a[i] * a[i] * s;
    }
  }
  return rows;
}

template <typename acc_t>
at::Tensor workspace(int64_t elements) {
  return at::empty({elements}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// ------------------------------------------------------------------------------ forward
template <typename scalar_t>
at::Tensor forward_impl(const Inputs<scalar_t>& in) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool convert = !std::is_same_v<scalar_t, acc_t>;
  const int64_t B = in.B, k = in.k, d = in.d;
  const auto acc_opts = in.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  if (B == 0) return at::zeros({0}, in.x.options());
  const TilePlan plan = make_plan(B, k, d, 1, 1, kFixedTileBudget);
  at::Tensor loss_parts = at::zeros({plan.nparts, B}, acc_opts);
  at::Tensor w_parts = at::zeros({plan.nparts, d}, acc_opts);

  const scalar_t* X = in.x.template data_ptr<scalar_t>();
  const scalar_t* A = in.A.template data_ptr<scalar_t>();
  const acc_t* bias = in.bias.template data_ptr<acc_t>();
  const acc_t* inv_s2 = in.inv_s2.template data_ptr<acc_t>();
  const acc_t* log_s2 = in.log_s2.template data_ptr<acc_t>();
  const acc_t* M = in.mean.template data_ptr<acc_t>();

  at::parallel_for(0, plan.nparts, 1, [&](int64_t q_begin, int64_t q_end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor ws = workspace<acc_t>((convert ? plan.tile * d : 0) + plan.batch_chunk * plan.tile);
    acc_t* abuf = ws.template data_ptr<acc_t>();
    acc_t* ybuf = abuf + (convert ? plan.tile * d : 0);
    for (int64_t q = q_begin; q < q_end; ++q) {
      acc_t* loss = loss_parts.template data_ptr<acc_t>() + linear_offset(q, 0, B);
      acc_t* w = w_parts.template data_ptr<acc_t>() + linear_offset(q, 0, d);
      for (int64_t t = plan.tile_begin(q); t < plan.tile_begin(q + 1); ++t) {
        const int64_t p0 = plan.pixel_begin(t), np = plan.pixel_count(t);
        const acc_t* rows = tile_rows<scalar_t, acc_t>(A, p0, np, d, abuf, inv_s2, w);
        for (int64_t n0 = 0; n0 < B; n0 += plan.batch_chunk) {
          const int64_t nb = std::min(plan.batch_chunk, B - n0);
          at::Tensor y = mat(ybuf, nb, np, np);
          gemm(y, mat(M + linear_offset(n0, 0, d), nb, d, d), mat(rows, np, d, d).t(), false);
          for (int64_t r = 0; r < nb; ++r) {
            const scalar_t* xr = X + linear_offset(n0 + r, p0, k);
            const acc_t* yr = ybuf + linear_offset(r, 0, np);
            const acc_t* SK_RESTRICT bp = bias + p0;
            const acc_t* SK_RESTRICT ip = inv_s2 + p0;
            const acc_t* SK_RESTRICT lp = log_s2 + p0;
            acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int64_t p = 0; p < np; ++p) {
              const acc_t resid = static_cast<acc_t>(xr[p]) - (yr[p] + bp[p]);
              sum += fixed_pixel_nll<acc_t>(resid, acc_t(0), ip[p], lp[p]);
            }
            loss[n0 + r] += sum;
          }
        }
      }
    }
  });
  // + sum_p Saa_p / (2 sigma2_p) = var . w / 2
  at::Tensor loss = sum_parts(loss_parts).add_(at::mv(in.var, sum_parts(w_parts)), 0.5);
  return loss.to(in.x.scalar_type());
}

// ----------------------------------------------------------------------------- backward
enum Need { kX = 0, kMean, kVar, kA, kBias, kSigma2, kNumInputs };

template <typename scalar_t>
std::array<at::Tensor, kNumInputs> backward_impl(const at::Tensor& grad_in, const Inputs<scalar_t>& in,
                                                 std::array<bool, kNumInputs> need) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool convert = !std::is_same_v<scalar_t, acc_t>;
  const int64_t B = in.B, k = in.k, d = in.d;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const auto acc_opts = in.x.options().dtype(acc);
  const auto out_opts = in.x.options();

  std::array<at::Tensor, kNumInputs> out;
  if (need[kX]) out[kX] = at::empty({B, k}, out_opts);
  if (need[kA]) out[kA] = at::empty({k, d}, out_opts);
  if (need[kBias]) out[kBias] = at::empty({k}, out_opts);
  if (need[kSigma2]) out[kSigma2] = at::empty({k}, out_opts);
  if (B == 0) {
    for (auto& t : out) if (t.defined()) t.zero_();
    if (need[kMean]) out[kMean] = at::zeros({0, d}, out_opts);
    if (need[kVar]) out[kVar] = at::zeros({0, d}, out_opts);
    return out;
  }

  const at::Tensor grad = as_acc(grad_in, acc);
  // The residual pass (one GEMM per chunk and tile) is needed by every gradient but var's.
  const bool need_resid = need[kX] || need[kMean] || need[kA] || need[kBias] || need[kSigma2];
  const bool need_w = need[kVar];
  // (var^T grad)_i: the variance part of dA and dsigma2.
  const at::Tensor gv = (need[kA] || need[kSigma2]) ? at::mv(in.var.t(), grad) : at::Tensor();
  const TilePlan plan = make_plan(B, k, d, int64_t(convert) + int64_t(need[kA]) + 1, 1, kFixedTileBudget);
  at::Tensor dmean_parts = need[kMean] ? at::zeros({plan.nparts, B, d}, acc_opts) : at::Tensor();
  at::Tensor w_parts = need_w ? at::zeros({plan.nparts, d}, acc_opts) : at::Tensor();

  const scalar_t* X = in.x.template data_ptr<scalar_t>();
  const scalar_t* A = in.A.template data_ptr<scalar_t>();
  const acc_t* bias = in.bias.template data_ptr<acc_t>();
  const acc_t* inv_s2 = in.inv_s2.template data_ptr<acc_t>();
  const acc_t* M = in.mean.template data_ptr<acc_t>();
  const acc_t* G = grad.template data_ptr<acc_t>();
  const acc_t* GV = gv.defined() ? gv.template data_ptr<acc_t>() : nullptr;

  at::parallel_for(0, plan.nparts, 1, [&](int64_t q_begin, int64_t q_end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const int64_t a_size = convert ? plan.tile * d : 0, h_size = need[kA] ? plan.tile * d : 0;
    const int64_t y_size = plan.batch_chunk * plan.tile;
    at::Tensor ws = workspace<acc_t>(a_size + h_size + y_size + 2 * plan.tile);
    acc_t* abuf = ws.template data_ptr<acc_t>();
    acc_t* hbuf = abuf + a_size;
    acc_t* ybuf = hbuf + h_size;
    acc_t* dbias = ybuf + y_size;
    acc_t* dsig = dbias + plan.tile;
    for (int64_t q = q_begin; q < q_end; ++q) {
      acc_t* w = need_w ? w_parts.template data_ptr<acc_t>() + linear_offset(q, 0, d) : nullptr;
      for (int64_t t = plan.tile_begin(q); t < plan.tile_begin(q + 1); ++t) {
        const int64_t p0 = plan.pixel_begin(t), np = plan.pixel_count(t);
        const acc_t* rows = tile_rows<scalar_t, acc_t>(A, p0, np, d, abuf, inv_s2, w);
        if (!need_resid) continue;
        for (int64_t p = 0; p < np; ++p) dbias[p] = dsig[p] = acc_t(0);
        for (int64_t n0 = 0; n0 < B; n0 += plan.batch_chunk) {
          const int64_t nb = std::min(plan.batch_chunk, B - n0);
          at::Tensor y = mat(ybuf, nb, np, np);
          const at::Tensor m = mat(M + linear_offset(n0, 0, d), nb, d, d);
          gemm(y, m, mat(rows, np, d, d).t(), false);
          for (int64_t r = 0; r < nb; ++r) {
            const scalar_t* xr = X + linear_offset(n0 + r, p0, k);
            acc_t* yr = ybuf + linear_offset(r, 0, np);
            const acc_t gn = G[n0 + r];
            const acc_t* SK_RESTRICT bp = bias + p0;
            const acc_t* SK_RESTRICT ip = inv_s2 + p0;
#pragma omp simd
            for (int64_t p = 0; p < np; ++p) {
              const acc_t inv = ip[p];
              const acc_t resid = static_cast<acc_t>(xr[p]) - (yr[p] + bp[p]);
              const acc_t g = -gn * resid * inv;  // d(loss)/d(ubar), times grad
              yr[p] = g;
              dbias[p] += g;
              dsig[p] += gn * fixed_pixel_dsigma2<acc_t>(resid, acc_t(0), inv);
            }
            if (need[kX]) {
              scalar_t* dxr = out[kX].template data_ptr<scalar_t>() + linear_offset(n0 + r, p0, k);
              for (int64_t p = 0; p < np; ++p) dxr[p] = static_cast<scalar_t>(-yr[p]);
            }
          }
          if (need[kMean]) {
            at::Tensor dm = mat(dmean_parts.template data_ptr<acc_t>() + linear_offset(q * B + n0, 0, d), nb, d, d);
            gemm(dm, y, mat(rows, np, d, d), /*accumulate=*/true);
          }
          if (need[kA]) {
            at::Tensor h = mat(hbuf, np, d, d);
            gemm(h, y.t(), m, /*accumulate=*/n0 > 0);
          }
        }
        if (need[kBias]) {
          scalar_t* db = out[kBias].template data_ptr<scalar_t>() + p0;
          for (int64_t p = 0; p < np; ++p) db[p] = static_cast<scalar_t>(dbias[p]);
        }
        if (need[kA] || need[kSigma2]) {
          for (int64_t p = 0; p < np; ++p) {
            const acc_t* a = rows + linear_offset(p, 0, d);
            const acc_t inv = inv_s2[p0 + p];
            if (need[kA]) {
              const acc_t* h = hbuf + linear_offset(p, 0, d);
              scalar_t* da = out[kA].template data_ptr<scalar_t>() + linear_offset(p0 + p, 0, d);
#pragma omp simd
              for (int64_t i = 0; i < d; ++i) da[i] = static_cast<scalar_t>(h[i] + a[i] * inv * GV[i]);
            }
            if (need[kSigma2]) {
              acc_t s = 0;  // sum_n grad_n Saa_np = sum_i A_pi^2 (var^T grad)_i
#pragma omp simd reduction(+ : s)
              for (int64_t i = 0; i < d; ++i) s += a[i] * a[i] * GV[i];
              out[kSigma2].template data_ptr<scalar_t>()[p0 + p] =
                  static_cast<scalar_t>(dsig[p] - acc_t(0.5) * inv * inv * s);
            }
          }
        }
      }
    }
  });

  if (need[kMean]) out[kMean] = sum_parts(dmean_parts).to(in.x.scalar_type());
  if (need[kVar]) out[kVar] = at::outer(grad, sum_parts(w_parts)).mul_(0.5).to(in.x.scalar_type());
  return out;
}

}  // namespace

at::Tensor fixed_nll(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                     const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                     const at::Tensor& sigma2) {
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fixed_nll_cpu", [&] {
    loss = forward_impl<scalar_t>(Inputs<scalar_t>(x, mean, var, weight, bias, sigma2));
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fixed_nll_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                   const at::Tensor& var, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias, const at::Tensor& sigma2,
                   const std::vector<bool>& needs) {
  const bool has_bias = bias.has_value() && bias->defined();
  std::array<bool, kNumInputs> need{};
  bool any = false;
  for (int i = 0; i < kNumInputs; ++i) {
    need[i] = needs[i] && (i != kBias || has_bias);
    any = any || need[i];
  }
  std::array<at::Tensor, kNumInputs> out;
  if (any) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fixed_nll_backward_cpu", [&] {
      out = backward_impl<scalar_t>(grad, Inputs<scalar_t>(x, mean, var, weight, bias, sigma2), need);
    });
  }
  for (auto& t : out)
    if (!t.defined()) t = empty_grad(x);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

}  // namespace silent_kernels::cpu
