// C++ CPU kernels of one-hot categorical latents (MATH.md §12): the per-group contraction stage
// (categorical.h) fused with the precision (Taylor log term) and log-variance epilogues. The fixed
// head needs no per-group pass at all (cpu_categorical_fixed.cpp); the entry points route it there.
//
// Each thread owns a range of pixels; per (sample, pixel) it walks the G groups of the sample's
// probabilities and the pixel's weight rows, so the (B, k, G) per-group moments are never stored.
// The backward recomputes a (sample, pixel)'s sums (keeping each group's stats), takes the head's
// coefficients, and makes a second pass over the groups for the gradients of the logits (per-thread
// (B, G K) partials summed at the end) and of the pixel's weight rows (owned by the thread).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "categorical.h"
#include "cpu_common.h"
#include "cpu_kernels.h"
#include "cpu_vector_math.h"

namespace silent_kernels::cpu {
namespace {

enum Need { kX = 0, kLogits, kA, kBias, kW2, kBias2, kSigma2, kNumInputs };

template <typename scalar_t>
struct CategoricalInputs {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor x, A, W2;               // scalar_t (W2 undefined for the fixed head)
  at::Tensor log_prob, prob;         // acc_t (B, G K), normalised per group
  at::Tensor bias, bias2;            // acc_t (k,); zeros when absent
  int64_t B, k, G, K;

  CategoricalInputs(const at::Tensor& x_, const at::Tensor& logits, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias_, const c10::optional<at::Tensor>& w2,
                    const c10::optional<at::Tensor>& bias2_) {
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    x = x_.contiguous();
    A = weight.contiguous();
    if (w2.has_value() && w2->defined()) W2 = w2->contiguous();
    B = x.size(0);
    k = x.size(1);
    G = logits.size(1);
    K = logits.size(2);
    log_prob = at::log_softmax(as_acc(logits, acc), -1).reshape({B, G * K}).contiguous();
    prob = log_prob.exp();
    const auto opts = x.options().dtype(acc);
    auto or_fill = [&](const c10::optional<at::Tensor>& t, double v) {
      return (t.has_value() && t->defined()) ? as_acc(*t, acc) : at::full({k}, v, opts);
    };
    bias = or_fill(bias_, 0.0);
    bias2 = or_fill(bias2_, 0.0);
  }
};

template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* src, int64_t n, acc_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

// Log-variance head, one (sample, pixel): all G groups tilted by exp(-h.z_g) at once (the
// per-group math of categorical.h's tilt_group, laid out so that its exponentials are one
// vectorised pass over the G K entries). w: the entries' weights exp(lp - h - shift_g); per group:
// the shift (max of lp - h), norm = sum w, tilted mean and variance of a.z_g, and E[h.z_g].
template <typename acc_t>
struct TiltedGroups {
  acc_t *w, *shift, *norm, *mean, *var, *hm;
};

template <typename acc_t>
SK_VECTOR_CLONES void exp_of_shifted(const acc_t* lp, const acc_t* h, int64_t d, acc_t* w) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) w[i] = vexp(lp[i] - h[i] - w[i]);  // w holds the entry's shift
}

template <typename acc_t>
TiltedSums<acc_t> tilt_groups(const acc_t* a, const acc_t* h, const acc_t* lp, const acc_t* prob, int64_t G,
                              int64_t K, const TiltedGroups<acc_t>& t) {
  for (int64_t g = 0; g < G; ++g) {
    acc_t m = lp[g * K] - h[g * K];
    for (int64_t j = 1; j < K; ++j) m = std::max(m, lp[g * K + j] - h[g * K + j]);
    t.shift[g] = m;
    for (int64_t j = 0; j < K; ++j) t.w[g * K + j] = m;
  }
  exp_of_shifted(lp, h, G * K, t.w);
  TiltedSums<acc_t> s{acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  for (int64_t g = 0; g < G; ++g) {
    const acc_t *wg = t.w + g * K, *ag = a + g * K, *hg = h + g * K, *pg = prob + g * K;
    acc_t norm = 0, wa = 0, hm = 0;
    for (int64_t j = 0; j < K; ++j) {
      norm += wg[j];
      wa += wg[j] * ag[j];
      hm += pg[j] * hg[j];
    }
    const acc_t mean = wa / norm;
    acc_t var = 0;
    for (int64_t j = 0; j < K; ++j) var += wg[j] * (ag[j] - mean) * (ag[j] - mean);
    var /= norm;
    t.norm[g] = norm;
    t.mean[g] = mean;
    t.var[g] = var;
    t.hm[g] = hm;
    s.hm += hm;
    s.S += t.shift[g] + std::log(norm);
    s.T1 += mean;
    s.T2 += var;
  }
  return s;
}

// Gradient of c.hm hm + c.S log_mgf + c.T1 mean + c.T2 var summed over the groups (c scaled),
// from tilt_groups' state; as categorical.h's tilt_group_grad.
template <typename acc_t>
void tilt_groups_grad(const acc_t* a, const acc_t* h, const acc_t* prob, int64_t G, int64_t K,
                      const TiltedGroups<acc_t>& t, const TiltedSums<acc_t>& c, acc_t* dlogit, acc_t* da, acc_t* dh) {
  for (int64_t g = 0; g < G; ++g) {
    const acc_t inv = acc_t(1) / t.norm[g], mean = t.mean[g], var = t.var[g], hm = t.hm[g];
    for (int64_t j = g * K; j < (g + 1) * K; ++j) {
      const acc_t p = prob[j], pt = t.w[j] * inv, dev = a[j] - mean;
      const acc_t tilted = c.S * pt + c.T1 * pt * dev + c.T2 * pt * (dev * dev - var);
      if (dlogit != nullptr) dlogit[j] += c.hm * p * (h[j] - hm) + tilted - c.S * p;
      dh[j] += c.hm * p - tilted;
      da[j] += c.T1 * pt + acc_t(2) * c.T2 * pt * dev;
    }
  }
}

// One (sample, pixel): the head's loss, and (grad != 0) the gradients it accumulates.
template <Head HD, typename acc_t>
struct PixelWork {
  const acc_t *a, *w2, *lp, *prob;
  int64_t G, K;
  acc_t x, b, b2;
  TiltedGroups<acc_t> tilted;  // the log-variance head's per-thread scratch
  GroupStats<acc_t>* stats;    // the precision head's per-thread scratch (G): the backward's group stats

  acc_t loss() const {
    if constexpr (HD == Head::kLogVar) {
      return tilted_logvar_pixel_nll(x, b, b2, tilt_groups(a, w2, lp, prob, G, K, tilted));
    } else {
      return precision_pixel_nll(x, terms());
    }
  }

  // The pixel's contractions; with `keep`, each group's stats are also written to keep[g].
  PixelTerms<acc_t> terms(GroupStats<acc_t>* keep = nullptr) const {
    PixelTerms<acc_t> t{b, b2, acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    for (int64_t g = 0; g < G; ++g) {
      const GroupStats<acc_t> st = group_stats<acc_t, acc_t>(a + g * K, w2 + g * K, prob + g * K, int(K), true);
      if (keep != nullptr) keep[g] = st;
      add_group(t, st);
    }
    return t;
  }

  // Gradients scaled by gn; returns d loss/d x, writes d/d bias, bias2 into db.
  acc_t backward(acc_t gn, acc_t* dlogit, acc_t* da, acc_t* dw2, std::array<acc_t, 2>& db) const {
    if constexpr (HD == Head::kLogVar) {
      TiltedSums<acc_t> c = tilted_logvar_pixel_grad(x, b, b2, tilt_groups(a, w2, lp, prob, G, K, tilted));
      c.hm *= gn;
      c.S *= gn;
      c.T1 *= gn;
      c.T2 *= gn;
      tilt_groups_grad(a, w2, prob, G, K, tilted, c, dlogit, da, dw2);
      db[0] += c.T1;
      db[1] += c.hm - c.S;
      return -c.T1;
    } else {
      const PixelTerms<acc_t> c = scaled(precision_pixel_grad(x, terms(stats)), gn);
      for (int64_t g = 0; g < G; ++g)
        group_grad(a + g * K, w2 + g * K, prob + g * K, int(K), stats[g], c, dlogit == nullptr ? nullptr : dlogit + g * K,
                   da + g * K, dw2 + g * K);
      db[0] += c.ubar;
      db[1] += c.vbar;
      return -c.ubar;
    }
  }
};

int64_t part_count(int64_t k) { return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), k)); }

template <Head HD, typename scalar_t>
std::array<at::Tensor, kNumInputs> run(const CategoricalInputs<scalar_t>& in, const at::Tensor* grad_in,
                                       const std::array<bool, kNumInputs>& need, at::Tensor* loss_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = in.B, k = in.k, d = in.G * in.K;
  const auto acc_opts = in.x.options().dtype(in.prob.scalar_type());
  const int64_t nparts = part_count(k);
  const bool backward = grad_in != nullptr;
  std::array<at::Tensor, kNumInputs> out;
  at::Tensor loss_parts = at::zeros({nparts, backward ? 0 : B}, acc_opts);
  at::Tensor dlogit_parts = (backward && need[kLogits]) ? at::zeros({nparts, B, d}, acc_opts) : at::Tensor();
  at::Tensor dx = backward ? at::zeros({B, k}, acc_opts) : at::Tensor();
  at::Tensor dA = backward ? at::zeros({k, d}, acc_opts) : at::Tensor();
  at::Tensor dW2 = (backward && in.W2.defined()) ? at::zeros({k, d}, acc_opts) : at::Tensor();
  at::Tensor dbias = backward ? at::zeros({2, k}, acc_opts) : at::Tensor();
  const at::Tensor grad = backward ? as_acc(*grad_in, in.prob.scalar_type()) : at::Tensor();

  at::parallel_for(0, nparts, 1, [&](int64_t part_begin, int64_t part_end) {
    std::vector<acc_t> a(d), w2(in.W2.defined() ? d : 0), scratch(d + 5 * in.G);
    std::vector<GroupStats<acc_t>> stats(in.G);
    acc_t* sp = scratch.data();
    const TiltedGroups<acc_t> tilted{sp, sp + d, sp + d + in.G, sp + d + 2 * in.G, sp + d + 3 * in.G,
                                     sp + d + 4 * in.G};
    for (int64_t part = part_begin; part < part_end; ++part) {
      for (int64_t p = part * k / nparts; p < (part + 1) * k / nparts; ++p) {
        load_row(in.A.template data_ptr<scalar_t>() + linear_offset(p, 0, d), d, a.data());
        if (in.W2.defined()) load_row(in.W2.template data_ptr<scalar_t>() + linear_offset(p, 0, d), d, w2.data());
        std::array<acc_t, 2> db{acc_t(0), acc_t(0)};
        for (int64_t n = 0; n < B; ++n) {
          const int64_t row = linear_offset(n, 0, d);
          const PixelWork<HD, acc_t> w{a.data(), in.W2.defined() ? w2.data() : nullptr,
                                       in.log_prob.template data_ptr<acc_t>() + row,
                                       in.prob.template data_ptr<acc_t>() + row, in.G, in.K,
                                       static_cast<acc_t>(in.x.template data_ptr<scalar_t>()[linear_offset(n, p, k)]),
                                       in.bias.template data_ptr<acc_t>()[p], in.bias2.template data_ptr<acc_t>()[p],
                                       tilted, stats.data()};
          if (!backward) {
            loss_parts.template data_ptr<acc_t>()[linear_offset(part, n, B)] += w.loss();
            continue;
          }
          acc_t* dl = dlogit_parts.defined() ? dlogit_parts.template data_ptr<acc_t>() + linear_offset(part * B + n, 0, d) : nullptr;
          dx.template data_ptr<acc_t>()[linear_offset(n, p, k)] =
              w.backward(grad.template data_ptr<acc_t>()[n], dl, dA.template data_ptr<acc_t>() + linear_offset(p, 0, d),
                         dW2.defined() ? dW2.template data_ptr<acc_t>() + linear_offset(p, 0, d) : nullptr, db);
        }
        if (backward)
          for (int i = 0; i < 2; ++i) dbias.template data_ptr<acc_t>()[linear_offset(i, p, k)] = db[i];
      }
    }
  });
  const auto dtype = in.x.scalar_type();
  if (!backward) {
    *loss_out = sum_parts(loss_parts).to(dtype);
    return out;
  }
  if (need[kX]) out[kX] = dx.to(dtype);
  if (need[kLogits]) out[kLogits] = sum_parts(dlogit_parts).reshape({B, in.G, in.K}).to(dtype);
  if (need[kA]) out[kA] = dA.to(dtype);
  if (need[kW2]) out[kW2] = dW2.to(dtype);
  if (need[kBias]) out[kBias] = dbias[0].to(dtype);
  if (need[kBias2]) out[kBias2] = dbias[1].to(dtype);
  return out;
}

template <typename Fn>
auto dispatch_head(int64_t head, Fn&& fn) {
  if (head == int64_t(Head::kLogVar)) return fn(std::integral_constant<Head, Head::kLogVar>{});
  return fn(std::integral_constant<Head, Head::kTaylor>{});
}

}  // namespace

at::Tensor categorical_nll(const at::Tensor& x, const at::Tensor& logits, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& second_weight,
                           const c10::optional<at::Tensor>& second_bias, const c10::optional<at::Tensor>& sigma2,
                           int64_t head) {
  if (head == int64_t(Head::kFixed)) return categorical_fixed_nll(x, logits, weight, bias, *sigma2);
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "categorical_nll_cpu", [&] {
    const CategoricalInputs<scalar_t> in(x, logits, weight, bias, second_weight, second_bias);
    if (in.B == 0) {
      loss = at::zeros({0}, x.options());
      return;
    }
    dispatch_head(head, [&](auto hd) { return run<decltype(hd)::value, scalar_t>(in, nullptr, {}, &loss); });
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
categorical_nll_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& logits,
                         const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& second_weight,
                         const c10::optional<at::Tensor>& second_bias, const c10::optional<at::Tensor>& sigma2,
                         const std::vector<bool>& needs, int64_t head) {
  const std::array<bool, kNumInputs> present = {true, true, true, given(bias), given(second_weight),
                                                given(second_bias), given(sigma2)};
  bool any = false;
  const std::array<bool, kNumInputs> need = needed_gradients(needs, present, &any);
  std::array<at::Tensor, kNumInputs> out;
  if (any && x.size(0) > 0 && head == int64_t(Head::kFixed)) {
    std::tie(out[kX], out[kLogits], out[kA], out[kBias], out[kSigma2]) = categorical_fixed_nll_backward(
        grad, x, logits, weight, bias, *sigma2, {need[kX], need[kLogits], need[kA], need[kBias], need[kSigma2]});
  } else if (any && x.size(0) > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "categorical_nll_backward_cpu", [&] {
      const CategoricalInputs<scalar_t> in(x, logits, weight, bias, second_weight, second_bias);
      out = dispatch_head(head, [&](auto hd) { return run<decltype(hd)::value, scalar_t>(in, &grad, need, nullptr); });
    });
  } else if (any) {  // empty batch: every gradient is an empty sum
    const std::array<at::Tensor, kNumInputs> like = {x, logits, weight, given(bias) ? *bias : x,
                                                     given(second_weight) ? *second_weight : x,
                                                     given(second_bias) ? *second_bias : x, given(sigma2) ? *sigma2 : x};
    for (int i = 0; i < kNumInputs; ++i)
      if (need[i]) out[i] = at::zeros_like(like[i]);
  }
  for (auto& t : out)
    if (!t.defined()) t = empty_grad(x);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6]};
}

}  // namespace silent_kernels::cpu
