// exp and log that vectorise inside `#pragma omp simd` loops: the per-latent loops of the tilted
// (log-variance) contractions are bound by these two functions, O(B k d) calls per pass.
//
// On x86-64 Linux with GCC the declarations below give expf/exp/logf/log the `simd` attribute,
// as glibc's own headers do under -ffast-math, so GCC calls glibc's vector variants (libmvec,
// linked by setup.py; at most 4 ulp) instead of one scalar call per element, and functions
// marked SK_VECTOR_CLONES get an AVX2 clone chosen at load time beside the baseline one. The
// loops also need -fno-math-errno (setup.py). Elsewhere both are plain scalar code.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
extern "C" float expf(float) noexcept __attribute__((simd("notinbranch")));
extern "C" double exp(double) noexcept __attribute__((simd("notinbranch")));
extern "C" float logf(float) noexcept __attribute__((simd("notinbranch")));
extern "C" double log(double) noexcept __attribute__((simd("notinbranch")));
#define SK_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SK_VECTOR_CLONES
#endif

namespace silent_kernels::cpu {

inline float vexp(float x) { return expf(x); }
inline double vexp(double x) { return exp(x); }
inline float vlog(float x) { return logf(x); }
inline double vlog(double x) { return log(x); }

// v[i] = log(v[i]) for a row.
SK_VECTOR_CLONES inline void log_in_place(double* v, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) v[i] = vlog(v[i]);
}

}  // namespace silent_kernels::cpu
