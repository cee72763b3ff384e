// C++ tests of the radix helpers and the CPU ops, called through the dispatcher
// (registrations come from the bip_fast_ops library). Run by ctest; exit code != 0 on failure.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

#include "common/radix.h"

namespace {

int g_failures = 0;

#define EXPECT(cond)                                                         \
  do {                                                                      \
    if (!(cond)) {                                                          \
      std::fprintf(stderr, "%s:%d: EXPECT failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                         \
    }                                                                       \
  } while (0)

using bip_fast::radix::key_of;

void test_radix_key() {
  EXPECT(key_of(0.0f) == 0u);
  EXPECT(key_of(-0.0f) == 0u);
  EXPECT(key_of(1.0f) == 0x3f800000u);
  EXPECT(key_of(-1.0f) == 0x3f800000u);
  EXPECT(key_of(2.0f) > key_of(1.5f));
  EXPECT(key_of(-3.0f) > key_of(2.5f));
  EXPECT(key_of(INFINITY) == 0x7f800000u);
  EXPECT(key_of(NAN) >= 0x7f800000u);
  const uint32_t k = 0x12345678u;
  EXPECT(((bip_fast::radix::digit1(k) << 19) | (bip_fast::radix::digit2(k) << 7) |
         bip_fast::radix::digit3(k)) == k);
  int64_t hist[4] = {1, 0, 2, 3};  // bins 0..3, take from the top
  int64_t above = -1;
  EXPECT(bip_fast::radix::select_bin(hist, 4, 3, &above) == 3 && above == 0);
  EXPECT(bip_fast::radix::select_bin(hist, 4, 4, &above) == 2 && above == 3);
  EXPECT(bip_fast::radix::select_bin(hist, 4, 6, &above) == 0 && above == 5);
  EXPECT(bip_fast::radix::select_bin(hist, 4, 7, &above) == -1);
}

// Brute force: stable order by descending |x| (float32), ties by global position.
std::vector<at::Tensor> topk_ref(const std::vector<at::Tensor>& xs, int64_t keep) {
  std::vector<uint32_t> keys;
  for (const auto& x : xs) {
    at::Tensor f = x.to(at::kFloat).contiguous();
    const float* p = f.const_data_ptr<float>();
    for (int64_t i = 0; i < f.numel(); ++i) keys.push_back(key_of(p[i]));
  }
  std::vector<int64_t> idx(keys.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return keys[a] > keys[b]; });
  std::vector<bool> flat(keys.size(), false);
  for (int64_t i = 0; i < keep; ++i) flat[idx[i]] = true;
  std::vector<at::Tensor> out;
  int64_t off = 0;
  for (const auto& x : xs) {
    at::Tensor m = at::empty(x.sizes(), at::kBool);
    bool* mp = m.data_ptr<bool>();
    for (int64_t i = 0; i < x.numel(); ++i) mp[i] = flat[off + i];
    off += x.numel();
    out.push_back(m);
  }
  return out;
}

void test_topk_masks() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("bip_fast::topk_masks", "")
                .typed<std::vector<at::Tensor>(at::TensorList, int64_t)>();
  auto op_hist = c10::Dispatcher::singleton()
                     .findSchemaOrThrow("bip_fast::topk_masks_hist", "")
                     .typed<std::vector<at::Tensor>(at::TensorList, int64_t, const at::Tensor&)>();
  auto hist = c10::Dispatcher::singleton()
                  .findSchemaOrThrow("bip_fast::radix_histogram", "")
                  .typed<at::Tensor(at::TensorList, int64_t, int64_t, int64_t, int64_t)>();
  at::manual_seed(0);
  std::vector<at::Tensor> xs = {at::randn({64, 33}), at::randint(-4, 5, {500}).to(at::kFloat),
                                at::full({7, 3}, 2.0), at::randn({70000}).to(at::kHalf),
                                at::randn({5, 6, 7}).transpose(0, 2)};
  int64_t n = 0;
  for (const auto& x : xs) n += x.numel();
  at::Tensor h1 = hist.call(xs, 19, 12, 0, 31);
  EXPECT(h1.sum().item<int64_t>() == n);
  for (int64_t keep : {int64_t(0), int64_t(1), int64_t(17), int64_t(1000), n / 2, n - 1, n}) {
    auto got = op.call(xs, keep);
    auto got_h = op_hist.call(xs, keep, h1);
    auto want = topk_ref(xs, keep);
    EXPECT(got.size() == xs.size());
    int64_t total = 0;
    for (size_t i = 0; i < xs.size(); ++i) {
      EXPECT(got[i].sizes() == xs[i].sizes());
      EXPECT(got[i].is_contiguous());
      EXPECT(at::equal(got[i], want[i]));
      EXPECT(at::equal(got_h[i], want[i]));
      total += got[i].sum().item<int64_t>();
    }
    EXPECT(total == keep);
  }
}

void test_elementwise() {
  auto mw = c10::Dispatcher::singleton()
                .findSchemaOrThrow("bip_fast::masked_weight", "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  at::Tensor theta = at::randn({40, 9});
  at::Tensor mask = at::rand({40, 9}) > 0.5;
  EXPECT(at::equal(mw.call(theta, mask), theta * mask));

  auto sgd = c10::Dispatcher::singleton()
                 .findSchemaOrThrow("bip_fast::fused_sgd_", "")
                 .typed<void(at::TensorList, at::TensorList, at::TensorList, double, double, double,
                             const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  at::Tensor p = at::randn({1000}), g = at::randn({1000}), b = at::randn({1000});
  at::Tensor d = g + 1e-4 * p;
  at::Tensor b_want = 0.9 * b + d;
  at::Tensor p_want = p - 0.1 * b_want;
  at::Tensor h = at::zeros({4096}, at::kLong);
  std::vector<at::Tensor> ps{p}, gs{g}, bs{b};
  sgd.call(ps, gs, bs, 0.1, 0.9, 1e-4, h, std::nullopt);
  EXPECT(at::allclose(b, b_want, 1e-6, 1e-6));
  EXPECT(at::allclose(p, p_want, 1e-6, 1e-6));
  EXPECT(h.sum().item<int64_t>() == 1000);
  // skip = true: nothing changes, the histogram still counts every param.
  at::Tensor p0 = p.clone(), b0 = b.clone();
  h.zero_();
  sgd.call(ps, gs, bs, 0.1, 0.9, 1e-4, h, at::ones({}, at::kBool));
  EXPECT(at::equal(p, p0));
  EXPECT(at::equal(b, b0));
  EXPECT(h.sum().item<int64_t>() == 1000);
}

}  // namespace

int main() {
  test_radix_key();
  test_topk_masks();
  test_elementwise();
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("all C++ checks passed\n");
  return 0;
}
