// The C++ CPU kernels of the fused loss ops (registered in ops.cpp). Arguments are checked
// by the caller (op_checks.h); these functions make their inputs contiguous themselves.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <vector>

namespace silent_kernels::cpu {

at::Tensor fixed_nll(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                     const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                     const at::Tensor& sigma2);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fixed_nll_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                   const at::Tensor& var, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias, const at::Tensor& sigma2,
                   const std::vector<bool>& needs);

// Training pair of the fixed head: the loss and the residual coefficients (x - ubar) / sigma2
// (B, k) in the accumulation dtype, and the backward that uses them (cpu_fixed.cpp).
std::tuple<at::Tensor, at::Tensor>
fixed_nll_train(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var, const at::Tensor& weight,
                const c10::optional<at::Tensor>& bias, const at::Tensor& sigma2);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fixed_nll_train_backward(const at::Tensor& grad, const at::Tensor& coefficients, const at::Tensor& mean,
                         const at::Tensor& var, const at::Tensor& weight, const at::Tensor& sigma2,
                         const std::vector<bool>& needs);

at::Tensor precision_nll(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                         const c10::optional<at::Tensor>& k3, const c10::optional<at::Tensor>& k4,
                         const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& precision_weight,
                         const c10::optional<at::Tensor>& precision_bias, int64_t head);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
precision_nll_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                       const at::Tensor& var, const c10::optional<at::Tensor>& k3,
                       const c10::optional<at::Tensor>& k4, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& precision_weight,
                       const c10::optional<at::Tensor>& precision_bias, const std::vector<bool>& needs,
                       int64_t head);

// Training forward (learnable precision): the loss and the unscaled per-pixel coefficients
// (a flat accumulation-dtype tensor of precision_coefficient_count(...) elements, layout in
// cpu_precision.cpp), and the backward that uses them instead of recomputing the contractions.
int64_t precision_coefficient_count(int64_t B, int64_t k, bool has_k3, bool has_k4);

std::tuple<at::Tensor, at::Tensor>
precision_nll_train(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                    const c10::optional<at::Tensor>& k3, const c10::optional<at::Tensor>& k4,
                    const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                    const at::Tensor& precision_weight, const c10::optional<at::Tensor>& precision_bias,
                    int64_t head);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
precision_nll_train_backward(const at::Tensor& grad, const at::Tensor& coefficients,
                             const at::Tensor& mean, const at::Tensor& var,
                             const c10::optional<at::Tensor>& k3, const c10::optional<at::Tensor>& k4,
                             const at::Tensor& weight, const at::Tensor& precision_weight,
                             const std::vector<bool>& needs);

// Log-variance head on Bernoulli latents (cpu_logvar.cpp): the fused tilted contraction.
at::Tensor bernoulli_logvar_nll(const at::Tensor& x, const at::Tensor& logits, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, const at::Tensor& logvar_weight,
                                const c10::optional<at::Tensor>& logvar_bias);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bernoulli_logvar_nll_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& logits,
                              const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              const at::Tensor& logvar_weight,
                              const c10::optional<at::Tensor>& logvar_bias, const std::vector<bool>& needs);

// One-hot categorical latents (cpu_categorical.cpp): logits (B, G, K), weights (k, G K); head 3
// fixed (sigma2), 0 precision with the Taylor log term, 2 log-variance (second_weight = H).
at::Tensor categorical_nll(const at::Tensor& x, const at::Tensor& logits, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& second_weight,
                           const c10::optional<at::Tensor>& second_bias, const c10::optional<at::Tensor>& sigma2,
                           int64_t head);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
categorical_nll_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& logits,
                         const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& second_weight,
                         const c10::optional<at::Tensor>& second_bias, const c10::optional<at::Tensor>& sigma2,
                         const std::vector<bool>& needs, int64_t head);

// The fixed head on categorical latents by pairwise weight distances (cpu_categorical_fixed.cpp);
// categorical_nll dispatches head 3 here. needs: x, logits, weight, bias, sigma2.
at::Tensor categorical_fixed_nll(const at::Tensor& x, const at::Tensor& logits, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, const at::Tensor& sigma2);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
categorical_fixed_nll_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& logits,
                               const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               const at::Tensor& sigma2, const std::vector<bool>& needs);

}  // namespace silent_kernels::cpu
