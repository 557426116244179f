// Argument checks of the fused loss ops, run at the C++ entry before any work.
// Every message names the op and the argument and gives the expected and the actual value.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/List.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

namespace silent_kernels {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline std::string shape_str(at::IntArrayRef s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) {
    out += std::to_string(s[i]);
    if (i + 1 < s.size()) out += ", ";
  }
  if (s.size() == 1) out += ",";
  return out + ")";
}

// x: (B, k), floating point; fixes dtype and device for every other argument.
inline void check_x(const char* op, const at::Tensor& x, c10::DeviceType device) {
  TORCH_CHECK(x.defined(), op, ": x is undefined");
  TORCH_CHECK(x.dim() == 2, op, ": x: expected a 2-D tensor (B, k), got shape ", shape_str(x.sizes()));
  TORCH_CHECK(is_supported_float(x.scalar_type()), op,
              ": x: expected dtype float16, bfloat16, float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.device().type() == device, op, ": x: expected a ", c10::DeviceTypeName(device),
              " tensor, got one on ", x.device());
}

// `t` must have exactly `shape` and x's dtype and device.
inline void check_like_x(const char* op, const char* name, const at::Tensor& t,
                         std::vector<int64_t> shape, const at::Tensor& x) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.sizes().equals(shape), op, ": ", name, ": expected shape ", shape_str(shape),
              ", got ", shape_str(t.sizes()));
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, ": expected dtype ",
              x.scalar_type(), " (the dtype of x), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, ": expected device ", x.device(),
              " (the device of x), got ", t.device());
}

inline void check_optional_like_x(const char* op, const char* name, const c10::optional<at::Tensor>& t,
                                  std::vector<int64_t> shape, const at::Tensor& x) {
  if (t.has_value() && t->defined()) check_like_x(op, name, *t, std::move(shape), x);
}

// mean: (B, d) with B = x.size(0); returns d.
inline int64_t check_mean(const char* op, const at::Tensor& mean, const at::Tensor& x) {
  TORCH_CHECK(mean.defined(), op, ": mean is undefined");
  TORCH_CHECK(mean.dim() == 2, op, ": mean: expected a 2-D tensor (B, d), got shape ",
              shape_str(mean.sizes()));
  TORCH_CHECK(mean.size(0) == x.size(0), op, ": mean: expected batch size ", x.size(0),
              " (x has shape ", shape_str(x.sizes()), "), got shape ", shape_str(mean.sizes()));
  check_like_x(op, "mean", mean, {x.size(0), mean.size(1)}, x);
  return mean.size(1);
}

// needs: one gradient flag per input of the forward (n of them); returns them as a vector.
inline std::vector<bool> check_needs(const char* op, const c10::List<bool>& needs_list, size_t n) {
  std::vector<bool> needs = needs_list.vec();
  TORCH_CHECK(needs.size() == n, op, ": needs: expected ", n, " flags (one per input), got ",
              needs.size());
  return needs;
}

// grad: the upstream gradient of each sample's loss, (B,) in x's dtype.
inline void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& x) {
  check_like_x(op, "grad", grad, {x.size(0)}, x);
}

// What every backward op checks beyond its forward's inputs: grad (B,) like x and one needs flag
// per input (n_inputs); returns the flags.
inline std::vector<bool> check_backward_arguments(const char* op, const at::Tensor& grad, const at::Tensor& x,
                                                  const c10::List<bool>& needs_list, size_t n_inputs) {
  check_grad(op, grad, x);
  return check_needs(op, needs_list, n_inputs);
}

inline void check_fixed_inputs(const char* op, c10::DeviceType device, const at::Tensor& x,
                               const at::Tensor& mean, const at::Tensor& var,
                               const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               const at::Tensor& sigma2) {
  check_x(op, x, device);
  const int64_t B = x.size(0), k = x.size(1);
  const int64_t d = check_mean(op, mean, x);
  check_like_x(op, "var", var, {B, d}, x);
  check_like_x(op, "weight", weight, {k, d}, x);
  check_optional_like_x(op, "bias", bias, {k}, x);
  check_like_x(op, "sigma2", sigma2, {k}, x);
}

inline void check_precision_inputs(const char* op, c10::DeviceType device, const at::Tensor& x,
                                   const at::Tensor& mean, const at::Tensor& var,
                                   const c10::optional<at::Tensor>& k3,
                                   const c10::optional<at::Tensor>& k4, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& bias,
                                   const at::Tensor& precision_weight,
                                   const c10::optional<at::Tensor>& precision_bias) {
  check_x(op, x, device);
  const int64_t B = x.size(0), k = x.size(1);
  const int64_t d = check_mean(op, mean, x);
  check_like_x(op, "var", var, {B, d}, x);
  check_optional_like_x(op, "k3", k3, {B, d}, x);
  check_optional_like_x(op, "k4", k4, {B, d}, x);
  check_like_x(op, "weight", weight, {k, d}, x);
  check_optional_like_x(op, "bias", bias, {k}, x);
  check_like_x(op, "precision_weight", precision_weight, {k, d}, x);
  check_optional_like_x(op, "precision_bias", precision_bias, {k}, x);
}

// head: 0 Taylor log term (any cumulants), 1 exact log term, 2 log-variance (Gaussian only).
inline void check_head(const char* op, int64_t head, const c10::optional<at::Tensor>& k3,
                       const c10::optional<at::Tensor>& k4) {
  TORCH_CHECK(head >= 0 && head <= 2, op, ": head: expected 0 (Taylor log term), 1 (exact log term) "
              "or 2 (log-variance head), got ", head);
  const bool higher = (k3.has_value() && k3->defined()) || (k4.has_value() && k4->defined());
  TORCH_CHECK(head == 0 || !higher, op, ": head=", head, " needs Gaussian latents: k3 and k4 must be "
              "None (the exact log term and the GEMM-shaped log-variance head hold only for them)");
}

inline void check_precision_head_inputs(const char* op, c10::DeviceType device, const at::Tensor& x,
                                        const at::Tensor& mean, const at::Tensor& var,
                                        const c10::optional<at::Tensor>& k3,
                                        const c10::optional<at::Tensor>& k4, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias,
                                        const at::Tensor& precision_weight,
                                        const c10::optional<at::Tensor>& precision_bias, int64_t head) {
  check_precision_inputs(op, device, x, mean, var, k3, k4, weight, bias, precision_weight, precision_bias);
  check_head(op, head, k3, k4);
}

inline void check_bernoulli_logvar_inputs(const char* op, c10::DeviceType device, const at::Tensor& x,
                                          const at::Tensor& logits, const at::Tensor& weight,
                                          const c10::optional<at::Tensor>& bias,
                                          const at::Tensor& logvar_weight,
                                          const c10::optional<at::Tensor>& logvar_bias) {
  check_x(op, x, device);
  const int64_t B = x.size(0), k = x.size(1);
  TORCH_CHECK(logits.defined() && logits.dim() == 2 && logits.size(0) == B, op,
              ": logits: expected shape (B=", B, ", d), got ", shape_str(logits.sizes()));
  const int64_t d = logits.size(1);
  check_like_x(op, "logits", logits, {B, d}, x);
  check_like_x(op, "weight", weight, {k, d}, x);
  check_optional_like_x(op, "bias", bias, {k}, x);
  check_like_x(op, "logvar_weight", logvar_weight, {k, d}, x);
  check_optional_like_x(op, "logvar_bias", logvar_bias, {k}, x);
}

// Categorical op: head 3 (fixed) needs sigma2 and no second head; 0 (Taylor precision) and
// 2 (log-variance) need second_weight and no sigma2.
inline void check_categorical_inputs(const char* op, c10::DeviceType device, const at::Tensor& x,
                                     const at::Tensor& logits, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias,
                                     const c10::optional<at::Tensor>& second_weight,
                                     const c10::optional<at::Tensor>& second_bias,
                                     const c10::optional<at::Tensor>& sigma2, int64_t head) {
  check_x(op, x, device);
  const int64_t B = x.size(0), k = x.size(1);
  TORCH_CHECK(logits.defined() && logits.dim() == 3 && logits.size(0) == B, op,
              ": logits: expected shape (B=", B, ", G, K), got ", shape_str(logits.sizes()));
  check_like_x(op, "logits", logits, {B, logits.size(1), logits.size(2)}, x);
  const int64_t d = logits.size(1) * logits.size(2);
  check_like_x(op, "weight", weight, {k, d}, x);
  check_optional_like_x(op, "bias", bias, {k}, x);
  check_optional_like_x(op, "second_weight", second_weight, {k, d}, x);
  check_optional_like_x(op, "second_bias", second_bias, {k}, x);
  check_optional_like_x(op, "sigma2", sigma2, {k}, x);
  const bool has_w2 = second_weight.has_value() && second_weight->defined();
  const bool has_s2 = sigma2.has_value() && sigma2->defined();
  TORCH_CHECK(head == 0 || head == 2 || head == 3, op, ": head: expected 3 (fixed), 0 (precision, "
              "Taylor log term) or 2 (log-variance), got ", head);
  TORCH_CHECK(head == 3 ? (has_s2 && !has_w2) : (has_w2 && !has_s2), op, ": head=", head,
              head == 3 ? " (fixed) needs sigma2 and no second_weight" : " needs second_weight and no sigma2");
}

// The backward of a training pair (CPU): weight sets the dtype and device every other argument
// must have (as x does elsewhere); returns the batch size B read from grad (B,).
inline int64_t check_saved_backward_inputs(const char* op, const at::Tensor& grad, const at::Tensor& weight) {
  TORCH_CHECK(weight.defined() && weight.dim() == 2, op, ": weight: expected a 2-D tensor (k, d), got shape ",
              shape_str(weight.sizes()));
  TORCH_CHECK(is_supported_float(weight.scalar_type()), op,
              ": weight: expected dtype float16, bfloat16, float32 or float64, got ", weight.scalar_type());
  TORCH_CHECK(weight.device().type() == c10::DeviceType::CPU, op, ": weight: expected a CPU tensor, got one on ",
              weight.device());
  TORCH_CHECK(grad.defined() && grad.dim() == 1, op, ": grad: expected a 1-D tensor (B,), got shape ",
              shape_str(grad.sizes()));
  check_like_x(op, "grad", grad, {grad.size(0)}, weight);
  return grad.size(0);
}

// The saved-coefficient backward's latent moments: mean and var (B, d) like weight (k, d).
inline void check_saved_moments(const char* op, const at::Tensor& mean, const at::Tensor& var, int64_t B,
                                const at::Tensor& weight) {
  check_like_x(op, "mean", mean, {B, weight.size(1)}, weight);
  check_like_x(op, "var", var, {B, weight.size(1)}, weight);
}

// The saved coefficients of a training forward `producer`: the expected shape, the
// accumulation dtype of weight's (float64 for float64, else float32), weight's device.
inline void check_coefficients(const char* op, const at::Tensor& coefficients, at::IntArrayRef shape,
                               const at::Tensor& weight, const char* producer) {
  const auto acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(coefficients.sizes() == shape, op, ": coefficients: expected shape ", shape_str(shape), " (from ",
              producer, " with the same shapes), got shape ", shape_str(coefficients.sizes()));
  TORCH_CHECK(coefficients.scalar_type() == acc, op, ": coefficients: expected dtype ", acc, ", got ",
              coefficients.scalar_type());
  TORCH_CHECK(coefficients.device() == weight.device(), op, ": coefficients: expected device ", weight.device(),
              ", got ", coefficients.device());
  TORCH_CHECK(coefficients.is_contiguous(), op, ": coefficients: expected a contiguous tensor");
}

}  // namespace silent_kernels
