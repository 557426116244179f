// Host program of tests/test_cuda_compile.py: reads (a, b, c, d, e) lines from stdin and prints
// the int64 index arithmetic of csrc/cuda/index.h for them (checked in Python beyond 2^31).
#include <cstdio>
#include "cuda/index.h"
using namespace silent_kernels::cuda;
int main() {
  long long a, b, c, d, e;
  while (std::scanf("%lld %lld %lld %lld %lld", &a, &b, &c, &d, &e) == 5) {
    const TileCoord t = tile_coord(a, c);
    std::printf("%lld %lld %lld %lld %lld\n", (long long)offset2d(a, b, c),
                (long long)offset3d(a, b, c, d, e), (long long)ceil_div(a, c),
                (long long)t.row_tile, (long long)t.col_tile);
  }
  return 0;
}
