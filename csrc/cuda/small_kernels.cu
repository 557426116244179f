// Small O(kd), O(Bd) and O(Bk) kernels: deterministic column sums (partial losses, split
// reductions, bias gradients), the fixed head's column weights and row dot products, the
// fixed head's var and sigma2 gradients.
#include <algorithm>

#include "common.cuh"

namespace silent_kernels {
namespace cuda {

namespace {

constexpr int kColThreadsX = 32;  // columns per block
constexpr int kColThreadsY = 8;   // row groups per block (summed in shared memory, in order)
constexpr int kBlock = 256;

// Column c (blockIdx.x * 32 + tx) of a column reduction in a fixed order: each thread sums
// term(r, c) over rows r = ty, ty + 8, ... < rows, then thread ty == 0 adds the eight partial
// sums in order and calls write(c, sum).
template <typename Acc, class Term, class Write>
__device__ __forceinline__ void ordered_column_sum(int64_t rows, int64_t cols, Term&& term,
                                                   Write&& write) {
  __shared__ Acc part[kColThreadsY][kColThreadsX + 1];
  const int tx = threadIdx.x % kColThreadsX, ty = threadIdx.x / kColThreadsX;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColThreadsX + tx;
  Acc s = Acc(0);
  if (c < cols) {
    for (int64_t r = ty; r < rows; r += kColThreadsY) s += term(r, c);
  }
  part[ty][tx] = s;
  __syncthreads();
  if (ty == 0 && c < cols) {
    Acc t = part[0][tx];
#pragma unroll
    for (int y = 1; y < kColThreadsY; ++y) t += part[y][tx];
    write(c, t);
  }
}

// Row r (one warp each, blockIdx.x * 8 + warp) of a row reduction: the lanes sum term(r, i) over
// i = lane, lane + 32, ... < cols, a warp reduction adds them and lane 0 calls finish(r, sum).
template <typename Acc, class Term, class Finish>
__device__ __forceinline__ void warp_row_sum(int64_t rows, int64_t cols, Term&& term,
                                             Finish&& finish) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (kBlock / 32) + (threadIdx.x >> 5);
  if (r >= rows) return;  // warp-uniform
  Acc s = Acc(0);
  for (int64_t i = lane; i < cols; i += 32) s += term(r, i);
  s = warp_sum(s);
  if (lane == 0) finish(r, s);
}

// out[c] = sum_r src[r, c] * rowscale[r]
template <typename S, typename O>
__global__ void __launch_bounds__(kBlock)
    sum_rows_kernel(const S* __restrict__ src, int64_t R, int64_t C, int64_t ld,
                    const S* __restrict__ rowscale, O* __restrict__ out) {
  using Acc = acc_t<S>;
  ordered_column_sum<Acc>(
      R, C,
      [&](int64_t r, int64_t c) {
        Acc v = load_acc(src, offset2d(r, c, ld));
        if (rowscale != nullptr) v *= load_acc(rowscale, r);
        return v;
      },
      [&](int64_t c, Acc t) { out[c] = Cvt<O>::store(t); });
}

// w[i] = sum_p A[p, i]^2 / sigma2[p]
template <typename T>
__global__ void __launch_bounds__(kBlock)
    colweight_kernel(const T* __restrict__ A, const T* __restrict__ sigma2, int64_t k, int64_t d,
                     acc_t<T>* __restrict__ w) {
  using Acc = acc_t<T>;
  ordered_column_sum<Acc>(
      k, d,
      [&](int64_t p, int64_t i) {
        const Acc a = load_acc(A, offset2d(p, i, d));
        return a * a / load_acc(sigma2, p);
      },
      [&](int64_t i, Acc t) { w[i] = t; });
}

// out[n] = scale * sum_i var[n, i] w[i]
template <typename T>
__global__ void __launch_bounds__(kBlock)
    rowdot_kernel(const T* __restrict__ var, const acc_t<T>* __restrict__ w, int64_t B, int64_t d,
                  acc_t<T> scale, acc_t<T>* __restrict__ out) {
  using Acc = acc_t<T>;
  warp_row_sum<Acc>(
      B, d, [&](int64_t n, int64_t i) { return load_acc(var, offset2d(n, i, d)) * w[i]; },
      [&](int64_t n, Acc s) { out[n] = scale * s; });
}

// out[n, i] = scale * grad[n] * w[i]
template <typename T>
__global__ void __launch_bounds__(kBlock)
    outer_kernel(const T* __restrict__ grad, const acc_t<T>* __restrict__ w, int64_t B, int64_t d,
                 acc_t<T> scale, T* __restrict__ out) {
  const int64_t total = B * d;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kBlock;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; e < total; e += stride) {
    const int64_t n = e / d, i = e % d;
    out[e] = Cvt<T>::store(scale * load_acc(grad, n) * w[i]);
  }
}

// out[p] = colsum[p] - 0.5 / sigma2_p^2 * sum_i A[p, i]^2 r[i]
// (d/d sigma2 of sum_n grad_n Saa_np / (2 sigma2_p), with sum_n grad_n Saa_np = A_p^2 . r.)
template <typename T>
__global__ void __launch_bounds__(kBlock)
    sigma2_finish_kernel(const T* __restrict__ A, const T* __restrict__ sigma2,
                         const acc_t<T>* __restrict__ r, const acc_t<T>* __restrict__ colsum,
                         int64_t k, int64_t d, T* __restrict__ out) {
  using Acc = acc_t<T>;
  warp_row_sum<Acc>(
      k, d,
      [&](int64_t p, int64_t i) {
        const Acc a = load_acc(A, offset2d(p, i, d));
        return a * a * r[i];
      },
      [&](int64_t p, Acc s) {
        const Acc inv = Acc(1) / load_acc(sigma2, p);
        out[p] = Cvt<T>::store(colsum[p] - Acc(0.5) * inv * inv * s);
      });
}

}  // namespace

template <typename S, typename O>
cudaError_t launch_sum_rows(const S* src, int64_t R, int64_t C, int64_t ld, const S* rowscale,
                            O* out, cudaStream_t stream) {
  if (C == 0) return cudaSuccess;
  const int64_t blocks = ceil_div(C, kColThreadsX);
  if (!grid_fits(blocks)) return cudaErrorInvalidConfiguration;
  sum_rows_kernel<S, O><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(src, R, C, ld, rowscale, out);
  return last_error();
}

template <typename T>
cudaError_t launch_colweight(const T* A, const T* sigma2, int64_t k, int64_t d, acc_t<T>* w,
                             cudaStream_t stream) {
  if (d == 0) return cudaSuccess;
  const int64_t blocks = ceil_div(d, kColThreadsX);
  if (!grid_fits(blocks)) return cudaErrorInvalidConfiguration;
  colweight_kernel<T><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(A, sigma2, k, d, w);
  return last_error();
}

template <typename T>
cudaError_t launch_rowdot(const T* var, const acc_t<T>* w, int64_t B, int64_t d, double scale,
                          acc_t<T>* out, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  const int64_t blocks = ceil_div(B, kBlock / 32);
  if (!grid_fits(blocks)) return cudaErrorInvalidConfiguration;
  rowdot_kernel<T><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(
      var, w, B, d, static_cast<acc_t<T>>(scale), out);
  return last_error();
}

template <typename T>
cudaError_t launch_outer(const T* grad, const acc_t<T>* w, int64_t B, int64_t d, double scale,
                         T* out, cudaStream_t stream) {
  if (B == 0 || d == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>(ceil_div(B * d, kBlock), int64_t(1) << 20);
  outer_kernel<T><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(
      grad, w, B, d, static_cast<acc_t<T>>(scale), out);
  return last_error();
}

template <typename T>
cudaError_t launch_sigma2_finish(const T* A, const T* sigma2, const acc_t<T>* r,
                                 const acc_t<T>* colsum, int64_t k, int64_t d, T* out,
                                 cudaStream_t stream) {
  if (k == 0) return cudaSuccess;
  const int64_t blocks = ceil_div(k, kBlock / 32);
  if (!grid_fits(blocks)) return cudaErrorInvalidConfiguration;
  sigma2_finish_kernel<T><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(A, sigma2, r, colsum, k, d, out);
  return last_error();
}

// sum_rows: (acc -> T) partial reductions, (acc -> acc) column sums, (T -> acc) r = grad . var
template cudaError_t launch_sum_rows<float, float>(const float*, int64_t, int64_t, int64_t, const float*, float*, cudaStream_t);
template cudaError_t launch_sum_rows<double, double>(const double*, int64_t, int64_t, int64_t, const double*, double*, cudaStream_t);
template cudaError_t launch_sum_rows<float, __half>(const float*, int64_t, int64_t, int64_t, const float*, __half*, cudaStream_t);
template cudaError_t launch_sum_rows<float, __nv_bfloat16>(const float*, int64_t, int64_t, int64_t, const float*, __nv_bfloat16*, cudaStream_t);
template cudaError_t launch_sum_rows<__half, float>(const __half*, int64_t, int64_t, int64_t, const __half*, float*, cudaStream_t);
template cudaError_t launch_sum_rows<__nv_bfloat16, float>(const __nv_bfloat16*, int64_t, int64_t, int64_t, const __nv_bfloat16*, float*, cudaStream_t);

#define SK_INSTANTIATE(T)                                                                          \
  template cudaError_t launch_colweight<T>(const T*, const T*, int64_t, int64_t, acc_t<T>*,         \
                                           cudaStream_t);                                          \
  template cudaError_t launch_rowdot<T>(const T*, const acc_t<T>*, int64_t, int64_t, double,        \
                                        acc_t<T>*, cudaStream_t);                                  \
  template cudaError_t launch_outer<T>(const T*, const acc_t<T>*, int64_t, int64_t, double, T*,     \
                                       cudaStream_t);                                              \
  template cudaError_t launch_sigma2_finish<T>(const T*, const T*, const acc_t<T>*,                 \
                                               const acc_t<T>*, int64_t, int64_t, T*, cudaStream_t);
SK_CUDA_FOR_EACH_TYPE(SK_INSTANTIATE)
#undef SK_INSTANTIATE

}  // namespace cuda
}  // namespace silent_kernels
