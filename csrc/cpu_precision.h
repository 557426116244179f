// Shared by cpu_precision.cpp and cpu_precision_backward.cpp: saved-coefficient tile plan, head/cumulant dispatch.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>

#include "cpu_common.h"
#include "cpu_meanfield.h"
#include "epilogue.h"

namespace silent_kernels::cpu::meanfield {

// The saved layout (tiles of saved_tile(k, d, ncontr) pixels) is described in cpu_precision.cpp.
inline int64_t saved_tile(int64_t k, int64_t d, int64_t ncontr) {
  // The backward's budget: products and weight partials (2 * ncontr rows of d per pixel).
  int64_t tile = kTileBudget / std::max<int64_t>(1, 2 * ncontr * std::max<int64_t>(d, 1));
  tile = std::max(kMinTile, tile);
  return std::max<int64_t>(1, std::min(tile, k));
}

inline TilePlan make_saved_plan(int64_t B, int64_t k, int64_t d, int64_t ncontr) {
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
inline std::array<int64_t, kGroups> group_row_offsets(const Groups& gr) {
  std::array<int64_t, kGroups> off{};
  int64_t acc = 0;
  for (int g = 0; g < kGroups; ++g) {
    off[g] = acc;
    acc += gr.rows[g];
  }
  return off;
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

}  // namespace silent_kernels::cpu::meanfield
