// Stage launchers shared between the .cu files (internal to csrc/cuda; the glue uses kernels.h).
// Plain header: raw pointers, int64 sizes, a stream; each returns cudaGetLastError().
#pragma once

#include <cstdint>

#include "kernels.h"

namespace silent_kernels {
namespace cuda {

// A reduction of length red split into `split` chunks of `chunk` (a multiple of the step):
// enough chunks that tiles * split blocks fill the device twice, at least four steps a chunk.
struct Split {
  int64_t split, chunk;
};
Split choose_split(int64_t tiles, int64_t red, int bk);
constexpr int64_t kMaxSplit = 65535;  // chunks are blockIdx.z

// Consecutive regions of the scratch buffer: take(n) is the offset of the next n elements.
struct ScratchLayout {
  int64_t end = 0;
  int64_t take(int64_t n) {
    const int64_t off = end;
    end += n;
    return off;
  }
};

// out[c] = sum_r src[r * ld + c] * (rowscale ? rowscale[r] : 1), c < C, summed in acc_t<S>
// in a fixed order (deterministic). R may be 0 (writes zeros).
template <typename S, typename O>
cudaError_t launch_sum_rows(const S* src, int64_t R, int64_t C, int64_t ld, const S* rowscale,
                            O* out, cudaStream_t stream);

// Zeros n elements of p (nothing when p is null).
template <typename T>
cudaError_t zero_async(T* p, int64_t n, cudaStream_t stream) {
  if (p == nullptr || n == 0) return cudaSuccess;
  return cudaMemsetAsync(p, 0, static_cast<size_t>(n) * sizeof(T), stream);  // 0.0 in every T
}

// out = the sum over the row tiles of column sum `slot` of colpart ((ncolsums, row_tiles, k));
// nothing when out is null or slot < 0.
template <typename Acc, typename O>
cudaError_t finish_colsum(const Acc* colpart, int slot, int64_t row_tiles, int64_t k, O* out,
                          cudaStream_t stream) {
  if (out == nullptr || slot < 0) return cudaSuccess;
  return launch_sum_rows<Acc, O>(colpart + slot * row_tiles * k, row_tiles, k, k, nullptr, out,
                                 stream);
}

// out = sum over the splits of partial[s, q] ((split, count, per) partials); nothing when out is null.
template <typename T>
cudaError_t finish_split(const acc_t<T>* partial, int64_t split, int count, int q, int64_t per,
                         T* out, cudaStream_t stream) {
  if (out == nullptr) return cudaSuccess;
  return launch_sum_rows<acc_t<T>, T>(partial + q * per, split, per, count * per, nullptr, out,
                                      stream);
}

// The weight gradients of (split, nwout, k, d) partials: output 0 the first weight's (when
// need_first), then the second's (when need_second); out pointers may be null.
template <typename T>
cudaError_t finish_weight_splits(const acc_t<T>* partial, int64_t split, bool need_first,
                                 bool need_second, int64_t per, T* first, T* second,
                                 cudaStream_t stream) {
  const int nwout = int(need_first) + int(need_second);
  if (need_first) {
    const cudaError_t err = finish_split<T>(partial, split, nwout, 0, per, first, stream);
    if (err != cudaSuccess) return err;
  }
  return need_second ? finish_split<T>(partial, split, nwout, int(need_first), per, second, stream)
                     : cudaSuccess;
}

// w[i] = sum_p A[p, i]^2 / sigma2[p]   (the fixed head's O(kd) column weights)
template <typename T>
cudaError_t launch_colweight(const T* A, const T* sigma2, int64_t k, int64_t d, acc_t<T>* w,
                             cudaStream_t stream);

// out[n] = scale * sum_i var[n, i] * w[i]   (one warp per sample)
template <typename T>
cudaError_t launch_rowdot(const T* var, const acc_t<T>* w, int64_t B, int64_t d, double scale,
                          acc_t<T>* out, cudaStream_t stream);

// out[n, i] = scale * grad[n] * w[i]
template <typename T>
cudaError_t launch_outer(const T* grad, const acc_t<T>* w, int64_t B, int64_t d, double scale,
                         T* out, cudaStream_t stream);

// out[p] = colsum[p] - 0.5 / sigma2[p]^2 * sum_i A[p, i]^2 r[i]   (fixed head d/d sigma2)
template <typename T>
cudaError_t launch_sigma2_finish(const T* A, const T* sigma2, const acc_t<T>* r,
                                 const acc_t<T>* colsum, int64_t k, int64_t d, T* out,
                                 cudaStream_t stream);

// Coefficient kernels: recompute the contractions of a (sample, pixel) tile, apply the
// derivative of the per-pixel loss times grad[n], write the planes named in slots
// ((nplanes, B, k)), the per-sample-tile column sums named in colsums
// ((ncolsums, row tiles, k)) and dx (nullable).
template <typename T>
cudaError_t launch_fixed_coef(const FixedArgs<T>& a, int cfg, const PlaneSlots& slots,
                              acc_t<T>* planes, const ColSumSlots& colsums, acc_t<T>* colpart,
                              T* dx, cudaStream_t stream);
template <typename T>
cudaError_t launch_precision_coef(const PrecisionArgs<T>& a, int cfg, const PlaneSlots& slots,
                                  acc_t<T>* planes, const ColSumSlots& colsums,
                                  acc_t<T>* colpart, T* dx, cudaStream_t stream);
// Sample tiles of the coefficient kernels for a tile configuration.
int64_t coef_row_tiles(bool precision, bool is_double, int cfg, int64_t B);

// Moment gradients: partial[s, q, n, i] = sum over pixel chunk s of sum_j g_j[n, p] W_j[p, i]
// for the moment kind kinds[q] (0 mean, 1 var, 2 k3, 3 k4); W_j the weight products.
template <typename T>
cudaError_t launch_moment_grad(bool precision, bool has_k3, bool has_k4, const acc_t<T>* planes,
                               const PlaneSlots& slots, const T* A, const T* C, int64_t B,
                               int64_t k, int64_t d, const int* kinds, int nkinds, int64_t split,
                               int64_t chunk, acc_t<T>* partial, cudaStream_t stream);

// Weight gradients: partial[s, o, p, i] (o: A then C, as needed) over the sample chunk s.
// Fixed head: dA = sum_n g_ubar m + A / sigma2 * r (r added by chunk 0).
template <typename T>
cudaError_t launch_weight_grad(bool precision, bool has_k3, bool has_k4, const acc_t<T>* planes,
                               const PlaneSlots& slots, const T* mean, const T* var, const T* k3,
                               const T* k4, const T* A, const T* C, const T* sigma2,
                               const acc_t<T>* r, int64_t B, int64_t k, int64_t d, bool need_a,
                               bool need_c, int64_t split, int64_t chunk, acc_t<T>* partial,
                               cudaStream_t stream);

}  // namespace cuda
}  // namespace silent_kernels
