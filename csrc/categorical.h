// The contraction stage of one-hot categorical latents (MATH.md §12, docs/math.md): per
// (sample, pixel, group) the central moments of the pair (a.z_g, c.z_g), summed over groups into
// the same PixelTerms the mean-field heads use, and their gradients. Shared by the C++ CPU and the
// CUDA kernels (host/device inline templates, no torch headers). T is the accumulation type;
// W the weights' storage type. ``c`` is null for the fixed head (then every c' is 0).
#pragma once

#include "epilogue.h"

namespace silent_kernels {

// Probability-weighted moments of one group: means, and central moments of a' = a - m10,
// c' = c - m01 (e22 = E[a'^2 c'^2], e04 = E[c'^4]).
template <typename T>
struct GroupStats {
  T m10, m01, k20, k02, k11, k21, k12, k03, e22, e04;
};

template <typename T, typename W>
SK_HOST_DEVICE GroupStats<T> group_stats(const W* a, const W* c, const T* prob, int K, bool higher) {
  GroupStats<T> s{T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0)};
  for (int j = 0; j < K; ++j) {
    s.m10 += prob[j] * T(a[j]);
    if (c != nullptr) s.m01 += prob[j] * T(c[j]);
  }
  for (int j = 0; j < K; ++j) {
    const T p = prob[j], da = T(a[j]) - s.m10;
    s.k20 += p * da * da;
    if (c == nullptr) continue;
    const T dc = T(c[j]) - s.m01;
    s.k02 += p * dc * dc;
    s.k11 += p * da * dc;
    if (higher) {
      s.k21 += p * da * da * dc;
      s.k12 += p * da * dc * dc;
      s.k03 += p * dc * dc * dc;
      s.e22 += p * da * da * dc * dc;
      s.e04 += p * dc * dc * dc * dc;
    }
  }
  return s;
}

// Add a group's cumulants to the pixel's contractions (biases are added by the caller).
template <typename T>
SK_HOST_DEVICE void add_group(PixelTerms<T>& t, const GroupStats<T>& s) {
  t.ubar += s.m10;
  t.vbar += s.m01;
  t.Saa += s.k20;
  t.Scc += s.k02;
  t.Sac += s.k11;
  t.Taac += s.k21;
  t.Tacc += s.k12;
  t.C3 += s.k03;
  t.Q += s.e22 - s.k20 * s.k02 - T(2) * s.k11 * s.k11;
  t.C4 += s.e04 - T(3) * s.k02 * s.k02;
}

// Gradient of sum_j g_j * contraction_j through one group: g holds d loss/d(contraction), already
// scaled by the sample's upstream gradient. Writing f = g_ubar m10 + g_vbar m01 + E[Phi(a', c')]
// (Phi collects every central term, with the products k20 k02, k11^2, k02^2 linearised into the
// coefficients), d f/d pi_j = Phi_j - a_j E[Phi_a] - c_j E[Phi_c] + g_ubar a_j + g_vbar c_j and
// d f/d a_j = pi_j (g_ubar + Phi_a(j) - E[Phi_a]) (likewise c); the logits' gradient is the
// softmax projection pi_j (d f/d pi_j - E[d f/d pi]). E[Phi], E[Phi_a], E[Phi_c] are polynomials
// in a', c' whose expectations are the group's central moments in s (E a' = E c' = 0), so one
// pass over the K categories suffices. Accumulates into dlogit, da, dc (dc may be null with c).
// s must carry the higher moments (group_stats with higher = true) whenever g has a non-zero
// Taac, Tacc, C3, Q or C4 (every head but the fixed one, whose c is null).
template <typename T, typename W>
SK_HOST_DEVICE void group_grad(const W* a, const W* c, const T* prob, int K, const GroupStats<T>& s,
                               const PixelTerms<T>& g, T* dlogit, T* da, T* dc) {
  const T g20 = g.Saa - g.Q * s.k02;
  const T g02 = g.Scc - g.Q * s.k20 - T(6) * g.C4 * s.k02;
  const T g11 = g.Sac - T(4) * g.Q * s.k11;
  const T e_phi = g20 * s.k20 + g02 * s.k02 + g11 * s.k11 + g.Tacc * s.k12 + g.Taac * s.k21 + g.C3 * s.k03 +
                  g.Q * s.e22 + g.C4 * s.e04;
  const T e_pa = g.Tacc * s.k02 + T(2) * g.Taac * s.k11 + T(2) * g.Q * s.k12;
  const T e_pc = T(2) * g.Tacc * s.k11 + g.Taac * s.k20 + T(3) * g.C3 * s.k02 + T(2) * g.Q * s.k21 +
                 T(4) * g.C4 * s.k03;
  const T mean_dpi = e_phi - s.m10 * e_pa - s.m01 * e_pc + g.ubar * s.m10 + g.vbar * s.m01;
  for (int j = 0; j < K; ++j) {
    const T p = prob[j], av = T(a[j]), x = av - s.m10;
    const T cv = c != nullptr ? T(c[j]) : T(0), y = c != nullptr ? cv - s.m01 : T(0);
    const T phi = g20 * x * x + g02 * y * y + g11 * x * y + g.Tacc * x * y * y + g.Taac * x * x * y +
                  g.C3 * y * y * y + g.Q * x * x * y * y + g.C4 * y * y * y * y;
    const T phi_a = T(2) * g20 * x + g11 * y + g.Tacc * y * y + T(2) * g.Taac * x * y + T(2) * g.Q * x * y * y;
    const T phi_c = T(2) * g02 * y + g11 * x + T(2) * g.Tacc * x * y + g.Taac * x * x + T(3) * g.C3 * y * y +
                    T(2) * g.Q * x * x * y + T(4) * g.C4 * y * y * y;
    const T dpi = phi - av * e_pa - cv * e_pc + g.ubar * av + g.vbar * cv;
    if (dlogit != nullptr) dlogit[j] += p * (dpi - mean_dpi);
    if (da != nullptr) da[j] += p * (g.ubar + phi_a - e_pa);
    if (dc != nullptr) dc[j] += p * (g.vbar + phi_c - e_pc);
  }
}

// Log-variance head: the group tilted by exp(-h.z_g) (MATH.md §12). lp: the group's normalised
// log-probabilities. hm = E[h.z_g], log_mgf = log E[exp(-h.z_g)], mean / var: of a.z_g under the
// tilted law.
template <typename T>
struct TiltedGroup {
  T hm, log_mgf, mean, var, norm, shift;  // norm = sum_j exp(lp_j - h_j - shift)
};

template <typename T, typename W>
SK_HOST_DEVICE TiltedGroup<T> tilt_group(const W* a, const W* h, const T* lp, int K) {
  TiltedGroup<T> t{T(0), T(0), T(0), T(0), T(0), T(0)};
  T shift = lp[0] - T(h[0]);
  for (int j = 1; j < K; ++j) {
    const T v = lp[j] - T(h[j]);
    shift = v > shift ? v : shift;
  }
  T sum_wa = 0;
  for (int j = 0; j < K; ++j) {
    const T w = exp(lp[j] - T(h[j]) - shift);
    t.norm += w;
    sum_wa += w * T(a[j]);
    t.hm += exp(lp[j]) * T(h[j]);
  }
  t.shift = shift;
  t.log_mgf = shift + log(t.norm);
  t.mean = sum_wa / t.norm;
  for (int j = 0; j < K; ++j) {
    const T dev = T(a[j]) - t.mean;
    t.var += exp(lp[j] - T(h[j]) - shift) * dev * dev;
  }
  t.var /= t.norm;
  return t;
}

// Gradient of g.hm hm + g.S log_mgf + g.T1 mean + g.T2 var of one group (g already scaled).
template <typename T, typename W>
SK_HOST_DEVICE void tilt_group_grad(const W* a, const W* h, const T* lp, int K, const TiltedGroup<T>& t,
                                    const TiltedSums<T>& g, T* dlogit, T* da, T* dh) {
  for (int j = 0; j < K; ++j) {
    const T p = exp(lp[j]);
    const T pt = exp(lp[j] - T(h[j]) - t.shift) / t.norm;
    const T dev = T(a[j]) - t.mean;
    const T tilted = g.S * pt + g.T1 * pt * dev + g.T2 * pt * (dev * dev - t.var);
    if (dlogit != nullptr) dlogit[j] += g.hm * p * (T(h[j]) - t.hm) + tilted - g.S * p;
    if (dh != nullptr) dh[j] += g.hm * p - tilted;
    if (da != nullptr) da[j] += g.T1 * pt + T(2) * g.T2 * pt * dev;
  }
}

}  // namespace silent_kernels
