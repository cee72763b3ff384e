// Helpers shared by the CPU kernels: input checks, multi-tensor chunking, per-dtype dispatch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/radix.h"

namespace bip_fast {
namespace cpu {

// Dispatch over the float dtypes every kernel supports (math in at::opmath_type<scalar_t>).
#define BIP_FAST_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

// Below this many elements in total an op runs on the calling thread only.
constexpr int64_t kSerialNumel = 1 << 16;

// A contiguous range [begin, end) of one tensor of a multi-tensor op; offset is its start in
// the virtual concatenation of all tensors. Chunks are listed in (tensor index, begin) order,
// which is the tie-break order of topk_masks.
struct Chunk {
  int tensor;
  int64_t begin;
  int64_t end;
  int64_t offset;
};

// Splits tensors of the given sizes into chunks of at most ~total / (8 * threads) elements
// (at least 32K), so that every thread gets several chunks.
inline std::vector<Chunk> make_chunks(const std::vector<int64_t>& numels) {
  int64_t total = 0;
  for (auto n : numels) total += n;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t chunk = total / (threads * 8) + 1;
  chunk = std::min<int64_t>(std::max<int64_t>(chunk, 1 << 15), 1 << 21);
  std::vector<Chunk> chunks;
  int64_t offset = 0;
  for (const auto t : c10::irange(numels.size())) {
    for (int64_t b = 0; b < numels[t]; b += chunk) {
      chunks.push_back({static_cast<int>(t), b, std::min(numels[t], b + chunk), offset + b});
    }
    offset += numels[t];
  }
  return chunks;
}

// Runs f(chunk_begin, chunk_end) over contiguous ranges of chunk indices, balanced by element
// count (not by chunk count: one small tensor is one small chunk). Runs on the calling thread
// when `work` (elements to touch) is small. f may be called several times per thread.
template <typename F>
inline void parallel_chunks(const std::vector<Chunk>& chunks, int64_t total, int64_t work,
                            const F& f) {
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  if (nchunks == 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), nchunks);
  if (work < kSerialNumel || threads <= 1 || at::in_parallel_region()) {
    f(0, nchunks);
    return;
  }
  // bound[t] = first chunk starting at or after t * total / threads.
  std::vector<int64_t> bound(threads + 1, nchunks);
  int64_t c = 0;
  for (int64_t t = 0; t < threads; ++t) {
    const int64_t start = total / threads * t + std::min<int64_t>(t, total % threads);
    while (c < nchunks && chunks[c].offset < start) ++c;
    bound[t] = c;
  }
  at::parallel_for(0, threads, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      if (bound[t] < bound[t + 1]) f(bound[t], bound[t + 1]);
    }
  });
}

inline void check_float_cpu(const at::Tensor& t, const char* what, int64_t idx = -1) {
  TORCH_CHECK(t.defined(), what, (idx >= 0 ? "[" + std::to_string(idx) + "]" : ""),
              " is undefined");
  TORCH_CHECK(t.device().is_cpu(), what,
              (idx >= 0 ? "[" + std::to_string(idx) + "]" : ""), " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), what,
              (idx >= 0 ? "[" + std::to_string(idx) + "]" : ""),
              " must be a floating tensor (float32/float16/bfloat16), got ", t.scalar_type());
}

// Radix key of element i of a typed buffer: half/bfloat16 upcast exactly, float64 rounds to
// float32 (the key is defined on float32); the float32 path reads the bits directly.
template <typename T>
inline uint32_t key_at(const T* p, int64_t i) {
  return radix::key_of(static_cast<float>(p[i]));
}
template <>
inline uint32_t key_at<float>(const float* p, int64_t i) {
  return reinterpret_cast<const uint32_t*>(p)[i] & radix::kAbsMask;
}

}  // namespace cpu
}  // namespace bip_fast
