// C++ CPU kernels of the heads that follow the mean-field contraction stage (cpu_meanfield.h):
// the learnable-precision head (paper's Taylor log term, or the exact log term for Gaussian
// latents) and the log-variance head on Gaussian latents (MATH.md §4, §10, §11).
//
// Training path: the forward saves the per-pixel coefficients (layout below), the backward does
// only the moment- and weight-gradient GEMMs and folds the partials into dA, dC (MATH.md §5);
// precision_nll_backward (for callers that did not keep the coefficients) runs both.
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

namespace silent_kernels::cpu {
namespace {

using namespace meanfield;

// ------------------------------------------------------------------------------ forward
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
  at::Tensor loss_parts = at::zeros({plan.nparts, B}, acc_opts);
  at::Tensor qcol_parts = at::zeros({plan.nparts, H4 ? d : 0}, acc_opts);

  const scalar_t* X = in.x.template data_ptr<scalar_t>();
  const scalar_t* A = in.A.template data_ptr<scalar_t>();
  const scalar_t* C = in.C.template data_ptr<scalar_t>();
  const acc_t* bias = in.bias.template data_ptr<acc_t>();
  const acc_t* pbias = in.pbias.template data_ptr<acc_t>();

  at::parallel_for(0, plan.nparts, 1, [&](int64_t q_begin, int64_t q_end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Workspace<acc_t> ws(gr, plan, d, /*with_h=*/false);
    std::vector<acc_t> mbuf(plan.tile);
    for (int64_t q = q_begin; q < q_end; ++q) {
      acc_t* loss = loss_parts.template data_ptr<acc_t>() + linear_offset(q, 0, B);
      acc_t* qcol = H4 ? qcol_parts.template data_ptr<acc_t>() + linear_offset(q, 0, d) : nullptr;
      for (int64_t t = plan.tile_begin(q); t < plan.tile_begin(q + 1); ++t) {
        const int64_t p0 = plan.pixel_begin(t), np = plan.pixel_count(t);
        form_products<scalar_t, acc_t, H3, H4>(A, C, p0, np, d, ws.P, qcol);
        for (int64_t n0 = 0; n0 < B; n0 += plan.batch_chunk) {
          const int64_t nb = std::min(plan.batch_chunk, B - n0);
          contract(gr, in.mom, ws, n0, nb, np, d);
          for (int64_t r = 0; r < nb; ++r) {
            loss[n0 + r] += row_loss<HD, scalar_t, acc_t, H3, H4>(
                ws.Y, r, np, X + linear_offset(n0 + r, p0, k), bias + p0, pbias + p0, mbuf.data());
          }
        }
      }
    }
  });

  at::Tensor loss = sum_parts(loss_parts);
  if (H4) loss.add_(at::mv(in.mom[3], sum_parts(qcol_parts)), 0.5);  // sum_p Q / 2
  return loss.to(in.x.scalar_type());
}

enum Need { kX = 0, kMean, kVar, kK3, kK4, kA, kBias, kC, kPBias, kNumInputs };

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
int64_t saved_tile(int64_t k, int64_t d, int64_t ncontr) {
  // The backward's budget: products and weight partials (2 * ncontr rows of d per pixel).
  int64_t tile = kTileBudget / std::max<int64_t>(1, 2 * ncontr * std::max<int64_t>(d, 1));
  tile = std::max(kMinTile, tile);
  return std::max<int64_t>(1, std::min(tile, k));
}

TilePlan make_saved_plan(int64_t B, int64_t k, int64_t d, int64_t ncontr) {
  TilePlan plan;
  plan.k = k;
  plan.tile = saved_tile(k, d, ncontr);
  plan.ntiles = k == 0 ? 0 : (k + plan.tile - 1) / plan.tile;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  plan.nparts = std::max<int64_t>(1, std::min(threads, plan.ntiles));
  const int64_t chunk = kChunkBudget / std::max<int64_t>(1, ncontr * plan.tile);
  plan.batch_chunk = std::max<int64_t>(1, std::min(std::max<int64_t>(chunk, 8), B));
  return plan;
}

// Offsets (in units of B * np elements) of each group's block inside a saved tile.
std::array<int64_t, kGroups> group_row_offsets(const Groups& gr) {
  std::array<int64_t, kGroups> off{};
  int64_t acc = 0;
  for (int g = 0; g < kGroups; ++g) {
    off[g] = acc;
    acc += gr.rows[g];
  }
  return off;
}

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
  at::Tensor loss_parts = at::zeros({plan.nparts, B}, acc_opts);
  at::Tensor qcol_parts = at::zeros({plan.nparts, H4 ? d : 0}, acc_opts);

  const scalar_t* X = in.x.template data_ptr<scalar_t>();
  const scalar_t* A = in.A.template data_ptr<scalar_t>();
  const scalar_t* C = in.C.template data_ptr<scalar_t>();
  const acc_t* bias = in.bias.template data_ptr<acc_t>();
  const acc_t* pbias = in.pbias.template data_ptr<acc_t>();
  acc_t* coef_ptr = coef.template data_ptr<acc_t>();

  at::parallel_for(0, plan.nparts, 1, [&](int64_t q_begin, int64_t q_end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Workspace<acc_t> ws(gr, plan, d, /*with_h=*/false);
    std::vector<acc_t> mbuf(plan.tile);
    ExactLogRow exact(HD == Head::kExactLog ? plan.tile : 0);
    for (int64_t q = q_begin; q < q_end; ++q) {
      acc_t* loss = loss_parts.template data_ptr<acc_t>() + linear_offset(q, 0, B);
      acc_t* qcol = H4 ? qcol_parts.template data_ptr<acc_t>() + linear_offset(q, 0, d) : nullptr;
      for (int64_t t = plan.tile_begin(q); t < plan.tile_begin(q + 1); ++t) {
        const int64_t p0 = plan.pixel_begin(t), np = plan.pixel_count(t);
        form_products<scalar_t, acc_t, H3, H4>(A, C, p0, np, d, ws.P, qcol);
        acc_t* tile_base = coef_ptr + B * gr.total * p0;
        for (int64_t n0 = 0; n0 < B; n0 += plan.batch_chunk) {
          const int64_t nb = std::min(plan.batch_chunk, B - n0);
          // Contract straight into the saved buffer, then overwrite with the coefficients.
          for (int g = 0; g < kGroups; ++g)
            ws.Y[g] = tile_base + B * roff[g] * np + n0 * gr.rows[g] * np;
          contract(gr, in.mom, ws, n0, nb, np, d);
          const acc_t* SK_RESTRICT bp = bias + p0;
          const acc_t* SK_RESTRICT pbp = pbias + p0;
          for (int64_t r = 0; r < nb; ++r) {
            const scalar_t* xr = X + linear_offset(n0 + r, p0, k);
            // Taylor: the (vectorised) loss first, as the coefficients overwrite the contractions
            // it reads; the other heads take both from one epilogue call per pixel below.
            if constexpr (HD == Head::kTaylor)
              loss[n0 + r] += row_loss<HD, scalar_t, acc_t, H3, H4>(ws.Y, r, np, xr, bp, pbp, mbuf.data());
            if constexpr (HD == Head::kExactLog)  // the special function in its own loops
              exact_log_terms<acc_t, H3, H4>(ws.Y, r, np, bp, pbp, exact);
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
                g = exact_log_pixel_grad_and_nll<acc_t>(xv, c, exact.ls[p], pixel_loss);
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
      }
    }
  });

  at::Tensor loss = sum_parts(loss_parts);
  if (H4) loss.add_(at::mv(in.mom[3], sum_parts(qcol_parts)), 0.5);  // sum_p Q / 2
  return {loss.to(in.x.scalar_type()), coef};
}

template <typename scalar_t, bool H3, bool H4>
std::array<at::Tensor, kNumInputs> backward_saved_impl(
    const at::Tensor& grad_in, const at::Tensor& coef_in, const std::array<at::Tensor, kGroups>& mom,
    const at::Tensor& A_in, const at::Tensor& C_in, std::array<bool, kNumInputs> need) {
  using acc_t = at::opmath_type<scalar_t>;
  const Groups gr(H3, H4);
  const at::Tensor A = A_in.contiguous(), C = C_in.contiguous();
  const int64_t B = mom[0].size(0), k = A.size(0), d = A.size(1);
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const auto acc_opts = A.options().dtype(acc);
  const auto out_opts = A.options();
  const bool need_a = need[kA], need_c = need[kC], need_w = need_a || need_c;
  const std::array<bool, kGroups> need_mom = {need[kMean], need[kVar], need[kK3], need[kK4]};

  std::array<at::Tensor, kNumInputs> out;
  if (need[kX]) out[kX] = at::empty({B, k}, out_opts);
  if (need[kA]) out[kA] = at::empty({k, d}, out_opts);
  if (need[kC]) out[kC] = at::empty({k, d}, out_opts);
  if (need[kBias]) out[kBias] = at::empty({k}, out_opts);
  if (need[kPBias]) out[kPBias] = at::empty({k}, out_opts);
  if (B == 0) {
    for (auto& t : out) if (t.defined()) t.zero_();
    for (int g = 0; g < kGroups; ++g)
      if (need_mom[g]) out[kMean + g] = at::zeros({0, d}, out_opts);
    return out;
  }

  const at::Tensor grad = as_acc(grad_in, acc);
  const at::Tensor coef = coef_in.contiguous();
  const TilePlan plan = make_saved_plan(B, k, d, gr.total);
  const auto roff = group_row_offsets(gr);
  std::array<at::Tensor, kGroups> dmom_parts;
  bool need_products = false;
  for (int g = 0; g < kGroups; ++g)
    if (gr.on[g] && need_mom[g]) {
      dmom_parts[g] = at::zeros({plan.nparts, B, d}, acc_opts);
      need_products = true;
    }
  const bool need_qcol = H4 && need_mom[3];
  at::Tensor qcol_parts = at::zeros({plan.nparts, need_qcol ? d : 0}, acc_opts);
  at::Tensor qh = (H4 && need_w) ? at::mv(mom[3].t(), grad).mul_(0.5) : at::Tensor();

  std::array<int64_t, kGroups> h_lo{}, h_hi{};
  h_lo = {need_a ? 0 : 1, need_a ? 0 : 1, 0, 0};
  h_hi = {need_c ? 2 : 1, need_c ? 3 : 2, need_c ? 3 : 2, need_c ? 1 : 0};
  // diag(grad) . moment_g: the right-hand sides of the weight-partial GEMMs.
  std::array<at::Tensor, kGroups> smom;
  for (int g = 0; g < kGroups; ++g)
    if (gr.on[g] && need_w && h_hi[g] > h_lo[g]) smom[g] = (mom[g] * grad.unsqueeze(1)).contiguous();

  const scalar_t* Ap = A.template data_ptr<scalar_t>();
  const scalar_t* Cp = C.template data_ptr<scalar_t>();
  const acc_t* Gr = grad.template data_ptr<acc_t>();
  const acc_t* coef_ptr = coef.template data_ptr<acc_t>();
  scalar_t* dX = need[kX] ? out[kX].template data_ptr<scalar_t>() : nullptr;
  const bool need_bias_sums = need[kBias] || need[kPBias];

  at::parallel_for(0, plan.nparts, 1, [&](int64_t q_begin, int64_t q_end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Workspace<acc_t> ws(gr, plan, d, need_w);
    for (int64_t q = q_begin; q < q_end; ++q) {
      acc_t* qcol = need_qcol ? qcol_parts.template data_ptr<acc_t>() + linear_offset(q, 0, d) : nullptr;
      for (int64_t t = plan.tile_begin(q); t < plan.tile_begin(q + 1); ++t) {
        const int64_t p0 = plan.pixel_begin(t), np = plan.pixel_count(t);
        if (need_products || need_qcol)
          form_products<scalar_t, acc_t, H3, H4>(Ap, Cp, p0, np, d, ws.P, qcol);
        const acc_t* tile_base = coef_ptr + B * gr.total * p0;
        std::array<const acc_t*, kGroups> Gg{};
        for (int g = 0; g < kGroups; ++g) Gg[g] = tile_base + B * roff[g] * np;

        // Bias gradients (column sums of grad * g_ubar, grad * g_vbar) and dx = -grad * g_ubar.
        if (need_bias_sums || dX != nullptr) {
          acc_t* SK_RESTRICT db = ws.dbias;
          acc_t* SK_RESTRICT dpb = ws.dpbias;
          for (int64_t p = 0; p < np; ++p) db[p] = dpb[p] = acc_t(0);
          for (int64_t n = 0; n < B; ++n) {
            const acc_t gn = Gr[n];
            const acc_t* SK_RESTRICT y0 = Gg[0] + linear_offset(n, 0, 2 * np);
            if (need_bias_sums) {
#pragma omp simd
              for (int64_t p = 0; p < np; ++p) {
                db[p] += gn * y0[p];
                dpb[p] += gn * y0[np + p];
              }
            }
            if (dX != nullptr) {
              scalar_t* dxr = dX + linear_offset(n, p0, k);
              for (int64_t p = 0; p < np; ++p) dxr[p] = static_cast<scalar_t>(-(gn * y0[p]));
            }
          }
          if (need[kBias]) {
            scalar_t* o = out[kBias].template data_ptr<scalar_t>() + p0;
            for (int64_t p = 0; p < np; ++p) o[p] = static_cast<scalar_t>(db[p]);
          }
          if (need[kPBias]) {
            scalar_t* o = out[kPBias].template data_ptr<scalar_t>() + p0;
            for (int64_t p = 0; p < np; ++p) o[p] = static_cast<scalar_t>(dpb[p]);
          }
        }

        for (int g = 0; g < kGroups; ++g) {
          if (!gr.on[g]) continue;
          const int64_t cols = gr.rows[g] * np;
          if (need_mom[g]) {  // (unscaled) d(moment_g) += G_g @ P_g
            at::Tensor dm = mat(dmom_parts[g].template data_ptr<acc_t>() + linear_offset(q * B, 0, d), B, d, d);
            gemm(dm, mat(Gg[g], B, cols, cols), mat(ws.P[g], cols, d, d), /*accumulate=*/true);
          }
          if (need_w && h_hi[g] > h_lo[g]) {  // H_g = G_g^T @ (diag(grad) moment_g)
            const int64_t lo = h_lo[g] * np, rows = (h_hi[g] - h_lo[g]) * np;
            at::Tensor h = mat(ws.H[g] + linear_offset(lo, 0, d), rows, d, d);
            gemm(h, mat(Gg[g] + lo, B, rows, cols).t(), smom[g], /*accumulate=*/false);
          }
        }
        if (!need_w) continue;
        fold_weight_grads<scalar_t, acc_t, H3, H4>(
            Ap, Cp, p0, np, d, ws.H, H4 ? qh.template data_ptr<acc_t>() : nullptr,
            need_a ? out[kA].template data_ptr<scalar_t>() : nullptr,
            need_c ? out[kC].template data_ptr<scalar_t>() : nullptr);
      }
    }
  });

  for (int g = 0; g < kGroups; ++g) {
    if (!need_mom[g] || !gr.on[g]) continue;
    at::Tensor dm = sum_parts(dmom_parts[g]).mul_(grad.unsqueeze(1));
    if (g == 3) dm.addr_(grad, sum_parts(qcol_parts), /*beta=*/1, /*alpha=*/0.5);  // Q's rank-one part
    out[kMean + g] = dm.to(A.scalar_type());
  }
  return out;
}

// Instantiate an impl for the present cumulants and the head: the Taylor head for every
// (k3, k4) combination, the other heads only for Gaussian latents (checked by the caller).
template <typename Fn>
auto dispatch_stage(bool has3, bool has4, int64_t head, Fn&& fn) {
  using T = std::true_type;
  using F = std::false_type;
  using Taylor = std::integral_constant<Head, Head::kTaylor>;
  if (head == int64_t(Head::kExactLog))
    return fn(F{}, F{}, std::integral_constant<Head, Head::kExactLog>{});
  if (head == int64_t(Head::kLogVar))
    return fn(F{}, F{}, std::integral_constant<Head, Head::kLogVar>{});
  if (has3 && has4) return fn(T{}, T{}, Taylor{});
  if (has3) return fn(T{}, F{}, Taylor{});
  if (has4) return fn(F{}, T{}, Taylor{});
  return fn(F{}, F{}, Taylor{});
}

bool given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

template <typename scalar_t>
std::array<at::Tensor, kGroups> acc_moments(const at::Tensor& mean, const at::Tensor& var,
                                            const c10::optional<at::Tensor>& k3,
                                            const c10::optional<at::Tensor>& k4) {
  const auto acc = c10::CppTypeToScalarType<at::opmath_type<scalar_t>>::value;
  std::array<at::Tensor, kGroups> mom;
  mom[0] = as_acc(mean, acc);
  mom[1] = as_acc(var, acc);
  if (given(k3)) mom[2] = as_acc(*k3, acc);
  if (given(k4)) mom[3] = as_acc(*k4, acc);
  return mom;
}

std::array<bool, kNumInputs> needed(const std::vector<bool>& needs, const c10::optional<at::Tensor>& k3,
                                    const c10::optional<at::Tensor>& k4, bool any_bias, bool* any) {
  const std::array<bool, kNumInputs> present = {true, true, true, given(k3), given(k4), true,
                                                any_bias, true, any_bias};
  std::array<bool, kNumInputs> need{};
  *any = false;
  for (int i = 0; i < kNumInputs; ++i) {
    need[i] = needs[i] && present[i];
    *any = *any || need[i];
  }
  return need;
}

template <typename scalar_t>
std::array<at::Tensor, kNumInputs> saved_backward(const at::Tensor& grad, const at::Tensor& coefficients,
                                                  const at::Tensor& mean, const at::Tensor& var,
                                                  const c10::optional<at::Tensor>& k3,
                                                  const c10::optional<at::Tensor>& k4,
                                                  const at::Tensor& weight, const at::Tensor& precision_weight,
                                                  const std::array<bool, kNumInputs>& need) {
  const auto mom = acc_moments<scalar_t>(mean, var, k3, k4);
  // The saved coefficients already carry the head: the backward GEMMs are head-independent.
  return dispatch_stage(given(k3), given(k4), 0, [&](auto h3, auto h4, auto) {
    return backward_saved_impl<scalar_t, decltype(h3)::value, decltype(h4)::value>(
        grad, coefficients, mom, weight, precision_weight, need);
  });
}

using Grads9 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                          at::Tensor, at::Tensor, at::Tensor>;

Grads9 as_tuple(std::array<at::Tensor, kNumInputs>& out, const at::Tensor& like) {
  for (auto& t : out)
    if (!t.defined()) t = empty_grad(like);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7], out[8]};
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

Grads9 precision_nll_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                              const at::Tensor& var, const c10::optional<at::Tensor>& k3,
                              const c10::optional<at::Tensor>& k4, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, const at::Tensor& precision_weight,
                              const c10::optional<at::Tensor>& precision_bias,
                              const std::vector<bool>& needs, int64_t head) {
  bool any = false;
  auto need = needed(needs, k3, k4, true, &any);
  need[kBias] = need[kBias] && given(bias);
  need[kPBias] = need[kPBias] && given(precision_bias);
  std::array<at::Tensor, kNumInputs> out;
  if (any) {
    // One CPU implementation per head: the training forward's coefficients, then its backward.
    const at::Tensor coefficients =
        std::get<1>(precision_nll_train(x, mean, var, k3, k4, weight, bias, precision_weight,
                                        precision_bias, head));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "precision_nll_backward_cpu", [&] {
      out = saved_backward<scalar_t>(grad, coefficients, mean, var, k3, k4, weight, precision_weight, need);
    });
  }
  return as_tuple(out, x);
}

int64_t precision_coefficient_count(int64_t B, int64_t k, bool has_k3, bool has_k4) {
  return B * Groups(has_k3, has_k4).total * k;
}

Grads9 precision_nll_train_backward(const at::Tensor& grad, const at::Tensor& coefficients,
                                    const at::Tensor& mean, const at::Tensor& var,
                                    const c10::optional<at::Tensor>& k3,
                                    const c10::optional<at::Tensor>& k4, const at::Tensor& weight,
                                    const at::Tensor& precision_weight, const std::vector<bool>& needs) {
  bool any = false;
  const auto need = needed(needs, k3, k4, true, &any);
  std::array<at::Tensor, kNumInputs> out;
  if (any) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "precision_nll_train_backward_cpu", [&] {
      out = saved_backward<scalar_t>(grad, coefficients, mean, var, k3, k4, weight, precision_weight, need);
    });
  }
  return as_tuple(out, weight);
}

}  // namespace silent_kernels::cpu
