// The silent_kernels op library: schemas (shared by the CPU and CUDA kernels), the CPU
// kernels' registration, and the Python module init so that
// `import silent_kernels._C` loads this library (which runs the registrations below).
#include <Python.h>

#include <torch/library.h>

#include "cpu_kernels.h"
#include "op_checks.h"

namespace silent_kernels {
namespace {

at::Tensor fixed_nll_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                         const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& sigma2) {
  check_fixed_inputs("silent_kernels::fixed_nll", c10::DeviceType::CPU, x, mean, var, weight, bias,
                     sigma2);
  return cpu::fixed_nll(x, mean, var, weight, bias, sigma2);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fixed_nll_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                       const at::Tensor& var, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& sigma2,
                       const c10::List<bool>& needs_list) {
  const char* op = "silent_kernels::fixed_nll_backward";
  check_fixed_inputs(op, c10::DeviceType::CPU, x, mean, var, weight, bias, sigma2);
  const std::vector<bool> needs = check_backward_arguments(op, grad, x, needs_list, 6);
  return cpu::fixed_nll_backward(grad, x, mean, var, weight, bias, sigma2, needs);
}

// Training pair of the fixed head (CPU only, used by the cpp backend when gradients are
// needed): the forward also returns the residual coefficients, which the backward consumes
// instead of recomputing the mean GEMM (cpu_fixed.cpp).
std::tuple<at::Tensor, at::Tensor>
fixed_nll_train_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias, const at::Tensor& sigma2) {
  check_fixed_inputs("silent_kernels::fixed_nll_train", c10::DeviceType::CPU, x, mean, var, weight, bias,
                     sigma2);
  return cpu::fixed_nll_train(x, mean, var, weight, bias, sigma2);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fixed_nll_train_backward_cpu(const at::Tensor& grad, const at::Tensor& coefficients, const at::Tensor& mean,
                             const at::Tensor& var, const at::Tensor& weight, const at::Tensor& sigma2,
                             const c10::List<bool>& needs_list) {
  const char* op = "silent_kernels::fixed_nll_train_backward";
  const int64_t B = check_saved_backward_inputs(op, grad, weight);
  check_saved_moments(op, mean, var, B, weight);
  const int64_t k = weight.size(0);
  check_like_x(op, "sigma2", sigma2, {k}, weight);
  check_coefficients(op, coefficients, {B, k}, weight, "fixed_nll_train");
  const std::vector<bool> needs = check_needs(op, needs_list, 6);
  return cpu::fixed_nll_train_backward(grad, coefficients, mean, var, weight, sigma2, needs);
}

at::Tensor precision_nll_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                             const c10::optional<at::Tensor>& k3,
                             const c10::optional<at::Tensor>& k4, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias,
                             const at::Tensor& precision_weight,
                             const c10::optional<at::Tensor>& precision_bias, int64_t head) {
  const char* op = "silent_kernels::precision_nll";
  check_precision_head_inputs(op, c10::DeviceType::CPU, x, mean, var, k3, k4, weight, bias,
                              precision_weight, precision_bias, head);
  return cpu::precision_nll(x, mean, var, k3, k4, weight, bias, precision_weight, precision_bias, head);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
precision_nll_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                           const at::Tensor& var, const c10::optional<at::Tensor>& k3,
                           const c10::optional<at::Tensor>& k4, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias,
                           const at::Tensor& precision_weight,
                           const c10::optional<at::Tensor>& precision_bias,
                           const c10::List<bool>& needs_list, int64_t head) {
  const char* op = "silent_kernels::precision_nll_backward";
  check_precision_head_inputs(op, c10::DeviceType::CPU, x, mean, var, k3, k4, weight, bias,
                              precision_weight, precision_bias, head);
  const std::vector<bool> needs = check_backward_arguments(op, grad, x, needs_list, 9);
  return cpu::precision_nll_backward(grad, x, mean, var, k3, k4, weight, bias, precision_weight,
                                     precision_bias, needs, head);
}

// Training pair of the learnable-precision head (CPU only, used by the cpp backend when
// gradients are needed): the forward also returns the unscaled per-pixel coefficients, which
// the backward consumes instead of recomputing the contractions (cpu_precision.cpp).
std::tuple<at::Tensor, at::Tensor>
precision_nll_train_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                        const c10::optional<at::Tensor>& k3, const c10::optional<at::Tensor>& k4,
                        const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        const at::Tensor& precision_weight,
                        const c10::optional<at::Tensor>& precision_bias, int64_t head) {
  const char* op = "silent_kernels::precision_nll_train";
  check_precision_head_inputs(op, c10::DeviceType::CPU, x, mean, var, k3, k4, weight, bias,
                              precision_weight, precision_bias, head);
  return cpu::precision_nll_train(x, mean, var, k3, k4, weight, bias, precision_weight,
                                  precision_bias, head);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
precision_nll_train_backward_cpu(const at::Tensor& grad, const at::Tensor& coefficients,
                                 const at::Tensor& mean, const at::Tensor& var,
                                 const c10::optional<at::Tensor>& k3,
                                 const c10::optional<at::Tensor>& k4, const at::Tensor& weight,
                                 const at::Tensor& precision_weight,
                                 const c10::List<bool>& needs_list) {
  const char* op = "silent_kernels::precision_nll_train_backward";
  const int64_t B = check_saved_backward_inputs(op, grad, weight);
  const int64_t k = weight.size(0), d = weight.size(1);
  check_saved_moments(op, mean, var, B, weight);
  check_optional_like_x(op, "k3", k3, {B, d}, weight);
  check_optional_like_x(op, "k4", k4, {B, d}, weight);
  check_like_x(op, "precision_weight", precision_weight, {k, d}, weight);
  const bool has3 = k3.has_value() && k3->defined(), has4 = k4.has_value() && k4->defined();
  check_coefficients(op, coefficients, {cpu::precision_coefficient_count(B, k, has3, has4)}, weight,
                     "precision_nll_train");
  const std::vector<bool> needs = check_needs(op, needs_list, 9);
  return cpu::precision_nll_train_backward(grad, coefficients, mean, var, k3, k4, weight,
                                           precision_weight, needs);
}

at::Tensor bernoulli_logvar_nll_cpu(const at::Tensor& x, const at::Tensor& logits,
                                    const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                    const at::Tensor& logvar_weight,
                                    const c10::optional<at::Tensor>& logvar_bias) {
  check_bernoulli_logvar_inputs("silent_kernels::bernoulli_logvar_nll", c10::DeviceType::CPU, x, logits,
                                weight, bias, logvar_weight, logvar_bias);
  return cpu::bernoulli_logvar_nll(x, logits, weight, bias, logvar_weight, logvar_bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bernoulli_logvar_nll_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& logits,
                                  const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                  const at::Tensor& logvar_weight,
                                  const c10::optional<at::Tensor>& logvar_bias,
                                  const c10::List<bool>& needs_list) {
  const char* op = "silent_kernels::bernoulli_logvar_nll_backward";
  check_bernoulli_logvar_inputs(op, c10::DeviceType::CPU, x, logits, weight, bias, logvar_weight,
                                logvar_bias);
  const std::vector<bool> needs = check_backward_arguments(op, grad, x, needs_list, 6);
  return cpu::bernoulli_logvar_nll_backward(grad, x, logits, weight, bias, logvar_weight, logvar_bias,
                                            needs);
}

at::Tensor categorical_nll_cpu(const at::Tensor& x, const at::Tensor& logits, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias,
                               const c10::optional<at::Tensor>& second_weight,
                               const c10::optional<at::Tensor>& second_bias,
                               const c10::optional<at::Tensor>& sigma2, int64_t head) {
  check_categorical_inputs("silent_kernels::categorical_nll", c10::DeviceType::CPU, x, logits, weight, bias,
                           second_weight, second_bias, sigma2, head);
  return cpu::categorical_nll(x, logits, weight, bias, second_weight, second_bias, sigma2, head);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
categorical_nll_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& logits,
                             const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             const c10::optional<at::Tensor>& second_weight,
                             const c10::optional<at::Tensor>& second_bias,
                             const c10::optional<at::Tensor>& sigma2, const c10::List<bool>& needs_list,
                             int64_t head) {
  const char* op = "silent_kernels::categorical_nll_backward";
  check_categorical_inputs(op, c10::DeviceType::CPU, x, logits, weight, bias, second_weight, second_bias,
                           sigma2, head);
  const std::vector<bool> needs = check_backward_arguments(op, grad, x, needs_list, 7);
  return cpu::categorical_nll_backward(grad, x, logits, weight, bias, second_weight, second_bias, sigma2,
                                       needs, head);
}


}  // namespace

TORCH_LIBRARY(silent_kernels, m) {
  m.def("fixed_nll(Tensor x, Tensor mean, Tensor var, Tensor weight, Tensor? bias, Tensor sigma2) -> Tensor");
  m.def("fixed_nll_backward(Tensor grad, Tensor x, Tensor mean, Tensor var, Tensor weight, Tensor? bias, "
        "Tensor sigma2, bool[] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("fixed_nll_train(Tensor x, Tensor mean, Tensor var, Tensor weight, Tensor? bias, Tensor sigma2) "
        "-> (Tensor, Tensor)");
  m.def("fixed_nll_train_backward(Tensor grad, Tensor coefficients, Tensor mean, Tensor var, Tensor weight, "
        "Tensor sigma2, bool[] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("precision_nll(Tensor x, Tensor mean, Tensor var, Tensor? k3, Tensor? k4, Tensor weight, "
        "Tensor? bias, Tensor precision_weight, Tensor? precision_bias, int head=0) -> Tensor");
  m.def("precision_nll_backward(Tensor grad, Tensor x, Tensor mean, Tensor var, Tensor? k3, Tensor? k4, "
        "Tensor weight, Tensor? bias, Tensor precision_weight, Tensor? precision_bias, bool[] needs, int head=0) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("precision_nll_train(Tensor x, Tensor mean, Tensor var, Tensor? k3, Tensor? k4, Tensor weight, "
        "Tensor? bias, Tensor precision_weight, Tensor? precision_bias, int head=0) -> (Tensor, Tensor)");
  m.def("precision_nll_train_backward(Tensor grad, Tensor coefficients, Tensor mean, Tensor var, Tensor? k3, "
        "Tensor? k4, Tensor weight, Tensor precision_weight, bool[] needs) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("bernoulli_logvar_nll(Tensor x, Tensor logits, Tensor weight, Tensor? bias, Tensor logvar_weight, "
        "Tensor? logvar_bias) -> Tensor");
  m.def("bernoulli_logvar_nll_backward(Tensor grad, Tensor x, Tensor logits, Tensor weight, Tensor? bias, "
        "Tensor logvar_weight, Tensor? logvar_bias, bool[] needs) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("categorical_nll(Tensor x, Tensor logits, Tensor weight, Tensor? bias, Tensor? second_weight, "
        "Tensor? second_bias, Tensor? sigma2, int head) -> Tensor");
  m.def("categorical_nll_backward(Tensor grad, Tensor x, Tensor logits, Tensor weight, Tensor? bias, "
        "Tensor? second_weight, Tensor? second_bias, Tensor? sigma2, bool[] needs, int head) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(silent_kernels, CPU, m) {
  m.impl("fixed_nll", &fixed_nll_cpu);
  m.impl("fixed_nll_backward", &fixed_nll_backward_cpu);
  m.impl("fixed_nll_train", &fixed_nll_train_cpu);
  m.impl("fixed_nll_train_backward", &fixed_nll_train_backward_cpu);
  m.impl("precision_nll", &precision_nll_cpu);
  m.impl("precision_nll_backward", &precision_nll_backward_cpu);
  m.impl("precision_nll_train", &precision_nll_train_cpu);
  m.impl("precision_nll_train_backward", &precision_nll_train_backward_cpu);
  m.impl("bernoulli_logvar_nll", &bernoulli_logvar_nll_cpu);
  m.impl("bernoulli_logvar_nll_backward", &bernoulli_logvar_nll_backward_cpu);
  m.impl("categorical_nll", &categorical_nll_cpu);
  m.impl("categorical_nll_backward", &categorical_nll_backward_cpu);
}

}  // namespace silent_kernels

// `import silent_kernels._C` only needs to load the library: an empty module.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                                      "silent_kernels compiled ops (see torch.ops.silent_kernels)",
                                      -1, nullptr};
  return PyModule_Create(&module);
}
