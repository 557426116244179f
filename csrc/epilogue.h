// Per-pixel math of the analytic loss and its derivatives (MATH.md §3-5).
//
// Shared by the C++ CPU kernels and the CUDA kernels: no torch headers, only
// inline templates that compile as host code and as __host__ __device__ code.
// T is the accumulation type (float for fp16/bf16/fp32 inputs, double for fp64).
// The pure-torch reference (silent_kernels/reference.py) is the specification
// these functions are tested against.
#pragma once

#include <array>
#include <cmath>

#include "dawson_table.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SK_HOST_DEVICE inline
#endif

namespace silent_kernels {

// 0.5 * log(2 pi): the Gaussian normalising constant per pixel.
constexpr double kHalfLog2Pi = 0.91893853320467274178032973640562;
// Floor on M = E[v^2] before the Taylor log term divides by it (reference.PRECISION_SQ_FLOOR).
constexpr double kPrecisionSqFloor = 1e-12;
// Floor on Var(v) in the exact log term's convergent series (special.EXACT_LOG_VAR_FLOOR).
constexpr double kExactLogVarFloor = 1e-30;
constexpr double kEulerGamma = 0.57721566490153286060651209008240243;
constexpr double kLog2 = 0.69314718055994530941723212145817657;
// Crossover x = |m| / sqrt(2 s2) between the convergent and the asymptotic series (special.py).
constexpr double kSeriesLimit = 6.0;
constexpr int kSeriesTerms = 110;
constexpr int kAsymptoticTerms = 36;

// The per-pixel epilogues that follow the mean-field contraction stage (op argument `head`).
enum class Head : int {
  kTaylor = 0,    // learnable precision, paper's Taylor log term (any family)
  kExactLog = 1,  // learnable precision, exact E[log v^2] (Gaussian latents)
  kLogVar = 2,    // log-variance head, exact (Gaussian latents: tilting is GEMM-shaped)
  kFixed = 3,     // fixed variance (the categorical op; the mean-field fixed head has its own op)
};

// ---------------------------------------------------------------- fixed variance
// Per pixel: ((x - ubar)^2 + Saa) / (2 sigma2) + 0.5 log(2 pi sigma2).
template <typename T>
SK_HOST_DEVICE T fixed_pixel_nll(T resid, T saa, T inv_sigma2, T log_sigma2) {
  return T(0.5) * (resid * resid + saa) * inv_sigma2 + T(0.5) * log_sigma2 + T(kHalfLog2Pi);
}

// d(pixel nll)/d(sigma2) for the fixed-variance head.
template <typename T>
SK_HOST_DEVICE T fixed_pixel_dsigma2(T resid, T saa, T inv_sigma2) {
  return T(0.5) * inv_sigma2 * (T(1) - (resid * resid + saa) * inv_sigma2);
}

// ----------------------------------------------------------- learnable precision
// The ten contractions of MATH.md §2 at one (sample, pixel); the same struct
// carries d(pixel nll)/d(contraction) in the backward pass.
template <typename T>
struct PixelTerms {
  T ubar, vbar, Saa, Scc, Sac, Tacc, Taac, C3, Q, C4;
};

template <typename T>
SK_HOST_DEVICE PixelTerms<T> scaled(PixelTerms<T> g, T s) {
  g.ubar *= s;
  g.vbar *= s;
  g.Saa *= s;
  g.Scc *= s;
  g.Sac *= s;
  g.Tacc *= s;
  g.Taac *= s;
  g.C3 *= s;
  g.Q *= s;
  g.C4 *= s;
  return g;
}

// Loss of one pixel (MATH.md §4, centred form, residual first):
//   l = 0.5 E[(x-u)^2 v^2] - 0.5 log M + V / (4 M^2) + 0.5 log 2 pi
// without its -0.5 log M term, and the (floored) M it needs, so that a caller can keep this part
// in a vectorised loop and take the logs separately.
template <typename T>
SK_HOST_DEVICE T precision_pixel_nll_logfree(T x, const PixelTerms<T>& c, T& M_out) {
  const T e = x - c.ubar;
  const T vb2 = c.vbar * c.vbar;
  const T e2v2 = e * e * (vb2 + c.Scc) - T(4) * e * c.vbar * c.Sac - T(2) * e * c.Tacc +
                 vb2 * c.Saa + T(2) * c.vbar * c.Taac + c.Q + c.Saa * c.Scc +
                 T(2) * c.Sac * c.Sac;
  T M = vb2 + c.Scc;
  M = M < T(kPrecisionSqFloor) ? T(kPrecisionSqFloor) : M;
  const T V = T(4) * vb2 * c.Scc + T(4) * c.vbar * c.C3 + c.C4 + T(2) * c.Scc * c.Scc;
  M_out = M;
  return T(0.5) * e2v2 + V / (T(4) * M * M) + T(kHalfLog2Pi);
}

// The whole loss of one pixel: precision_pixel_nll_logfree - 0.5 log M.
template <typename T>
SK_HOST_DEVICE T precision_pixel_nll(T x, const PixelTerms<T>& c) {
  T M;
  const T logfree = precision_pixel_nll_logfree(x, c, M);
  return logfree - T(0.5) * log(M);
}

// d(pixel nll)/d(each contraction); d/dx is -grad.ubar. Below the floor M is a
// constant, so its partial derivatives are dropped (as torch.clamp_min does).
template <typename T>
SK_HOST_DEVICE PixelTerms<T> precision_pixel_grad(T x, const PixelTerms<T>& c) {
  const T e = x - c.ubar;
  const T vb = c.vbar;
  const T vb2 = vb * vb;
  const T M_raw = vb2 + c.Scc;
  const bool floored = M_raw < T(kPrecisionSqFloor);
  const T M = floored ? T(kPrecisionSqFloor) : M_raw;
  const T V = T(4) * vb2 * c.Scc + T(4) * vb * c.C3 + c.C4 + T(2) * c.Scc * c.Scc;
  const T inv_M = T(1) / M;
  const T dl_dV = T(0.25) * inv_M * inv_M;
  const T dl_dM = floored ? T(0) : (-T(0.5) * inv_M - T(0.5) * V * inv_M * inv_M * inv_M);

  PixelTerms<T> g;
  g.ubar = -(e * M_raw - T(2) * vb * c.Sac - c.Tacc);  // -0.5 d(E2)/de
  g.vbar = e * e * vb - T(2) * e * c.Sac + vb * c.Saa + c.Taac + T(2) * vb * dl_dM +
           dl_dV * (T(8) * vb * c.Scc + T(4) * c.C3);
  g.Saa = T(0.5) * M_raw;
  g.Scc = T(0.5) * (e * e + c.Saa) + dl_dM + dl_dV * (T(4) * vb2 + T(4) * c.Scc);
  g.Sac = T(2) * (c.Sac - e * vb);
  g.Tacc = -e;
  g.Taac = vb;
  g.C3 = T(4) * vb * dl_dV;
  g.Q = T(0.5);
  g.C4 = dl_dV;
  return g;
}

// ------------------------------------------------------------- exact log term (MATH.md §10)
// E[log v^2] for v ~ N(m, s2) and its partial derivatives, always in double: with
// x = |m| / sqrt(2 s2),
//   x < kSeriesLimit:  log s2 - gamma - log 2 + sum_n P_n h_n,
//                      D(x) = x sum_n P_n / (2n + 1),  P_n = e^-x^2 x^2n / n!,  h_n = sum_{i<n} 2/(2i+1)
//   otherwise:         log m^2 - sum_{n>=1} (2n-1)!!/n r^n,   r = s2 / m^2
// d/dm = 2 sqrt(2) D(x) sign(m) / sqrt(s2), d/ds2 = (1 - 2 x D(x)) / s2 (series); the asymptotic
// form's own derivatives otherwise. Same pieces as silent_kernels/special.py.
struct LogSquare {
  double value, d_mean, d_var;
};


// D(x) and 4 F(x) for 0 <= x <= kSeriesLimit from the node table: Taylor series of order 12
// around the nearest node x_j (|x - x_j| <= 1/16), with D^(n+1) = -2 x_j D^(n) - 2 n D^(n-1)
// (from D' = 1 - 2 x D) and F' = D. Measured against 30-digit values: < 1e-15 relative. The
// coefficients D^(n)(x_j) / n! are made at compile time, and each polynomial in t = x - x_j is
// evaluated by Estrin's scheme (a dependency chain of 4 multiply-adds instead of Horner's 13:
// the per-pixel epilogue is latency-bound).
constexpr int kDawsonOrder = 12;
constexpr std::array<double, kDawsonOrder + 3> kInvFactorial = [] {
  std::array<double, kDawsonOrder + 3> a{};
  a[0] = 1.0;
  for (int n = 1; n < kDawsonOrder + 3; ++n) a[n] = a[n - 1] / n;
  return a;
}();

// 1 / n for the asymptotic series' terms.
constexpr std::array<double, kAsymptoticTerms + 1> kReciprocal = [] {
  std::array<double, kAsymptoticTerms + 1> a{};
  for (int n = 1; n <= kAsymptoticTerms; ++n) a[n] = 1.0 / n;
  return a;
}();

// Per node: D's Taylor coefficients (powers 0..12) and F's (powers 0..13; F(x_j) first).
struct DawsonTaylor {
  std::array<double, kDawsonOrder + 1> d;
  std::array<double, kDawsonOrder + 2> f;
};

constexpr std::array<DawsonTaylor, kDawsonNodes> kDawsonTaylor = [] {
  std::array<DawsonTaylor, kDawsonNodes> out{};
  for (int j = 0; j < kDawsonNodes; ++j) {
    const double xj = j * kDawsonNodeStep;
    double prev = kDawsonAtNode[j], cur = 1.0 - 2.0 * xj * prev;   // D^(0), D^(1) at x_j
    out[j].d[0] = prev;
    out[j].d[1] = cur;
    out[j].f[0] = kDawsonIntegralAtNode[j];
    out[j].f[1] = prev;
    out[j].f[2] = cur * 0.5;
    for (int n = 1; n < kDawsonOrder; ++n) {
      const double next = -2.0 * xj * cur - 2.0 * n * prev;       // D^(n+1)
      out[j].d[n + 1] = next * kInvFactorial[n + 1];
      out[j].f[n + 2] = next * kInvFactorial[n + 2];
      prev = cur;
      cur = next;
    }
  }
  return out;
}();

// sum_n c[n] t^n for up to 16 coefficients (missing ones are 0), by Estrin's scheme.
template <size_t N>
inline double estrin(const std::array<double, N>& c, double t) {
  static_assert(N <= 16, "estrin: at most 16 coefficients");
  auto at = [&](size_t i) { return i < N ? c[i] : 0.0; };
  const double t2 = t * t, t4 = t2 * t2, t8 = t4 * t4;
  double pairs[8];
  for (size_t i = 0; i < 8; ++i) pairs[i] = at(2 * i) + at(2 * i + 1) * t;
  const double q0 = pairs[0] + pairs[1] * t2, q1 = pairs[2] + pairs[3] * t2;
  const double q2 = pairs[4] + pairs[5] * t2, q3 = pairs[6] + pairs[7] * t2;
  return (q0 + q1 * t4) + (q2 + q3 * t4) * t8;
}

inline void dawson_from_table(double x, double& dawson, double& four_f) {
  int j = static_cast<int>(x / kDawsonNodeStep + 0.5);
  j = j < kDawsonNodes - 1 ? j : kDawsonNodes - 1;
  const double t = x - j * kDawsonNodeStep;
  dawson = estrin(kDawsonTaylor[j].d, t);
  four_f = 4.0 * estrin(kDawsonTaylor[j].f, t);
}

// The one logarithm expected_log_square needs: of the floored s2 (series) or of m^2
// (asymptotic). Split out so that CPU kernels can take it for a row of pixels in one vectorised
// pass (csrc/cpu_vector_math.h); log_argument and the _given_log form below are the same formula.
SK_HOST_DEVICE bool log_square_is_asymptotic(double m, double s2) {
  const double floored = s2 < kExactLogVarFloor ? kExactLogVarFloor : s2;
  return !(m * m < 2.0 * kSeriesLimit * kSeriesLimit * floored);
}

SK_HOST_DEVICE double log_square_log_argument(double m, double s2) {
  return log_square_is_asymptotic(m, s2) ? m * m : (s2 < kExactLogVarFloor ? kExactLogVarFloor : s2);
}

// How many terms the asymptotic series takes at r = s2 / m^2: up to the first whose next
// contribution is below 1e-18 (at most kAsymptoticTerms). A row of pixels can share the count
// of its largest r (the terms decrease faster at smaller r), which lets it vectorise.
SK_HOST_DEVICE int asymptotic_terms(double r) {
  double term = 1.0;  // (2n-1)!! r^(n-1)
  int n = 1;
  for (; n < kAsymptoticTerms; ++n) {
    if (term * r < 1e-18) break;
    term *= (2 * n + 1) * r;
  }
  return n;
}

// E[log v^2] and its derivatives for |m| / sqrt(2 s2) >= kSeriesLimit: log m^2 - r sum_n
// (2n-1)!!/n r^(n-1), r = s2 / m^2, as partial sums advanced one term at a time (CPU kernels step
// a whole row of pixels together, which vectorises).
struct AsymptoticSums {
  double term, tail, dtail;  // (2n-1)!! r^(n-1), sum of term / n, sum of term
};

SK_HOST_DEVICE AsymptoticSums asymptotic_first() { return AsymptoticSums{1.0, 1.0, 1.0}; }

SK_HOST_DEVICE void asymptotic_step(AsymptoticSums& a, int n, double r) {  // adds term n >= 2
  a.term *= (2 * n - 1) * r;
#ifdef __CUDA_ARCH__
  a.tail += a.term / n;
#else
  a.tail += a.term * kReciprocal[n];
#endif
  a.dtail += a.term;
}

SK_HOST_DEVICE LogSquare asymptotic_finish(const AsymptoticSums& a, double inv_m, double r, double log_m2) {
  LogSquare out;
  out.value = log_m2 - a.tail * r;
  out.d_mean = 2.0 * inv_m * (1.0 + r * a.dtail);
  out.d_var = -a.dtail * inv_m * inv_m;
  return out;
}

SK_HOST_DEVICE LogSquare asymptotic_log_square(double m, double s2, double log_m2, int terms) {
  const double inv_m = 1.0 / m, r = s2 * inv_m * inv_m;
  AsymptoticSums a = asymptotic_first();
  for (int n = 2; n <= terms; ++n) asymptotic_step(a, n, r);
  return asymptotic_finish(a, inv_m, r, log_m2);
}

SK_HOST_DEVICE LogSquare expected_log_square_given_log(double m, double s2, double log_of_argument) {
  LogSquare out;
  const double floored = s2 < kExactLogVarFloor ? kExactLogVarFloor : s2;
  if (!log_square_is_asymptotic(m, s2)) {
    const double inv_sd = 1.0 / sqrt(floored);
    const double x = fabs(m) * inv_sd * 0.70710678118654752440;   // |m| / sqrt(2 s2)
    double dawson, fsum;
#ifdef __CUDA_ARCH__
    // Device code sums the Poisson-weighted series (no table in constant memory yet).
    const double x2 = x * x;
    double w = exp(-x2), dsum = w, h = 0.0;
    fsum = 0.0;
    for (int n = 1; n < kSeriesTerms; ++n) {
      w *= x2 / n;
      h += 2.0 / (2 * n - 1);
      dsum += w / (2 * n + 1);
      fsum += w * h;
      if (n > x2 && w < 1e-18 * dsum) break;
    }
    dawson = x * dsum;
#else
    dawson_from_table(x, dawson, fsum);
#endif
    out.value = log_of_argument - kEulerGamma - kLog2 + fsum;
    out.d_mean = (m < 0 ? -2.0 : 2.0) * 1.41421356237309504880 * dawson * inv_sd;
    out.d_var = s2 < kExactLogVarFloor ? 0.0 : (1.0 - 2.0 * x * dawson) * inv_sd * inv_sd;
  } else {
    out = asymptotic_log_square(m, s2, log_of_argument, asymptotic_terms(s2 / (m * m)));
  }
  return out;
}

SK_HOST_DEVICE LogSquare expected_log_square(double m, double s2) {
  return expected_log_square_given_log(m, s2, log(log_square_log_argument(m, s2)));
}

// ----------------------------------------------------------- heads on Gaussian contractions
// E[(x-u)^2 v^2] with Gaussian latents (T, Q, C3, C4 vanish).
template <typename T>
SK_HOST_DEVICE T gaussian_e2v2(T e, const PixelTerms<T>& c) {
  const T vb2 = c.vbar * c.vbar;
  return e * e * (vb2 + c.Scc) - T(4) * e * c.vbar * c.Sac + vb2 * c.Saa + c.Saa * c.Scc +
         T(2) * c.Sac * c.Sac;
}

// Learnable precision, exact log term: l = 0.5 E[(x-u)^2 v^2] - 0.5 E[log v^2] + 0.5 log 2 pi.
template <typename T>
SK_HOST_DEVICE T exact_log_pixel_nll(T x, const PixelTerms<T>& c) {
  const LogSquare ls = expected_log_square(double(c.vbar), double(c.Scc));
  return T(0.5) * gaussian_e2v2(x - c.ubar, c) - T(0.5 * ls.value) + T(kHalfLog2Pi);
}



// Log-variance head (MATH.md §11) on the Gaussian contractions with C = H (log-variance
// weights), vbar = E[s] = H m + h0, Scc = H^2 k2, Sac = (A H) k2:
//   E[e^-s] scale = exp(-vbar + Scc / 2), tilted residual r = x - ubar + Sac,
//   l = 0.5 (log 2 pi + vbar + scale (r^2 + Saa)).
template <typename T>
SK_HOST_DEVICE T logvar_pixel_nll(T x, const PixelTerms<T>& c) {
  const T r = x - c.ubar + c.Sac;
  return T(0.5) * (c.vbar + exp(T(0.5) * c.Scc - c.vbar) * (r * r + c.Saa)) + T(kHalfLog2Pi);
}



// ----------------------------------------------- log-variance head on tilted latents (§11)
// Bernoulli latent with logits l tilted by t = -h: K(t) = log(q + p e^t) (p = sigmoid(l),
// q = 1 - p) = max(log p + t, log q) + log1p(e^-|l + t|), since log p - log q = l; its tilted
// mean sigmoid(l + t) and variance sigmoid(l + t) sigmoid(-(l + t)). One exp and one log1p,
// exact at saturated and infinite logits (log p, log q precomputed per sample and latent).
template <typename T>
struct LatentTilt {
  T log_mgf, mean, var;
};

template <typename T>
SK_HOST_DEVICE LatentTilt<T> bernoulli_tilt(T logit, T log_p, T log_q, T h) {
  const T s = logit - h;
  const T e = exp(-fabs(s));
  const T inv = T(1) / (T(1) + e);
  const T shifted = log_p - h;
  LatentTilt<T> out;
  out.log_mgf = (shifted > log_q ? shifted : log_q) + log1p(e);
  out.mean = s >= T(0) ? inv : e * inv;
  out.var = e * inv * inv;
  return out;
}

// What the tilted contraction accumulates per (sample, pixel) over the latents:
// hm = sum_i h_i E[z_i], S = sum_i K_i(-h_i), T1 = sum_i a_i mean'_i, T2 = sum_i a_i^2 var'_i.
template <typename T>
struct TiltedSums {
  T hm, S, T1, T2;
};

// l = 0.5 (log 2 pi + hm + h0 + exp(S - h0) ((x - b - T1)^2 + T2)).
template <typename T>
SK_HOST_DEVICE T tilted_logvar_pixel_nll(T x, T b, T h0, const TiltedSums<T>& s) {
  const T r = x - b - s.T1;
  return T(0.5) * (s.hm + h0 + exp(s.S - h0) * (r * r + s.T2)) + T(kHalfLog2Pi);
}

// d l / d(hm, S, T1, T2); d l/d b = d l/d T1, d l/d x = -d l/d T1, d l/d h0 = 1/2 - d l/d S.
template <typename T>
SK_HOST_DEVICE TiltedSums<T> tilted_logvar_pixel_grad(T x, T b, T h0, const TiltedSums<T>& s) {
  const T r = x - b - s.T1;
  const T scale = exp(s.S - h0);
  TiltedSums<T> g;
  g.hm = T(0.5);
  g.S = T(0.5) * scale * (r * r + s.T2);
  g.T1 = -scale * r;
  g.T2 = T(0.5) * scale;
  return g;
}

// The loss and d loss/d contraction of one pixel in one call (the special function of the exact
// log term, or the exp of the log-variance head, evaluated once for both).
// The exact-log head's loss and coefficients given its E[log v^2] ls (split out so that CPU
// kernels can evaluate the scalar special function in its own loop and vectorise the rest).
template <typename T>
SK_HOST_DEVICE PixelTerms<T> exact_log_pixel_grad_and_nll(T x, const PixelTerms<T>& c, const LogSquare& ls, T& nll) {
  const T e = x - c.ubar, vb = c.vbar;
  nll = T(0.5) * gaussian_e2v2(e, c) - T(0.5 * ls.value) + T(kHalfLog2Pi);
  PixelTerms<T> g;
  g.ubar = -(e * (vb * vb + c.Scc) - T(2) * vb * c.Sac);
  g.vbar = e * e * vb - T(2) * e * c.Sac + vb * c.Saa - T(0.5 * ls.d_mean);
  g.Saa = T(0.5) * (vb * vb + c.Scc);
  g.Scc = T(0.5) * (e * e + c.Saa) - T(0.5 * ls.d_var);
  g.Sac = T(2) * (c.Sac - e * vb);
  g.Tacc = g.Taac = g.C3 = g.Q = g.C4 = T(0);
  return g;
}

template <Head H, typename T>
SK_HOST_DEVICE PixelTerms<T> head_pixel_grad_and_nll(T x, const PixelTerms<T>& c, T& nll) {
  if constexpr (H == Head::kExactLog) {
    return exact_log_pixel_grad_and_nll(x, c, expected_log_square(double(c.vbar), double(c.Scc)), nll);
  } else if constexpr (H == Head::kLogVar) {
    const T r = x - c.ubar + c.Sac;
    const T scale = exp(T(0.5) * c.Scc - c.vbar);
    const T weighted = scale * (r * r + c.Saa);
    nll = T(0.5) * (c.vbar + weighted) + T(kHalfLog2Pi);
    PixelTerms<T> g;
    g.ubar = -scale * r;
    g.vbar = T(0.5) - T(0.5) * weighted;
    g.Saa = T(0.5) * scale;
    g.Scc = T(0.25) * weighted;
    g.Sac = scale * r;
    g.Tacc = g.Taac = g.C3 = g.Q = g.C4 = T(0);
    return g;
  } else {
    nll = precision_pixel_nll(x, c);
    return precision_pixel_grad(x, c);
  }
}

// Dispatch on the head at compile time (kernels are instantiated per head).
template <Head H, typename T>
SK_HOST_DEVICE T head_pixel_nll(T x, const PixelTerms<T>& c) {
  if constexpr (H == Head::kExactLog) return exact_log_pixel_nll(x, c);
  else if constexpr (H == Head::kLogVar) return logvar_pixel_nll(x, c);
  else return precision_pixel_nll(x, c);
}

template <Head H, typename T>
SK_HOST_DEVICE PixelTerms<T> head_pixel_grad(T x, const PixelTerms<T>& c) {
  T unused;
  return head_pixel_grad_and_nll<H>(x, c, unused);
}

}  // namespace silent_kernels
