// The mean-field contraction stage on the CPU (MATH.md §2, §5), shared by the heads that
// follow it (cpu_precision.cpp: learnable precision with the Taylor or the exact log term, and
// the log-variance head on Gaussian latents, which uses the same contractions with C = H).
//
// Per pixel tile (see cpu_common.h) the weight products are stacked by the cumulant they
// contract, so that each present cumulant costs one GEMM per (batch chunk, tile):
//
//   group 0, moment m : [A; C]                 -> ubar, vbar
//   group 1, moment k2: [A^2; A*C; C^2]        -> Saa, Sac, Scc
//   group 2, moment k3: [A*C^2; A^2*C; C^3]    -> Tacc, Taac, C3      (only when k3 is given)
//   group 3, moment k4: [C^4]                  -> C4                  (only when k4 is given)
//
// Q = sum_i A^2 C^2 k4 enters the pixel loss linearly with coefficient 1/2 and nothing else,
// so its sum over pixels is k4 . colsum(A^2 C^2): O(kd + Bd), no GEMM. Likewise its gradient
// is rank one (dk4 += grad/2 colsum(A^2 C^2), and the weight gradients use k4^T grad / 2).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstring>
#include <vector>

#include "cpu_common.h"
#include "epilogue.h"

namespace silent_kernels::cpu::meanfield {

// sum_p log(m[p]) over a contiguous buffer of floored M values (all > 0). float: a branch-free
// log that the compiler vectorises (std::log keeps the per-pixel loops scalar): M = 2^e m with
// m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s), s = (m - 1)/(m + 1), |s| < 0.1716, by its series
// to s^9 (truncation < 1e-9), e ln 2 in two parts (Cody-Waite). Non-finite M give log M = M
// (inf, NaN), as std::log. double: std::log.
inline float sum_log(const float* SK_RESTRICT m, int64_t n) {
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t p = 0; p < n; ++p) {
    const float M = m[p];
    uint32_t bits;
    std::memcpy(&bits, &M, sizeof bits);
    int32_t e = static_cast<int32_t>(bits >> 23) - 127;
    const uint32_t mbits = (bits & 0x7fffffu) | 0x3f800000u;
    float f;
    std::memcpy(&f, &mbits, sizeof f);
    const bool big = f > 1.41421356f;
    f = big ? f * 0.5f : f;
    e += big ? 1 : 0;
    const float s = (f - 1.0f) / (f + 1.0f), s2 = s * s;
    const float poly =
        s * (2.0f + s2 * (2.0f / 3.0f + s2 * (2.0f / 5.0f + s2 * (2.0f / 7.0f + s2 * (2.0f / 9.0f)))));
    const float ef = static_cast<float>(e);
    const float r = ef * 0.693145751953125f + (poly + ef * 1.428606765330187e-06f);
    sum += (M < 3.40282347e+38f) ? r : M;  // false for inf and NaN
  }
  return sum;
}

inline double sum_log(const double* m, int64_t n) {
  double sum = 0;
  for (int64_t p = 0; p < n; ++p) sum += std::log(m[p]);
  return sum;
}



constexpr int kGroups = 4;

struct Groups {
  std::array<bool, kGroups> on{};
  std::array<int64_t, kGroups> rows{};  // contractions per group, 0 when absent
  int64_t total = 0;
  Groups(bool has3, bool has4) {
    on = {true, true, has3, has4};
    const std::array<int64_t, kGroups> full = {2, 3, 3, 1};
    for (int g = 0; g < kGroups; ++g) {
      rows[g] = on[g] ? full[g] : 0;
      total += rows[g];
    }
  }
};

// The inputs as the kernels read them: x and the weights in the input dtype (contiguous),
// moments and biases converted to the accumulation dtype.
template <typename scalar_t>
struct Inputs {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor x, A, C;              // scalar_t
  std::array<at::Tensor, kGroups> mom;  // acc_t (undefined when absent)
  at::Tensor bias, pbias;          // acc_t, zeros when absent
  int64_t B, k, d;

  Inputs(const at::Tensor& x_, const at::Tensor& mean, const at::Tensor& var,
         const c10::optional<at::Tensor>& k3, const c10::optional<at::Tensor>& k4,
         const at::Tensor& weight, const c10::optional<at::Tensor>& bias_,
         const at::Tensor& pweight, const c10::optional<at::Tensor>& pbias_) {
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    x = x_.contiguous();
    A = weight.contiguous();
    C = pweight.contiguous();
    B = x.size(0);
    k = x.size(1);
    d = mean.size(1);
    mom[0] = as_acc(mean, acc);
    mom[1] = as_acc(var, acc);
    if (k3.has_value() && k3->defined()) mom[2] = as_acc(*k3, acc);
    if (k4.has_value() && k4->defined()) mom[3] = as_acc(*k4, acc);
    const auto opts = x.options().dtype(acc);
    bias = (bias_.has_value() && bias_->defined()) ? as_acc(*bias_, acc) : at::zeros({k}, opts);
    pbias = (pbias_.has_value() && pbias_->defined()) ? as_acc(*pbias_, acc) : at::zeros({k}, opts);
  }
};

// Per-part workspace carved into the buffers of one tile (sized for the largest tile).
template <typename acc_t>
struct Workspace {
  at::Tensor storage;
  std::array<acc_t*, kGroups> P{}, Y{}, H{};
  acc_t* dbias = nullptr;   // (tile,) bias gradient partials
  acc_t* dpbias = nullptr;

  Workspace(const Groups& gr, const TilePlan& plan, int64_t d, bool with_h) {
    const int64_t tile = plan.tile, chunk = plan.batch_chunk;
    const int64_t p_size = gr.total * tile * d, y_size = gr.total * chunk * tile;
    const int64_t h_size = with_h ? p_size : 0;
    storage = at::empty({p_size + y_size + h_size + 2 * tile},
                        at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc_t* base = storage.data_ptr<acc_t>();
    int64_t off_p = 0, off_y = p_size, off_h = p_size + y_size;
    for (int g = 0; g < kGroups; ++g) {
      P[g] = base + off_p;
      Y[g] = base + off_y;
      H[g] = with_h ? base + off_h : nullptr;
      off_p += gr.rows[g] * tile * d;
      off_y += gr.rows[g] * chunk * tile;
      off_h += with_h ? gr.rows[g] * tile * d : 0;
    }
    dbias = base + p_size + y_size + h_size;
    dpbias = dbias + tile;
  }
};

// Weight products of pixels [p0, p0 + np) into P (layout in the file comment);
// qcol[i] += sum_p A^2 C^2 when H4 (k4 present) and qcol is given.
template <typename scalar_t, typename acc_t, bool H3, bool H4>
void form_products(const scalar_t* A, const scalar_t* C, int64_t p0, int64_t np, int64_t d,
                   const std::array<acc_t*, kGroups>& P, acc_t* qcol) {
  for (int64_t p = 0; p < np; ++p) {
    const scalar_t* SK_RESTRICT a = A + linear_offset(p0 + p, 0, d);
    const scalar_t* SK_RESTRICT c = C + linear_offset(p0 + p, 0, d);
    acc_t* SK_RESTRICT pa = P[0] + linear_offset(p, 0, d);
    acc_t* SK_RESTRICT pc = P[0] + linear_offset(np + p, 0, d);
    acc_t* SK_RESTRICT saa = P[1] + linear_offset(p, 0, d);
    acc_t* SK_RESTRICT sac = P[1] + linear_offset(np + p, 0, d);
    acc_t* SK_RESTRICT scc = P[1] + linear_offset(2 * np + p, 0, d);
    acc_t* SK_RESTRICT tacc = H3 ? P[2] + linear_offset(p, 0, d) : nullptr;
    acc_t* SK_RESTRICT taac = H3 ? P[2] + linear_offset(np + p, 0, d) : nullptr;
    acc_t* SK_RESTRICT c3 = H3 ? P[2] + linear_offset(2 * np + p, 0, d) : nullptr;
    acc_t* SK_RESTRICT c4 = H4 ? P[3] + linear_offset(p, 0, d) : nullptr;
    acc_t* SK_RESTRICT qc = qcol;
    const bool with_q = H4 && qcol != nullptr;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) {
      const acc_t av = static_cast<acc_t>(a[i]);
      const acc_t cv = static_cast<acc_t>(c[i]);
      const acc_t aa = av * av, cc = cv * cv, ac = av * cv;
      pa[i] = av;
      pc[i] = cv;
      saa[i] = aa;
      sac[i] = ac;
      scc[i] = cc;
      if constexpr (H3) {
        tacc[i] = ac * cv;
        taac[i] = aa * cv;
        c3[i] = cc * cv;
      }
      if constexpr (H4) c4[i] = cc * cc;
    }
    if (with_q) {
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) {
        const acc_t av = static_cast<acc_t>(a[i]), cv = static_cast<acc_t>(c[i]);
        qc[i] += (av * av) * (cv * cv);
      }
    }
  }
}

// Contractions of batch rows [n0, n0 + nb) x pixels of the tile: Y_g = moment_g @ P_g^T.
template <typename acc_t>
void contract(const Groups& gr, const std::array<at::Tensor, kGroups>& mom,
              const Workspace<acc_t>& ws, int64_t n0, int64_t nb, int64_t np, int64_t d) {
  for (int g = 0; g < kGroups; ++g) {
    if (!gr.on[g]) continue;
    const int64_t cols = gr.rows[g] * np;
    at::Tensor y = mat(ws.Y[g], nb, cols, cols);
    gemm(y, mat(mom[g].template data_ptr<acc_t>() + linear_offset(n0, 0, d), nb, d, d),
         mat(ws.P[g], cols, d, d).t(), /*accumulate=*/false);
  }
}

// The ten contractions of (row r, pixel p) of a tile (Q = 0: handled outside), biases added.
template <typename acc_t, bool H3, bool H4>
inline PixelTerms<acc_t> load_terms(const std::array<acc_t*, kGroups>& Y, int64_t r, int64_t p,
                                    int64_t np, acc_t b, acc_t pb) {
  PixelTerms<acc_t> c;
  const acc_t* y0 = Y[0] + linear_offset(r, 0, 2 * np);
  const acc_t* y1 = Y[1] + linear_offset(r, 0, 3 * np);
  c.ubar = y0[p] + b;
  c.vbar = y0[np + p] + pb;
  c.Saa = y1[p];
  c.Sac = y1[np + p];
  c.Scc = y1[2 * np + p];
  if constexpr (H3) {
    const acc_t* y2 = Y[2] + linear_offset(r, 0, 3 * np);
    c.Tacc = y2[p];
    c.Taac = y2[np + p];
    c.C3 = y2[2 * np + p];
  } else {
    c.Tacc = c.Taac = c.C3 = acc_t(0);
  }
  c.Q = acc_t(0);
  c.C4 = H4 ? Y[3][linear_offset(r, p, np)] : acc_t(0);
  return c;
}

// dA, dC of pixels [p0, p0 + np) from the weight partials H of their tile (MATH.md §5);
// qv: Q's factor 1/2 sum_n grad_n k4_n (H4 only); da / dc null when not needed.
template <typename scalar_t, typename acc_t, bool H3, bool H4>
void fold_weight_grads(const scalar_t* A, const scalar_t* C, int64_t p0, int64_t np, int64_t d,
                       const std::array<acc_t*, kGroups>& H, const acc_t* qv, scalar_t* da_out,
                       scalar_t* dc_out) {
  for (int64_t p = 0; p < np; ++p) {
    const scalar_t* a = A + linear_offset(p0 + p, 0, d);
    const scalar_t* c = C + linear_offset(p0 + p, 0, d);
    const acc_t* hu = H[0] + linear_offset(p, 0, d);
    const acc_t* hv = H[0] + linear_offset(np + p, 0, d);
    const acc_t* h_saa = H[1] + linear_offset(p, 0, d);
    const acc_t* h_sac = H[1] + linear_offset(np + p, 0, d);
    const acc_t* h_scc = H[1] + linear_offset(2 * np + p, 0, d);
    const acc_t* h_tacc = H3 ? H[2] + linear_offset(p, 0, d) : nullptr;
    const acc_t* h_taac = H3 ? H[2] + linear_offset(np + p, 0, d) : nullptr;
    const acc_t* h_c3 = H3 ? H[2] + linear_offset(2 * np + p, 0, d) : nullptr;
    const acc_t* h_c4 = H4 ? H[3] + linear_offset(p, 0, d) : nullptr;
    if (da_out != nullptr) {
      scalar_t* da = da_out + linear_offset(p0 + p, 0, d);
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) {
        const acc_t av = static_cast<acc_t>(a[i]), cv = static_cast<acc_t>(c[i]);
        acc_t v = hu[i] + acc_t(2) * av * h_saa[i] + cv * h_sac[i];
        if constexpr (H3) v += cv * cv * h_tacc[i] + acc_t(2) * av * cv * h_taac[i];
        if constexpr (H4) v += acc_t(2) * av * cv * cv * qv[i];
        da[i] = static_cast<scalar_t>(v);
      }
    }
    if (dc_out != nullptr) {
      scalar_t* dc = dc_out + linear_offset(p0 + p, 0, d);
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) {
        const acc_t av = static_cast<acc_t>(a[i]), cv = static_cast<acc_t>(c[i]);
        acc_t v = hv[i] + acc_t(2) * cv * h_scc[i] + av * h_sac[i];
        if constexpr (H3) {
          v += acc_t(2) * av * cv * h_tacc[i] + av * av * h_taac[i] + acc_t(3) * cv * cv * h_c3[i];
        }
        if constexpr (H4) v += acc_t(2) * av * av * cv * qv[i] + acc_t(4) * cv * cv * cv * h_c4[i];
        dc[i] = static_cast<scalar_t>(v);
      }
    }
  }
}

}  // namespace silent_kernels::cpu::meanfield
