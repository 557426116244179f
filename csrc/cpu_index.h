// Index arithmetic of the C++ CPU kernels: every element offset is computed here, in int64.
//
// Kept in one function so that a unit test (tests/cpp/linear_offsets.cpp) can check values
// beyond 2^31 without allocating a huge tensor.
#pragma once

#include <cstdint>

namespace silent_kernels {

// Offset of element (row, col) of a row-major matrix with leading dimension ld.
inline int64_t linear_offset(int64_t row, int64_t col, int64_t ld) {
  return row * ld + col;
}

}  // namespace silent_kernels
