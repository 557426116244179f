// Shared machinery of the C++ CPU kernels (cpu_fixed.cpp, cpu_precision.cpp):
// the pixel-tile plan, GEMMs on raw workspace buffers, dtype helpers.
//
// Scheme (both heads, forward and backward): the k pixels are cut into tiles that are
// spread over at::parallel_for "parts" (one per thread). A part forms, for each of its
// tiles, the element-wise weight products of that tile only (A^2, A*C, ... stacked by
// latent cumulant), multiplies the moments of a batch chunk against them with ATen GEMMs
// (MKL/BLAS, single-threaded inside the parallel region), and applies the per-pixel
// epilogue of epilogue.h on the cache-resident result. Nothing of size B x k x (number of
// contractions) or k x d x (number of products) is ever materialised: the extra memory is
// O(threads * tile * (d + batch chunk)) plus per-part accumulators of the outputs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "cpu_index.h"

#define SK_RESTRICT __restrict__

namespace silent_kernels::cpu {

// How the pixels and the batch are cut. `ncontr` is the number of (B, k)-shaped contractions
// a tile computes (fixed head: 1; learnable precision: 5 Gaussian ... 9 with k3 and k4).
struct TilePlan {
  int64_t k = 0;
  int64_t tile = 1;         // pixels per tile (the last tile may be shorter)
  int64_t ntiles = 0;
  int64_t nparts = 1;       // parallel parts; part q owns tiles [tile_begin(q), tile_begin(q+1))
  int64_t batch_chunk = 1;  // batch rows per GEMM chunk

  int64_t tile_begin(int64_t part) const { return part * ntiles / nparts; }
  int64_t pixel_begin(int64_t t) const { return std::min(t * tile, k); }
  int64_t pixel_count(int64_t t) const { return std::min(k, (t + 1) * tile) - pixel_begin(t); }
};

// Workspace budgets (elements of the accumulation type) that set the tile and chunk sizes:
// per part, the weight products (+ weight-gradient partials) of one tile, and the
// contractions of one (batch chunk x tile) block. Measured (learnable precision, Bernoulli,
// B=64 d=200 k=784 fp32, one thread, CPU time fwd / bwd): tile budget 64 Ki 3.1 / 8.3 ms,
// 128 Ki 3.0 / 7.2 ms, 256 Ki 3.5 / 7.5 ms, 512 Ki 3.7 / 8.8 ms, 4 Mi (= all k pixels in one
// tile, i.e. every weight product materialised once per call) 4.5 / 12.9 ms: small tiles
// keep the products and partials in L2, larger ones lose more to cache misses than they
// gain in GEMM size.
constexpr int64_t kTileBudget = 1 << 17;   // 128 Ki elements: 512 KiB fp32
constexpr int64_t kChunkBudget = 1 << 15;  // 32 Ki elements: 128 KiB fp32
constexpr int64_t kMinTile = 16;

inline TilePlan make_plan(int64_t batch, int64_t k, int64_t d, int64_t per_pixel_row,
                          int64_t ncontr, int64_t tile_budget_elements = kTileBudget) {
  TilePlan plan;
  plan.k = k;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // A tile holds `per_pixel_row` rows of length d per pixel (products, gradient partials).
  int64_t tile = tile_budget_elements / std::max<int64_t>(1, per_pixel_row * std::max<int64_t>(d, 1));
  tile = std::max(kMinTile, tile);
  int64_t ntiles = (k + tile - 1) / tile;
  // At least one tile per thread where there are enough pixels, and a multiple of the thread
  // count so that the parts are balanced.
  const int64_t max_tiles = std::max<int64_t>(1, k / kMinTile);
  ntiles = std::min(max_tiles, ((ntiles + threads - 1) / threads) * threads);
  ntiles = std::max<int64_t>(1, ntiles);
  plan.tile = std::max<int64_t>(1, (k + ntiles - 1) / ntiles);
  plan.ntiles = k == 0 ? 0 : (k + plan.tile - 1) / plan.tile;
  plan.nparts = std::max<int64_t>(1, std::min(threads, plan.ntiles));
  int64_t chunk = kChunkBudget / std::max<int64_t>(1, ncontr * plan.tile);
  plan.batch_chunk = std::max<int64_t>(1, std::min(std::max<int64_t>(chunk, 8), batch));
  return plan;
}

// A (rows x cols) row-major matrix with leading dimension ld over a raw buffer (no copy).
template <typename T>
inline at::Tensor mat(const T* data, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// out = a @ b (beta = 0) or out += a @ b (beta = 1). out, a, b are views (see mat()).
inline void gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

// The tensor as a contiguous tensor of the accumulation dtype (no copy when it already is).
inline at::Tensor as_acc(const at::Tensor& t, at::ScalarType acc) {
  return t.to(acc).contiguous();
}

// Sum of per-part accumulators (parts, ...) over the parts (no copy when there is one part).
inline at::Tensor sum_parts(const at::Tensor& parts) {
  return parts.size(0) == 1 ? parts.select(0, 0) : parts.sum(0);
}

inline at::Tensor empty_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }

inline bool given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The inputs of a backward that get a gradient: asked for (needs, one flag per input) and present
// (an absent optional input gets none); *any says whether at least one does.
template <size_t N>
std::array<bool, N> needed_gradients(const std::vector<bool>& needs, const std::array<bool, N>& present,
                                     bool* any) {
  std::array<bool, N> need{};
  *any = false;
  for (size_t i = 0; i < N; ++i) {
    need[i] = needs[i] && present[i];
    *any = *any || need[i];
  }
  return need;
}

}  // namespace silent_kernels::cpu
