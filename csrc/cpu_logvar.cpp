// C++ CPU kernels of the log-variance head on Bernoulli latents (MATH.md §11): the tilted
// contraction stage, fused with its epilogue (epilogue.h: bernoulli_tilt, tilted_logvar_*).
//
// Per (sample n, pixel p) the loss needs, over the latents i (s = l_i - h_pi),
//   hm = sum h_pi sigmoid(l_i),  S = sum softplus(s) - softplus(l_i),
//   T1 = sum a_pi sigmoid(s),    T2 = sum a_pi^2 sigmoid(s) sigmoid(-s):
// O(B k d) exp/log1p work that is not GEMM-shaped. Each thread owns a range of pixels and
// walks rows of A, H and of the logits, so nothing of size (B, k, d) is ever stored. The
// backward recomputes the four sums of a (n, p), forms the coefficients d loss/d(sum) and makes
// a second pass over the latents for the gradients of the logits (per-thread (B, d) partials,
// summed at the end) and of the pixel's rows of A and H (owned by the thread).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "cpu_common.h"
#include "cpu_kernels.h"
#include "cpu_vector_math.h"
#include "epilogue.h"

namespace silent_kernels::cpu {
namespace {

enum Need { kX = 0, kLogits, kA, kBias, kH, kLogvarBias, kNumInputs };

// Per-sample rows of the latent tables (each (B, d), acc_t).
template <typename acc_t>
struct LatentRows {
  const acc_t *logit, *log_p, *log_q, *prob;
};

template <typename scalar_t>
struct LogvarInputs {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor x, A, H;                     // scalar_t, contiguous
  at::Tensor logits, log_p, log_q, probs;  // acc_t (B, d): l, log sigmoid(+-l), sigmoid(l)
  at::Tensor bias, h0;                    // acc_t (k,), zeros when absent
  int64_t B, k, d;

  LogvarInputs(const at::Tensor& x_, const at::Tensor& logits_, const at::Tensor& weight,
               const c10::optional<at::Tensor>& bias_, const at::Tensor& logvar_weight,
               const c10::optional<at::Tensor>& logvar_bias) {
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    x = x_.contiguous();
    A = weight.contiguous();
    H = logvar_weight.contiguous();
    B = x.size(0);
    k = x.size(1);
    d = logits_.size(1);
    logits = as_acc(logits_, acc);
    log_p = at::log_sigmoid(logits).contiguous();
    log_q = at::log_sigmoid(-logits).contiguous();
    probs = at::sigmoid(logits).contiguous();
    const auto opts = x.options().dtype(acc);
    bias = (bias_.has_value() && bias_->defined()) ? as_acc(*bias_, acc) : at::zeros({k}, opts);
    h0 = (logvar_bias.has_value() && logvar_bias->defined()) ? as_acc(*logvar_bias, acc) : at::zeros({k}, opts);
    X = x.template data_ptr<scalar_t>();
    Ap = A.template data_ptr<scalar_t>();
    Hp = H.template data_ptr<scalar_t>();
    bias_p = bias.template data_ptr<acc_t>();
    h0_p = h0.template data_ptr<acc_t>();
    tables = {logits.template data_ptr<acc_t>(), log_p.template data_ptr<acc_t>(),
              log_q.template data_ptr<acc_t>(), probs.template data_ptr<acc_t>()};
  }

  // raw views of the tensors above, read by the loops
  const scalar_t *X, *Ap, *Hp;
  const acc_t *bias_p, *h0_p;
  LatentRows<acc_t> tables;   // row 0 of each latent table

  LatentRows<acc_t> latent_row(int64_t n) const {
    const int64_t row = linear_offset(n, 0, d);
    return {tables.logit + row, tables.log_p + row, tables.log_q + row, tables.prob + row};
  }
};

// The four sums of one (sample, pixel): rows a, h of the pixel (acc_t), rows of the sample.
// Per latent (s = l - h): K(-h) = max(log_p - h, log_q) + log(1 + e^-|s|), the tilted mean
// sigmoid(s) and variance sigmoid(s) sigmoid(-s) (epilogue.h: bernoulli_tilt, written here
// with the vectorising exp and log).
template <typename acc_t>
SK_VECTOR_CLONES TiltedSums<acc_t> tilted_sums(const acc_t* a, const acc_t* h, const LatentRows<acc_t>& z, int64_t d) {
  acc_t hm = 0, S = 0, T1 = 0, T2 = 0;
  const acc_t *l = z.logit, *pr = z.prob, *lp = z.log_p, *lq = z.log_q;
#pragma omp simd reduction(+ : hm, S, T1, T2)
  for (int64_t i = 0; i < d; ++i) {
    const acc_t sv = l[i] - h[i];
    const acc_t e = vexp(-std::fabs(sv));
    const acc_t inv = acc_t(1) / (acc_t(1) + e);
    const acc_t shifted = lp[i] - h[i];
    hm += h[i] * pr[i];
    S += (shifted > lq[i] ? shifted : lq[i]) + vlog(acc_t(1) + e);
    T1 += a[i] * (sv >= acc_t(0) ? inv : e * inv);
    T2 += a[i] * a[i] * e * inv * inv;
  }
  return TiltedSums<acc_t>{hm, S, T1, T2};
}

// The second backward pass over the latents of one (sample, pixel), g = d loss/d(sums) scaled:
// accumulates the logits' gradient into dl and the pixel's rows' gradients into da, dh.
template <typename acc_t>
SK_VECTOR_CLONES void tilted_row_grads(const acc_t* a, const acc_t* h, const acc_t* l, const acc_t* pr,
                                       const TiltedSums<acc_t>& g, int64_t d, acc_t* dl, acc_t* da, acc_t* dh) {
  const acc_t gS = g.S, gT1 = g.T1, gT2 = g.T2, ghm = g.hm;
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) {
    const acc_t sv = l[i] - h[i];
    const acc_t e = vexp(-std::fabs(sv));
    const acc_t inv = acc_t(1) / (acc_t(1) + e);
    const acc_t mean = sv >= acc_t(0) ? inv : e * inv;
    const acc_t var = e * inv * inv;
    const acc_t w = gS * mean + gT1 * a[i] * var + gT2 * a[i] * a[i] * var * (acc_t(1) - acc_t(2) * mean);
    dl[i] += w - gS * pr[i] + ghm * h[i] * pr[i] * (acc_t(1) - pr[i]);
    dh[i] += ghm * pr[i] - w;
    da[i] += gT1 * mean + acc_t(2) * gT2 * a[i] * var;
  }
}

template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* src, int64_t d, acc_t* dst) {
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

int64_t part_count(int64_t k) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), k));
}

template <typename scalar_t>
at::Tensor forward_impl(const LogvarInputs<scalar_t>& in) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = in.B, k = in.k, d = in.d;
  if (B == 0) return at::zeros({0}, in.x.options());
  const int64_t nparts = part_count(k);
  at::Tensor loss_parts = at::zeros({nparts, B}, in.x.options().dtype(in.logits.scalar_type()));

  at::parallel_for(0, nparts, 1, [&](int64_t part_begin, int64_t part_end) {
    std::vector<acc_t> a(d), h(d);
    for (int64_t part = part_begin; part < part_end; ++part) {
      acc_t* loss = loss_parts.template data_ptr<acc_t>() + linear_offset(part, 0, B);
      for (int64_t p = part * k / nparts; p < (part + 1) * k / nparts; ++p) {
        load_row(in.Ap + linear_offset(p, 0, d), d, a.data());
        load_row(in.Hp + linear_offset(p, 0, d), d, h.data());
        for (int64_t n = 0; n < B; ++n) {
          const TiltedSums<acc_t> s = tilted_sums(a.data(), h.data(), in.latent_row(n), d);
          loss[n] += tilted_logvar_pixel_nll<acc_t>(static_cast<acc_t>(in.X[linear_offset(n, p, k)]),
                                                    in.bias_p[p], in.h0_p[p], s);
        }
      }
    }
  });
  return sum_parts(loss_parts).to(in.x.scalar_type());
}

template <typename scalar_t>
std::array<at::Tensor, kNumInputs> backward_impl(const at::Tensor& grad_in, const LogvarInputs<scalar_t>& in,
                                                 const std::array<bool, kNumInputs>& need) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = in.B, k = in.k, d = in.d;
  const auto out_opts = in.x.options();
  const auto acc_opts = out_opts.dtype(in.logits.scalar_type());
  std::array<at::Tensor, kNumInputs> out;
  if (need[kX]) out[kX] = at::zeros({B, k}, out_opts);
  if (need[kA]) out[kA] = at::zeros({k, d}, out_opts);
  if (need[kH]) out[kH] = at::zeros({k, d}, out_opts);
  if (need[kBias]) out[kBias] = at::zeros({k}, out_opts);
  if (need[kLogvarBias]) out[kLogvarBias] = at::zeros({k}, out_opts);
  if (B == 0) {
    if (need[kLogits]) out[kLogits] = at::zeros({0, d}, out_opts);
    return out;
  }
  const int64_t nparts = part_count(k);
  at::Tensor dlogit_parts = need[kLogits] ? at::zeros({nparts, B, d}, acc_opts) : at::Tensor();
  const at::Tensor grad = as_acc(grad_in, in.logits.scalar_type());
  const bool second_pass = need[kLogits] || need[kA] || need[kH];

  const acc_t* G = grad.template data_ptr<acc_t>();

  at::parallel_for(0, nparts, 1, [&](int64_t part_begin, int64_t part_end) {
    std::vector<acc_t> a(d), h(d), da(d), dh(d), dl_scratch(need[kLogits] ? 0 : d);
    for (int64_t part = part_begin; part < part_end; ++part) {
      acc_t* dl_part = need[kLogits] ? dlogit_parts.template data_ptr<acc_t>() + linear_offset(part, 0, B * d)
                                     : nullptr;
      for (int64_t p = part * k / nparts; p < (part + 1) * k / nparts; ++p) {
        load_row(in.Ap + linear_offset(p, 0, d), d, a.data());
        load_row(in.Hp + linear_offset(p, 0, d), d, h.data());
        std::fill(da.begin(), da.end(), acc_t(0));
        std::fill(dh.begin(), dh.end(), acc_t(0));
        acc_t dbias = 0, dh0 = 0;
        for (int64_t n = 0; n < B; ++n) {
          const int64_t row = linear_offset(n, 0, d);
          const LatentRows<acc_t> z = in.latent_row(n);
          const TiltedSums<acc_t> s = tilted_sums(a.data(), h.data(), z, d);
          const acc_t xv = static_cast<acc_t>(in.X[linear_offset(n, p, k)]);
          TiltedSums<acc_t> g = tilted_logvar_pixel_grad<acc_t>(xv, in.bias_p[p], in.h0_p[p], s);
          const acc_t gn = G[n];
          g.hm *= gn;
          g.S *= gn;
          g.T1 *= gn;
          g.T2 *= gn;
          dbias += g.T1;
          dh0 += g.hm - g.S;
          if (need[kX]) out[kX].template data_ptr<scalar_t>()[linear_offset(n, p, k)] = static_cast<scalar_t>(-g.T1);
          if (!second_pass) continue;
          tilted_row_grads(a.data(), h.data(), z.logit, z.prob, g, d, dl_part != nullptr ? dl_part + row : dl_scratch.data(),
                           da.data(), dh.data());
        }
        if (need[kBias]) out[kBias].template data_ptr<scalar_t>()[p] = static_cast<scalar_t>(dbias);
        if (need[kLogvarBias]) out[kLogvarBias].template data_ptr<scalar_t>()[p] = static_cast<scalar_t>(dh0);
        if (need[kA]) {
          scalar_t* o = out[kA].template data_ptr<scalar_t>() + linear_offset(p, 0, d);
          for (int64_t i = 0; i < d; ++i) o[i] = static_cast<scalar_t>(da[i]);
        }
        if (need[kH]) {
          scalar_t* o = out[kH].template data_ptr<scalar_t>() + linear_offset(p, 0, d);
          for (int64_t i = 0; i < d; ++i) o[i] = static_cast<scalar_t>(dh[i]);
        }
      }
    }
  });
  if (need[kLogits]) out[kLogits] = sum_parts(dlogit_parts).to(in.x.scalar_type());
  return out;
}


}  // namespace

at::Tensor bernoulli_logvar_nll(const at::Tensor& x, const at::Tensor& logits, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, const at::Tensor& logvar_weight,
                                const c10::optional<at::Tensor>& logvar_bias) {
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bernoulli_logvar_nll_cpu", [&] {
    loss = forward_impl<scalar_t>(LogvarInputs<scalar_t>(x, logits, weight, bias, logvar_weight, logvar_bias));
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bernoulli_logvar_nll_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& logits,
                              const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              const at::Tensor& logvar_weight,
                              const c10::optional<at::Tensor>& logvar_bias, const std::vector<bool>& needs) {
  const std::array<bool, kNumInputs> present = {true, true, true, given(bias), true, given(logvar_bias)};
  bool any = false;
  const std::array<bool, kNumInputs> need = needed_gradients(needs, present, &any);
  std::array<at::Tensor, kNumInputs> out;
  if (any) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bernoulli_logvar_nll_backward_cpu", [&] {
      out = backward_impl<scalar_t>(
          grad, LogvarInputs<scalar_t>(x, logits, weight, bias, logvar_weight, logvar_bias), need);
    });
  }
  for (auto& t : out)
    if (!t.defined()) t = empty_grad(x);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

}  // namespace silent_kernels::cpu
