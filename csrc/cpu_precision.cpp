// C++ CPU kernels of the heads that follow the mean-field contraction stage (cpu_meanfield.h):
// the learnable-precision head (paper's Taylor log term, or the exact log term for Gaussian
// latents) and the log-variance head on Gaussian latents (MATH.md §4, §10, §11).
//
// Training path: the forward saves the per-pixel coefficients (layout below), the backward does
// only the moment- and weight-gradient GEMMs and folds the partials into dA, dC (MATH.md §5);
// precision_nll_backward (for callers that did not keep the coefficients) runs both.
//
// This file: the forwards; the backwards are in cpu_precision_backward.cpp, the pieces both use in
// cpu_precision.h.
#include <ATen/Dispatch.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_common.h"
#include "cpu_kernels.h"
#include "epilogue.h"
#include "cpu_meanfield.h"
#include "cpu_exact_log.h"
#include "cpu_precision.h"

namespace silent_kernels::cpu {
namespace {

using namespace meanfield;

// ------------------------------------------------------------------------------ forward
// The forwards' per-part partial sums (one row per parallel part, summed at the end so that the
// result does not depend on the thread count): each sample's loss and, with k4, the column sums
// of the Q products (their loss term is sum_p Q / 2 = 0.5 k4 . colsum, one GEMV at the end).
// Raw pointers to a forward's inputs: x and the weights A, C in scalar_t, the biases in acc_t.
template <typename scalar_t>
struct ForwardPointers {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* X;
  const scalar_t* A;
  const scalar_t* C;
  const acc_t* bias;
  const acc_t* pbias;
  explicit ForwardPointers(const Inputs<scalar_t>& in)
      : X(in.x.template data_ptr<scalar_t>()), A(in.A.template data_ptr<scalar_t>()),
        C(in.C.template data_ptr<scalar_t>()), bias(in.bias.template data_ptr<acc_t>()),
        pbias(in.pbias.template data_ptr<acc_t>()) {}
};

template <typename acc_t, bool H4>
struct LossParts {
  at::Tensor loss, qcol;
  int64_t B, d;
  LossParts(int64_t nparts, int64_t B_, int64_t d_, const at::TensorOptions& acc_opts)
      : loss(at::zeros({nparts, B_}, acc_opts)), qcol(at::zeros({nparts, H4 ? d_ : 0}, acc_opts)), B(B_), d(d_) {}
  acc_t* loss_row(int64_t q) { return loss.template data_ptr<acc_t>() + linear_offset(q, 0, B); }
  acc_t* qcol_row(int64_t q) { return H4 ? qcol.template data_ptr<acc_t>() + linear_offset(q, 0, d) : nullptr; }
  at::Tensor total(const std::array<at::Tensor, kGroups>& mom, at::ScalarType out_dtype) const {
    at::Tensor sum = sum_parts(loss);
    if (H4) sum.add_(at::mv(mom[3], sum_parts(qcol)), 0.5);
    return sum.to(out_dtype);
  }
};

// Per-thread scratch of the forwards: the floored M of a row for the Taylor head's log sum, and
// the exact log term's row buffers (empty unless that head runs).
template <typename acc_t>
struct RowScratch {
  std::vector<acc_t> mbuf;
  ExactLogRow exact;
  RowScratch(int64_t tile, bool exact_log) : mbuf(tile), exact(exact_log ? tile : 0) {}
};

// The forwards' loop over pixel tiles: parts of the tile range run in parallel, each thread with
// its own workspace and scratch; per tile the weight products are formed in ws.P (adding the Q
// column sums to the part's row), then body(part's loss row, p0, np, ws, scratch) runs.
template <typename scalar_t, typename acc_t, bool H3, bool H4, typename Body>
void for_each_product_tile(const TilePlan& plan, const Groups& gr, int64_t d, bool exact_log,
                           const ForwardPointers<scalar_t>& ptr, LossParts<acc_t, H4>& parts, Body&& body) {
  at::parallel_for(0, plan.nparts, 1, [&](int64_t q_begin, int64_t q_end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Workspace<acc_t> ws(gr, plan, d, /*with_h=*/false);
    RowScratch<acc_t> scratch(plan.tile, exact_log);
    for (int64_t q = q_begin; q < q_end; ++q) {
      acc_t* loss = parts.loss_row(q);
      for (int64_t t = plan.tile_begin(q); t < plan.tile_begin(q + 1); ++t) {
        const int64_t p0 = plan.pixel_begin(t), np = plan.pixel_count(t);
        form_products<scalar_t, acc_t, H3, H4>(ptr.A, ptr.C, p0, np, d, ws.P, parts.qcol_row(q));
        body(loss, p0, np, ws, scratch);
      }
    }
  });
}

// The per-pixel loss of one row of a tile, summed: the Taylor head keeps its log out of the
// (vectorised) loop, the other heads call their epilogue per pixel (special functions).
template <Head HD, typename scalar_t, typename acc_t, bool H3, bool H4>
inline acc_t row_loss(const std::array<acc_t*, kGroups>& Y, int64_t r, int64_t np,
                      const scalar_t* xr, const acc_t* bp, const acc_t* pbp, acc_t* mb) {
  acc_t sum = 0;
  if constexpr (HD == Head::kTaylor) {
#pragma omp simd reduction(+ : sum)
    for (int64_t p = 0; p < np; ++p) {
      const PixelTerms<acc_t> c = load_terms<acc_t, H3, H4>(Y, r, p, np, bp[p], pbp[p]);
      acc_t M;
      sum += precision_pixel_nll_logfree<acc_t>(static_cast<acc_t>(xr[p]), c, M);
      mb[p] = M;
    }
    return sum - acc_t(0.5) * sum_log(mb, np);
  } else {
    for (int64_t p = 0; p < np; ++p) {
      const PixelTerms<acc_t> c = load_terms<acc_t, H3, H4>(Y, r, p, np, bp[p], pbp[p]);
      sum += head_pixel_nll<HD, acc_t>(static_cast<acc_t>(xr[p]), c);
    }
    return sum;
  }
}

template <typename scalar_t, bool H3, bool H4, Head HD>
at::Tensor forward_impl(const Inputs<scalar_t>& in) {
  using acc_t = at::opmath_type<scalar_t>;
  const Groups gr(H3, H4);
  const int64_t B = in.B, k = in.k, d = in.d;
  const auto acc_opts = in.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  if (B == 0) return at::zeros({0}, in.x.options());
  const TilePlan plan = make_plan(B, k, d, gr.total, gr.total);
  LossParts<acc_t, H4> parts(plan.nparts, B, d, acc_opts);

  const ForwardPointers<scalar_t> ptr(in);

  for_each_product_tile<scalar_t, acc_t, H3, H4>(plan, gr, d, /*exact_log=*/false, ptr, parts,
                                                 [&](acc_t* loss, int64_t p0, int64_t np, Workspace<acc_t>& ws,
                                                     RowScratch<acc_t>& scratch) {
    for (int64_t n0 = 0; n0 < B; n0 += plan.batch_chunk) {
      const int64_t nb = std::min(plan.batch_chunk, B - n0);
      contract(gr, in.mom, ws, n0, nb, np, d);
      for (int64_t r = 0; r < nb; ++r) {
        loss[n0 + r] += row_loss<HD, scalar_t, acc_t, H3, H4>(
            ws.Y, r, np, ptr.X + linear_offset(n0 + r, p0, k), ptr.bias + p0, ptr.pbias + p0, scratch.mbuf.data());
      }
    }
  });

  return parts.total(in.mom, in.x.scalar_type());
}

// ------------------------------------------------- training forward + saved-coefficient backward
// The coefficients g_j = d(pixel loss)/d(contraction j) do not depend on the upstream gradient,
// so they are saved UNSCALED (epilogue.h) and the backward does
//   d(moment_g) = diag(grad) (sum over tiles of G_g @ P_g),   H_g = G_g^T @ (diag(grad) moment_g)
// Saved layout (a flat acc_t tensor of B * ncontr * k elements, ncontr = Groups::total): the
// pixels are cut into tiles of saved_tile(k, d, ncontr) pixels (a function of the shapes only,
// not of the thread count); tile t (pixels [p0, p0 + np)) occupies elements
// [B ncontr p0, B ncontr (p0 + np)), holding for each group g in turn the row-major
// (B x rows_g * np) matrix G_g, stacked like the products P_g (contraction-major within a row):
// so G_g @ P_g and G_g^T @ moment are single GEMMs straight on the saved buffer.
template <typename scalar_t, bool H3, bool H4, Head HD>
std::tuple<at::Tensor, at::Tensor> forward_train_impl(const Inputs<scalar_t>& in) {
  using acc_t = at::opmath_type<scalar_t>;
  const Groups gr(H3, H4);
  const int64_t B = in.B, k = in.k, d = in.d;
  const auto acc_opts = in.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor coef = at::empty({B * gr.total * k}, acc_opts);
  if (B == 0) return {at::zeros({0}, in.x.options()), coef};
  const TilePlan plan = make_saved_plan(B, k, d, gr.total);
  const auto roff = group_row_offsets(gr);
  LossParts<acc_t, H4> parts(plan.nparts, B, d, acc_opts);

  const ForwardPointers<scalar_t> ptr(in);
  acc_t* coef_ptr = coef.template data_ptr<acc_t>();

  for_each_product_tile<scalar_t, acc_t, H3, H4>(plan, gr, d, HD == Head::kExactLog, ptr, parts,
                                                 [&](acc_t* loss, int64_t p0, int64_t np, Workspace<acc_t>& ws,
                                                     RowScratch<acc_t>& scratch) {
    acc_t* tile_base = coef_ptr + B * gr.total * p0;
    for (int64_t n0 = 0; n0 < B; n0 += plan.batch_chunk) {
      const int64_t nb = std::min(plan.batch_chunk, B - n0);
      // Contract straight into the saved buffer, then overwrite with the coefficients.
      for (int g = 0; g < kGroups; ++g)
        ws.Y[g] = tile_base + B * roff[g] * np + n0 * gr.rows[g] * np;
      contract(gr, in.mom, ws, n0, nb, np, d);
      const acc_t* SK_RESTRICT bp = ptr.bias + p0;
      const acc_t* SK_RESTRICT pbp = ptr.pbias + p0;
      for (int64_t r = 0; r < nb; ++r) {
        const scalar_t* xr = ptr.X + linear_offset(n0 + r, p0, k);
        // Taylor: the (vectorised) loss first, as the coefficients overwrite the contractions
        // it reads; the other heads take both from one epilogue call per pixel below.
        if constexpr (HD == Head::kTaylor)
          loss[n0 + r] += row_loss<HD, scalar_t, acc_t, H3, H4>(ws.Y, r, np, xr, bp, pbp, scratch.mbuf.data());
        if constexpr (HD == Head::kExactLog)  // the special function in its own loops
          exact_log_terms<acc_t, H3, H4>(ws.Y, r, np, bp, pbp, scratch.exact);
        acc_t row_sum = 0;
        acc_t* y0 = ws.Y[0] + linear_offset(r, 0, 2 * np);
        acc_t* y1 = ws.Y[1] + linear_offset(r, 0, 3 * np);
        acc_t* y2 = H3 ? ws.Y[2] + linear_offset(r, 0, 3 * np) : nullptr;
        acc_t* y3 = H4 ? ws.Y[3] + linear_offset(r, 0, np) : nullptr;
#pragma omp simd reduction(+ : row_sum)
        for (int64_t p = 0; p < np; ++p) {
          const PixelTerms<acc_t> c = load_terms<acc_t, H3, H4>(ws.Y, r, p, np, bp[p], pbp[p]);
          const acc_t xv = static_cast<acc_t>(xr[p]);
          PixelTerms<acc_t> g;
          if constexpr (HD == Head::kTaylor) {
            g = precision_pixel_grad<acc_t>(xv, c);
          } else if constexpr (HD == Head::kExactLog) {
            acc_t pixel_loss;
            g = exact_log_pixel_grad_and_nll<acc_t>(xv, c, scratch.exact.ls[p], pixel_loss);
            row_sum += pixel_loss;
          } else {
            acc_t pixel_loss;
            g = head_pixel_grad_and_nll<HD, acc_t>(xv, c, pixel_loss);
            row_sum += pixel_loss;
          }
          y0[p] = g.ubar;
          y0[np + p] = g.vbar;
          y1[p] = g.Saa;
          y1[np + p] = g.Sac;
          y1[2 * np + p] = g.Scc;
          if constexpr (H3) {
            y2[p] = g.Tacc;
            y2[np + p] = g.Taac;
            y2[2 * np + p] = g.C3;
          }
          if constexpr (H4) y3[p] = g.C4;
        }
        if constexpr (HD != Head::kTaylor) loss[n0 + r] += row_sum;
      }
    }
  });

  return {parts.total(in.mom, in.x.scalar_type()), coef};
}

}  // namespace

at::Tensor precision_nll(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                         const c10::optional<at::Tensor>& k3, const c10::optional<at::Tensor>& k4,
                         const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& precision_weight,
                         const c10::optional<at::Tensor>& precision_bias, int64_t head) {
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "precision_nll_cpu", [&] {
    const Inputs<scalar_t> in(x, mean, var, k3, k4, weight, bias, precision_weight, precision_bias);
    loss = dispatch_stage(given(k3), given(k4), head, [&](auto h3, auto h4, auto hd) {
      return forward_impl<scalar_t, decltype(h3)::value, decltype(h4)::value, decltype(hd)::value>(in);
    });
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor>
precision_nll_train(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                    const c10::optional<at::Tensor>& k3, const c10::optional<at::Tensor>& k4,
                    const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                    const at::Tensor& precision_weight, const c10::optional<at::Tensor>& precision_bias,
                    int64_t head) {
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "precision_nll_train_cpu", [&] {
    const Inputs<scalar_t> in(x, mean, var, k3, k4, weight, bias, precision_weight, precision_bias);
    out = dispatch_stage(given(k3), given(k4), head, [&](auto h3, auto h4, auto hd) {
      return forward_train_impl<scalar_t, decltype(h3)::value, decltype(h4)::value, decltype(hd)::value>(in);
    });
  });
  return out;
}

int64_t precision_coefficient_count(int64_t B, int64_t k, bool has_k3, bool has_k4) {
  return B * Groups(has_k3, has_k4).total * k;
}

}  // namespace silent_kernels::cpu
