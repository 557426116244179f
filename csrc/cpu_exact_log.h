// The exact log term (epilogue.h: expected_log_square) for a row of pixels of the mean-field
// precision head, evaluated in loops that vectorise instead of one scalar call per pixel.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "cpu_meanfield.h"
#include "cpu_vector_math.h"
#include "epilogue.h"

namespace silent_kernels::cpu::meanfield {

// The exact log term of one row of pixels, in three loops instead of one scalar call per pixel:
// the logarithm as one vectorised pass, the asymptotic series (the usual case: the precision's
// mean many deviations from 0) vectorised with the term count of the row's largest s2 / m^2, and
// the table-based series for the remaining pixels.
struct ExactLogRow {
  std::vector<double> m, s2, log_arg, asymptotic, value, d_mean, d_var, inv_m, r, term, tail, dtail;
  std::vector<LogSquare> ls;
  explicit ExactLogRow(int64_t n)
      : m(n), s2(n), log_arg(n), asymptotic(n), value(n), d_mean(n), d_var(n), inv_m(n), r(n), term(n), tail(n),
        dtail(n), ls(n) {}
};

// The asymptotic series for a row, the pixel loop innermost. Series pixels get stand-ins (m = 1,
// s2 = 0) and are overwritten by the caller.
SK_VECTOR_CLONES inline void asymptotic_row(ExactLogRow& row, int64_t n, int terms) {
  double *inv_m = row.inv_m.data(), *r = row.r.data(), *term = row.term.data(), *tail = row.tail.data(),
         *dtail = row.dtail.data();
  const double *m = row.m.data(), *s2 = row.s2.data(), *asym = row.asymptotic.data();
#pragma omp simd
  for (int64_t p = 0; p < n; ++p) {
    const bool a = asym[p] != 0.0;
    inv_m[p] = 1.0 / (a ? m[p] : 1.0);
    r[p] = (a ? s2[p] : 0.0) * inv_m[p] * inv_m[p];
    const AsymptoticSums first = asymptotic_first();
    term[p] = first.term;
    tail[p] = first.tail;
    dtail[p] = first.dtail;
  }
  for (int k = 2; k <= terms; ++k) {
#pragma omp simd
    for (int64_t p = 0; p < n; ++p) {
      AsymptoticSums s{term[p], tail[p], dtail[p]};
      asymptotic_step(s, k, r[p]);
      term[p] = s.term;
      tail[p] = s.tail;
      dtail[p] = s.dtail;
    }
  }
  const double* log_m2 = row.log_arg.data();
  double *value = row.value.data(), *d_mean = row.d_mean.data(), *d_var = row.d_var.data();
#pragma omp simd
  for (int64_t p = 0; p < n; ++p) {
    const LogSquare ls = asymptotic_finish(AsymptoticSums{term[p], tail[p], dtail[p]}, inv_m[p], r[p], log_m2[p]);
    value[p] = ls.value;
    d_mean[p] = ls.d_mean;
    d_var[p] = ls.d_var;
  }
}

template <typename acc_t, bool H3, bool H4>
void exact_log_terms(const std::array<acc_t*, kGroups>& Y, int64_t r, int64_t np, const acc_t* bp, const acc_t* pbp, ExactLogRow& row) {
  double r_max = 0.0;
  for (int64_t p = 0; p < np; ++p) {
    const PixelTerms<acc_t> c = load_terms<acc_t, H3, H4>(Y, r, p, np, bp[p], pbp[p]);
    const double m = double(c.vbar), s2 = double(c.Scc);
    const bool asym = log_square_is_asymptotic(m, s2);
    row.m[p] = m;
    row.s2[p] = s2;
    row.log_arg[p] = log_square_log_argument(m, s2);
    row.asymptotic[p] = asym ? 1.0 : 0.0;
    if (asym) r_max = std::max(r_max, s2 / (m * m));
  }
  log_in_place(row.log_arg.data(), np);
  asymptotic_row(row, np, asymptotic_terms(r_max));
  for (int64_t p = 0; p < np; ++p)
    row.ls[p] = row.asymptotic[p] != 0.0 ? LogSquare{row.value[p], row.d_mean[p], row.d_var[p]}
                                         : expected_log_square_given_log(row.m[p], row.s2[p], row.log_arg[p]);
}

}  // namespace silent_kernels::cpu::meanfield
