// Host API of the CUDA kernels (MATH.md §2-5), used by the torch glue in ops_cuda.cpp.
//
// Plain header: no torch headers, raw pointers, int64 sizes and a cudaStream_t; compiles
// with a host compiler given the CUDA include directory. Every entry point is a template
// over the element type T of the inputs (float, double, __half, __nv_bfloat16) and
// accumulates in acc_t<T> (float, or double for double inputs).
//
// Calling convention: all tensors are contiguous row-major; optional inputs are nullptr.
// The caller asks for a plan (tile configuration, split factors and the size of one
// scratch buffer of acc_t<T> elements), allocates the outputs and the scratch buffer,
// and calls the launcher on its stream. Launchers only enqueue work (no synchronisation,
// no allocation) and return the first CUDA error (cudaGetLastError after each launch).
// Results are deterministic: partial sums are written to the scratch buffer and reduced
// in a fixed order, never with atomics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace silent_kernels {
namespace cuda {

// M(T) for every element type the launchers are instantiated for.
#define SK_CUDA_FOR_EACH_TYPE(M) M(float) M(double) M(__half) M(__nv_bfloat16)

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

// ------------------------------------------------------------------------------- inputs
// x (B, k); mean, var (B, d); weight (k, d); bias, sigma2 (k,); grad (B,) (backward only).
template <typename T>
struct FixedArgs {
  const T* x;
  const T* mean;
  const T* var;
  const T* weight;
  const T* bias;  // nullable
  const T* sigma2;
  const T* grad;  // backward only
  int64_t B, k, d;
};

// x (B, k); mean, var, k3, k4 (B, d); weight, pweight (k, d); bias, pbias (k,); grad (B,).
// head: the per-pixel epilogue (the values of epilogue.h's Head): 0 learnable precision with
// the paper's Taylor log term (any family), 1 learnable precision with the exact E[log v^2],
// 2 Gaussian log-variance head (pweight, pbias = H, h0). Heads 1 and 2 need Gaussian latents
// (k3 = k4 = nullptr); the launchers return cudaErrorInvalidValue otherwise.
template <typename T>
struct PrecisionArgs {
  const T* x;
  const T* mean;
  const T* var;
  const T* k3;  // nullable (k3 = 0)
  const T* k4;  // nullable (k4 = 0)
  const T* weight;
  const T* bias;  // nullable
  const T* pweight;
  const T* pbias;  // nullable
  const T* grad;   // backward only
  int64_t B, k, d;
  int head = 0;
};

constexpr int kNumPrecisionHeads = 3;
template <typename T>
inline bool precision_head_valid(const PrecisionArgs<T>& a) {
  return a.head >= 0 && a.head < kNumPrecisionHeads &&
         (a.head == 0 || (a.k3 == nullptr && a.k4 == nullptr));
}

// Bernoulli log-variance head (MATH.md §11): x (B, k); logits (B, d) of the Bernoulli
// latents; weight, lweight (k, d) = A, H; bias, lbias (k,) = b, h0; grad (B,) (backward only).
// Decoder variance exp(H z + h0); the loss tilts every latent by -H (O(B k d) softplus /
// sigmoid work, reduced over d in registers: no (B, k, d) tensor is stored).
template <typename T>
struct BernoulliLogvarArgs {
  const T* x;
  const T* logits;
  const T* weight;
  const T* bias;  // nullable
  const T* lweight;
  const T* lbias;  // nullable
  const T* grad;   // backward only
  int64_t B, k, d;
};
template <typename T>
struct BernoulliLogvarGrads {
  T *x, *logits, *weight, *bias, *lweight, *lbias;
};
struct BernoulliLogvarNeeds {
  bool x, logits, weight, bias, lweight, lbias;
};

// Gradient outputs (each the shape of its input, contiguous); nullptr = not needed.
template <typename T>
struct FixedGrads {
  T *x, *mean, *var, *weight, *bias, *sigma2;
};
template <typename T>
struct PrecisionGrads {
  T *x, *mean, *var, *k3, *k4, *weight, *bias, *pweight, *pbias;
};

struct FixedNeeds {
  bool x, mean, var, weight, bias, sigma2;
};
struct PrecisionNeeds {
  bool x, mean, var, k3, k4, weight, bias, pweight, pbias;
};

// ------------------------------------------------------------------------------- plans
// The per-(sample, pixel) coefficient planes g_j of MATH.md §5, in PixelTerms order.
enum Plane : int { kUbar = 0, kVbar, kSaa, kScc, kSac, kTacc, kTaac, kC3, kQ, kC4, kNumPlanes };
// Column sums over the batch formed by the coefficient kernel (per sample tile, then summed):
// bias gradient (sum_n g_ubar), precision-bias gradient (sum_n g_vbar) and, for the fixed
// head, sum_n grad_n d(pixel loss)/d(sigma2) without its Saa part.
enum ColSum : int { kColUbar = 0, kColVbar = 1, kColDSigma2 = 1, kNumColSums = 2 };

// slot[j] = index of plane j in the (nplanes, B, k) scratch block, -1 = not stored.
struct PlaneSlots {
  int slot[kNumPlanes];
};
// slot[c] = index of column sum c in the (ncolsums, coef_row_tiles, k) scratch block, -1 = none.
struct ColSumSlots {
  int slot[kNumColSums];
};

struct ForwardPlan {
  int cfg;               // tile configuration (0: large tiles, 1: small tiles for small problems)
  int64_t pixel_tiles;   // pixel tiles = rows of per-tile partial losses
  int64_t partial_rows;  // pixel_tiles, + 1 row (the O(Bd) variance term) for the fixed head
  int64_t off_colw;      // fixed head: offset of the (d,) column weights sum_p A_pi^2 / sigma2_p
  int64_t workspace;     // scratch elements of acc_t<T>
};

struct BackwardPlan {
  bool run_coef;          // the coefficient kernel runs (any gradient but the fixed head's var)
  int coef_cfg;           // its tile configuration (as ForwardPlan::cfg)
  PlaneSlots slots;
  int nplanes;
  ColSumSlots colsums;
  int ncolsums;
  int64_t coef_row_tiles;  // sample tiles of the coefficient kernel (rows of the column sums)
  int kinds[4];           // moment gradients computed, in slot order (0 mean, 1 var, 2 k3, 3 k4)
  int nkinds;
  int64_t mom_split, mom_chunk;  // split of the pixel reduction of the moment gradients
  bool need_a, need_c;           // weight gradients (A = weight, C = precision_weight)
  int nwout;
  int64_t w_split, w_chunk;      // split of the batch reduction of the weight gradients
  bool need_colw, need_r;        // fixed head: column weights (d,), r = sum_n grad_n var_n (d,)
  // scratch layout (offsets in acc_t<T> elements)
  int64_t off_planes;  // (nplanes, B, k)
  int64_t off_colsum;  // (ncolsums, coef_row_tiles, k)
  int64_t off_mom;     // (mom_split, nkinds, B, d)
  int64_t off_w;       // (w_split, nwout, k, d)
  int64_t off_colw;    // (d,)
  int64_t off_r;       // (d,)
  int64_t off_tmp;     // (k,)
  int64_t workspace;
};

// Bernoulli log-variance backward:
//   1. coefficient kernel: recomputes the tilted sums per (sample, pixel), writes the planes
//      (gS, gT1, gT2) times grad[n] as (3, B, k), dx, and per-sample-tile column sums of
//      gT1 (bias) and 0.5 grad[n] - gS (h0);
//   2. dlogits: (logit_split, B, d) partials over pixel chunks, summed in order;
//   3. dA, dH: (w_split, nwout, k, d) partials over sample chunks, summed in order.
enum BernoulliPlane : int { kGS = 0, kGT1 = 1, kGT2 = 2, kNumBernoulliPlanes = 3 };
enum BernoulliColSum : int { kColBias = 0, kColLbias = 1, kNumBernoulliColSums = 2 };

struct BernoulliLogvarPlan {
  bool run_coef;
  bool planes;             // the (3, B, k) coefficient planes are written
  ColSumSlots colsums;     // slot[kColBias], slot[kColLbias]; -1 = not needed
  int ncolsums;
  int64_t coef_row_tiles;  // sample tiles of the tile kernels (rows of the column sums)
  int64_t pixel_tiles;     // pixel tiles of the tile kernels (rows of the forward partials)
  bool need_logits;
  int64_t l_split, l_chunk;  // split of the pixel reduction of dlogits
  bool need_a, need_h;
  int nwout;
  int64_t w_split, w_chunk;  // split of the batch reduction of dA, dH
  // scratch layout (offsets in acc_t<T> elements)
  int64_t off_planes;  // (3, B, k)
  int64_t off_colsum;  // (ncolsums, coef_row_tiles, k)
  int64_t off_logits;  // (l_split, B, d)
  int64_t off_w;       // (w_split, nwout, k, d)
  int64_t workspace;
};

// Plans use the multiprocessor count of the current device (cached per device).
int current_sm_count();

ForwardPlan plan_fixed_forward(int64_t B, int64_t k, int64_t d, bool is_double);
ForwardPlan plan_precision_forward(int64_t B, int64_t k, int64_t d, bool is_double);
BackwardPlan plan_fixed_backward(int64_t B, int64_t k, int64_t d, bool is_double,
                                 const FixedNeeds& needs);
BackwardPlan plan_precision_backward(int64_t B, int64_t k, int64_t d, bool is_double, bool has_k3,
                                     bool has_k4, const PrecisionNeeds& needs);

// Forward: workspace = pixel_tiles * B; backward as BernoulliLogvarPlan.
BernoulliLogvarPlan plan_bernoulli_logvar_forward(int64_t B, int64_t k, int64_t d, bool is_double);
BernoulliLogvarPlan plan_bernoulli_logvar_backward(int64_t B, int64_t k, int64_t d, bool is_double,
                                                   const BernoulliLogvarNeeds& needs);

// One-hot categorical latents (MATH.md §12): x (B, k); logits (B, G, K) (unnormalised, per
// group); weight (k, G K) group-major = A; bias (k,); second_weight (k, G K) = C (precision
// head) or H (log-variance head), second_bias (k,); sigma2 (k,) (fixed head); grad (B,).
// head (epilogue.h Head): 3 fixed (sigma2, no second weight), 0 learnable precision with the
// paper's Taylor log term, 2 log-variance (second weight, no sigma2); the launchers return
// cudaErrorInvalidValue otherwise. Per (sample, pixel) the kernels walk the G groups with the
// shared per-group math of csrc/categorical.h: no (B, k, G) or (B, k, G K) tensor is stored.
template <typename T>
struct CategoricalArgs {
  const T* x;
  const T* logits;
  const T* weight;
  const T* bias;           // nullable
  const T* second_weight;  // nullable (fixed head)
  const T* second_bias;    // nullable
  const T* sigma2;         // nullable (precision / log-variance heads)
  const T* grad;           // backward only
  int64_t B, k, G, K;
  int head;
};
template <typename T>
struct CategoricalGrads {
  T *x, *logits, *weight, *bias, *second_weight, *second_bias, *sigma2;
};
struct CategoricalNeeds {
  bool x, logits, weight, bias, second_weight, second_bias, sigma2;
};

// Forward: (1) per-group normalisation of the logits into (B, G K) probabilities (log-
//   probabilities for the log-variance head) in acc_t; (2) one thread per (sample, pixel) over
//   the groups, the head's epilogue, warp sums into per-pixel-tile partial losses
//   (pixel_tiles, B), summed in order.
// Backward: (1) as forward; (2) coefficient kernel: d loss / d(contraction) times grad[n] as
//   (nplanes, B, k) planes, dx, per-sample-tile column sums (bias; second bias or sigma2);
//   (3) dlogits: one thread per (sample, group) over a pixel chunk, (l_split, B, G K) partials;
//   (4) dweight / dsecond_weight: one thread per (pixel, group) over a sample chunk,
//   (w_split, nwout, k, G K) partials; every partial reduced in a fixed order.
enum CategoricalColSum : int { kCatColBias = 0, kCatColSecond = 1 };  // second: bias2 or sigma2
struct CategoricalPlan {
  int head;
  int nplanes;             // coefficient planes of the head (fixed 2, Taylor 10, log-variance 4)
  int64_t pixel_tiles;     // pixel tiles of the (sample, pixel) kernels
  int64_t row_tiles;       // sample tiles of the (sample, pixel) kernels
  bool run_coef;
  bool planes;             // the coefficient planes are written (dlogits / dweights needed)
  ColSumSlots colsums;     // slot[kCatColBias], slot[kCatColSecond]; -1 = not needed
  int ncolsums;
  bool need_logits;
  int64_t l_split, l_chunk;  // split of the pixel reduction of dlogits
  bool need_a, need_c;
  int nwout;
  int64_t w_split, w_chunk;  // split of the sample reduction of dweight / dsecond_weight
  // scratch layout (offsets in acc_t<T> elements)
  int64_t off_prob;     // (B, G K) probabilities (log-probabilities for the log-variance head)
  int64_t off_partial;  // forward: (pixel_tiles, B)
  int64_t off_planes;   // (nplanes, B, k)
  int64_t off_colsum;   // (ncolsums, row_tiles, k)
  int64_t off_logits;   // (l_split, B, G K)
  int64_t off_w;        // (w_split, nwout, k, G K)
  int64_t workspace;
};
CategoricalPlan plan_categorical_forward(int64_t B, int64_t k, int64_t G, int64_t K, int head,
                                         bool is_double);
CategoricalPlan plan_categorical_backward(int64_t B, int64_t k, int64_t G, int64_t K, int head,
                                          bool is_double, const CategoricalNeeds& needs);

// ------------------------------------------------------------------------------- launchers
// Forward: loss (B,) in T, per-sample nats summed over pixels (incl. 0.5 log 2 pi).
template <typename T>
cudaError_t fixed_forward(const FixedArgs<T>& a, const ForwardPlan& plan, acc_t<T>* workspace,
                          T* loss, cudaStream_t stream);
template <typename T>
cudaError_t precision_forward(const PrecisionArgs<T>& a, const ForwardPlan& plan,
                              acc_t<T>* workspace, T* loss, cudaStream_t stream);

// Backward: a.grad is the upstream gradient of each sample's loss; writes the gradients
// whose pointers are non-null (they must match the needs the plan was made for).
template <typename T>
cudaError_t fixed_backward(const FixedArgs<T>& a, const BackwardPlan& plan, acc_t<T>* workspace,
                           const FixedGrads<T>& out, cudaStream_t stream);
template <typename T>
cudaError_t precision_backward(const PrecisionArgs<T>& a, const BackwardPlan& plan,
                               acc_t<T>* workspace, const PrecisionGrads<T>& out,
                               cudaStream_t stream);

// Bernoulli log-variance head: loss (B,) and the gradients whose pointers are non-null.
template <typename T>
cudaError_t bernoulli_logvar_forward(const BernoulliLogvarArgs<T>& a, const BernoulliLogvarPlan& plan,
                                     acc_t<T>* workspace, T* loss, cudaStream_t stream);
template <typename T>
cudaError_t bernoulli_logvar_backward(const BernoulliLogvarArgs<T>& a,
                                      const BernoulliLogvarPlan& plan, acc_t<T>* workspace,
                                      const BernoulliLogvarGrads<T>& out, cudaStream_t stream);

// Categorical latents: loss (B,) and the gradients whose pointers are non-null.
template <typename T>
cudaError_t categorical_forward(const CategoricalArgs<T>& a, const CategoricalPlan& plan,
                                acc_t<T>* workspace, T* loss, cudaStream_t stream);
template <typename T>
cudaError_t categorical_backward(const CategoricalArgs<T>& a, const CategoricalPlan& plan,
                                 acc_t<T>* workspace, const CategoricalGrads<T>& out,
                                 cudaStream_t stream);

#define SK_CUDA_DECLARE_LAUNCHERS(T)                                                          \
  extern template cudaError_t fixed_forward<T>(const FixedArgs<T>&, const ForwardPlan&,       \
                                               acc_t<T>*, T*, cudaStream_t);                  \
  extern template cudaError_t precision_forward<T>(const PrecisionArgs<T>&, const ForwardPlan&, \
                                                   acc_t<T>*, T*, cudaStream_t);              \
  extern template cudaError_t fixed_backward<T>(const FixedArgs<T>&, const BackwardPlan&,     \
                                                acc_t<T>*, const FixedGrads<T>&, cudaStream_t); \
  extern template cudaError_t precision_backward<T>(const PrecisionArgs<T>&,                  \
                                                    const BackwardPlan&, acc_t<T>*,            \
                                                    const PrecisionGrads<T>&, cudaStream_t);  \
  extern template cudaError_t bernoulli_logvar_forward<T>(                                    \
      const BernoulliLogvarArgs<T>&, const BernoulliLogvarPlan&, acc_t<T>*, T*, cudaStream_t); \
  extern template cudaError_t bernoulli_logvar_backward<T>(                                   \
      const BernoulliLogvarArgs<T>&, const BernoulliLogvarPlan&, acc_t<T>*,                    \
      const BernoulliLogvarGrads<T>&, cudaStream_t);                                          \
  extern template cudaError_t categorical_forward<T>(const CategoricalArgs<T>&,                \
                                                     const CategoricalPlan&, acc_t<T>*, T*,    \
                                                     cudaStream_t);                            \
  extern template cudaError_t categorical_backward<T>(const CategoricalArgs<T>&,               \
                                                      const CategoricalPlan&, acc_t<T>*,       \
                                                      const CategoricalGrads<T>&, cudaStream_t);
SK_CUDA_FOR_EACH_TYPE(SK_CUDA_DECLARE_LAUNCHERS)
#undef SK_CUDA_DECLARE_LAUNCHERS

}  // namespace cuda
}  // namespace silent_kernels
