// Per-pixel math of the analytic loss and its derivatives (MATH.md §3-5).
//
// Shared by the C++ CPU kernels and the CUDA kernels: no torch headers, only
// inline templates that compile as host code and as __host__ __device__ code.
// T is the accumulation type (float for fp16/bf16/fp32 inputs, double for fp64).
// The pure-torch reference (silent_kernels/reference.py) is the specification
// these functions are tested against.
#pragma once

#include <cmath>

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

// Loss of one pixel (MATH.md §4, centred form, residual first):
//   l = 0.5 E[(x-u)^2 v^2] - 0.5 log M + V / (4 M^2) + 0.5 log 2 pi
template <typename T>
SK_HOST_DEVICE T precision_pixel_nll(T x, const PixelTerms<T>& c) {
  const T e = x - c.ubar;
  const T vb2 = c.vbar * c.vbar;
  const T e2v2 = e * e * (vb2 + c.Scc) - T(4) * e * c.vbar * c.Sac - T(2) * e * c.Tacc +
                 vb2 * c.Saa + T(2) * c.vbar * c.Taac + c.Q + c.Saa * c.Scc +
                 T(2) * c.Sac * c.Sac;
  T M = vb2 + c.Scc;
  M = M < T(kPrecisionSqFloor) ? T(kPrecisionSqFloor) : M;
  const T V = T(4) * vb2 * c.Scc + T(4) * c.vbar * c.C3 + c.C4 + T(2) * c.Scc * c.Scc;
  return T(0.5) * e2v2 - T(0.5) * log(M) + V / (T(4) * M * M) + T(kHalfLog2Pi);
}

// precision_pixel_nll without its -0.5 log M term, and the (floored) M it needs:
// precision_pixel_nll(x, c) == precision_pixel_nll_logfree(x, c, M) - 0.5 log(M), so that a
// caller can keep this part in a vectorised loop and take the logs separately.
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

}  // namespace silent_kernels
