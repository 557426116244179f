// Host program of tests/test_cuda_compile.py: links against the nvcc objects of every
// csrc/cuda/*.cu (so a missing template instantiation fails the link) and checks the plans of
// kernels.h on the host (no device: the multiprocessor count falls back to 1), for large,
// empty and degenerate shapes: slot bookkeeping, scratch layout, split factors.
#include <cstdio>
#include <vector>
#include "cuda/kernels.h"
using namespace silent_kernels::cuda;
static int fails = 0, checked = 0;
#define CHECK(c) do { if (!(c)) { ++fails; std::printf("FAIL line %d: %s (B=%lld k=%lld d=%lld)\n", \
    __LINE__, #c, (long long)B, (long long)k, (long long)d); } } while (0)

static void check_split(int64_t split, int64_t chunk, int64_t red, int64_t B, int64_t k, int64_t d) {
  CHECK(split >= 1 && split <= 65535 && chunk >= 1);
  if (red > 0) { CHECK(split * chunk >= red); CHECK((split - 1) * chunk < red); }
}

static void check_backward(const BackwardPlan& p, int64_t B, int64_t k, int64_t d) {
  ++checked;
  std::vector<int> seen(16, 0);
  for (int q = 0; q < kNumPlanes; ++q) if (p.slots.slot[q] >= 0) {
    CHECK(p.slots.slot[q] < p.nplanes); seen[p.slots.slot[q]]++; }
  for (int q = 0; q < p.nplanes; ++q) CHECK(seen[q] == 1);
  std::vector<int> cs(4, 0);
  for (int q = 0; q < kNumColSums; ++q) if (p.colsums.slot[q] >= 0) {
    CHECK(p.colsums.slot[q] < p.ncolsums); cs[p.colsums.slot[q]]++; }
  for (int q = 0; q < p.ncolsums; ++q) CHECK(cs[q] == 1);
  std::vector<int> kinds(4, 0);
  for (int q = 0; q < p.nkinds; ++q) { CHECK(p.kinds[q] >= 0 && p.kinds[q] < 4); kinds[p.kinds[q] & 3]++; }
  for (int q = 0; q < 4; ++q) CHECK(kinds[q] <= 1);
  CHECK(p.coef_row_tiles >= (B > 0 ? 1 : 0));
  CHECK(p.off_planes == 0);
  CHECK(p.off_colsum >= p.off_planes + p.nplanes * B * k);
  CHECK(p.off_mom >= p.off_colsum + p.ncolsums * p.coef_row_tiles * k);
  CHECK(p.off_w >= p.off_mom + (p.nkinds ? p.mom_split * p.nkinds * B * d : 0));
  CHECK(p.off_colw >= p.off_w + (p.nwout ? p.w_split * p.nwout * k * d : 0));
  CHECK(p.off_r >= p.off_colw + (p.need_colw ? d : 0));
  CHECK(p.off_tmp >= p.off_r + (p.need_r ? d : 0));
  CHECK(p.workspace >= p.off_tmp + k);
  CHECK(p.nwout == int(p.need_a) + int(p.need_c));
  check_split(p.mom_split, p.mom_chunk, k, B, k, d);
  check_split(p.w_split, p.w_chunk, B, B, k, d);
}

int main() {
  const int64_t shapes[][3] = {{64, 784, 200}, {1, 1, 1}, {0, 5, 3}, {5, 0, 3}, {5, 3, 0},
                               {3000000, 784, 1000}, {33, 1000003, 7}, {70000, 70000, 2}};
  for (const auto& s : shapes) {
    const int64_t B = s[0], k = s[1], d = s[2];
    for (bool dbl : {false, true}) {
      const ForwardPlan f = plan_fixed_forward(B, k, d, dbl);
      ++checked;
      CHECK(f.cfg == 0 || f.cfg == 1);
      CHECK(f.pixel_tiles >= (k > 0 ? 1 : 0) && f.pixel_tiles <= k);
      CHECK(f.partial_rows == f.pixel_tiles + 1);
      CHECK(f.off_colw >= f.partial_rows * B && f.workspace >= f.off_colw + d);
      const ForwardPlan p = plan_precision_forward(B, k, d, dbl);
      ++checked;
      CHECK(p.partial_rows == p.pixel_tiles && p.workspace >= p.partial_rows * B);
      for (int mask = 0; mask < 64; ++mask) {
        const FixedNeeds n{bool(mask & 1), bool(mask & 2), bool(mask & 4), bool(mask & 8),
                           bool(mask & 16), bool(mask & 32)};
        const BackwardPlan b = plan_fixed_backward(B, k, d, dbl, n);
        check_backward(b, B, k, d);
        CHECK(b.need_a == n.weight && !b.need_c);
        CHECK((b.colsums.slot[kColUbar] >= 0) == n.bias);
        CHECK((b.colsums.slot[kColDSigma2] >= 0) == n.sigma2);
        CHECK(b.need_colw == n.var && b.need_r == (n.weight || n.sigma2));
      }
      const BernoulliLogvarPlan bf = plan_bernoulli_logvar_forward(B, k, d, dbl);
      ++checked;
      CHECK(bf.pixel_tiles >= (k > 0 ? 1 : 0) && bf.pixel_tiles <= k);
      CHECK(bf.workspace >= bf.pixel_tiles * B);
      for (int mask = 0; mask < 64; ++mask) {
        const BernoulliLogvarNeeds n{bool(mask & 1), bool(mask & 2), bool(mask & 4), bool(mask & 8),
                                     bool(mask & 16), bool(mask & 32)};
        const BernoulliLogvarPlan b = plan_bernoulli_logvar_backward(B, k, d, dbl, n);
        ++checked;
        CHECK(b.run_coef == (mask != 0));
        CHECK(b.planes == (n.logits || n.weight || n.lweight));
        CHECK((b.colsums.slot[kColBias] >= 0) == n.bias);
        CHECK((b.colsums.slot[kColLbias] >= 0) == n.lbias);
        CHECK(b.ncolsums == int(n.bias) + int(n.lbias));
        if (n.bias && n.lbias) CHECK(b.colsums.slot[kColBias] != b.colsums.slot[kColLbias]);
        CHECK(b.need_logits == n.logits && b.need_a == n.weight && b.need_h == n.lweight);
        CHECK(b.nwout == int(n.weight) + int(n.lweight));
        CHECK(b.pixel_tiles == bf.pixel_tiles && b.coef_row_tiles >= (B > 0 ? 1 : 0));
        CHECK(b.off_planes == 0);
        CHECK(b.off_colsum >= b.off_planes + (b.planes ? kNumBernoulliPlanes * B * k : 0));
        CHECK(b.off_logits >= b.off_colsum + b.ncolsums * b.coef_row_tiles * k);
        CHECK(b.off_w >= b.off_logits + (b.need_logits ? b.l_split * B * d : 0));
        CHECK(b.workspace >= b.off_w + (b.nwout ? b.w_split * b.nwout * k * d : 0));
        check_split(b.l_split, b.l_chunk, k, B, k, d);
        check_split(b.w_split, b.w_chunk, B, B, k, d);
      }
      for (int mask = 0; mask < 512; mask += 7) {
        for (int lat = 0; lat < 4; ++lat) {
          const bool k3 = lat & 1, k4 = lat & 2;
          const PrecisionNeeds n{bool(mask & 1), bool(mask & 2), bool(mask & 4), bool(mask & 8),
                                 bool(mask & 16), bool(mask & 32), bool(mask & 64),
                                 bool(mask & 128), bool(mask & 256)};
          const BackwardPlan b = plan_precision_backward(B, k, d, dbl, k3, k4, n);
          check_backward(b, B, k, d);
          const bool any_w = n.weight || n.pweight;
          CHECK((b.slots.slot[kUbar] >= 0) == (n.mean || any_w));
          CHECK((b.slots.slot[kSaa] >= 0) == (n.var || any_w));
          CHECK((b.slots.slot[kTacc] >= 0) == (k3 && (n.k3 || any_w)));
          CHECK((b.slots.slot[kQ] >= 0) == (k4 && (n.k4 || any_w)));
          CHECK(b.nkinds == int(n.mean) + int(n.var) + int(k3 && n.k3) + int(k4 && n.k4));
          CHECK(b.need_a == n.weight && b.need_c == n.pweight);
        }
      }
    }
  }
  // categorical plans: shapes (B, k, G, K), every head, every subset of the 7 gradients
  const int64_t cat_shapes[][4] = {{64, 784, 20, 10}, {1, 1, 1, 1}, {0, 5, 3, 4}, {5, 0, 3, 4}, {5, 3, 0, 4},
                                   {5, 3, 4, 0}, {3000000, 784, 100, 10}, {33, 1000003, 7, 3}, {70000, 70000, 1, 2}};
  for (const auto& s : cat_shapes) {
    const int64_t B = s[0], k = s[1], G = s[2], K = s[3], d = G * K;
    for (bool dbl : {false, true})
      for (int head : {0, 2, 3}) {
        const CategoricalPlan f = plan_categorical_forward(B, k, G, K, head, dbl);
        ++checked;
        CHECK(f.head == head && f.nplanes == (head == 3 ? 2 : head == 2 ? 4 : 10));
        CHECK(f.pixel_tiles >= (k > 0 ? 1 : 0) && f.pixel_tiles <= k);
        CHECK(f.off_prob == 0 && f.off_partial >= B * d && f.workspace >= f.off_partial + f.pixel_tiles * B);
        for (int mask = 0; mask < 128; ++mask) {
          CategoricalNeeds n{bool(mask & 1), bool(mask & 2), bool(mask & 4), bool(mask & 8),
                             bool(mask & 16), bool(mask & 32), bool(mask & 64)};
          if (head == 3) n.second_weight = n.second_bias = false;  // absent for the fixed head
          else n.sigma2 = false;
          const CategoricalPlan b = plan_categorical_backward(B, k, G, K, head, dbl, n);
          ++checked;
          const bool second = head == 3 ? n.sigma2 : n.second_bias;
          CHECK(b.run_coef == (n.x || n.logits || n.weight || n.bias || n.second_weight || second));
          CHECK(b.planes == (n.logits || n.weight || n.second_weight));
          CHECK((b.colsums.slot[kCatColBias] >= 0) == n.bias);
          CHECK((b.colsums.slot[kCatColSecond] >= 0) == second);
          CHECK(b.ncolsums == int(n.bias) + int(second));
          if (n.bias && second) CHECK(b.colsums.slot[kCatColBias] != b.colsums.slot[kCatColSecond]);
          CHECK(b.need_logits == n.logits && b.need_a == n.weight && b.need_c == n.second_weight);
          CHECK(b.nwout == int(n.weight) + int(n.second_weight));
          CHECK(b.pixel_tiles == f.pixel_tiles && b.row_tiles >= (B > 0 ? 1 : 0));
          CHECK(b.off_prob == 0 && b.off_planes >= B * d);
          CHECK(b.off_colsum >= b.off_planes + (b.planes ? b.nplanes * B * k : 0));
          CHECK(b.off_logits >= b.off_colsum + b.ncolsums * b.row_tiles * k);
          CHECK(b.off_w >= b.off_logits + (b.need_logits ? b.l_split * B * d : 0));
          CHECK(b.workspace >= b.off_w + (b.nwout ? b.w_split * b.nwout * k * d : 0));
          check_split(b.l_split, b.l_chunk, k, B, k, d);
          check_split(b.w_split, b.w_chunk, B, B, k, d);
        }
      }
  }
  {  // an empty batch enqueues nothing; a bad head or argument set is refused before any launch
    const int64_t B = 0, k = 5, d = 3;
    const float dummy = 0.f;
    CategoricalArgs<float> ca{nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, &dummy, nullptr, 0, 5, 1, 3, 3};
    CHECK(categorical_forward<float>(ca, plan_categorical_forward(0, 5, 1, 3, 3, false), nullptr, nullptr,
                                     nullptr) == cudaSuccess);
    for (int head : {-1, 0, 1, 2, 4}) {
      ca.head = head;
      CHECK(categorical_forward<float>(ca, plan_categorical_forward(0, 5, 1, 3, head, false), nullptr,
                                       nullptr, nullptr) == cudaErrorInvalidValue);
    }
    ca.head = 3;
    CHECK(categorical_forward<float>(ca, plan_categorical_forward(0, 5, 1, 3, 0, false), nullptr, nullptr,
                                     nullptr) == cudaErrorInvalidValue);  // plan made for another head
  }
  // an empty batch enqueues nothing (returns before touching the device)
  const FixedArgs<float> fa{nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 5, 3};
  const ForwardPlan fp = plan_fixed_forward(0, 5, 3, false);
  const int64_t B = 0, k = 5, d = 3;
  CHECK(fixed_forward<float>(fa, fp, nullptr, nullptr, nullptr) == cudaSuccess);
  const BernoulliLogvarArgs<float> ba{nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 5, 3};
  CHECK(bernoulli_logvar_forward<float>(ba, plan_bernoulli_logvar_forward(0, 5, 3, false), nullptr,
                                        nullptr, nullptr) == cudaSuccess);
  // an unknown head, or an exact head with k3 / k4, is refused before any launch
  PrecisionArgs<float> pa{nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                          nullptr, nullptr, 0, 5, 3};
  const ForwardPlan pp = plan_precision_forward(0, 5, 3, false);
  for (int head = 0; head < kNumPrecisionHeads; ++head) {
    pa.head = head;
    CHECK(precision_forward<float>(pa, pp, nullptr, nullptr, nullptr) == cudaSuccess);
  }
  pa.head = 3;
  CHECK(precision_forward<float>(pa, pp, nullptr, nullptr, nullptr) == cudaErrorInvalidValue);
  const float dummy = 0.f;
  pa.k4 = &dummy;
  pa.head = 1;
  CHECK(precision_forward<float>(pa, pp, nullptr, nullptr, nullptr) == cudaErrorInvalidValue);
  pa.head = 0;
  CHECK(precision_forward<float>(pa, pp, nullptr, nullptr, nullptr) == cudaSuccess);
  std::printf("checked %d plans, %d failures\n", checked, fails);
  return fails ? 1 : 0;
}
