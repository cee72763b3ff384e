// CPU elementwise ops: masked_weight, masked_weight_backward, fused_sgd_.
//
// All three are memory bound, one pass each:
//   masked_weight           read theta (T) + mask (1 B), write z (T)
//   masked_weight_backward  read grad, theta, mask, scores; write dtheta and/or gscores
//   fused_sgd_              read p, g, b; write p, b (+ optional D1 histogram of the new p,
//                           taken from the block just written, still in L1)
// Math in at::opmath_type<T> (float32 for float16/bfloat16). Parallel over elements (or
// multi-tensor chunks) with a grain so small tensors stay on the calling thread; inner loops
// are plain and branch-free so the compiler vectorises them at -O3.
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <tuple>

#include "cpu_utils.h"

namespace bip_fast {
namespace cpu {
namespace {

constexpr int64_t kGrain = 1 << 15;

// The float32 hot loops below are compiled for several ISAs and picked at load time (GCC
// ifunc): the extension is built without -march, so this is what gets AVX2/AVX-512 where the CPU
// has them. The build uses -ffp-contract=off, so no clone fuses a multiply-add: every clone
// rounds exactly like the op-by-op PyTorch expression (same operation order as the reference).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define BIP_FAST_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define BIP_FAST_MULTIVERSION
#endif

// One pass of the straight-through backward for float32 (both outputs, or one of them):
//   dtheta = m * g ;  gscores = sgn(s) * (theta * g - ig * m * g * g)
BIP_FAST_MULTIVERSION
void mwb_both_f32(const float* __restrict g, const float* __restrict t, const uint8_t* __restrict m,
                  const float* __restrict s, float* __restrict dt, float* __restrict ds, int64_t n,
                  float ig) {
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i], mi = static_cast<float>(m[i]);
    const float sg = s[i] < 0.0f ? -1.0f : 1.0f;
    dt[i] = gi * mi;
    ds[i] = sg * (t[i] * gi - ig * mi * gi * gi);
  }
}

BIP_FAST_MULTIVERSION
void mwb_scores_f32(const float* __restrict g, const float* __restrict t, const uint8_t* __restrict m,
                    const float* __restrict s, float* __restrict ds, int64_t n, float ig) {
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i], mi = static_cast<float>(m[i]);
    const float sg = s[i] < 0.0f ? -1.0f : 1.0f;
    ds[i] = sg * (t[i] * gi - ig * mi * gi * gi);
  }
}

BIP_FAST_MULTIVERSION
void mw_mul_f32(const float* __restrict a, const uint8_t* __restrict m, float* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] * static_cast<float>(m[i]);
}

void check_same_shape(const at::Tensor& a, const at::Tensor& b, const char* op, const char* an,
                      const char* bn) {
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": ", bn, " must have the shape of ", an, " ",
              a.sizes(), ", got ", b.sizes());
}

void check_bool_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kBool, op, ": ", name, " must be bool, got ",
              t.scalar_type());
}

at::Tensor masked_weight_cpu(const at::Tensor& theta, const at::Tensor& mask) {
  const char* op = "bip_fast::masked_weight";
  check_float_cpu(theta, "bip_fast::masked_weight: theta");
  check_bool_cpu(mask, op, "mask");
  check_same_shape(theta, mask, op, "theta", "mask");
  const at::Tensor t = theta.contiguous();
  const at::Tensor m = mask.contiguous();
  at::Tensor out = at::empty(theta.sizes(), theta.options().memory_format(at::MemoryFormat::Contiguous));
  BIP_FAST_DISPATCH_FLOATS(t.scalar_type(), "masked_weight_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const uint8_t* mp = reinterpret_cast<const uint8_t*>(m.const_data_ptr<bool>());
    scalar_t* op_ = out.data_ptr<scalar_t>();
    if constexpr (std::is_same_v<scalar_t, float>) {
      at::parallel_for(0, t.numel(), kGrain, [&](int64_t b, int64_t e) {
        // (reinterpret_cast: this branch only runs for float; it must still compile for others)
        mw_mul_f32(reinterpret_cast<const float*>(tp) + b, mp + b, reinterpret_cast<float*>(op_) + b, e - b);
      });
      return;
    }
    at::parallel_for(0, t.numel(), kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        op_[i] = static_cast<scalar_t>(static_cast<opmath_t>(tp[i]) * static_cast<opmath_t>(mp[i]));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> masked_weight_backward_cpu(
    const at::Tensor& grad, const at::Tensor& theta, const at::Tensor& mask,
    const at::Tensor& scores, double ig_scale, bool need_theta, bool need_scores) {
  const char* op = "bip_fast::masked_weight_backward";
  check_float_cpu(grad, "bip_fast::masked_weight_backward: grad");
  check_float_cpu(theta, "bip_fast::masked_weight_backward: theta");
  check_float_cpu(scores, "bip_fast::masked_weight_backward: scores");
  check_bool_cpu(mask, op, "mask");
  check_same_shape(theta, grad, op, "theta", "grad");
  check_same_shape(theta, mask, op, "theta", "mask");
  check_same_shape(theta, scores, op, "theta", "scores");

  at::Tensor dtheta = need_theta
      ? at::empty(theta.sizes(), theta.options().memory_format(at::MemoryFormat::Contiguous))
      : at::empty({0}, theta.options());
  at::Tensor gscores = need_scores
      ? at::empty(scores.sizes(), scores.options().memory_format(at::MemoryFormat::Contiguous))
      : at::empty({0}, scores.options());
  if (!need_theta && !need_scores) return {dtheta, gscores};

  // grad is read in theta's dtype (autograd hands grad in the dtype of z = theta * mask).
  const at::Tensor g = grad.to(theta.scalar_type()).contiguous();
  const at::Tensor t = theta.contiguous();
  const at::Tensor m = mask.contiguous();
  const at::Tensor s = need_scores ? scores.contiguous() : scores;
  const int64_t n = theta.numel();

  BIP_FAST_DISPATCH_FLOATS(t.scalar_type(), "masked_weight_backward_cpu", [&] {
    using T = scalar_t;
    using opmath_t = at::opmath_type<T>;
    const T* gp = g.const_data_ptr<T>();
    const T* tp = t.const_data_ptr<T>();
    const uint8_t* mp = reinterpret_cast<const uint8_t*>(m.const_data_ptr<bool>());
    if constexpr (std::is_same_v<T, float>) {
      // float32 weights and scores: one fused pass over g (the common case).
      if (s.scalar_type() == at::kFloat) {
        const float* sp = need_scores ? s.const_data_ptr<float>() : nullptr;
        float* dp = need_theta ? reinterpret_cast<float*>(dtheta.data_ptr<T>()) : nullptr;
        float* op_ = need_scores ? gscores.data_ptr<float>() : nullptr;
        const float ig = static_cast<float>(ig_scale);
        const float* gf = reinterpret_cast<const float*>(gp);
        const float* tf = reinterpret_cast<const float*>(tp);
        at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
          if (need_theta && need_scores) {
            mwb_both_f32(gf + b, tf + b, mp + b, sp + b, dp + b, op_ + b, e - b, ig);
          } else if (need_scores) {
            mwb_scores_f32(gf + b, tf + b, mp + b, sp + b, op_ + b, e - b, ig);
          } else {
            mw_mul_f32(gf + b, mp + b, dp + b, e - b);
          }
        });
        return;
      }
    }
    if (need_theta) {
      T* dp = dtheta.data_ptr<T>();
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          dp[i] = static_cast<T>(static_cast<opmath_t>(gp[i]) * static_cast<opmath_t>(mp[i]));
        }
      });
    }
    if (need_scores) {
      BIP_FAST_DISPATCH_FLOATS(s.scalar_type(), "masked_weight_backward_cpu_scores", [&] {
        using S = scalar_t;
        // float32 math (float64 when both are float64).
        using acc_t = std::conditional_t<std::is_same_v<T, double> && std::is_same_v<S, double>,
                                         double, float>;
        const S* sp = s.const_data_ptr<S>();
        S* op_ = gscores.data_ptr<S>();
        const acc_t ig = static_cast<acc_t>(ig_scale);
        at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            const acc_t gi = static_cast<acc_t>(gp[i]);
            const acc_t ti = static_cast<acc_t>(tp[i]);
            const acc_t mi = static_cast<acc_t>(mp[i]);
            const acc_t sg = static_cast<acc_t>(sp[i]) < acc_t(0) ? acc_t(-1) : acc_t(1);
            op_[i] = static_cast<S>(sg * (ti * gi - ig * mi * gi * gi));
          }
        });
      });
    }
  });
  return {dtheta, gscores};
}


BIP_FAST_MULTIVERSION
void sgd_block_f32(float* __restrict p, const float* __restrict g, float* __restrict buf,
                   int64_t n, float lr, float mom, float wd) {
  for (int64_t i = 0; i < n; ++i) {
    const float pi = p[i];
    const float d = g[i] + wd * pi;
    const float bi = mom * buf[i] + d;
    buf[i] = bi;
    p[i] = pi - lr * bi;
  }
}

// One block of the SGD update (PyTorch semantics, dampening 0), p and buf in place.
template <typename T>
inline void sgd_block(T* __restrict p, const T* __restrict g, T* __restrict buf, int64_t n,
                      double lr, double mom, double wd) {
  if constexpr (std::is_same_v<T, float>) {
    sgd_block_f32(p, g, buf, n, static_cast<float>(lr), static_cast<float>(mom),
                  static_cast<float>(wd));
    return;
  }
  using acc_t = at::opmath_type<T>;
  const acc_t alr = static_cast<acc_t>(lr), amom = static_cast<acc_t>(mom),
              awd = static_cast<acc_t>(wd);
  for (int64_t i = 0; i < n; ++i) {
    const acc_t pi = static_cast<acc_t>(p[i]);
    const acc_t d = static_cast<acc_t>(g[i]) + awd * pi;
    const acc_t bi = amom * static_cast<acc_t>(buf[i]) + d;
    buf[i] = static_cast<T>(bi);
    p[i] = static_cast<T>(pi - alr * bi);
  }
}

template <typename T>
inline void sgd_block_nobuf(T* __restrict p, const T* __restrict g, int64_t n, double lr,
                            double wd) {
  using acc_t = at::opmath_type<T>;
  const acc_t alr = static_cast<acc_t>(lr), awd = static_cast<acc_t>(wd);
  for (int64_t i = 0; i < n; ++i) {
    const acc_t pi = static_cast<acc_t>(p[i]);
    const acc_t d = static_cast<acc_t>(g[i]) + awd * pi;
    p[i] = static_cast<T>(pi - alr * d);
  }
}

void fused_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   double lr, double momentum, double weight_decay,
                   const std::optional<at::Tensor>& hist1, const std::optional<at::Tensor>& skip) {
  const char* op = "bip_fast::fused_sgd_";
  const size_t nt = params.size();
  TORCH_CHECK(grads.size() == nt, op, ": grads must have one tensor per param (", nt, "), got ",
              grads.size());
  const bool use_buf = !momentum_buffers.empty();
  TORCH_CHECK(momentum_buffers.size() == nt || (!use_buf && momentum == 0.0), op,
              ": momentum_buffers must have one tensor per param (", nt, "), got ",
              momentum_buffers.size(), " (an empty list is allowed only with momentum == 0)");
  const bool want_hist = hist1.has_value() && hist1->defined();
  if (want_hist) {
    TORCH_CHECK(hist1->device().is_cpu(), op, ": hist1 must be a CPU tensor, got ", hist1->device());
    TORCH_CHECK(hist1->scalar_type() == at::kLong, op, ": hist1 must be int64, got ",
                hist1->scalar_type());
    TORCH_CHECK(hist1->dim() == 1 && hist1->numel() == radix::kRadixBins, op,
                ": hist1 must have shape (4096,), got ", hist1->sizes());
    TORCH_CHECK(hist1->is_contiguous(), op, ": hist1 must be contiguous");
  }
  // skip (one bool): when true nothing is updated; hist1 still receives the params' histogram.
  bool skipped = false;
  if (skip.has_value() && skip->defined()) {
    TORCH_CHECK(skip->device().is_cpu(), op, ": skip must be a CPU tensor, got ", skip->device());
    TORCH_CHECK(skip->scalar_type() == at::kBool && skip->numel() == 1, op,
                ": skip must be a one-element bool tensor, got ", skip->scalar_type(), " ",
                skip->sizes());
    skipped = skip->item<bool>();
  }
  if (skipped && !want_hist) return;

  // Work tensors: contiguous params/buffers are updated in place; others via a copy + copy_.
  std::vector<at::Tensor> p(nt), g(nt), b(nt);
  std::vector<int64_t> numels(nt);
  int64_t total = 0;
  for (const auto i : c10::irange(nt)) {
    const auto ii = static_cast<int64_t>(i);
    check_float_cpu(params[i], "bip_fast::fused_sgd_: params", ii);
    check_float_cpu(grads[i], "bip_fast::fused_sgd_: grads", ii);
    TORCH_CHECK(grads[i].sizes() == params[i].sizes(), op, ": grads[", i,
                "] must have the shape of params[", i, "] ", params[i].sizes(), ", got ",
                grads[i].sizes());
    p[i] = params[i].contiguous();
    g[i] = grads[i].to(params[i].scalar_type()).contiguous();
    if (use_buf) {
      check_float_cpu(momentum_buffers[i], "bip_fast::fused_sgd_: momentum_buffers", ii);
      TORCH_CHECK(momentum_buffers[i].sizes() == params[i].sizes() &&
                      momentum_buffers[i].scalar_type() == params[i].scalar_type(),
                  op, ": momentum_buffers[", i, "] must match params[", i, "] in shape and dtype (",
                  params[i].sizes(), ", ", params[i].scalar_type(), "), got (",
                  momentum_buffers[i].sizes(), ", ", momentum_buffers[i].scalar_type(), ")");
      b[i] = momentum_buffers[i].contiguous();
    }
    numels[i] = params[i].numel();
    total += numels[i];
  }

  const std::vector<Chunk> chunks = make_chunks(numels);
  int64_t* hout = want_hist ? hist1->data_ptr<int64_t>() : nullptr;
  std::mutex mu;
  constexpr int64_t kBlock = 2048;
  parallel_chunks(chunks, total, total, [&](int64_t cb, int64_t ce) {
    std::vector<uint32_t> h(want_hist ? radix::kRadixBins : 0, 0);
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[c];
      BIP_FAST_DISPATCH_FLOATS(p[ch.tensor].scalar_type(), "fused_sgd_cpu", [&] {
        scalar_t* pp = p[ch.tensor].data_ptr<scalar_t>();
        const scalar_t* gp = g[ch.tensor].const_data_ptr<scalar_t>();
        scalar_t* bp = use_buf ? b[ch.tensor].data_ptr<scalar_t>() : nullptr;
        for (int64_t i0 = ch.begin; i0 < ch.end; i0 += kBlock) {
          const int64_t n = std::min(kBlock, ch.end - i0);
          if (skipped) {
            // no update: only the histogram below
          } else if (use_buf) {
            sgd_block(pp + i0, gp + i0, bp + i0, n, lr, momentum, weight_decay);
          } else {
            sgd_block_nobuf(pp + i0, gp + i0, n, lr, weight_decay);
          }
          if (want_hist) {
            for (int64_t i = i0; i < i0 + n; ++i) h[key_at(pp, i) >> radix::kD1Shift]++;
          }
        }
      });
    }
    if (want_hist) {
      std::lock_guard<std::mutex> lock(mu);
      for (int i = 0; i < radix::kRadixBins; ++i) hout[i] += static_cast<int64_t>(h[i]);
    }
  });

  if (skipped) return;
  for (const auto i : c10::irange(nt)) {
    if (!p[i].is_same(params[i])) params[i].copy_(p[i]);
    if (use_buf && !b[i].is_same(momentum_buffers[i])) momentum_buffers[i].copy_(b[i]);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(bip_fast, CPU, m) {
  m.impl("masked_weight", &masked_weight_cpu);
  m.impl("masked_weight_backward", &masked_weight_backward_cpu);
  m.impl("fused_sgd_", &fused_sgd_cpu);
}

}  // namespace cpu
}  // namespace bip_fast
