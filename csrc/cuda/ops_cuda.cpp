// Torch glue of the CUDA kernels: registers CUDA implementations of eight of the ops defined in
// csrc/ops.cpp (TORCH_LIBRARY(silent_kernels)): fixed_nll, precision_nll (head 0 Taylor,
// 1 exact log term, 2 Gaussian log-variance), bernoulli_logvar_nll, categorical_nll (head 3
// fixed, 0 Taylor precision, 2 log-variance) and their backwards (precision_nll_train has no
// CUDA kernels yet). Per call: argument
// checks (op_checks.h, before any allocation or launch), contiguous inputs, the device guard,
// the current stream, a plan and one scratch buffer from the caching allocator, the launchers
// of kernels.h (torch-free), and a check of the CUDA error they return.
//
// setup.py compiles csrc/cuda/*.cpp on CPU-only builds too, so everything is behind WITH_CUDA.
#ifdef WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cuda/kernels.h"
#include "op_checks.h"

namespace silent_kernels {
namespace {

namespace sk = silent_kernels::cuda;

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T the CUDA element type of `t` (checked float dtypes only).
template <typename F>
void dispatch_dtype(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: f(TypeTag<float>{}); break;
    case at::kDouble: f(TypeTag<double>{}); break;
    case at::kHalf: f(TypeTag<__half>{}); break;  // layout-compatible with at::Half
    case at::kBFloat16: f(TypeTag<__nv_bfloat16>{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor contiguous_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

template <typename T>
const T* cptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const T*>(t.data_ptr()) : nullptr;
}

template <typename T>
T* mptr(at::Tensor& t, bool needed) {
  return needed ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// Runs launch(TypeTag<T>{}, scratch, stream) -> cudaError_t for x's element type T on the current
// stream, with `workspace` accumulators (acc_t<T>) of scratch from the caching allocator, and checks
// the error the launcher returns.
template <typename Launch>
void launch_with_scratch(const char* op, const at::Tensor& x, int64_t workspace, Launch&& launch) {
  at::Tensor scratch = at::empty({workspace}, x.options().dtype(acc_dtype(x.scalar_type())));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_dtype(x.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_launch(launch(tag, reinterpret_cast<sk::acc_t<T>*>(scratch.data_ptr()), stream), op);
  });
}

const std::vector<int64_t> kNoShape{0};  // shape (0,) of the gradient of an absent input

// The gradient output of an input: its shape where needed, else an empty (0,) tensor.
at::Tensor grad_output(bool needed, at::IntArrayRef shape, const at::TensorOptions& opts) {
  return needed ? at::empty(shape, opts) : at::empty({0}, opts);
}

// ------------------------------------------------------------------------------ fixed head
at::Tensor fixed_nll_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                          const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          const at::Tensor& sigma2) {
  const char* op = "silent_kernels::fixed_nll";
  check_fixed_inputs(op, c10::DeviceType::CUDA, x, mean, var, weight, bias, sigma2);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), mc = mean.contiguous(), vc = var.contiguous(),
                   wc = weight.contiguous(), s2c = sigma2.contiguous();
  const at::Tensor bc = contiguous_or_undefined(bias);
  const int64_t B = x.size(0), k = x.size(1), d = mean.size(1);
  at::Tensor loss = at::empty({B}, x.options());
  if (B == 0) return loss;

  const sk::ForwardPlan plan = sk::plan_fixed_forward(B, k, d, x.scalar_type() == at::kDouble);
  launch_with_scratch(op, x, plan.workspace, [&](auto tag, auto* ws, cudaStream_t stream) {
    using T = typename decltype(tag)::type;
    const sk::FixedArgs<T> a{cptr<T>(xc), cptr<T>(mc), cptr<T>(vc), cptr<T>(wc), cptr<T>(bc),
                             cptr<T>(s2c), nullptr, B, k, d};
    return sk::fixed_forward<T>(a, plan, ws, reinterpret_cast<T*>(loss.data_ptr()), stream);
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fixed_nll_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                        const at::Tensor& var, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& sigma2,
                        const c10::List<bool>& needs_list) {
  const char* op = "silent_kernels::fixed_nll_backward";
  check_fixed_inputs(op, c10::DeviceType::CUDA, x, mean, var, weight, bias, sigma2);
  const std::vector<bool> needs = check_backward_arguments(op, grad, x, needs_list, 6);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor bc = contiguous_or_undefined(bias);
  const sk::FixedNeeds n{needs[0], needs[1], needs[2], needs[3], needs[4] && bc.defined(),
                         needs[5]};
  const auto opts = x.options();
  at::Tensor gx = grad_output(n.x, x.sizes(), opts), gm = grad_output(n.mean, mean.sizes(), opts),
             gv = grad_output(n.var, var.sizes(), opts),
             gw = grad_output(n.weight, weight.sizes(), opts),
             gb = grad_output(n.bias, bc.defined() ? bc.sizes() : at::IntArrayRef(kNoShape), opts),
             gs = grad_output(n.sigma2, sigma2.sizes(), opts);
  if (!(n.x || n.mean || n.var || n.weight || n.bias || n.sigma2)) return {gx, gm, gv, gw, gb, gs};

  const at::Tensor gc = grad.contiguous(), xc = x.contiguous(), mc = mean.contiguous(),
                   vc = var.contiguous(), wc = weight.contiguous(), s2c = sigma2.contiguous();
  const int64_t B = x.size(0), k = x.size(1), d = mean.size(1);
  const sk::BackwardPlan plan =
      sk::plan_fixed_backward(B, k, d, x.scalar_type() == at::kDouble, n);
  launch_with_scratch(op, x, plan.workspace, [&](auto tag, auto* ws, cudaStream_t stream) {
    using T = typename decltype(tag)::type;
    const sk::FixedArgs<T> a{cptr<T>(xc), cptr<T>(mc),  cptr<T>(vc), cptr<T>(wc),
                             cptr<T>(bc), cptr<T>(s2c), cptr<T>(gc), B, k, d};
    const sk::FixedGrads<T> out{mptr<T>(gx, n.x),      mptr<T>(gm, n.mean),
                                mptr<T>(gv, n.var),    mptr<T>(gw, n.weight),
                                mptr<T>(gb, n.bias),   mptr<T>(gs, n.sigma2)};
    return sk::fixed_backward<T>(a, plan, ws, out, stream);
  });
  return {gx, gm, gv, gw, gb, gs};
}

// ------------------------------------------------------------------ learnable precision head
at::Tensor precision_nll_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                              const c10::optional<at::Tensor>& k3,
                              const c10::optional<at::Tensor>& k4, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias,
                              const at::Tensor& precision_weight,
                              const c10::optional<at::Tensor>& precision_bias, int64_t head) {
  const char* op = "silent_kernels::precision_nll";
  check_precision_head_inputs(op, c10::DeviceType::CUDA, x, mean, var, k3, k4, weight, bias,
                              precision_weight, precision_bias, head);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), mc = mean.contiguous(), vc = var.contiguous(),
                   wc = weight.contiguous(), pwc = precision_weight.contiguous();
  const at::Tensor k3c = contiguous_or_undefined(k3), k4c = contiguous_or_undefined(k4),
                   bc = contiguous_or_undefined(bias), pbc = contiguous_or_undefined(precision_bias);
  const int64_t B = x.size(0), k = x.size(1), d = mean.size(1);
  at::Tensor loss = at::empty({B}, x.options());
  if (B == 0) return loss;

  const sk::ForwardPlan plan =
      sk::plan_precision_forward(B, k, d, x.scalar_type() == at::kDouble);
  launch_with_scratch(op, x, plan.workspace, [&](auto tag, auto* ws, cudaStream_t stream) {
    using T = typename decltype(tag)::type;
    const sk::PrecisionArgs<T> a{cptr<T>(xc),  cptr<T>(mc),  cptr<T>(vc),
                                 cptr<T>(k3c), cptr<T>(k4c), cptr<T>(wc),
                                 cptr<T>(bc),  cptr<T>(pwc), cptr<T>(pbc),
                                 nullptr,      B,            k,
                                 d,            static_cast<int>(head)};
    return sk::precision_forward<T>(a, plan, ws, reinterpret_cast<T*>(loss.data_ptr()), stream);
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
precision_nll_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                            const at::Tensor& var, const c10::optional<at::Tensor>& k3,
                            const c10::optional<at::Tensor>& k4, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias,
                            const at::Tensor& precision_weight,
                            const c10::optional<at::Tensor>& precision_bias,
                            const c10::List<bool>& needs_list, int64_t head) {
  const char* op = "silent_kernels::precision_nll_backward";
  check_precision_head_inputs(op, c10::DeviceType::CUDA, x, mean, var, k3, k4, weight, bias,
                              precision_weight, precision_bias, head);
  const std::vector<bool> needs = check_backward_arguments(op, grad, x, needs_list, 9);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor k3c = contiguous_or_undefined(k3), k4c = contiguous_or_undefined(k4),
                   bc = contiguous_or_undefined(bias), pbc = contiguous_or_undefined(precision_bias);
  // an absent optional input gets no gradient
  const sk::PrecisionNeeds n{needs[0], needs[1], needs[2], needs[3] && k3c.defined(),
                             needs[4] && k4c.defined(), needs[5], needs[6] && bc.defined(),
                             needs[7], needs[8] && pbc.defined()};
  const auto opts = x.options();
  const at::IntArrayRef none(kNoShape);
  at::Tensor gx = grad_output(n.x, x.sizes(), opts), gm = grad_output(n.mean, mean.sizes(), opts),
             gv = grad_output(n.var, var.sizes(), opts),
             g3 = grad_output(n.k3, n.k3 ? k3c.sizes() : none, opts),
             g4 = grad_output(n.k4, n.k4 ? k4c.sizes() : none, opts),
             gw = grad_output(n.weight, weight.sizes(), opts),
             gb = grad_output(n.bias, n.bias ? bc.sizes() : none, opts),
             gpw = grad_output(n.pweight, precision_weight.sizes(), opts),
             gpb = grad_output(n.pbias, n.pbias ? pbc.sizes() : none, opts);
  if (!(n.x || n.mean || n.var || n.k3 || n.k4 || n.weight || n.bias || n.pweight || n.pbias))
    return {gx, gm, gv, g3, g4, gw, gb, gpw, gpb};

  const at::Tensor gc = grad.contiguous(), xc = x.contiguous(), mc = mean.contiguous(),
                   vc = var.contiguous(), wc = weight.contiguous(),
                   pwc = precision_weight.contiguous();
  const int64_t B = x.size(0), k = x.size(1), d = mean.size(1);
  const sk::BackwardPlan plan = sk::plan_precision_backward(
      B, k, d, x.scalar_type() == at::kDouble, k3c.defined(), k4c.defined(), n);
  launch_with_scratch(op, x, plan.workspace, [&](auto tag, auto* ws, cudaStream_t stream) {
    using T = typename decltype(tag)::type;
    const sk::PrecisionArgs<T> a{cptr<T>(xc),  cptr<T>(mc),  cptr<T>(vc),
                                 cptr<T>(k3c), cptr<T>(k4c), cptr<T>(wc),
                                 cptr<T>(bc),  cptr<T>(pwc), cptr<T>(pbc),
                                 cptr<T>(gc),  B,            k,
                                 d,            static_cast<int>(head)};
    const sk::PrecisionGrads<T> out{mptr<T>(gx, n.x),       mptr<T>(gm, n.mean),
                                    mptr<T>(gv, n.var),     mptr<T>(g3, n.k3),
                                    mptr<T>(g4, n.k4),      mptr<T>(gw, n.weight),
                                    mptr<T>(gb, n.bias),    mptr<T>(gpw, n.pweight),
                                    mptr<T>(gpb, n.pbias)};
    return sk::precision_backward<T>(a, plan, ws, out, stream);
  });
  return {gx, gm, gv, g3, g4, gw, gb, gpw, gpb};
}


// --------------------------------------------------------- log-variance head, Bernoulli latents
at::Tensor bernoulli_logvar_nll_cuda(const at::Tensor& x, const at::Tensor& logits,
                                     const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                     const at::Tensor& logvar_weight,
                                     const c10::optional<at::Tensor>& logvar_bias) {
  const char* op = "silent_kernels::bernoulli_logvar_nll";
  check_bernoulli_logvar_inputs(op, c10::DeviceType::CUDA, x, logits, weight, bias, logvar_weight,
                                logvar_bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), lc = logits.contiguous(), wc = weight.contiguous(),
                   hc = logvar_weight.contiguous();
  const at::Tensor bc = contiguous_or_undefined(bias), h0c = contiguous_or_undefined(logvar_bias);
  const int64_t B = x.size(0), k = x.size(1), d = logits.size(1);
  at::Tensor loss = at::empty({B}, x.options());
  if (B == 0) return loss;

  const sk::BernoulliLogvarPlan plan =
      sk::plan_bernoulli_logvar_forward(B, k, d, x.scalar_type() == at::kDouble);
  launch_with_scratch(op, x, plan.workspace, [&](auto tag, auto* ws, cudaStream_t stream) {
    using T = typename decltype(tag)::type;
    const sk::BernoulliLogvarArgs<T> a{cptr<T>(xc), cptr<T>(lc),  cptr<T>(wc), cptr<T>(bc),
                                       cptr<T>(hc), cptr<T>(h0c), nullptr,     B,
                                       k,           d};
    return sk::bernoulli_logvar_forward<T>(a, plan, ws, reinterpret_cast<T*>(loss.data_ptr()), stream);
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bernoulli_logvar_nll_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                   const at::Tensor& logits, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& bias,
                                   const at::Tensor& logvar_weight,
                                   const c10::optional<at::Tensor>& logvar_bias,
                                   const c10::List<bool>& needs_list) {
  const char* op = "silent_kernels::bernoulli_logvar_nll_backward";
  check_bernoulli_logvar_inputs(op, c10::DeviceType::CUDA, x, logits, weight, bias, logvar_weight,
                                logvar_bias);
  const std::vector<bool> needs = check_backward_arguments(op, grad, x, needs_list, 6);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor bc = contiguous_or_undefined(bias), h0c = contiguous_or_undefined(logvar_bias);
  const sk::BernoulliLogvarNeeds n{needs[0], needs[1], needs[2], needs[3] && bc.defined(),
                                   needs[4], needs[5] && h0c.defined()};
  const auto opts = x.options();
  const at::IntArrayRef none(kNoShape);
  at::Tensor gx = grad_output(n.x, x.sizes(), opts),
             gl = grad_output(n.logits, logits.sizes(), opts),
             gw = grad_output(n.weight, weight.sizes(), opts),
             gb = grad_output(n.bias, n.bias ? bc.sizes() : none, opts),
             gh = grad_output(n.lweight, logvar_weight.sizes(), opts),
             gh0 = grad_output(n.lbias, n.lbias ? h0c.sizes() : none, opts);
  if (!(n.x || n.logits || n.weight || n.bias || n.lweight || n.lbias))
    return {gx, gl, gw, gb, gh, gh0};

  const at::Tensor gc = grad.contiguous(), xc = x.contiguous(), lc = logits.contiguous(),
                   wc = weight.contiguous(), hc = logvar_weight.contiguous();
  const int64_t B = x.size(0), k = x.size(1), d = logits.size(1);
  const sk::BernoulliLogvarPlan plan =
      sk::plan_bernoulli_logvar_backward(B, k, d, x.scalar_type() == at::kDouble, n);
  launch_with_scratch(op, x, plan.workspace, [&](auto tag, auto* ws, cudaStream_t stream) {
    using T = typename decltype(tag)::type;
    const sk::BernoulliLogvarArgs<T> a{cptr<T>(xc), cptr<T>(lc),  cptr<T>(wc), cptr<T>(bc),
                                       cptr<T>(hc), cptr<T>(h0c), cptr<T>(gc), B,
                                       k,           d};
    const sk::BernoulliLogvarGrads<T> out{mptr<T>(gx, n.x),      mptr<T>(gl, n.logits),
                                          mptr<T>(gw, n.weight), mptr<T>(gb, n.bias),
                                          mptr<T>(gh, n.lweight), mptr<T>(gh0, n.lbias)};
    return sk::bernoulli_logvar_backward<T>(a, plan, ws, out, stream);
  });
  return {gx, gl, gw, gb, gh, gh0};
}

// ------------------------------------------------------------------- categorical latents
// head 3 fixed (sigma2), 0 learnable precision with the Taylor log term, 2 log-variance.
at::Tensor categorical_nll_cuda(const at::Tensor& x, const at::Tensor& logits, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias,
                                const c10::optional<at::Tensor>& second_weight,
                                const c10::optional<at::Tensor>& second_bias,
                                const c10::optional<at::Tensor>& sigma2, int64_t head) {
  const char* op = "silent_kernels::categorical_nll";
  check_categorical_inputs(op, c10::DeviceType::CUDA, x, logits, weight, bias, second_weight, second_bias,
                           sigma2, head);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), lc = logits.contiguous(), wc = weight.contiguous();
  const at::Tensor bc = contiguous_or_undefined(bias), w2c = contiguous_or_undefined(second_weight),
                   b2c = contiguous_or_undefined(second_bias), s2c = contiguous_or_undefined(sigma2);
  const int64_t B = x.size(0), k = x.size(1), G = logits.size(1), K = logits.size(2);
  at::Tensor loss = at::empty({B}, x.options());
  if (B == 0) return loss;

  const sk::CategoricalPlan plan =
      sk::plan_categorical_forward(B, k, G, K, static_cast<int>(head), x.scalar_type() == at::kDouble);
  launch_with_scratch(op, x, plan.workspace, [&](auto tag, auto* ws, cudaStream_t stream) {
    using T = typename decltype(tag)::type;
    const sk::CategoricalArgs<T> a{cptr<T>(xc),  cptr<T>(lc),  cptr<T>(wc), cptr<T>(bc),
                                   cptr<T>(w2c), cptr<T>(b2c), cptr<T>(s2c), nullptr,
                                   B,            k,            G,            K,
                                   static_cast<int>(head)};
    return sk::categorical_forward<T>(a, plan, ws, reinterpret_cast<T*>(loss.data_ptr()), stream);
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
categorical_nll_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& logits,
                              const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              const c10::optional<at::Tensor>& second_weight,
                              const c10::optional<at::Tensor>& second_bias,
                              const c10::optional<at::Tensor>& sigma2, const c10::List<bool>& needs_list,
                              int64_t head) {
  const char* op = "silent_kernels::categorical_nll_backward";
  check_categorical_inputs(op, c10::DeviceType::CUDA, x, logits, weight, bias, second_weight, second_bias,
                           sigma2, head);
  const std::vector<bool> needs = check_backward_arguments(op, grad, x, needs_list, 7);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor bc = contiguous_or_undefined(bias), w2c = contiguous_or_undefined(second_weight),
                   b2c = contiguous_or_undefined(second_bias), s2c = contiguous_or_undefined(sigma2);
  // an absent optional input gets no gradient
  const sk::CategoricalNeeds n{needs[0], needs[1], needs[2], needs[3] && bc.defined(),
                               needs[4] && w2c.defined(), needs[5] && b2c.defined(),
                               needs[6] && s2c.defined()};
  const auto opts = x.options();
  const at::IntArrayRef none(kNoShape);
  at::Tensor gx = grad_output(n.x, x.sizes(), opts), gl = grad_output(n.logits, logits.sizes(), opts),
             gw = grad_output(n.weight, weight.sizes(), opts),
             gb = grad_output(n.bias, n.bias ? bc.sizes() : none, opts),
             gw2 = grad_output(n.second_weight, n.second_weight ? w2c.sizes() : none, opts),
             gb2 = grad_output(n.second_bias, n.second_bias ? b2c.sizes() : none, opts),
             gs = grad_output(n.sigma2, n.sigma2 ? s2c.sizes() : none, opts);
  if (!(n.x || n.logits || n.weight || n.bias || n.second_weight || n.second_bias || n.sigma2))
    return {gx, gl, gw, gb, gw2, gb2, gs};

  const at::Tensor gc = grad.contiguous(), xc = x.contiguous(), lc = logits.contiguous(),
                   wc = weight.contiguous();
  const int64_t B = x.size(0), k = x.size(1), G = logits.size(1), K = logits.size(2);
  const sk::CategoricalPlan plan = sk::plan_categorical_backward(
      B, k, G, K, static_cast<int>(head), x.scalar_type() == at::kDouble, n);
  launch_with_scratch(op, x, plan.workspace, [&](auto tag, auto* ws, cudaStream_t stream) {
    using T = typename decltype(tag)::type;
    const sk::CategoricalArgs<T> a{cptr<T>(xc),  cptr<T>(lc),  cptr<T>(wc), cptr<T>(bc),
                                   cptr<T>(w2c), cptr<T>(b2c), cptr<T>(s2c), cptr<T>(gc),
                                   B,            k,            G,            K,
                                   static_cast<int>(head)};
    const sk::CategoricalGrads<T> out{mptr<T>(gx, n.x),      mptr<T>(gl, n.logits),
                                      mptr<T>(gw, n.weight), mptr<T>(gb, n.bias),
                                      mptr<T>(gw2, n.second_weight), mptr<T>(gb2, n.second_bias),
                                      mptr<T>(gs, n.sigma2)};
    return sk::categorical_backward<T>(a, plan, ws, out, stream);
  });
  return {gx, gl, gw, gb, gw2, gb2, gs};
}

}  // namespace

TORCH_LIBRARY_IMPL(silent_kernels, CUDA, m) {
  m.impl("fixed_nll", &fixed_nll_cuda);
  m.impl("fixed_nll_backward", &fixed_nll_backward_cuda);
  m.impl("precision_nll", &precision_nll_cuda);
  m.impl("precision_nll_backward", &precision_nll_backward_cuda);
  m.impl("bernoulli_logvar_nll", &bernoulli_logvar_nll_cuda);
  m.impl("bernoulli_logvar_nll_backward", &bernoulli_logvar_nll_backward_cuda);
  m.impl("categorical_nll", &categorical_nll_cuda);
  m.impl("categorical_nll_backward", &categorical_nll_backward_cuda);
}

}  // namespace silent_kernels

#endif  // WITH_CUDA
