// The contraction engine of the forward and coefficient kernels (MATH.md §2): one block
// computes, for a tile of BM samples x BN pixels, the contractions
//   ubar, vbar (mean . A, mean . C), Saa, Scc, Sac (var . A^2, C^2, AC),
//   Tacc, Taac, C3 (k3 . AC^2, A^2C, C^3), Q, C4 (k4 . A^2C^2, C^4)
// (fixed head: ubar only) by looping over the latent dimension d in steps of BK. Tiles of
// the moments and of A, C are staged in shared memory (double-buffered, the next step's
// global loads in flight during the current step's arithmetic); the weight products are
// formed in registers from the A, C values of a step and never stored. Each thread
// accumulates TM x TN outputs of every contraction in registers (acc_t: fp32, fp64 for double).
#pragma once

#include "common.cuh"

namespace silent_kernels {
namespace cuda {

// Which moments, weights and contractions a kernel uses.
template <bool PREC, bool K3, bool K4>
struct ContractSet {
  static constexpr bool kPrec = PREC, kK3 = PREC && K3, kK4 = PREC && K4;
  // moment kinds staged: mean, var, [k3], [k4]
  static constexpr int NK = PREC ? 2 + int(kK3) + int(kK4) : 1;
  static constexpr int KI_K3 = 2, KI_K4 = 2 + int(kK3);
  // weights staged: A, [C]
  static constexpr int NW = PREC ? 2 : 1;
  // accumulators, in PixelTerms order with the absent ones left out
  static constexpr int NACC = PREC ? 5 + 3 * int(kK3) + 2 * int(kK4) : 1;
  static constexpr int UB = 0, VB = 1, SAA = 2, SCC = 3, SAC = 4, TACC = 5, TAAC = 6, C3 = 7;
  static constexpr int Q = 5 + 3 * int(kK3), C4 = 6 + 3 * int(kK3);
};

// Moment pointers of a ContractSet from the precision inputs.
template <class Set, typename T>
__device__ __forceinline__ void precision_moments(const PrecisionArgs<T>& a,
                                                  const T* (&mom)[Set::NK]) {
  mom[0] = a.mean;
  mom[1] = a.var;
  if constexpr (Set::kK3) mom[Set::KI_K3] = a.k3;
  if constexpr (Set::kK4) mom[Set::KI_K4] = a.k4;  // may be null (k3-only moments): zeros
}

template <class Tl, class Set_, typename T>
struct Contractor {
  using Set = Set_;
  using Acc = acc_t<T>;
  static constexpr int TM = Tl::TM, TN = Tl::TN, BK = Tl::BK, BM = Tl::BM, BN = Tl::BN;
  using RowLoader = TileLoader<T, Acc, BM, BK, Tl::THREADS, true>;
  using ColLoader = TileLoader<T, Acc, BN, BK, Tl::THREADS, true>;
  using Accum = Acc[Set::NACC][TM][TN];

  struct __align__(16) Smem {
    Acc row[2][Set::NK][BK][BM + pad16<Acc>()];  // moments, [kk][sample]
    Acc col[2][Set::NW][BK][BN + 1];             // weights, [kk][pixel]
  };
  // lds_vec reads TM consecutive samples: rows must keep the vector alignment
  static_assert(((BM + pad16<Acc>()) * sizeof(Acc)) % 16 == 0, "moment rows not 16-byte aligned");

  // mom[q]: the moment kinds of Set (B x d); w[q]: A, C (k x d). acc is overwritten.
  static __device__ __forceinline__ void run(Smem& sm, const T* const (&mom)[Set::NK],
                                             const T* const (&w)[Set::NW], int64_t B, int64_t k,
                                             int64_t d, int64_t n0, int64_t p0, Accum& acc) {
    const int lane = threadIdx.x & 31, wy = threadIdx.x >> 5;
    zero_fill(acc);
    TileGroup<RowLoader, Set::NK> rows;
    TileGroup<ColLoader, Set::NW> cols;
    double_buffered_steps<BK>(
        0, ceil_div(d, BK),
        [&](int64_t c0) {
          rows.load(mom, d, n0, B, c0, d);
          cols.load(w, d, p0, k, c0, d);
        },
        [&](int buf) {
          rows.store(sm.row[buf]);
          cols.store(sm.col[buf]);
        },
        [&](int buf) {
#pragma unroll
          for (int kk = 0; kk < BK; ++kk) step(sm, buf, kk, lane, wy, acc);
        });
  }

  // The contractions of this block's tile bt of a fixed-head call (ubar only).
  static __device__ __forceinline__ void run(const FixedArgs<T>& a, const BlockTile& bt, Accum& acc) {
    static_assert(!Set::kPrec, "the fixed head has no precision weights");
    __shared__ Smem sm;
    const T* mom[1] = {a.mean};
    const T* w[1] = {a.weight};
    run(sm, mom, w, a.B, a.k, a.d, bt.row0, bt.col0, acc);
  }

  // The contractions of this block's tile bt of a precision-family call.
  static __device__ __forceinline__ void run(const PrecisionArgs<T>& a, const BlockTile& bt,
                                             Accum& acc) {
    static_assert(Set::kPrec, "precision calls contract with both weights");
    __shared__ Smem sm;
    const T* mom[Set::NK];
    precision_moments<Set>(a, mom);
    const T* w[2] = {a.weight, a.pweight};
    run(sm, mom, w, a.B, a.k, a.d, bt.row0, bt.col0, acc);
  }

  static __device__ __forceinline__ void step(const Smem& sm, int buf, int kk, int lane, int wy,
                                              Accum& acc) {
    Acc a[TN], c[TN];
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      a[j] = sm.col[buf][0][kk][lane + 32 * j];
      if constexpr (Set::kPrec) c[j] = sm.col[buf][Set::NW - 1][kk][lane + 32 * j];
    }
    Acc m[TM];
    lds_vec<Acc, TM>(&sm.row[buf][0][kk][wy * TM], m);
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[Set::UB][i][j] += m[i] * a[j];
    if constexpr (Set::kPrec) {
      Acc v[TM];
      lds_vec<Acc, TM>(&sm.row[buf][1][kk][wy * TM], v);
      Acc a2[TN], c2[TN], ac[TN];
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        a2[j] = a[j] * a[j];
        c2[j] = c[j] * c[j];
        ac[j] = a[j] * c[j];
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          acc[Set::VB][i][j] += m[i] * c[j];
          acc[Set::SAA][i][j] += v[i] * a2[j];
          acc[Set::SCC][i][j] += v[i] * c2[j];
          acc[Set::SAC][i][j] += v[i] * ac[j];
        }
      if constexpr (Set::kK3) {
        Acc t3[TM];
        lds_vec<Acc, TM>(&sm.row[buf][Set::KI_K3][kk][wy * TM], t3);
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          const Acc ac2 = ac[j] * c[j], a2c = a2[j] * c[j], c3 = c2[j] * c[j];
#pragma unroll
          for (int i = 0; i < TM; ++i) {
            acc[Set::TACC][i][j] += t3[i] * ac2;
            acc[Set::TAAC][i][j] += t3[i] * a2c;
            acc[Set::C3][i][j] += t3[i] * c3;
          }
        }
      }
      if constexpr (Set::kK4) {
        Acc t4[TM];
        lds_vec<Acc, TM>(&sm.row[buf][Set::KI_K4][kk][wy * TM], t4);
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          const Acc a2c2 = a2[j] * c2[j], c4 = c2[j] * c2[j];
#pragma unroll
          for (int i = 0; i < TM; ++i) {
            acc[Set::Q][i][j] += t4[i] * a2c2;
            acc[Set::C4][i][j] += t4[i] * c4;
          }
        }
      }
    }
  }

  // The PixelTerms of output (i, j) with the biases added (absent contractions are 0).
  static __device__ __forceinline__ PixelTerms<Acc> terms(const Accum& acc, int i, int j,
                                                          Acc bias_u, Acc bias_v) {
    PixelTerms<Acc> t;
    t.ubar = acc[Set::UB][i][j] + bias_u;
    t.vbar = t.Saa = t.Scc = t.Sac = t.Tacc = t.Taac = t.C3 = t.Q = t.C4 = Acc(0);
    if constexpr (Set::kPrec) {
      t.vbar = acc[Set::VB][i][j] + bias_v;
      t.Saa = acc[Set::SAA][i][j];
      t.Scc = acc[Set::SCC][i][j];
      t.Sac = acc[Set::SAC][i][j];
    }
    if constexpr (Set::kK3) {
      t.Tacc = acc[Set::TACC][i][j];
      t.Taac = acc[Set::TAAC][i][j];
      t.C3 = acc[Set::C3][i][j];
    }
    if constexpr (Set::kK4) {
      t.Q = acc[Set::Q][i][j];
      t.C4 = acc[Set::C4][i][j];
    }
    return t;
  }
};

template <class Tl, typename T>
using FixedContractor = Contractor<Tl, ContractSet<false, false, false>, T>;
template <class Tl, bool K3, bool K4, typename T>
using PrecisionContractor = Contractor<Tl, ContractSet<true, K3, K4>, T>;

}  // namespace cuda
}  // namespace silent_kernels
