// Host program of tests/test_cuda_compile.py: the derivatives of csrc/epilogue.h next to central
// finite differences of the losses (one line per derivative: kind point index analytic fd).
#include <cmath>
#include <cstdio>
#include <random>
#include "epilogue.h"
using namespace silent_kernels;

static double& at(PixelTerms<double>& t, int j) {
  switch (j) {
    case 0: return t.ubar; case 1: return t.vbar; case 2: return t.Saa; case 3: return t.Scc;
    case 4: return t.Sac; case 5: return t.Tacc; case 6: return t.Taac; case 7: return t.C3;
    case 8: return t.Q; default: return t.C4;
  }
}

int main() {
  std::mt19937_64 rng(20240611);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  for (int point = 0; point < 12; ++point) {
    const double x = 2 * u(rng);
    PixelTerms<double> c;
    c.ubar = 2 * u(rng); c.vbar = point % 4 == 0 ? 0.05 * u(rng) : 2 * u(rng);
    c.Saa = 0.1 + std::fabs(u(rng)); c.Scc = 0.1 + std::fabs(u(rng)); c.Sac = 0.5 * u(rng);
    c.Tacc = 0.5 * u(rng); c.Taac = 0.5 * u(rng); c.C3 = 0.5 * u(rng);
    c.Q = 0.5 * u(rng); c.C4 = 0.5 * u(rng);
    PixelTerms<double> g = precision_pixel_grad(x, c);
    for (int j = 0; j < 10; ++j) {
      const double h = 1e-5 * std::fmax(1.0, std::fabs(at(c, j)));
      PixelTerms<double> p = c, m = c;
      at(p, j) += h; at(m, j) -= h;
      const double fd = (precision_pixel_nll(x, p) - precision_pixel_nll(x, m)) / (2 * h);
      std::printf("precision %d %d %.17g %.17g\n", point, j, at(g, j), fd);
    }
    // d/dx = -d/d ubar (the CUDA coefficient kernel writes dx this way)
    const double h = 1e-5 * std::fmax(1.0, std::fabs(x));
    const double fdx = (precision_pixel_nll(x + h, c) - precision_pixel_nll(x - h, c)) / (2 * h);
    std::printf("precision_x %d 0 %.17g %.17g\n", point, -g.ubar, fdx);
    // fixed head: d/d sigma2 (epilogue.h) and d/d resid = resid / sigma2 (coef kernel)
    const double resid = 2 * u(rng), saa = 0.1 + std::fabs(u(rng)), s2 = 0.2 + std::fabs(u(rng));
    auto nll = [&](double r, double s) { return fixed_pixel_nll(r, saa, 1.0 / s, std::log(s)); };
    const double hs = 1e-6 * s2, hr = 1e-5 * std::fmax(1.0, std::fabs(resid));
    std::printf("fixed_sigma2 %d 0 %.17g %.17g\n", point, fixed_pixel_dsigma2(resid, saa, 1.0 / s2),
                (nll(resid, s2 + hs) - nll(resid, s2 - hs)) / (2 * hs));
    std::printf("fixed_resid %d 0 %.17g %.17g\n", point, resid / s2,
                (nll(resid + hr, s2) - nll(resid - hr, s2)) / (2 * hr));
    // exact log term and Gaussian log-variance head: the five Gaussian contractions
    PixelTerms<double> gc = c;
    gc.Tacc = gc.Taac = gc.C3 = gc.Q = gc.C4 = 0;
    PixelTerms<double> ge = head_pixel_grad<Head::kExactLog>(x, gc), gl = head_pixel_grad<Head::kLogVar>(x, gc);
    for (int j = 0; j < 5; ++j) {
      const double h = 1e-5 * std::fmax(1.0, std::fabs(at(gc, j)));
      PixelTerms<double> p = gc, m = gc;
      at(p, j) += h; at(m, j) -= h;
      std::printf("exact_log %d %d %.17g %.17g\n", point, j, at(ge, j),
                  (exact_log_pixel_nll(x, p) - exact_log_pixel_nll(x, m)) / (2 * h));
      std::printf("logvar %d %d %.17g %.17g\n", point, j, at(gl, j),
                  (logvar_pixel_nll(x, p) - logvar_pixel_nll(x, m)) / (2 * h));
    }
    // tilted log-variance epilogue: d/d(hm, S, T1, T2), d/db = d/dT1, d/dh0 = 1/2 - d/dS
    const TiltedSums<double> ts{u(rng), 0.5 * u(rng), u(rng), 0.1 + std::fabs(u(rng))};
    const double tb = 0.3 * u(rng), th0 = 0.5 * u(rng);
    const TiltedSums<double> tg = tilted_logvar_pixel_grad(x, tb, th0, ts);
    auto tl = [&](TiltedSums<double> t, double b, double h0) { return tilted_logvar_pixel_nll(x, b, h0, t); };
    const double analytic_t[4] = {tg.hm, tg.S, tg.T1, tg.T2};
    for (int j = 0; j < 4; ++j) {
      const double h = 1e-6;
      TiltedSums<double> p = ts, m = ts;
      double* pf[4] = {&p.hm, &p.S, &p.T1, &p.T2};
      double* mf[4] = {&m.hm, &m.S, &m.T1, &m.T2};
      *pf[j] += h; *mf[j] -= h;
      std::printf("tilted %d %d %.17g %.17g\n", point, j, analytic_t[j], (tl(p, tb, th0) - tl(m, tb, th0)) / (2 * h));
    }
    std::printf("tilted_b %d 0 %.17g %.17g\n", point, tg.T1, (tl(ts, tb + 1e-6, th0) - tl(ts, tb - 1e-6, th0)) / 2e-6);
    std::printf("tilted_h0 %d 0 %.17g %.17g\n", point, 0.5 - tg.S, (tl(ts, tb, th0 + 1e-6) - tl(ts, tb, th0 - 1e-6)) / 2e-6);
    // Bernoulli tilt (what the CUDA backward's chain rule uses): d K/dh = -mean', d mean'/dh = -var',
    // d mean'/dl = var' (log p, log q follow l)
    const double lg = 3 * u(rng), hh = u(rng);
    auto tilt = [](double l, double h) {
      const double lp = -std::log1p(std::exp(-l)), lq = -std::log1p(std::exp(l));
      return bernoulli_tilt(l, lp, lq, h);
    };
    const LatentTilt<double> t0 = tilt(lg, hh);
    std::printf("tilt_K_h %d 0 %.17g %.17g\n", point, -t0.mean, (tilt(lg, hh + 1e-6).log_mgf - tilt(lg, hh - 1e-6).log_mgf) / 2e-6);
    std::printf("tilt_mean_h %d 0 %.17g %.17g\n", point, -t0.var, (tilt(lg, hh + 1e-6).mean - tilt(lg, hh - 1e-6).mean) / 2e-6);
    std::printf("tilt_mean_l %d 0 %.17g %.17g\n", point, t0.var, (tilt(lg + 1e-6, hh).mean - tilt(lg - 1e-6, hh).mean) / 2e-6);
  }
  return 0;
}
