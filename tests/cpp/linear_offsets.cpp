// Prints csrc/cpu_index.h's linear_offset(row, col, ld) for each "row col ld" triple on stdin,
// one per line, so a test can check the kernels' offset arithmetic beyond 2^31 without
// allocating a huge tensor.
#include <cstdint>
#include <iostream>

#include "cpu_index.h"

int main() {
  int64_t row, col, ld;
  while (std::cin >> row >> col >> ld) std::cout << silent_kernels::linear_offset(row, col, ld) << "\n";
  return 0;
}
