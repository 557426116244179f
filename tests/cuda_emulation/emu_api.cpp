// ctypes entry points of the host-emulated CUDA backend (tests only; built and loaded by
// tests/cuda_emulation/emulation.py). Scratch buffers are NaN-filled so that a kernel reading a
// slot nobody wrote shows up as a NaN result; `info` reports plan fields to the tests.
#include <limits>
#include <vector>

#include "kernels.h"

using namespace silent_kernels::cuda;

namespace {
template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
int with_dtype(int dtype, F f) {
  switch (dtype) {
    case 0: return f(Tag<float>{});
    case 1: return f(Tag<double>{});
    case 2: return f(Tag<__half>{});
    case 3: return f(Tag<__nv_bfloat16>{});
    default: return -1;
  }
}

template <typename Acc>
std::vector<Acc> scratch(int64_t n) {  // NaN-filled: reading an unwritten slot shows up
  return std::vector<Acc>(n > 0 ? n : 1, std::numeric_limits<Acc>::quiet_NaN());
}
}  // namespace

extern "C" {

void emu_set_device(int device, int sm_count) {
  sk_emul::device = device;
  sk_emul::sm_count[device] = sm_count;
}

long emu_launches() { return sk_emul::launches; }

int emu_fixed_forward(int dtype, const void* x, const void* mean, const void* var,
                      const void* weight, const void* bias, const void* sigma2, int64_t B,
                      int64_t k, int64_t d, void* loss, int64_t* info) {
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const FixedArgs<T> a{(const T*)x, (const T*)mean, (const T*)var, (const T*)weight,
                         (const T*)bias, (const T*)sigma2, nullptr, B, k, d};
    const ForwardPlan p = plan_fixed_forward(B, k, d, sizeof(T) == 8);
    info[0] = p.cfg;
    info[1] = p.pixel_tiles;
    auto ws = scratch<acc_t<T>>(p.workspace);
    return int(fixed_forward<T>(a, p, ws.data(), (T*)loss, nullptr));
  });
}

int emu_precision_forward(int dtype, const void* x, const void* mean, const void* var,
                          const void* k3, const void* k4, const void* weight, const void* bias,
                          const void* pweight, const void* pbias, int64_t B, int64_t k, int64_t d,
                          void* loss, int64_t* info, int head) {
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const PrecisionArgs<T> a{(const T*)x, (const T*)mean, (const T*)var, (const T*)k3,
                             (const T*)k4, (const T*)weight, (const T*)bias, (const T*)pweight,
                             (const T*)pbias, nullptr, B, k, d, head};
    const ForwardPlan p = plan_precision_forward(B, k, d, sizeof(T) == 8);
    info[0] = p.cfg;
    info[1] = p.pixel_tiles;
    auto ws = scratch<acc_t<T>>(p.workspace);
    return int(precision_forward<T>(a, p, ws.data(), (T*)loss, nullptr));
  });
}

// outs: x, mean, var, weight, bias, sigma2 (null = not needed)
int emu_fixed_backward(int dtype, const void* grad, const void* x, const void* mean,
                       const void* var, const void* weight, const void* bias, const void* sigma2,
                       int64_t B, int64_t k, int64_t d, void* const* outs, int64_t* info) {
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const FixedArgs<T> a{(const T*)x, (const T*)mean, (const T*)var, (const T*)weight,
                         (const T*)bias, (const T*)sigma2, (const T*)grad, B, k, d};
    const FixedNeeds n{outs[0] != nullptr, outs[1] != nullptr, outs[2] != nullptr,
                       outs[3] != nullptr, outs[4] != nullptr, outs[5] != nullptr};
    const BackwardPlan p = plan_fixed_backward(B, k, d, sizeof(T) == 8, n);
    info[0] = p.coef_cfg;
    info[1] = p.mom_split;
    info[2] = p.w_split;
    info[3] = p.nplanes;
    auto ws = scratch<acc_t<T>>(p.workspace);
    const FixedGrads<T> g{(T*)outs[0], (T*)outs[1], (T*)outs[2],
                          (T*)outs[3], (T*)outs[4], (T*)outs[5]};
    return int(fixed_backward<T>(a, p, ws.data(), g, nullptr));
  });
}

// outs: x, mean, var, k3, k4, weight, bias, pweight, pbias (null = not needed)
int emu_precision_backward(int dtype, const void* grad, const void* x, const void* mean,
                           const void* var, const void* k3, const void* k4, const void* weight,
                           const void* bias, const void* pweight, const void* pbias, int64_t B,
                           int64_t k, int64_t d, void* const* outs, int64_t* info, int head) {
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const PrecisionArgs<T> a{(const T*)x, (const T*)mean, (const T*)var, (const T*)k3,
                             (const T*)k4, (const T*)weight, (const T*)bias, (const T*)pweight,
                             (const T*)pbias, (const T*)grad, B, k, d, head};
    const PrecisionNeeds n{outs[0] != nullptr, outs[1] != nullptr, outs[2] != nullptr,
                           outs[3] != nullptr, outs[4] != nullptr, outs[5] != nullptr,
                           outs[6] != nullptr, outs[7] != nullptr, outs[8] != nullptr};
    const BackwardPlan p =
        plan_precision_backward(B, k, d, sizeof(T) == 8, k3 != nullptr, k4 != nullptr, n);
    info[0] = p.coef_cfg;
    info[1] = p.mom_split;
    info[2] = p.w_split;
    info[3] = p.nplanes;
    auto ws = scratch<acc_t<T>>(p.workspace);
    const PrecisionGrads<T> g{(T*)outs[0], (T*)outs[1], (T*)outs[2], (T*)outs[3], (T*)outs[4],
                              (T*)outs[5], (T*)outs[6], (T*)outs[7], (T*)outs[8]};
    return int(precision_backward<T>(a, p, ws.data(), g, nullptr));
  });
}

int emu_bernoulli_forward(int dtype, const void* x, const void* logits, const void* weight,
                          const void* bias, const void* lweight, const void* lbias, int64_t B,
                          int64_t k, int64_t d, void* loss, int64_t* info) {
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const BernoulliLogvarArgs<T> a{(const T*)x,       (const T*)logits, (const T*)weight,
                                   (const T*)bias,    (const T*)lweight, (const T*)lbias,
                                   nullptr,           B,                k,
                                   d};
    const BernoulliLogvarPlan p = plan_bernoulli_logvar_forward(B, k, d, sizeof(T) == 8);
    info[0] = p.pixel_tiles;
    auto ws = scratch<acc_t<T>>(p.workspace);
    return int(bernoulli_logvar_forward<T>(a, p, ws.data(), (T*)loss, nullptr));
  });
}

// outs: x, logits, weight, bias, lweight, lbias (null = not needed)
int emu_bernoulli_backward(int dtype, const void* grad, const void* x, const void* logits,
                           const void* weight, const void* bias, const void* lweight,
                           const void* lbias, int64_t B, int64_t k, int64_t d, void* const* outs,
                           int64_t* info) {
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const BernoulliLogvarArgs<T> a{(const T*)x,       (const T*)logits, (const T*)weight,
                                   (const T*)bias,    (const T*)lweight, (const T*)lbias,
                                   (const T*)grad,    B,                k,
                                   d};
    const BernoulliLogvarNeeds n{outs[0] != nullptr, outs[1] != nullptr, outs[2] != nullptr,
                                 outs[3] != nullptr, outs[4] != nullptr, outs[5] != nullptr};
    const BernoulliLogvarPlan p = plan_bernoulli_logvar_backward(B, k, d, sizeof(T) == 8, n);
    info[0] = p.pixel_tiles;
    info[1] = p.l_split;
    info[2] = p.w_split;
    info[3] = p.workspace;
    auto ws = scratch<acc_t<T>>(p.workspace);
    const BernoulliLogvarGrads<T> g{(T*)outs[0], (T*)outs[1], (T*)outs[2],
                                    (T*)outs[3], (T*)outs[4], (T*)outs[5]};
    return int(bernoulli_logvar_backward<T>(a, p, ws.data(), g, nullptr));
  });
}

// Categorical latents. inputs: x, logits, weight, bias, second_weight, second_bias, sigma2 (null =
// absent); outs likewise (null = not needed). info: plan fields.
int emu_categorical_forward(int dtype, const void* const* in, int64_t B, int64_t k, int64_t G,
                            int64_t K, int head, void* loss, int64_t* info) {
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const CategoricalArgs<T> a{(const T*)in[0], (const T*)in[1], (const T*)in[2], (const T*)in[3],
                               (const T*)in[4], (const T*)in[5], (const T*)in[6], nullptr,
                               B, k, G, K, head};
    const CategoricalPlan p = plan_categorical_forward(B, k, G, K, head, sizeof(T) == 8);
    info[0] = p.pixel_tiles;
    info[1] = p.workspace;
    auto ws = scratch<acc_t<T>>(p.workspace);
    return int(categorical_forward<T>(a, p, ws.data(), (T*)loss, nullptr));
  });
}

int emu_categorical_backward(int dtype, const void* grad, const void* const* in, int64_t B,
                             int64_t k, int64_t G, int64_t K, int head, void* const* outs,
                             int64_t* info) {
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const CategoricalArgs<T> a{(const T*)in[0], (const T*)in[1], (const T*)in[2], (const T*)in[3],
                               (const T*)in[4], (const T*)in[5], (const T*)in[6], (const T*)grad,
                               B, k, G, K, head};
    const CategoricalNeeds n{outs[0] != nullptr, outs[1] != nullptr, outs[2] != nullptr,
                             outs[3] != nullptr, outs[4] != nullptr, outs[5] != nullptr,
                             outs[6] != nullptr};
    const CategoricalPlan p = plan_categorical_backward(B, k, G, K, head, sizeof(T) == 8, n);
    info[0] = p.l_split;
    info[1] = p.w_split;
    info[2] = p.nplanes;
    info[3] = p.workspace;
    info[4] = p.run_coef;
    auto ws = scratch<acc_t<T>>(p.workspace);
    const CategoricalGrads<T> g{(T*)outs[0], (T*)outs[1], (T*)outs[2], (T*)outs[3],
                                (T*)outs[4], (T*)outs[5], (T*)outs[6]};
    return int(categorical_backward<T>(a, p, ws.data(), g, nullptr));
  });
}

}  // extern "C"
