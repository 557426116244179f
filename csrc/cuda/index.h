// Index arithmetic of the CUDA kernels: every element offset is computed here, in int64.
//
// Plain header (no CUDA or torch headers needed): the functions are __host__ __device__
// under nvcc and ordinary inline functions under a host compiler, so that
// tests/test_cuda_compile.py can check them on the host with g++ for values beyond 2^31.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SK_CUDA_HD __host__ __device__ __forceinline__
#else
#define SK_CUDA_HD inline
#endif

namespace silent_kernels {
namespace cuda {

// Offset of element (row, col) of a row-major matrix with leading dimension ld.
SK_CUDA_HD int64_t offset2d(int64_t row, int64_t col, int64_t ld) { return row * ld + col; }

// Offset of element (plane, row, col) of a contiguous (planes, rows, cols) array.
SK_CUDA_HD int64_t offset3d(int64_t plane, int64_t row, int64_t col, int64_t rows, int64_t cols) {
  return (plane * rows + row) * cols + col;
}

// ceil(a / b) for a >= 0, b > 0.
SK_CUDA_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A flat block index over a (row tiles x col tiles) grid, col tiles fastest.
struct TileCoord {
  int64_t row_tile, col_tile;
};
SK_CUDA_HD TileCoord tile_coord(int64_t block, int64_t col_tiles) {
  return TileCoord{block / col_tiles, block % col_tiles};
}

}  // namespace cuda
}  // namespace silent_kernels
