// Host emulation of the CUDA features the kernels use (tests only).
//
// tests/cuda_emulation/emulation.py compiles every csrc/cuda/*.cu as host C++ with g++ -std=c++20,
// this header force-included (-include) and each `kernel<<<grid, block, smem, stream>>>(args)`
// rewritten to `::sk_emul::launch(::sk_emul::Cfg(grid, block, smem, stream), kernel, args)`:
// one std::thread per CUDA thread of a block, a std::barrier for __syncthreads, a per-warp
// barrier for __shfl_xor_sync, `__shared__` as static storage, blocks one after another.
#pragma once
#define __shared__ static
#define __launch_bounds__(...)
#define cudaGetLastError sk_emul_cudaGetLastError
#define cudaMemsetAsync sk_emul_cudaMemsetAsync
#define cudaGetDevice sk_emul_cudaGetDevice
#define cudaDeviceGetAttribute sk_emul_cudaDeviceGetAttribute
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <barrier>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

namespace sk_emul {
struct Warp {
  std::barrier<> bar{32};
  double buf[32];
};
inline thread_local std::barrier<>* block_barrier = nullptr;
inline thread_local Warp* warp = nullptr;
inline int device = 0;
inline int sm_count[64] = {};
inline long launches = 0;

struct Cfg {
  dim3 grid, block;
  Cfg(dim3 g, dim3 b, size_t = 0, cudaStream_t = nullptr) : grid(g), block(b) {}
};

// One std::thread per thread of a block; the blocks run one after another (a barrier between
// them keeps the static "__shared__" storage of one block from being overwritten early).
template <typename K, typename... A>
void launch(Cfg c, K kernel, const A&... args) {
  ++launches;
  const unsigned n = c.block.x * c.block.y * c.block.z;
  std::barrier<> bar(n);
  std::vector<std::unique_ptr<Warp>> warps;
  for (unsigned w = 0; w < (n + 31) / 32; ++w) warps.emplace_back(new Warp());
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (unsigned t = 0; t < n; ++t)
    threads.emplace_back([&, t] {
      threadIdx = uint3{t % c.block.x, (t / c.block.x) % c.block.y, t / (c.block.x * c.block.y)};
      blockDim = c.block;
      gridDim = c.grid;
      block_barrier = &bar;
      warp = warps[t / 32].get();
      for (unsigned z = 0; z < c.grid.z; ++z)
        for (unsigned y = 0; y < c.grid.y; ++y)
          for (unsigned x = 0; x < c.grid.x; ++x) {
            blockIdx = uint3{x, y, z};
            kernel(args...);
            bar.arrive_and_wait();
          }
    });
  for (auto& th : threads) th.join();
}
}  // namespace sk_emul

inline void __syncthreads() { sk_emul::block_barrier->arrive_and_wait(); }

template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int lane_mask) {
  const unsigned lane = threadIdx.x & 31;
  sk_emul::warp->buf[lane] = static_cast<double>(v);
  sk_emul::warp->bar.arrive_and_wait();
  const V r = static_cast<V>(sk_emul::warp->buf[lane ^ lane_mask]);
  sk_emul::warp->bar.arrive_and_wait();
  return r;
}

inline cudaError_t sk_emul_cudaGetLastError() { return cudaSuccess; }
inline cudaError_t sk_emul_cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t sk_emul_cudaGetDevice(int* d) {
  *d = sk_emul::device;
  return cudaSuccess;
}
inline cudaError_t sk_emul_cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int d) {
  *v = sk_emul::sm_count[d];
  return cudaSuccess;
}
